//! The tus 1.0.0 handlers: OPTIONS, POST, HEAD, PATCH, DELETE.

use std::sync::Arc;

use axum::{
    Extension,
    body::Body,
    extract::{Path, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::{AppState, admit, auth::Caller, connection::Connection, error::ApiError, headers};
use crate::uploads::{
    AppendRequest, BodyEvent, BodyStream, ClientLink, CreateConcat, Upload,
    types::{Checksum, ChecksumAlgorithm, ChecksumPlan, Concat, UploadId, UploadState},
};

pub const TUS_RESUMABLE: &str = "1.0.0";
pub const TUS_VERSION: &str = "1.0.0";
pub const TUS_EXTENSIONS: &str = "creation,creation-with-upload,creation-defer-length,termination,checksum,\
                                  checksum-trailer,expiration,concatenation";

/// Checks `Tus-Resumable` on every tus request but OPTIONS (where the spec says to ignore it) and
/// GET (a download, not part of tus), and sets it on every response. A HEAD without the header is
/// answered (as tusd does), so that `curl -I` and link checkers work; a wrong version never is.
pub async fn tus_resumable(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    if method != Method::OPTIONS && method != Method::GET {
        let version = request.headers().get("tus-resumable").map(|v| v.to_str().unwrap_or("?"));
        let problem = match version {
            None if method == Method::HEAD => None,
            None => Some(
                "Tus-Resumable is missing; this server speaks tus 1.0.0, and HTTP resumable uploads \
                 (send Upload-Complete and Upload-Draft-Interop-Version)"
                    .to_string(),
            ),
            Some(TUS_RESUMABLE) => None,
            Some(other) => Some(format!("tus version '{other}' is not supported; this server speaks tus 1.0.0")),
        };
        if let Some(message) = problem {
            return with_tus_resumable(ApiError::UnsupportedVersion(message).into_response());
        }
    }
    with_tus_resumable(next.run(request).await)
}

fn with_tus_resumable(mut response: Response) -> Response {
    response.headers_mut().insert("tus-resumable", HeaderValue::from_static(TUS_RESUMABLE));
    response
}

/// OPTIONS: what this server supports (for a client of the IETF draft, its limits in full).
pub async fn options(State(state): State<AppState>, interop: Option<Extension<super::ietf::Interop>>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-extension", HeaderValue::from_static(TUS_EXTENSIONS));
    h.insert("tus-max-size", HeaderValue::from(state.uploads.settings().max_size));
    h.insert("tus-checksum-algorithm", HeaderValue::from_static(ChecksumAlgorithm::ADVERTISED));
    match interop {
        Some(_) => {
            h.insert("upload-limit", super::ietf::upload_limit(&state, None, None));
            // Interop 8 (-11) asks for it; -12 dropped it, and it does no harm there.
            h.insert("accept-patch", HeaderValue::from_static(super::ietf::PARTIAL_UPLOAD));
        }
        None => set_upload_limit(&state, h),
    }
    response
}

/// `Upload-Limit: max-append-size=N` (the IETF resumable-uploads draft's field): the largest
/// body the proxies in front let through, so clients size their chunks below it.
fn set_upload_limit(state: &AppState, h: &mut HeaderMap) {
    if let Some(n) = state.max_append_size {
        h.insert("upload-limit", super::fields::integer_dictionary(&[("max-append-size", n)]));
    }
}

/// The absolute URL of an upload, from the request's `Host` (or, with `--behind-proxy`, the
/// scheme and host the proxy in front was asked for); a path when there is no host.
pub(super) fn upload_url(state: &AppState, request_headers: &HeaderMap, id: UploadId) -> String {
    let path = format!("{}{id}", state.base_path);
    match headers::origin(request_headers, state.behind_proxy) {
        Some(origin) => format!("{origin}{path}"),
        None => path,
    }
}

/// Adapts an HTTP body into the domain's stream of data and trailer checksums.
pub(super) fn body_stream(body: Body) -> BodyStream {
    http_body_util::BodyStream::new(body)
        .filter_map(|frame| async move {
            match frame {
                Err(e) => Some(Err(e.to_string())),
                Ok(frame) => match frame.into_data() {
                    Ok(data) => Some(Ok(BodyEvent::Data(data))),
                    Err(frame) => {
                        let trailers = frame.into_trailers().ok()?;
                        let value = trailers.get("upload-checksum")?;
                        let parsed = value
                            .to_str()
                            .map_err(|_| "Upload-Checksum trailer is not ASCII".to_string())
                            .and_then(Checksum::parse);
                        Some(Ok(BodyEvent::TrailerChecksum(parsed)))
                    }
                },
            }
        })
        .boxed()
}

fn set_expires(headers: &mut HeaderMap, expires_at: Option<i64>) {
    if let Some(ms) = expires_at {
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
        if let Ok(value) = HeaderValue::from_str(&httpdate::fmt_http_date(when)) {
            headers.insert("upload-expires", value);
        }
    }
}

/// POST: creation, creation-with-upload, creation-defer-length and concatenation.
pub async fn create(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    connection: Option<Extension<Connection>>,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let length = headers::upload_length(&request_headers)?;
    let deferred = headers::defer_length(&request_headers)?;
    let metadata = headers::metadata(&request_headers)?;
    let concat = headers::concat(&request_headers, &state.base_path)?;
    let with_body = headers::has_body(&request_headers)?;
    let checksum = headers::checksum(&request_headers)?;
    let content_length = headers::content_length(&request_headers)?;

    match (&concat, length, deferred) {
        (CreateConcat::Final(_), None, false) => {}
        (CreateConcat::Final(_), _, _) => {
            return Err(ApiError::bad_header(
                "a final upload takes its length from its partial uploads: send neither Upload-Length nor Upload-Defer-Length",
            ));
        }
        (_, Some(_), true) => {
            return Err(ApiError::bad_header("send either Upload-Length or Upload-Defer-Length, not both"));
        }
        (_, None, false) => {
            return Err(ApiError::bad_header("Upload-Length or Upload-Defer-Length: 1 is required"));
        }
        _ => {}
    }
    if with_body {
        if matches!(concat, CreateConcat::Final(_)) {
            return Err(ApiError::bad_header("a final upload cannot carry a body"));
        }
        headers::require_offset_octet_stream(&request_headers)?;
    }
    if let (Some(length), Some(content_length)) = (length, content_length)
        && content_length > length
    {
        return Err(crate::uploads::UploadError::TooLarge(format!(
            "the body is {content_length} bytes but Upload-Length is {length}"
        ))
        .into());
    }

    let create = admit::admit(&state, caller, &request_headers, length, metadata, concat).await?;
    let upload = state.uploads.create(create).await?;
    let location = upload_url(&state, &request_headers, upload.id);
    let mut offset = upload.offset;
    let mut expires_at = upload.expires_at;
    let mut failure = None;
    if with_body {
        let owner = upload.owner.clone();
        let client = client_link(connection);
        let append = AppendRequest {
            id: upload.id,
            offset: 0,
            length: None,
            checksum,
            content_length,
            owner,
            client,
            completes: false,
        };
        match state.uploads.append(append, body_stream(body)).await {
            Ok(appended) => {
                offset = appended.offset;
                expires_at = appended.expires_at;
            }
            Err(e) => failure = Some(e),
        }
    }
    let mut response = match failure {
        // The upload exists even though its first bytes were refused: say where it is.
        Some(e) => ApiError::from(e).into_response(),
        None => StatusCode::CREATED.into_response(),
    };
    let h = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, value);
    }
    h.insert("upload-offset", HeaderValue::from(offset));
    set_expires(h, expires_at);
    set_upload_limit(&state, h);
    Ok(response)
}

