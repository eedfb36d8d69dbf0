//! Webhooks: the outbox dispatcher and Standard Webhooks signatures.
//!
//! Events are written to the outbox in the same transaction as the state change that causes
//! them. A dispatcher on every instance claims due events (PostgreSQL: `FOR UPDATE SKIP LOCKED`),
//! delivers each with a signature, and settles it: delivered on 2xx, dead on 410 or once the
//! retry budget is spent, otherwise retried later with exponential backoff and jitter. Delivery
//! is at-least-once with a stable `webhook-id`; events of one upload go out in order.

pub mod precreate;

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{KeyInit, Mac};
use rand::Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    model::now_ms,
    repo::{EventOutcome, EventRow, Repo},
    uploads::{links::DownloadLinks, types::UploadId},
};

/// A webhook signing secret, `whsec_<base64>` as the Standard Webhooks spec writes them.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl Secret {
    pub fn parse(value: &str) -> Result<Self, String> {
        let encoded = value.trim().strip_prefix("whsec_").unwrap_or(value.trim());
        let key =
            STANDARD.decode(encoded).map_err(|_| "a webhook secret is 'whsec_' followed by base64".to_string())?;
        if key.len() < 16 {
            return Err("a webhook secret should hold at least 16 bytes".into());
        }
        Ok(Self(key))
    }
}

