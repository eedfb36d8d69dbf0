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

use super::{AppState, auth::Caller, connection::Connection, error::ApiError, headers};
use crate::hooks::precreate::{Decision, PreCreateRequest};
use crate::uploads::{
    AppendRequest, BodyEvent, BodyStream, ClientLink, CreateConcat, CreateRequest, Upload,
    types::{Checksum, ChecksumAlgorithm, ChecksumPlan, Concat, UploadId},
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
            None => Some("Tus-Resumable is missing; this server speaks tus 1.0.0".to_string()),
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

/// OPTIONS: what this server supports.
pub async fn options(State(state): State<AppState>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-extension", HeaderValue::from_static(TUS_EXTENSIONS));
    h.insert("tus-max-size", HeaderValue::from(state.uploads.settings().max_size));
    h.insert("tus-checksum-algorithm", HeaderValue::from_static(ChecksumAlgorithm::ADVERTISED));
    set_upload_limit(&state, h);
    response
}

/// `Upload-Limit: max-append-size=N` (the IETF resumable-uploads draft's field): the largest
/// body the proxies in front let through, so clients size their chunks below it.
fn set_upload_limit(state: &AppState, h: &mut HeaderMap) {
    if let Some(value) = &state.upload_limit {
        h.insert("upload-limit", value.clone());
    }
}

/// The absolute URL of an upload, from the request's `Host` (or, with `--behind-proxy`, the
/// scheme and host the proxy in front was asked for); a path when there is no host.
fn upload_url(state: &AppState, request_headers: &HeaderMap, id: UploadId) -> String {
    let path = format!("{}{id}", state.base_path);
    match headers::origin(request_headers, state.behind_proxy) {
        Some(origin) => format!("{origin}{path}"),
        None => path,
    }
}

/// Adapts an HTTP body into the domain's stream of data and trailer checksums.
fn body_stream(body: Body) -> BodyStream {
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
    let mut metadata = headers::metadata(&request_headers)?;
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

    let caller = caller.map(|Extension(caller)| caller);
    let mut owner = caller.as_ref().map(|c| c.owner.clone());
    let mut max_size = caller.as_ref().and_then(|c| c.max_size);
    let mut key_prefix = None;
    if let Some(precreate) = &state.precreate {
        let request = PreCreateRequest {
            length,
            metadata: metadata.decoded().into_iter().collect(),
            concat: match &concat {
                CreateConcat::None => None,
                CreateConcat::Partial => Some("partial"),
                CreateConcat::Final(_) => Some("final"),
            },
            headers: precreate
                .forward_headers()
                .iter()
                .filter_map(|name| {
                    let value = request_headers.get(name.as_str())?.to_str().ok()?;
                    Some((name.clone(), value.to_string()))
                })
                .collect(),
        };
        match precreate.ask(&request).await {
            Decision::Allow(allowed) => {
                for (key, value) in &allowed.metadata {
                    metadata.insert(key, value);
                }
                // A token's subject wins over the hook's owner; the smaller size limit wins.
                owner = owner.or(allowed.owner);
                key_prefix = allowed.key_prefix;
                max_size = match (max_size, allowed.max_size) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Decision::Deny { status, message } => return Err(ApiError::Refused { status, message }),
            Decision::Unavailable(reason) => {
                tracing::warn!(%reason, "the pre-create hook could not be asked");
                return Err(ApiError::Unavailable(
                    "the application that approves uploads did not answer; nothing was created, try again later".into(),
                ));
            }
        }
    }
    let upload = state.uploads.create(CreateRequest { length, metadata, concat, owner, max_size, key_prefix }).await?;
    let location = upload_url(&state, &request_headers, upload.id);
    let mut offset = upload.offset;
    let mut expires_at = upload.expires_at;
    let mut failure = None;
    if with_body {
        let owner = upload.owner.clone();
        let client = client_link(connection);
        let append = AppendRequest { id: upload.id, offset: 0, length: None, checksum, content_length, owner, client };
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

pub fn parse_id(id: &str) -> Result<UploadId, ApiError> {
    id.parse().map_err(|_| {
        crate::uploads::UploadError::NotFound(format!(
            "'{}' is not an upload id of this server",
            id.chars().take(64).collect::<String>()
        ))
        .into()
    })
}

/// With upload tokens, only the token's subject may touch an upload (others get 404): the owner
/// the domain checks, in the same read of the upload that serves the request.
pub fn owner(caller: &Option<Extension<Caller>>) -> Option<&str> {
    caller.as_ref().map(|Extension(caller)| caller.owner.as_str())
}

/// HEAD: where an upload stands.
pub async fn head(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let upload = state.uploads.status(id, owner(&caller)).await?;
    let mut response = StatusCode::OK.into_response();
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("upload-offset", HeaderValue::from(upload.offset));
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
fn client_link(connection: Option<Extension<Connection>>) -> Option<Arc<dyn ClientLink>> {
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
    caller: Option<Extension<Caller>>,
    connection: Option<Extension<Connection>>,
    Path(id): Path<String>,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    headers::require_offset_octet_stream(&request_headers)?;
    let offset = headers::upload_offset(&request_headers)?;
    let length = headers::upload_length(&request_headers)?;
    if let (Some(Extension(caller)), Some(length)) = (&caller, length)
        && let Some(limit) = caller.max_size
        && length > limit
    {
        return Err(crate::uploads::UploadError::TooLarge(format!(
            "Upload-Length {length} is larger than the {limit} bytes your token allows"
        ))
        .into());
    }
    let checksum: ChecksumPlan = headers::checksum(&request_headers)?;
    let content_length = headers::content_length(&request_headers)?;
    let owner = owner(&caller).map(str::to_string);
    let client = client_link(connection);
    let request = AppendRequest { id, offset, length, checksum, content_length, owner, client };
    let appended = state.uploads.append(request, body_stream(body)).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert("upload-offset", HeaderValue::from(appended.offset));
    set_expires(response.headers_mut(), appended.expires_at);
    Ok(response)
}

/// DELETE: termination.
pub async fn terminate(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    state.uploads.terminate(id, owner(&caller)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
