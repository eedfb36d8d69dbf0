//! HTTP's own resumable uploads (draft-ietf-httpbis-resumable-upload): creation with
//! `Upload-Complete`, offset retrieval (HEAD, GET), append (PATCH with
//! `application/partial-upload`), cancellation (DELETE), `104 Upload Resumption Supported`, and
//! errors as `application/problem+json`. Interop versions 5 and 6 (the drafts tus-js-client and
//! URLSession on iOS 18 speak) and 7 to 9 (-10 to -12) are served; the domain behind is the one
//! tus uses.

use axum::{
    Extension,
    body::Body,
    response::{IntoResponse, Response},
};
use http::{HeaderMap, HeaderValue, StatusCode, Version, header};

use super::{
    AppState,
    auth::Caller,
    connection::Connection,
    error::ApiError,
    fields::{self, Field},
    headers,
    tus::{self, UploadRef},
};
use crate::config::InterimResponses;
use crate::uploads::{
    AppendRequest, CreateConcat, Upload, UploadError,
    types::{Checksum, ChecksumAlgorithm, ChecksumPlan, Metadata, UploadState},
};

/// The interop version of the newest draft served (-12).
pub const LATEST: u64 = 9;
/// The interop versions served; a request naming another gets no `104` and the newest draft's
/// rules, as the draft says.
pub const SUPPORTED: std::ops::RangeInclusive<u64> = 5..=9;
pub const INTEROP_HEADER: &str = "upload-draft-interop-version";
pub const PARTIAL_UPLOAD: &str = "application/partial-upload";

const PROBLEM_BASE: &str = "https://iana.org/assignments/http-problem-types#";

/// Which draft a request follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interop {
    /// The version the request named, when it is one served (then `104`s echo it).
    pub named: Option<u64>,
    /// The draft whose rules apply.
    pub version: u64,
}

impl Interop {
    pub fn of(request: &HeaderMap) -> Self {
        match fields::integer(request, INTEROP_HEADER) {
            Field::Valid(v) if SUPPORTED.contains(&v) => Self { named: Some(v), version: v },
            _ => Self { named: None, version: LATEST },
        }
    }

    /// Interop 5 and 6 (-03 to -05): incomplete creations and appends answer 201, a PATCH
    /// without `Upload-Complete` is not the last one.
    fn early(self) -> bool {
        self.version <= 6
    }
}

/// Whether a request without `Tus-Resumable` follows the IETF draft.
pub fn speaks(method: &http::Method, request: &HeaderMap) -> bool {
    request.contains_key("upload-complete")
        || request.contains_key(INTEROP_HEADER)
        || (method == http::Method::PATCH && content_type_is(request, PARTIAL_UPLOAD))
}

fn content_type_is(request: &HeaderMap, wanted: &str) -> bool {
    request
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(wanted))
}

/// `Upload-Limit`: the upload's size limit, `--max-append-size`, and `max-age` (seconds left
/// before it expires).
pub fn upload_limit(state: &AppState, max_size: Option<u64>, expires_at: Option<i64>) -> HeaderValue {
    let settings = state.uploads.settings();
    let max_size = max_size.map_or(settings.max_size, |m| m.min(settings.max_size));
    let mut members = vec![("max-size", max_size)];
    if let Some(n) = state.max_append_size {
        members.push(("max-append-size", n));
    }
    let max_age = match expires_at {
        Some(at) => ((at - crate::uploads::now_ms()).max(0) / 1000) as u64,
        None => settings.expire_after.as_secs(),
    };
    members.push(("max-age", max_age));
    fields::integer_dictionary(&members)
}

/// An error as the draft answers it: `application/problem+json` (RFC 9457), with the draft's
/// problem types where one applies, and the fields a client needs to go on.
struct Problem {
    error: ApiError,
    /// The upload's state when known: `Upload-Offset` and `Upload-Complete` on a conflict.
    complete: Option<bool>,
    limit: Option<HeaderValue>,
    location: Option<String>,
}

