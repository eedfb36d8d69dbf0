//! One error type for every handler, with an explicit status per variant. Client errors carry a
//! readable plain-text message; server errors are logged and answered with an opaque body.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::uploads::UploadError;

/// tus's own status for a checksum mismatch.
pub const CHECKSUM_MISMATCH: u16 = 460;

/// `Retry-After` (seconds) when the database or the store does not answer.
pub const UNAVAILABLE_RETRY_AFTER: &str = "5";
/// `Retry-After` (seconds) when the store is full: space comes back when an operator or the
/// sweeper frees some.
pub const FULL_RETRY_AFTER: &str = "60";

#[derive(Debug)]
pub enum ApiError {
    /// A request header is missing or malformed (400).
    BadHeader(String),
    /// Wrong `Content-Type` for an append (415).
    UnsupportedMediaType(String),
    /// Missing or unsupported `Tus-Resumable` (412).
    UnsupportedVersion(String),
    /// No valid upload token (401).
    Unauthorized(String),
    /// Range outside the object (416).
    RangeNotSatisfiable(u64),
    Upload(UploadError),
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        Self::Upload(e)
    }
}

impl ApiError {
    pub fn bad_header(message: impl Into<String>) -> Self {
        Self::BadHeader(message.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadHeader(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::UnsupportedVersion(_) => StatusCode::PRECONDITION_FAILED,
            Self::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Upload(e) => match e {
                UploadError::NotFound(_) => StatusCode::NOT_FOUND,
                UploadError::Gone(_) => StatusCode::GONE,
                UploadError::OffsetMismatch { .. } | UploadError::Conflict(_) | UploadError::NotReady(_) => {
                    StatusCode::CONFLICT
                }
                UploadError::Forbidden(_) => StatusCode::FORBIDDEN,
                UploadError::TooLarge(_) | UploadError::PastLength(_) => StatusCode::PAYLOAD_TOO_LARGE,
                UploadError::Invalid(_)
                | UploadError::BodyCutOff(_)
                | UploadError::AlreadyComplete
                | UploadError::LengthMismatch(_)
                | UploadError::DigestMismatch(_) => StatusCode::BAD_REQUEST,
                UploadError::ChecksumMismatch => {
                    StatusCode::from_u16(CHECKSUM_MISMATCH).expect("460 is a valid status")
                }
                UploadError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
                UploadError::ShuttingDown | UploadError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                UploadError::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
                UploadError::Refused { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN),
                UploadError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl ApiError {
    /// What the client is told, whatever the protocol's format. Internal errors are logged here
    /// with their detail and told only that the log has it.
    pub fn message(&self) -> String {
        match self {
            Self::BadHeader(m)
            | Self::UnsupportedMediaType(m)
            | Self::UnsupportedVersion(m)
            | Self::Unauthorized(m) => m.clone(),
            Self::RangeNotSatisfiable(size) => format!("the range is outside the {size} bytes of this upload"),
            Self::Upload(UploadError::Internal(e)) => {
                tracing::error!(error = ?e, "request failed");
                "internal error; the details are in the server log".to_string()
            }
            Self::Upload(e) => e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.message();
        let mut response =
            (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{message}\n")).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Upload(UploadError::OffsetMismatch { expected, .. }) => {
                headers.insert("upload-offset", HeaderValue::from(*expected));
            }
            Self::UnsupportedVersion(_) => {
                headers.insert("tus-version", HeaderValue::from_static(super::tus::TUS_VERSION));
            }
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Upload(UploadError::Unavailable(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(UNAVAILABLE_RETRY_AFTER));
            }
            Self::Upload(UploadError::StorageFull(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(FULL_RETRY_AFTER));
            }
            Self::Upload(UploadError::NotReady(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::Upload(UploadError::ShuttingDown) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Self::RangeNotSatisfiable(size) => {
                if let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, value);
                }
            }
            _ => {}
        }
        response
    }
}
