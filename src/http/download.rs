//! GET of a completed upload: the bytes streamed from the store, with Range, ETag and headers
//! taken from the upload's metadata (sanitised: a browser must never run what someone uploaded).

use std::ops::Range;

use axum::{
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};

use super::{AppState, error::ApiError};
use crate::config::DownloadMode;
use crate::uploads::{Upload, UploadError, links::LinkQuery, now_ms, types::Metadata};

/// Types a browser may show inline: they cannot run script in our origin.
const INLINE_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/avif",
    "image/bmp",
    "audio/mpeg",
    "audio/ogg",
    "audio/wav",
    "audio/webm",
    "audio/flac",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "text/plain",
];

const CACHE_CONTROL: &str = "private, max-age=0, must-revalidate";

pub async fn download(
    State(state): State<AppState>,
    upload: super::tus::UploadRef,
    uri: Uri,
    request_headers: HeaderMap,
) -> Result<Response, ApiError> {
    // A signed link opens its upload for whoever holds it; anything else is the caller's own.
    let owner = match LinkQuery::parse(uri.query()) {
        Some(link) => {
            state
                .uploads
                .links()
                .verify(upload.id, &link, now_ms())
                .map_err(|e| UploadError::Forbidden(e.to_string()))?;
            None
        }
        None => upload.owner,
    };
    // Conditions apply only to what would otherwise be a 2xx: check completeness first.
    let upload = state.uploads.completed(upload.id, owner.as_deref()).await?;
    let size = upload.length.unwrap_or(upload.offset);
    let etag = etag(&upload);

    if super::headers::if_none_match(&request_headers, &etag) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        response.headers_mut().insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex etag"));
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
        return Ok(response);
    }

    let if_range_ok = match request_headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(tag) => tag.trim() == etag,
    };
    if state.download == DownloadMode::Redirect
        && let Some(url) = state.uploads.presign(&upload).await?
    {
        let mut response = StatusCode::FOUND.into_response();
        response.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&url).expect("a URL is a valid header"));
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(response);
    }

    let range = match request_headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(value) if if_range_ok => parse_range(value, size)?,
        _ => None,
    };

    let download = state.uploads.download(&upload, range.clone()).await?;
    let mut response = Response::new(Body::from_stream(download.stream));
    let h = response.headers_mut();
    match &range {
        Some(r) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = response.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            let content_range = format!("bytes {}-{}/{}", r.start, r.end - 1, download.size);
            h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&content_range).expect("digits"));
        }
        None => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(download.size));
        }
    }
    let h = response.headers_mut();
    let content_type = content_type(&upload.metadata);
    let inline = INLINE_TYPES.contains(&content_type.as_str());
    h.insert(header::CONTENT_TYPE, HeaderValue::from_str(&content_type).expect("validated media type"));
    h.insert(header::CONTENT_DISPOSITION, content_disposition(&upload.metadata, inline));
    h.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex etag"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_CONTROL));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    if let Some(sha256) = upload.sha256 {
        let digest = format!("sha-256=:{}:", STANDARD.encode(sha256));
        h.insert("repr-digest", HeaderValue::from_str(&digest).expect("base64"));
    }
    Ok(response)
}