impl Problem {
    fn new(error: impl Into<ApiError>) -> Self {
        Self { error: error.into(), complete: None, limit: None, location: None }
    }

    fn with_limit(mut self, limit: HeaderValue) -> Self {
        self.limit = Some(limit);
        self
    }
}

impl From<ApiError> for Problem {
    fn from(error: ApiError) -> Self {
        Self::new(error)
    }
}

impl From<UploadError> for Problem {
    fn from(error: UploadError) -> Self {
        Self::new(error)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let Problem { error, complete, limit, location } = self;
        let mut status = error.status();
        let mut body = serde_json::Map::new();
        let mut headers = HeaderMap::new();
        let (kind, title) = match &error {
            ApiError::Upload(UploadError::OffsetMismatch { expected, provided }) => {
                body.insert("expected-offset".into(), (*expected).into());
                body.insert("provided-offset".into(), (*provided).into());
                headers.insert("upload-offset", HeaderValue::from(*expected));
                headers.insert("upload-complete", fields::boolean_value(complete.unwrap_or(false)));
                (Some("mismatching-upload-offset"), "offset from request does not match offset of resource")
            }
            ApiError::Upload(UploadError::LengthMismatch(_) | UploadError::PastLength(_)) => {
                status = StatusCode::BAD_REQUEST;
                headers.insert("upload-complete", fields::boolean_value(complete.unwrap_or(false)));
                (Some("inconsistent-upload-length"), "inconsistent length values for upload")
            }
            ApiError::Upload(UploadError::AlreadyComplete) => {
                headers.insert("upload-complete", fields::boolean_value(true));
                (Some("completed-upload"), "upload is already completed")
            }
            ApiError::Upload(UploadError::TooLarge(_)) => (None, "the upload exceeds a limit"),
            ApiError::Upload(UploadError::ChecksumMismatch) => (None, "Content-Digest does not match the content"),
            ApiError::Upload(UploadError::DigestMismatch(_)) => (None, "Repr-Digest does not match the upload"),
            ApiError::Upload(UploadError::NotReady(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                (None, "the upload is being assembled")
            }
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                (None, "an upload token is required")
            }
            ApiError::Upload(UploadError::ShuttingDown) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                (None, "try again shortly")
            }
            ApiError::Upload(UploadError::Unavailable(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(super::error::UNAVAILABLE_RETRY_AFTER));
                (None, "a service ferry depends on is not answering")
            }
            ApiError::Upload(UploadError::StorageFull(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(super::error::FULL_RETRY_AFTER));
                (None, "insufficient storage")
            }
            _ => (None, status.canonical_reason().unwrap_or("error")),
        };
        if matches!(error, ApiError::Upload(UploadError::ChecksumMismatch)) {
            // tus's 460 has no meaning here.
            status = StatusCode::BAD_REQUEST;
        }
        let detail = match &error {
            ApiError::Upload(UploadError::ChecksumMismatch) => {
                "the content does not match Content-Digest; nothing of it was kept".to_string()
            }
            other => other.message(),
        };
        body.insert(
            "type".into(),
            kind.map_or_else(|| "about:blank".to_string(), |k| format!("{PROBLEM_BASE}{k}")).into(),
        );
        body.insert("title".into(), title.into());
        body.insert("status".into(), status.as_u16().into());
        body.insert("detail".into(), detail.into());
        let mut response = (status, serde_json::Value::Object(body).to_string()).into_response();
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        h.extend(headers);
        if let Some(limit) = limit {
            h.insert("upload-limit", limit);
        }
        if let Some(location) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            h.insert(header::LOCATION, location);
        }
        response
    }
}