/// The upload a request names (`{base}{id}`), and who asks: with upload tokens only the token's
/// subject may touch an upload (others get 404), the owner the domain checks in the same read of
/// the upload that serves the request. Shared by both protocols; a malformed id is answered in
/// the request's protocol.
pub struct UploadRef {
    pub id: UploadId,
    pub owner: Option<String>,
    /// The caller's token's size limit, if smaller than `--max-size`.
    pub max_size: Option<u64>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for UploadRef {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Self, Response> {
        let ietf = parts.extensions.get::<super::ietf::Interop>().is_some();
        let reject = |e: ApiError| if ietf { super::ietf::problem_response(e) } else { e.into_response() };
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| reject(ApiError::bad_header("the URL names no upload")))?;
        let id = parse_id(&id).map_err(reject)?;
        let caller = parts.extensions.get::<Caller>();
        Ok(Self { id, owner: caller.map(|c| c.owner.clone()), max_size: caller.and_then(|c| c.max_size) })
    }
}

pub fn parse_id(id: &str) -> Result<UploadId, ApiError> {
    id.parse().map_err(|_| {
        crate::uploads::UploadError::NotFound(format!(
            "'{}' is not an upload id of this server",
            id.chars().take(64).collect::<String>()
        ))
        .into()
    })
}

