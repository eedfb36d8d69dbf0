//! `POST {base-path}probe`: a body sink that tells `ferry doctor` what the proxies in front do to
//! request bodies. It lives under the tus base path so that it travels exactly the proxy path
//! uploads travel (a static segment wins over the `{id}` route). It reads the body, stores
//! nothing, and answers how many bytes arrived and when: a buffering proxy delivers the whole body
//! at once after the client has finished, a streaming one as the client sends.
//!
//! It cannot be used to make ferry work hard: bodies are capped (ferry's own 413, marked with
//! `Ferry-Probe: limit` so the doctor can tell it from a proxy's), at most [`MAX_CONCURRENT`]
//! probes run at a time per instance, and a token bucket bounds the bytes per minute; the last
//! two answer 429 with `Retry-After`. With upload tokens configured, a probe needs one too.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
    routing::post,
};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::Semaphore;

use super::{AppState, auth};

/// Response header on every probe answer: `ok`, or why ferry itself refused (`limit`, `busy`,
/// `budget`). A 413 without it came from a proxy.
pub const PROBE_HEADER: &str = "ferry-probe";
/// Probes running at once on one instance; more get 429.
pub const MAX_CONCURRENT: usize = 2;
/// The path segment after the base path.
pub const SEGMENT: &str = "probe";
/// The longest one probe may take, however its bytes trickle in: a slot is never held for ever.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The probe's limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    /// Largest body accepted; larger ones get ferry's own 413.
    pub max_size: u64,
    /// Bytes per minute all probes of this instance may take together (also the burst).
    pub budget_per_minute: u64,
}

/// The probe's shared state on one instance.
#[derive(Debug)]
pub struct Probe {
    settings: ProbeSettings,
    slots: Arc<Semaphore>,
    budget: Mutex<TokenBucket>,
}

impl Probe {
    pub fn new(settings: ProbeSettings) -> Self {
        let budget = TokenBucket::new(settings.budget_per_minute, Duration::from_secs(60), Instant::now());
        Self { settings, slots: Arc::new(Semaphore::new(MAX_CONCURRENT)), budget: Mutex::new(budget) }
    }

    fn take(&self, bytes: u64) -> Result<(), Duration> {
        self.budget.lock().unwrap_or_else(|e| e.into_inner()).take(bytes, Instant::now())
    }

    /// Returns what a body declared but never sent, so that abandoned probes cannot spend the budget.
    fn give_back(&self, bytes: u64) {
        self.budget.lock().unwrap_or_else(|e| e.into_inner()).give_back(bytes);
    }
}

/// The probe route, when enabled, behind the same token check as the tus routes.
pub fn routes(state: &AppState) -> Router<AppState> {
    if state.probe.is_none() {
        return Router::new();
    }
    Router::new()
        .route(&format!("{}{SEGMENT}", state.base_path), post(probe))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token))
}

/// A token bucket over bytes: `capacity` bytes refill evenly over `period`. A request may take
/// more than is left (the bucket goes into debt) as long as what it needs, at most the capacity,
/// is there: large requests are not starved, and the average rate stays bounded.
#[derive(Debug)]
struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(capacity: u64, period: Duration, now: Instant) -> Self {
        let capacity = capacity as f64;
        Self { capacity, per_second: capacity / period.as_secs_f64(), tokens: capacity, updated: now }
    }

    /// Takes `bytes`, or says how long until they could be taken.
    fn give_back(&mut self, bytes: u64) {
        self.tokens = (self.tokens + bytes as f64).min(self.capacity);
    }

    fn take(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
        let needed = (bytes as f64).min(self.capacity);
        if self.tokens >= needed {
            self.tokens -= bytes as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - self.tokens) / self.per_second))
        }
    }
}