/// `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` per secret,
/// space-separated (two secrets while rotating).
pub fn sign(secrets: &[Secret], id: &str, timestamp: i64, body: &str) -> String {
    secrets
        .iter()
        .map(|secret| {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&secret.0).expect("HMAC takes keys of any size");
            mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
            format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: Option<String>,
    pub secrets: Vec<Secret>,
    /// Per delivery; well under gunicorn's 30 s.
    pub timeout: Duration,
    /// After this long without a 2xx, an event is marked dead.
    pub retry_budget: Duration,
    /// First retry delay; doubles per attempt up to an hour, with jitter.
    pub retry_min: Duration,
    /// Signs the `download_url` of each `upload.completed` delivery.
    pub links: Option<Arc<DownloadLinks>>,
}

/// A claimed event is held for the delivery timeout plus this margin; if the instance dies
/// mid-delivery, another instance retries it then (and the upload's later events wait that long).
const CLAIM_MARGIN: Duration = Duration::from_secs(5);
/// How often the dispatcher looks for due events when it has nothing to do.
const POLL: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

pub struct Dispatcher {
    repo: Arc<dyn Repo>,
    settings: WebhookSettings,
    client: reqwest::Client,
}

impl Dispatcher {
    pub fn new(repo: Arc<dyn Repo>, settings: WebhookSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { repo, settings, client })
    }

    /// Delivers events until `shutdown`; without a webhook URL, events are only recorded.
    pub fn spawn(self, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
        let url = self.settings.url.clone()?;
        Some(tokio::spawn(async move {
            loop {
                let delivered = tokio::select! {
                    () = shutdown.cancelled() => break,
                    result = self.deliver_one(&url) => result,
                };
                match delivered {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "webhook dispatch failed"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        }))
    }

    /// Claims and delivers one due event; false when none was due.
    pub async fn deliver_one(&self, url: &str) -> anyhow::Result<bool> {
        let now = now_ms();
        let lease = (self.settings.timeout + CLAIM_MARGIN).as_millis() as i64;
        let Some(event) = self.repo.claim_event(now, now + lease).await? else {
            return Ok(false);
        };
        let outcome = self.attempt(url, &event).await;
        match &outcome {
            EventOutcome::Delivered { .. } => {
                tracing::info!(event = %event.id, kind = %event.event_type, upload = %event.upload_id, "webhook delivered")
            }
            EventOutcome::Retry { error, .. } => {
                tracing::warn!(event = %event.id, attempt = event.attempts, %error, "webhook delivery failed; will retry")
            }
            EventOutcome::Dead { error, .. } => {
                tracing::error!(event = %event.id, attempts = event.attempts, %error, "webhook event is dead")
            }
        }
        self.repo.settle_event(event.seq, &outcome).await?;
        Ok(true)
    }

    async fn attempt(&self, url: &str, event: &EventRow) -> EventOutcome {
        let timestamp = now_ms() / 1000;
        let payload = match &self.settings.links {
            Some(links) if event.event_type == "upload.completed" => with_download_url(links, &event.payload, now_ms()),
            _ => event.payload.clone(),
        };
        let mut request = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .body(payload.clone());
        if !self.settings.secrets.is_empty() {
            request = request.header("webhook-signature", sign(&self.settings.secrets, &event.id, timestamp, &payload));
        }
        let error = match request.send().await {
            Ok(response) if response.status().is_success() => return EventOutcome::Delivered { at: now_ms() },
            Ok(response) if response.status() == reqwest::StatusCode::GONE => {
                return EventOutcome::Dead { at: now_ms(), error: "the receiver answered 410: stop".into() };
            }
            Ok(response) => format!("the receiver answered {}", response.status()),
            Err(e) if e.is_timeout() => format!("no answer within {:?}", self.settings.timeout),
            Err(e) => format!("could not reach the receiver: {e}"),
        };
        let now = now_ms();
        if now - event.created_at > self.settings.retry_budget.as_millis() as i64 {
            return EventOutcome::Dead { at: now, error: format!("{error}; retry budget spent") };
        }
        EventOutcome::Retry { at: now + backoff(self.settings.retry_min, event.attempts).as_millis() as i64, error }
    }
}

/// An `upload.completed` payload with `data.download_url`: `data.url` signed from this delivery
/// on, so that a receiver that was down for a while still gets a link it can use. Payloads this
/// version did not write go out as they are.
fn with_download_url(links: &DownloadLinks, payload: &str, now: i64) -> String {
    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(payload) else {
        return payload.to_string();
    };
    let Some(data) = value.get_mut("data").and_then(|d| d.as_object_mut()) else {
        return payload.to_string();
    };
    let id = data.get("id").and_then(|v| v.as_str()).and_then(|v| v.parse::<UploadId>().ok());
    let (Some(id), Some(url)) = (id, data.get("url").and_then(|v| v.as_str()).map(str::to_string)) else {
        return payload.to_string();
    };
    let (link, expires) = links.sign(&url, id, now);
    data.insert("download_url".into(), link.into());
    data.insert("download_url_expires_at".into(), crate::uploads::links::rfc3339(expires).into());
    value.to_string()
}

/// `min * 2^(attempts - 1)`, capped at an hour, times a jitter in [0.5, 1.5) so that instances
/// recovering together do not retry in lockstep.
fn backoff(min: Duration, attempts: i64) -> Duration {
    let exponent = attempts.clamp(1, 20) as u32 - 1;
    let base = min.saturating_mul(2u32.saturating_pow(exponent)).min(MAX_BACKOFF);
    base.mul_f64(rand::rng().random_range(0.5..1.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_spec_example() {
        // The example of the Standard Webhooks specification.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = r#"{"test": 2432232314}"#;
        let signature = sign(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn two_secrets_sign_twice() {
        let a = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = Secret::parse("whsec_c2Vjb25kIHNlY3JldCBmb3Igcm90YXRpb24=").unwrap();
        let signature = sign(&[a, b], "id", 1, "{}");
        assert_eq!(signature.split(' ').count(), 2);
        assert!(signature.split(' ').all(|s| s.starts_with("v1,")));
    }

    #[test]
    fn secrets_are_checked_and_redacted() {
        assert!(Secret::parse("whsec_***").is_err());
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err());
        assert_eq!(
            format!("{:?}", Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()),
            "Secret(redacted)"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let min = Duration::from_secs(1);
        assert!(backoff(min, 1) < Duration::from_millis(1500));
        assert!(backoff(min, 4) >= Duration::from_secs(4));
        assert!(backoff(min, 40) <= MAX_BACKOFF.mul_f64(1.5));
    }
}