/// `Content-Digest` of one request: verified like tus's `Upload-Checksum` (sha-256 or sha-512;
/// other algorithms are ignored, as RFC 9530 allows).
fn content_digest(request: &HeaderMap) -> ChecksumPlan {
    let Field::Valid(digests) = fields::digests(request, "content-digest") else {
        return ChecksumPlan::None;
    };
    for (name, algorithm) in [("sha-512", ChecksumAlgorithm::Sha512), ("sha-256", ChecksumAlgorithm::Sha256)] {
        if let Some((_, digest)) = digests.iter().find(|(n, _)| n == name) {
            return ChecksumPlan::Header(Checksum { algorithm, digest: digest.clone() });
        }
    }
    ChecksumPlan::None
}

/// The whole upload's SHA-256 announced with `Repr-Digest` at creation. ferry keeps only a
/// SHA-256 of whole uploads, so other algorithms are not checked (RFC 9530 lets a recipient
/// ignore what it does not compute).
fn repr_digest(request: &HeaderMap) -> Result<Option<[u8; 32]>, Problem> {
    let Field::Valid(digests) = fields::digests(request, "repr-digest") else {
        return Ok(None);
    };
    match digests.into_iter().find(|(name, _)| name == "sha-256") {
        None => Ok(None),
        Some((_, digest)) => digest.try_into().map(Some).map_err(|d: Vec<u8>| {
            Problem::new(ApiError::bad_header(format!("Repr-Digest sha-256 is {} bytes, not 32", d.len())))
        }),
    }
}

/// The request's `Upload-Length` and what `Upload-Complete: ?1` with `Content-Length` implies,
/// which must agree; the length to record, if known.
fn declared_length(request: &HeaderMap, offset: u64, complete: bool) -> Result<Option<u64>, Problem> {
    let declared = fields::integer(request, "upload-length").valid();
    let content_length = headers::content_length(request)?;
    let implied = complete.then_some(content_length).flatten().map(|n| offset + n);
    match (declared, implied) {
        (Some(d), Some(i)) if d != i => Err(Problem::new(UploadError::LengthMismatch(format!(
            "Upload-Length is {d} but Upload-Complete: ?1 with {} bytes of content at offset {offset} makes it {i}",
            i - offset
        )))),
        (Some(d), _) if content_length.is_some_and(|n| offset + n > d) => {
            Err(Problem::new(UploadError::LengthMismatch(format!(
                "{} bytes of content at offset {offset} go past Upload-Length {d}",
                content_length.unwrap_or_default()
            ))))
        }
        (d, i) => Ok(d.or(i)),
    }
}

/// Whether a 104 may go to this client: proxies that do not know interim responses take one
/// for the final answer (nginx 1.22 with `proxy_http_version 1.1` passes the real answer on as
/// the body and then waits for the connection to close), so by default only clients that reach
/// ferry directly get it.
fn interim_allowed(state: &AppState, request: &HeaderMap) -> bool {
    match state.interim_responses {
        InterimResponses::Always => true,
        InterimResponses::Never => false,
        InterimResponses::Auto => {
            !state.behind_proxy
                && !["forwarded", "x-forwarded-for", "x-real-ip", "via"].iter().any(|h| request.contains_key(*h))
        }
    }
}

/// The interim response announcing the upload.
fn interim(interop: Interop, location: &str, limit: &HeaderValue) -> Option<Vec<u8>> {
    let version = interop.named?;
    let mut head = format!("HTTP/1.1 104 Upload Resumption Supported\r\n{INTEROP_HEADER}: {version}\r\n");
    head.push_str(&format!("location: {location}\r\n"));
    head.push_str(&format!("upload-limit: {}\r\n\r\n", limit.to_str().ok()?));
    Some(head.into_bytes())
}