fn answer(status: StatusCode, marker: &'static str, body: serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    let h = response.headers_mut();
    h.insert(PROBE_HEADER, HeaderValue::from_static(marker));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn too_large(max_size: u64) -> Response {
    let error = format!("ferry's probe takes bodies of at most {max_size} bytes (this 413 is ferry's, not a proxy's)");
    answer(StatusCode::PAYLOAD_TOO_LARGE, "limit", serde_json::json!({"error": error, "max_size": max_size}))
}

fn too_many(marker: &'static str, error: &str, wait: Duration) -> Response {
    let mut response = answer(StatusCode::TOO_MANY_REQUESTS, marker, serde_json::json!({"error": error}));
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

fn milliseconds(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

/// Reads and discards the body; answers `{"received", "first_byte_ms", "read_ms", "max_size"}`,
/// times counted from the moment the request's headers were handled.
async fn probe(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let Some(probe) = state.probe.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let max_size = probe.settings.max_size;
    let declared =
        match headers.get(header::CONTENT_LENGTH).map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok())) {
            None => None,
            Some(Some(length)) => Some(length),
            Some(None) => {
                let error = "Content-Length is not a number";
                return answer(StatusCode::BAD_REQUEST, "invalid", serde_json::json!({"error": error}));
            }
        };
    if declared.is_some_and(|length| length > max_size) {
        return too_large(max_size);
    }
    let Ok(_slot) = probe.slots.clone().try_acquire_owned() else {
        let error = format!("at most {MAX_CONCURRENT} probes run at a time; try again shortly");
        return too_many("busy", &error, Duration::from_secs(1));
    };
    let over_budget = |wait| too_many("budget", "the probe's byte budget on this instance is spent for now", wait);
    if let Some(length) = declared
        && let Err(wait) = probe.take(length)
    {
        return over_budget(wait);
    }

    let idle_timeout = state.uploads.settings().idle_timeout;
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    let mut first_byte = None;
    let unsent = |received: u64| declared.map_or(0, |length| length.saturating_sub(received));
    loop {
        let left = DEADLINE.saturating_sub(started.elapsed());
        let frame = match tokio::time::timeout(idle_timeout.min(left), stream.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, received, "probe body broke off");
                probe.give_back(unsent(received));
                let error = format!("the body broke off after {received} bytes: {e}");
                return answer(StatusCode::BAD_REQUEST, "invalid", serde_json::json!({"error": error}));
            }
            Err(_) => {
                probe.give_back(unsent(received));
                let error = if left <= idle_timeout {
                    format!("a probe may take at most {DEADLINE:?}")
                } else {
                    format!("no body bytes for {idle_timeout:?}")
                };
                return answer(StatusCode::REQUEST_TIMEOUT, "idle", serde_json::json!({"error": error}));
            }
        };
        if frame.is_empty() {
            continue;
        }
        first_byte.get_or_insert_with(|| started.elapsed());
        received += frame.len() as u64;
        if received > max_size {
            return too_large(max_size);
        }
        if declared.is_none()
            && let Err(wait) = probe.take(frame.len() as u64)
        {
            return over_budget(wait);
        }
    }
    let read = started.elapsed();
    tracing::debug!(received, ?first_byte, ?read, "probe body read");
    answer(
        StatusCode::OK,
        "ok",
        serde_json::json!({
            "received": received,
            "first_byte_ms": first_byte.map(milliseconds),
            "read_ms": milliseconds(read),
            "max_size": max_size,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refills_over_its_period() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(60, Duration::from_secs(60), start);
        assert_eq!(bucket.take(40, start), Ok(()));
        assert_eq!(bucket.take(20, start), Ok(()));
        let wait = bucket.take(10, start).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10), "a byte a second comes back");
        assert_eq!(bucket.take(10, start + Duration::from_secs(10)), Ok(()));
        // Never more than the capacity, however long it rested.
        let later = start + Duration::from_secs(3600);
        assert_eq!(bucket.take(60, later), Ok(()));
        assert!(bucket.take(1, later).is_err());
    }

    #[test]
    fn bytes_declared_but_never_sent_come_back() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100, Duration::from_secs(60), start);
        assert_eq!(bucket.take(100, start), Ok(()));
        assert!(bucket.take(1, start).is_err());
        bucket.give_back(70);
        assert_eq!(bucket.take(70, start), Ok(()));
        bucket.give_back(1000);
        assert_eq!(bucket.take(100, start), Ok(()), "never more than the capacity");
        assert!(bucket.take(1, start).is_err());
    }

    #[test]
    fn a_request_larger_than_the_budget_waits_for_a_full_bucket_and_goes_into_debt() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, Duration::from_secs(10), start);
        assert_eq!(bucket.take(25, start), Ok(()), "a full bucket lets it through");
        // 15 bytes of debt plus 10 to fill the bucket again: 25 s.
        assert_eq!(bucket.take(25, start).unwrap_err(), Duration::from_secs(25));
    }
}