/// HEAD: where an upload stands.
pub async fn head(State(state): State<AppState>, upload: UploadRef) -> Result<Response, ApiError> {
    let upload = state.uploads.status(upload.id, upload.owner.as_deref()).await?;
    let mut response = StatusCode::OK.into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // A final upload has no offset of its own while it is assembled (tus: it SHOULD NOT carry
    // one); a client that read 0 there would think it has to send the bytes.
    let assembling = matches!(upload.concat, Concat::Final(_)) && upload.state != UploadState::Completed;
    if !assembling {
        h.insert("upload-offset", HeaderValue::from(upload.offset));
    }
    match upload.length {
        Some(length) => h.insert("upload-length", HeaderValue::from(length)),
        None => h.insert("upload-defer-length", HeaderValue::from_static("1")),
    };
    if !upload.metadata.is_empty()
        && let Ok(value) = HeaderValue::from_str(&upload.metadata.to_header())
    {
        h.insert("upload-metadata", value);
    }
    if let Some(value) = concat_header(&state, &upload) {
        h.insert("upload-concat", value);
    }
    if let Some(sha256) = upload.sha256 {
        let digest = format!("sha-256=:{}:", STANDARD.encode(sha256));
        h.insert("repr-digest", HeaderValue::from_str(&digest).expect("base64 is a valid header value"));
    }
    set_expires(h, upload.expires_at);
    set_upload_limit(&state, h);
    Ok(response)
}

/// The request's connection as the domain sees it (absent when served by something else than
/// ferry's own listener, as in tests that call the router directly).
pub(super) fn client_link(connection: Option<Extension<Connection>>) -> Option<Arc<dyn ClientLink>> {
    connection.map(|Extension(c)| Arc::new(c) as Arc<dyn ClientLink>)
}

fn concat_header(state: &AppState, upload: &Upload) -> Option<HeaderValue> {
    match &upload.concat {
        Concat::None => None,
        Concat::Partial => Some(HeaderValue::from_static("partial")),
        Concat::Final(parts) => {
            let urls: Vec<String> = parts.iter().map(|id| format!("{}{id}", state.base_path)).collect();
            HeaderValue::from_str(&format!("final;{}", urls.join(" "))).ok()
        }
    }
}

/// PATCH: append bytes at the upload's offset.
pub async fn append(
    State(state): State<AppState>,
    upload: UploadRef,
    connection: Option<Extension<Connection>>,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let UploadRef { id, owner, max_size } = upload;
    headers::require_offset_octet_stream(&request_headers)?;
    let offset = headers::upload_offset(&request_headers)?;
    let length = headers::upload_length(&request_headers)?;
    if let (Some(limit), Some(length)) = (max_size, length)
        && length > limit
    {
        return Err(crate::uploads::UploadError::TooLarge(format!(
            "Upload-Length {length} is larger than the {limit} bytes your token allows"
        ))
        .into());
    }
    let checksum: ChecksumPlan = headers::checksum(&request_headers)?;
    let content_length = headers::content_length(&request_headers)?;
    let client = client_link(connection);
    let request = AppendRequest { id, offset, length, checksum, content_length, owner, client, completes: false };
    let appended = state.uploads.append(request, body_stream(body)).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert("upload-offset", HeaderValue::from(appended.offset));
    set_expires(response.headers_mut(), appended.expires_at);
    Ok(response)
}

/// DELETE: termination.
pub async fn terminate(State(state): State<AppState>, upload: UploadRef) -> Result<Response, ApiError> {
    state.uploads.terminate(upload.id, upload.owner.as_deref()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