fn metadata_of(request: &HeaderMap) -> Metadata {
    // tus-js-client sends its tus metadata in this protocol too; plain clients say what the
    // file is with Content-Type and Content-Disposition.
    let mut metadata = headers::metadata(request).unwrap_or_default();
    if let Some(kind) = request.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
        && !content_type_is(request, PARTIAL_UPLOAD)
        && metadata.text("filetype").is_none()
    {
        metadata.insert("filetype", kind.trim());
    }
    if let Some(name) = request.get(header::CONTENT_DISPOSITION).and_then(|v| v.to_str().ok()).and_then(filename)
        && metadata.text("filename").is_none()
    {
        metadata.insert("filename", &name);
    }
    metadata
}

/// `filename="…"` (or a bare token) of a `Content-Disposition`.
fn filename(disposition: &str) -> Option<String> {
    disposition.split(';').skip(1).find_map(|param| {
        let (key, value) = param.split_once('=')?;
        (key.trim().eq_ignore_ascii_case("filename")).then(|| value.trim().trim_matches('"').to_string())
    })
}

/// Creation: `POST` with `Upload-Complete` (and any content).
pub async fn create(
    state: AppState,
    interop: Interop,
    caller: Option<Extension<Caller>>,
    connection: Option<Extension<Connection>>,
    version: Version,
    request: HeaderMap,
    body: Body,
) -> Response {
    // A malformed or missing Upload-Complete is ignored: then this is a plain upload of the
    // whole content, with no 104 to resume it by.
    let complete_field = fields::boolean(&request, "upload-complete");
    let resumable = matches!(complete_field, Field::Valid(_));
    let complete = complete_field.valid().unwrap_or(true);
    let length = match declared_length(&request, 0, complete) {
        Ok(length) => length,
        Err(problem) => return problem.into_response(),
    };
    let limit = upload_limit(&state, caller.as_ref().and_then(|c| c.max_size), None);
    if let Some(length) = length
        && length > state.uploads.settings().max_size
    {
        let message =
            format!("the upload's {length} bytes exceed the maximum of {} bytes", state.uploads.settings().max_size);
        return Problem::new(UploadError::TooLarge(message)).with_limit(limit).into_response();
    }
    let content_length = match headers::content_length(&request) {
        Ok(n) => n,
        Err(e) => return Problem::new(e).into_response(),
    };
    let mut create =
        match super::admit::admit(&state, caller, &request, length, metadata_of(&request), CreateConcat::None).await {
            Ok(create) => create,
            Err(e) => return Problem::new(e).with_limit(limit).into_response(),
        };
    create.expected_sha256 = match repr_digest(&request) {
        Ok(expected) => expected,
        Err(problem) => return problem.into_response(),
    };
    let upload = match state.uploads.create(create).await {
        Ok(upload) => upload,
        Err(e) => return Problem::new(e).with_limit(limit).into_response(),
    };
    let location = tus::upload_url(&state, &request, upload.id);
    let limit = upload_limit(&state, upload.size_limit, upload.expires_at);
    if resumable
        && version == Version::HTTP_11
        && interim_allowed(&state, &request)
        && let (Some(Extension(connection)), Some(head)) = (&connection, interim(interop, &location, &limit))
    {
        connection.send_interim(&head).await;
    }

    let has_content = content_length.is_none_or(|n| n > 0);
    let mut offset = 0;
    let mut completed = length == Some(0);
    let mut sha256 = upload.sha256;
    if has_content || (complete && length.is_none()) {
        let append = AppendRequest {
            id: upload.id,
            offset: 0,
            length: None,
            checksum: content_digest(&request),
            content_length,
            owner: upload.owner.clone(),
            client: tus::client_link(connection),
            completes: complete,
        };
        match state.uploads.append(append, tus::body_stream(body)).await {
            Ok(appended) => {
                offset = appended.offset;
                completed = appended.completed;
                sha256 = appended.sha256;
            }
            Err(e) => {
                let mut problem = Problem::new(e).with_limit(limit);
                problem.location = Some(location);
                return problem.into_response();
            }
        }
    }
    // 201 whether or not this completed the upload: ferry's answer to an upload is the upload
    // resource it created.
    let mut response = StatusCode::CREATED.into_response();
    let h = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, value);
    }
    h.insert("upload-offset", HeaderValue::from(offset));
    h.insert("upload-complete", fields::boolean_value(completed));
    h.insert("upload-limit", limit);
    add_repr_digest(h, sha256);
    response
}

