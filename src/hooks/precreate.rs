//! The pre-create hook: a synchronous call asking the application whether an upload may be
//! created, and on whose behalf.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct PreCreateSettings {
    pub url: String,
    pub timeout: Duration,
    /// Request headers passed on to the application (lower case).
    pub forward_headers: Vec<String>,
    /// The webhook secrets: when set, each call is signed as webhooks are (Standard Webhooks
    /// headers), so the application can tell ferry's calls from anyone else's.
    pub secrets: Vec<super::Secret>,
}

#[derive(Debug, Serialize)]
pub struct PreCreateRequest {
    pub length: Option<u64>,
    pub metadata: BTreeMap<String, Option<String>>,
    pub concat: Option<&'static str>,
    pub headers: BTreeMap<String, String>,
}

/// What the application allows, from a 2xx answer's (optional) JSON body.
#[derive(Debug, Default, Deserialize)]
pub struct Allowed {
    #[serde(default)]
    pub owner: Option<String>,
    /// Added to the upload's metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// A smaller size limit for this upload.
    #[serde(default)]
    pub max_size: Option<u64>,
    /// Where in the store the upload's object goes: `uploads/<key_prefix><id>`.
    #[serde(default)]
    pub key_prefix: Option<String>,
}

#[derive(Debug)]
pub enum Decision {
    Allow(Allowed),
    /// A 4xx from the application, with its message: passed on to the client.
    Deny {
        status: u16,
        message: String,
    },
    /// The application could not be asked (down, slow, or a non-4xx error).
    Unavailable(String),
}

pub struct PreCreate {
    settings: PreCreateSettings,
    client: reqwest::Client,
}

impl PreCreate {
    pub fn new(settings: PreCreateSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { settings, client })
    }

    pub fn forward_headers(&self) -> &[String] {
        &self.settings.forward_headers
    }

    pub async fn ask(&self, request: &PreCreateRequest) -> Decision {
        let body = serde_json::to_string(request).expect("the request serializes");
        let mut call = self.client.post(&self.settings.url).header("content-type", "application/json");
        if !self.settings.secrets.is_empty() {
            let id = format!("pre_{}", uuid::Uuid::new_v4().simple());
            let timestamp = crate::model::now_ms() / 1000;
            call = call
                .header("webhook-id", &id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", super::sign(&self.settings.secrets, &id, timestamp, &body));
        }
        let sent = call.body(body).send();
        let response = match sent.await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Decision::Unavailable(format!("no answer within {:?}", self.settings.timeout));
            }
            Err(e) => return Decision::Unavailable(format!("could not reach it: {e}")),
        };
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if status.is_success() {
            if body.trim().is_empty() {
                return Decision::Allow(Allowed::default());
            }
            return match serde_json::from_str::<Allowed>(&body) {
                Ok(allowed)
                    if allowed.key_prefix.as_deref().is_some_and(|p| !crate::model::parts::valid_key_prefix(p)) =>
                {
                    Decision::Unavailable(
                        "its key_prefix is not a relative path of letters, digits, '.', '_', '-' and '/'".into(),
                    )
                }
                Ok(allowed) => Decision::Allow(allowed),
                Err(e) => Decision::Unavailable(format!("its answer is not the expected JSON: {e}")),
            };
        }
        if status.is_client_error() {
            // `{"message": "..."}` or plain text.
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or_else(|| body.trim().to_string());
            let message = if message.is_empty() { "the upload was refused".to_string() } else { message };
            return Decision::Deny { status: status.as_u16(), message };
        }
        Decision::Unavailable(format!("it answered {status}"))
    }
}
