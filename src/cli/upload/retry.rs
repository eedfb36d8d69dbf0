//! The retry rules of `ferry upload`, the same for both protocols: which answers are worth
//! another try, how long to wait, when to give up, and how a failure is put to the user (who
//! answered, the status, the server's own words).

use std::time::{Duration, SystemTime};

use reqwest::{Response, StatusCode, header::HeaderMap};

use super::{
    UploadArgs,
    policy::{self, human_duration},
    progress::Reporter,
};

/// Why a file's upload stopped.
pub(super) enum Failure {
    /// Give up on this file, with the reason.
    Fatal(String),
    /// The server no longer has the upload (404/410): start a new one.
    Gone(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Fatal(e.to_string())
    }
}

pub(super) fn fatal_text(failure: Failure) -> String {
    match failure {
        Failure::Fatal(message) | Failure::Gone(message) => message,
    }
}

/// Why a request failed, for retry notes and the final message.
#[derive(Debug, Clone)]
pub(super) enum Cause {
    /// No answer: connection refused, reset, DNS...
    Network(String),
    Timeout(Duration),
    /// An answer with a status that may be retried.
    Status {
        status: StatusCode,
        who: String,
        message: Option<String>,
        retry_after: Option<Duration>,
    },
    /// Reading the file failed because it changed under us.
    FileChanged(String),
}

/// The message of the I/O error a chunk's body fails with when the file got shorter.
pub(super) const FILE_SHRANK: &str = "the file got shorter while it was being uploaded";

impl Cause {
    pub(super) fn of_error(e: &reqwest::Error, timeout: Duration) -> Self {
        if e.is_timeout() {
            return Cause::Timeout(timeout);
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        let mut innermost = e.to_string();
        while let Some(error) = source {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::UnexpectedEof && io.to_string() == FILE_SHRANK {
                    return Cause::FileChanged(FILE_SHRANK.into());
                }
                use std::io::ErrorKind::*;
                let text = match io.kind() {
                    ConnectionRefused => Some("connection refused"),
                    ConnectionReset => Some("connection reset by the server"),
                    ConnectionAborted => Some("connection aborted"),
                    BrokenPipe => Some("the connection closed while the chunk was being sent"),
                    TimedOut => Some("connection timed out"),
                    _ => None,
                };
                if let Some(text) = text {
                    return Cause::Network(text.into());
                }
            }
            innermost = error.to_string();
            source = error.source();
        }
        Cause::Network(innermost)
    }

    pub(super) async fn of_response(response: Response) -> Self {
        Self::with_body(response).await.0
    }

    /// The cause, and the body it was read from (a 409's problem names the right offset).
    pub(super) async fn with_body(response: Response) -> (Self, String) {
        let status = response.status();
        let who = who(&response);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| policy::retry_after(v, SystemTime::now()));
        let problem = is_problem(response.headers());
        let body = response.text().await.unwrap_or_default();
        let message = message_in(&body, problem);
        (Cause::Status { status, who, message, retry_after }, body)
    }

    pub(super) fn detail(&self) -> Option<String> {
        match self {
            Cause::Status { message, .. } => message.clone(),
            _ => None,
        }
    }

    /// One line: what happened.
    pub(super) fn describe(&self) -> String {
        match self {
            Cause::Network(text) => text.clone(),
            Cause::Timeout(limit) => format!("no answer within {}", human_duration(*limit)),
            Cause::Status { status, who, message, .. } => match message {
                Some(message) => format!("{who} answered {}: {message}", status_text(*status)),
                None => format!("{who} answered {}", status_text(*status)),
            },
            Cause::FileChanged(text) => text.clone(),
        }
    }

    /// The closing message after `attempts` attempts.
    fn give_up(&self, attempts: u32) -> String {
        match self {
            Cause::Network(text) => format!("server unreachable after {attempts} attempts: {text}"),
            Cause::Timeout(limit) => {
                format!("no answer within {} after {attempts} attempts", human_duration(*limit))
            }
            Cause::Status { .. } => format!("giving up after {attempts} attempts: {}", self.describe()),
            Cause::FileChanged(text) => text.clone(),
        }
    }
}

/// The retry budget of one step (a chunk, a HEAD, the POST): reset by progress.
pub(super) struct Retry {
    failures: u32,
    retries: u32,
    first: Duration,
}

impl Retry {
    pub(super) fn new(args: &UploadArgs) -> Self {
        Self { failures: 0, retries: args.retries, first: args.retry_delay }
    }

    pub(super) fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a failure; fails when the budget is spent.
    pub(super) fn count(&mut self, cause: &Cause) -> Result<(), Failure> {
        self.failures += 1;
        if self.failures > self.retries {
            return Err(Failure::Fatal(cause.give_up(self.failures)));
        }
        Ok(())
    }