/// `Repr-Digest` of a complete upload (from the append that completed it: no second read).
fn add_repr_digest(h: &mut HeaderMap, sha256: Option<[u8; 32]>) {
    if let Some(sha256) = sha256 {
        h.insert("repr-digest", fields::digest_value("sha-256", &sha256));
    }
}

fn is_complete(upload: &Upload) -> bool {
    upload.state != UploadState::Receiving && upload.length == Some(upload.offset)
}

/// Offset retrieval: `HEAD` (or `GET`) on the upload.
pub async fn offset(state: AppState, upload: UploadRef) -> Response {
    let upload = match state.uploads.status(upload.id, upload.owner.as_deref()).await {
        Ok(upload) => upload,
        Err(e) => return Problem::new(e).into_response(),
    };
    // A body of no known length: axum gives a HEAD's answer the Content-Length its body would
    // have, and a 204 must have none (RFC 9110).
    let no_length = futures_util::stream::empty::<Result<bytes::Bytes, std::io::Error>>();
    let mut response = (StatusCode::NO_CONTENT, Body::from_stream(no_length)).into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("upload-offset", HeaderValue::from(upload.offset));
    h.insert("upload-complete", fields::boolean_value(is_complete(&upload)));
    if let Some(length) = upload.length {
        h.insert("upload-length", HeaderValue::from(length));
    }
    h.insert("upload-limit", upload_limit(&state, upload.size_limit, upload.expires_at));
    if let Some(sha256) = upload.sha256 {
        h.insert("repr-digest", fields::digest_value("sha-256", &sha256));
    }
    response
}

/// Append: `PATCH` with `application/partial-upload`, `Upload-Offset` and `Upload-Complete`.
pub async fn append(
    state: AppState,
    interop: Interop,
    upload: UploadRef,
    connection: Option<Extension<Connection>>,
    request: HeaderMap,
    body: Body,
) -> Response {
    let UploadRef { id, owner, max_size } = upload;
    // Interop 5 had no media type for appends; since 6 it is required.
    if interop.version >= 6 && !content_type_is(&request, PARTIAL_UPLOAD) {
        return Problem::new(ApiError::UnsupportedMediaType(format!(
            "an append must be sent as Content-Type: {PARTIAL_UPLOAD}"
        )))
        .into_response();
    }
    let Some(offset) = fields::integer(&request, "upload-offset").valid() else {
        return Problem::new(ApiError::bad_header("Upload-Offset (a non-negative Integer) is required"))
            .into_response();
    };
    let complete = match fields::boolean(&request, "upload-complete") {
        Field::Valid(c) => c,
        // The early drafts' clients leave it out of every append but the last.
        _ if interop.early() => false,
        _ => {
            return Problem::new(ApiError::bad_header("Upload-Complete (?1 or ?0) is required")).into_response();
        }
    };
    let length = match declared_length(&request, offset, complete) {
        Ok(length) => length,
        Err(problem) => return problem.into_response(),
    };
    if let (Some(limit), Some(length)) = (max_size, length)
        && length > limit
    {
        let message = format!("the upload's {length} bytes exceed the {limit} bytes your token allows");
        return Problem::new(UploadError::TooLarge(message))
            .with_limit(upload_limit(&state, max_size, None))
            .into_response();
    }
    let content_length = match headers::content_length(&request) {
        Ok(n) => n,
        Err(e) => return Problem::new(e).into_response(),
    };
    let append = AppendRequest {
        id,
        offset,
        length,
        checksum: content_digest(&request),
        content_length,
        owner: owner.clone(),
        client: tus::client_link(connection),
        completes: complete,
    };
    match state.uploads.append(append, tus::body_stream(body)).await {
        Ok(appended) => {
            let status = if !appended.completed && interop.early() {
                StatusCode::CREATED
            } else if appended.completed {
                StatusCode::OK
            } else {
                StatusCode::NO_CONTENT
            };
            let mut response = status.into_response();
            let h = response.headers_mut();
            h.insert("upload-offset", HeaderValue::from(appended.offset));
            h.insert("upload-complete", fields::boolean_value(appended.completed));
            add_repr_digest(h, appended.sha256);
            response
        }
        Err(error) => {
            let upload = state.uploads.status(id, owner.as_deref()).await.ok();
            let mut problem = Problem::new(error);
            problem.complete = upload.as_ref().map(is_complete);
            if let ApiError::Upload(UploadError::TooLarge(_)) = problem.error {
                problem.limit = upload.map(|u| upload_limit(&state, u.size_limit, u.expires_at));
            }
            problem.into_response()
        }
    }
}