/// `GET {base}{id}/link`: a signed download link of a completed upload, for the page and for
/// anyone who holds a token and wants to hand the file on without it.
pub async fn link(
    State(state): State<AppState>,
    upload: super::tus::UploadRef,
    request_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let upload = state.uploads.completed(upload.id, upload.owner.as_deref()).await?;
    let url = super::tus::upload_url(&state, &request_headers, upload.id);
    let (link, expires) = state.uploads.links().sign(&url, upload.id, now_ms());
    let body = serde_json::json!({
        "url": link,
        "expires_at": crate::uploads::links::rfc3339(expires),
        "expires_in": state.uploads.links().ttl().as_secs().max(1),
    });
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// A strong validator: the content's SHA-256 once known, else the upload id and size.
fn etag(upload: &Upload) -> String {
    match upload.sha256 {
        Some(sha) => format!("\"{}\"", sha.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        None => format!("\"{}-{}\"", upload.id, upload.offset),
    }
}

/// One `bytes=` range; a list of ranges is answered with the whole content (RFC 9110 allows it).
fn parse_range(value: &str, size: u64) -> Result<Option<Range<u64>>, ApiError> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if size == 0 {
        // No range of an empty representation can be satisfied.
        return Err(ApiError::RangeNotSatisfiable(0));
    }
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let number = |s: &str| s.trim().parse::<u64>().ok();
    let range = match (start.trim().is_empty(), end.trim().is_empty()) {
        (true, false) => {
            let Some(suffix) = number(end) else { return Ok(None) };
            if suffix == 0 {
                return Err(ApiError::RangeNotSatisfiable(size));
            }
            size.saturating_sub(suffix)..size
        }
        (false, _) => {
            let Some(first) = number(start) else { return Ok(None) };
            let last = if end.trim().is_empty() {
                size.saturating_sub(1)
            } else {
                match number(end) {
                    Some(last) if last >= first => last.min(size.saturating_sub(1)),
                    _ => return Ok(None),
                }
            };
            if first >= size {
                return Err(ApiError::RangeNotSatisfiable(size));
            }
            first..last + 1
        }
        (true, true) => return Ok(None),
    };
    Ok(Some(range))
}

/// The media type the client declared, if it is a well-formed `type/subtype`; else binary.
fn content_type(metadata: &Metadata) -> String {
    let declared =
        ["filetype", "type", "contentType", "content-type", "mimetype"].iter().find_map(|key| metadata.text(key));
    let valid = |s: &str| {
        !s.is_empty() && s.len() <= 127 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    match declared.map(|t| t.trim().to_ascii_lowercase()) {
        Some(t) if t.split_once('/').is_some_and(|(a, b)| valid(a) && valid(b)) => t,
        _ => "application/octet-stream".to_string(),
    }
}

/// `attachment` (or `inline` for safe types) with the declared file name, reduced to its last
/// path segment and stripped of control characters and quotes.
fn content_disposition(metadata: &Metadata, inline: bool) -> HeaderValue {
    let kind = if inline { "inline" } else { "attachment" };
    let name = ["filename", "name"].iter().find_map(|key| metadata.text(key)).unwrap_or_default();
    let name = name.rsplit(['/', '\\']).next().unwrap_or("");
    let name: String = name.chars().filter(|c| !c.is_control() && !matches!(c, '"' | ';')).take(255).collect();
    let name = name.trim().trim_start_matches('.').to_string();
    if name.is_empty() {
        return HeaderValue::from_static(if inline { "inline" } else { "attachment" });
    }
    let ascii: String = name.chars().map(|c| if c.is_ascii() && c != '%' && c != '\\' { c } else { '_' }).collect();
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    HeaderValue::from_str(&format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}"))
        .unwrap_or(HeaderValue::from_static("attachment"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(header: &str) -> Metadata {
        Metadata::parse(header).unwrap()
    }

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some(0..10));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some(90..100));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some(90..100));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), Some(50..100));
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(parse_range("items=0-1", 100).unwrap(), None);
        assert_eq!(parse_range("bytes=9-3", 100).unwrap(), None);
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=-0", 100).is_err());
        assert!(parse_range("bytes=-5", 0).is_err());
        assert!(parse_range("bytes=0-", 0).is_err());
    }

    #[test]
    fn media_types() {
        assert_eq!(content_type(&meta(&format!("filetype {}", b64("image/PNG")))), "image/png");
        assert_eq!(content_type(&meta(&format!("filetype {}", b64("text/html\r\nX: y")))), "application/octet-stream");
        assert_eq!(content_type(&meta("")), "application/octet-stream");
    }

    #[test]
    fn dispositions() {
        let d = content_disposition(&meta(&format!("filename {}", b64("../../etc/pa\"ss\u{7}wd"))), false);
        assert_eq!(d, "attachment; filename=\"passwd\"; filename*=UTF-8''passwd");
        let d = content_disposition(&meta(&format!("filename {}", b64("résumé 1.pdf"))), false);
        assert_eq!(d, "attachment; filename=\"r_sum_ 1.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%201.pdf");
        assert_eq!(content_disposition(&meta(""), true), "inline");
    }
}