    /// Counts a failure and waits before the retry (backoff with jitter, or the server's
    /// `Retry-After`).
    pub(super) async fn failed(&mut self, reporter: &Reporter, name: &str, cause: Cause) -> Result<(), Failure> {
        self.count(&cause)?;
        let delay = match &cause {
            Cause::Status { retry_after: Some(after), .. } => *after,
            _ => policy::backoff(self.failures, self.first, Duration::from_secs(30), rand::random::<f64>()),
        };
        reporter.note(
            name,
            &format!(
                "{}; retrying in {} ({} of {})",
                cause.describe(),
                human_delay(delay),
                self.failures,
                self.retries
            ),
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

fn human_delay(delay: Duration) -> String {
    if delay < Duration::from_secs(10) { format!("{:.1}s", delay.as_secs_f64()) } else { human_duration(delay) }
}

/// Statuses worth retrying: the server or a proxy in front is unwell, busy or restarting, or the
/// upload is locked by a request that has not noticed its client left.
pub(super) fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::LOCKED
        || status.as_u16() == 460
}

pub(super) fn text_header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

pub(super) fn gone(status: StatusCode) -> bool {
    status == StatusCode::NOT_FOUND || status == StatusCode::GONE
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/problem+json"))
}

/// Whether the upload server answered, rather than a proxy in front of it: a tus server marks
/// every answer with `Tus-Resumable`; a server of the IETF draft answers with its fields or an
/// RFC 9457 problem, neither of which a proxy makes up.
pub(super) fn from_server(response: &Response) -> bool {
    let headers = response.headers();
    ["tus-resumable", "upload-complete", "upload-offset", "upload-limit"].iter().any(|h| headers.contains_key(*h))
        || is_problem(headers)
}

/// Who answered, for messages: "the server", or the proxy's product name ("nginx").
pub(super) fn who(response: &Response) -> String {
    if from_server(response) {
        return "the server".into();
    }
    match response.headers().get(reqwest::header::SERVER).and_then(|v| v.to_str().ok()) {
        Some(server) if !server.trim().is_empty() => {
            server.split(['/', ' ']).next().unwrap_or(server).trim().to_string()
        }
        _ => "a proxy in front of the server".into(),
    }
}

pub(super) fn status_text(status: StatusCode) -> String {
    match status.as_u16() {
        460 => "460 Checksum Mismatch".into(),
        _ => format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")).trim().to_string(),
    }
}

/// What an error body says: a problem's `detail` (or `title`), or the first line of a plain-text
/// body (HTML error pages say nothing the status does not).
pub(crate) fn message_in(body: &str, problem: bool) -> Option<String> {
    let text = body.trim();
    let line = if problem {
        let problem: serde_json::Value = serde_json::from_str(text).ok()?;
        let said = |key: &str| problem.get(key).and_then(|v| v.as_str()).map(str::trim).filter(|s| !s.is_empty());
        said("detail").or_else(|| said("title"))?.to_string()
    } else {
        if text.is_empty() || text.starts_with('<') {
            return None;
        }
        text.lines().next()?.trim().to_string()
    };
    Some(if line.chars().count() > 300 { format!("{}...", line.chars().take(300).collect::<String>()) } else { line })
}

/// A refusal that retrying will not change (401, 403, 413 from the server, other 4xx).
pub(super) async fn refused(doing: &str, response: Response) -> String {
    let status = response.status();
    let who = who(&response);
    let problem = is_problem(response.headers());
    let message = message_in(&response.text().await.unwrap_or_default(), problem);
    let mut text = format!("{who} refused {doing}: {}", status_text(status));
    if let Some(message) = message {
        text.push_str(": ");
        text.push_str(&message);
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        text.push_str(if who == "the server" {
            " (check the token: --token or FERRY_TOKEN)"
        } else {
            " (check what the proxy wants: --header, or --token / FERRY_TOKEN)"
        });
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_answered() {
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(retryable(StatusCode::LOCKED));
        assert!(!retryable(StatusCode::UNAUTHORIZED));
        assert!(!retryable(StatusCode::PAYLOAD_TOO_LARGE));
        assert_eq!(status_text(StatusCode::from_u16(460).unwrap()), "460 Checksum Mismatch");
        assert_eq!(status_text(StatusCode::PAYLOAD_TOO_LARGE), "413 Payload Too Large");
    }

    #[test]
    fn messages_of_error_bodies() {
        let conflict = r#"{"type":"https://iana.org/assignments/http-problem-types#mismatching-upload-offset",
            "title":"offset from request does not match offset of resource","status":409,
            "detail":"Upload-Offset is 3 but the upload is at offset 0","expected-offset":0}"#;
        assert_eq!(message_in(conflict, true).as_deref(), Some("Upload-Offset is 3 but the upload is at offset 0"));
        assert_eq!(message_in(r#"{"title":"Gone"}"#, true).as_deref(), Some("Gone"));
        assert_eq!(message_in("not json", true), None);
        assert_eq!(message_in("busy, come back later\nmore", false).as_deref(), Some("busy, come back later"));
        assert_eq!(message_in("<html><body>502</body></html>", false), None);
        let long = "x".repeat(400);
        assert_eq!(message_in(&long, false).unwrap().chars().count(), 303);
    }
}