/// Cancellation: `DELETE`.
pub async fn cancel(state: AppState, upload: UploadRef) -> Response {
    match state.uploads.terminate(upload.id, upload.owner.as_deref()).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => Problem::new(e).into_response(),
    }
}

/// An error answered as a problem document (for extractors of the shared handlers).
pub fn problem_response(error: ApiError) -> Response {
    Problem::new(error).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::fields::tests::headers;

    #[test]
    fn versions() {
        assert_eq!(Interop::of(&headers(&[(INTEROP_HEADER, "6")])), Interop { named: Some(6), version: 6 });
        assert_eq!(Interop::of(&headers(&[(INTEROP_HEADER, "9")])), Interop { named: Some(9), version: 9 });
        // Unknown or malformed: the newest rules, and no 104.
        for other in ["4", "10", "x", "8.0"] {
            let h = HeaderMap::from_iter([(
                http::HeaderName::from_static(INTEROP_HEADER),
                HeaderValue::from_static(other),
            )]);
            assert_eq!(Interop::of(&h), Interop { named: None, version: LATEST }, "{other}");
        }
        assert_eq!(Interop::of(&HeaderMap::new()), Interop { named: None, version: LATEST });
    }

    #[test]
    fn detection() {
        let patch = http::Method::PATCH;
        assert!(speaks(&http::Method::POST, &headers(&[("upload-complete", "?1")])));
        assert!(speaks(&http::Method::HEAD, &headers(&[(INTEROP_HEADER, "8")])));
        assert!(speaks(&patch, &headers(&[("content-type", "application/partial-upload")])));
        assert!(!speaks(&patch, &headers(&[("content-type", "application/offset+octet-stream")])));
        assert!(!speaks(&http::Method::POST, &headers(&[("upload-length", "5")])));
    }

    #[test]
    fn lengths() {
        let h = headers(&[("upload-length", "10"), ("content-length", "10")]);
        assert_eq!(declared_length(&h, 0, true).ok(), Some(Some(10)));
        let h = headers(&[("content-length", "7")]);
        assert_eq!(declared_length(&h, 3, true).ok(), Some(Some(10)));
        assert_eq!(declared_length(&h, 3, false).ok(), Some(None));
        let h = headers(&[("upload-length", "9"), ("content-length", "7")]);
        assert!(declared_length(&h, 3, true).is_err(), "?1 with 3 + 7 bytes against a length of 9");
        assert!(declared_length(&h, 3, false).is_err(), "7 bytes at 3 go past a length of 9");
        assert_eq!(declared_length(&h, 2, false).ok(), Some(Some(9)));
    }

    #[test]
    fn filenames() {
        assert_eq!(filename("attachment; filename=\"a b.txt\"").as_deref(), Some("a b.txt"));
        assert_eq!(filename("inline; FILENAME=x.bin").as_deref(), Some("x.bin"));
        assert_eq!(filename("inline"), None);
    }
}
