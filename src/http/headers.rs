//! tus request headers, parsed once at the edge into domain values. Anything malformed becomes a
//! 400 (or 412/415) with a message before any work is done.

use http::{HeaderMap, header};

use super::error::ApiError;
use crate::uploads::{
    CreateConcat,
    types::{Checksum, ChecksumPlan, Metadata, UploadId},
};

/// The media type of tus append bodies.
pub const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| ApiError::bad_header(format!("{name} contains characters that are not visible ASCII"))),
    }
}

/// A non-negative integer that fits the database (at most 2^63 - 1): digits only, no sign.
pub fn parse_count(name: &str, value: &str) -> Result<u64, ApiError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_header(format!("{name} must be a non-negative integer, got '{value}'")));
    }
    value
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= i64::MAX as u64)
        .ok_or_else(|| ApiError::bad_header(format!("{name} is too large")))
}

fn count(headers: &HeaderMap, name: &str) -> Result<Option<u64>, ApiError> {
    text(headers, name)?.map(|value| parse_count(name, value)).transpose()
}

pub fn upload_offset(headers: &HeaderMap) -> Result<u64, ApiError> {
    count(headers, "upload-offset")?.ok_or_else(|| ApiError::bad_header("Upload-Offset is required"))
}

pub fn upload_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    count(headers, "upload-length")
}

pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    count(headers, header::CONTENT_LENGTH.as_str())
}

/// `Upload-Defer-Length: 1` (the only value allowed).
pub fn defer_length(headers: &HeaderMap) -> Result<bool, ApiError> {
    match text(headers, "upload-defer-length")? {
        None => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(ApiError::bad_header(format!("Upload-Defer-Length must be 1, got '{other}'"))),
    }
}

pub fn metadata(headers: &HeaderMap) -> Result<Metadata, ApiError> {
    match text(headers, "upload-metadata")? {
        None => Ok(Metadata::default()),
        Some(value) => Metadata::parse(value).map_err(ApiError::BadHeader),
    }
}

/// `Upload-Checksum` as a header, or announced as a trailer in `Trailer`.
pub fn checksum(headers: &HeaderMap) -> Result<ChecksumPlan, ApiError> {
    if let Some(value) = text(headers, "upload-checksum")? {
        return Checksum::parse(value).map(ChecksumPlan::Header).map_err(ApiError::BadHeader);
    }
    let announced = headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|name| name.trim().eq_ignore_ascii_case("upload-checksum"));
    Ok(if announced { ChecksumPlan::Trailer } else { ChecksumPlan::None })
}

/// Whether the request carries a body (by `Content-Length` or chunked transfer).
pub fn has_body(headers: &HeaderMap) -> Result<bool, ApiError> {
    Ok(match content_length(headers)? {
        Some(n) => n > 0,
        None => headers.contains_key(header::TRANSFER_ENCODING),
    })
}

/// Appends must be `application/offset+octet-stream` (parameters are ignored).
pub fn require_offset_octet_stream(headers: &HeaderMap) -> Result<(), ApiError> {
    let value = text(headers, header::CONTENT_TYPE.as_str())?.unwrap_or("");
    let essence = value.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(OFFSET_OCTET_STREAM) {
        Ok(())
    } else if value.is_empty() {
        Err(ApiError::UnsupportedMediaType(format!("Content-Type must be {OFFSET_OCTET_STREAM}")))
    } else {
        Err(ApiError::UnsupportedMediaType(format!("Content-Type must be {OFFSET_OCTET_STREAM}, not '{value}'")))
    }
}

/// `Upload-Concat: partial` or `final;<url> <url> ...`. The URLs may be absolute or paths;
/// their last segment must be an upload id under our base path.
pub fn concat(headers: &HeaderMap, base_path: &str) -> Result<CreateConcat, ApiError> {
    let Some(value) = text(headers, "upload-concat")? else {
        return Ok(CreateConcat::None);
    };
    if value == "partial" {
        return Ok(CreateConcat::Partial);
    }
    let Some(list) = value.strip_prefix("final;") else {
        return Err(ApiError::bad_header("Upload-Concat must be 'partial' or 'final;<upload URLs>'"));
    };
    let parts = list.split_whitespace().map(|url| parse_upload_url(url, base_path)).collect::<Result<Vec<_>, _>>()?;
    if parts.is_empty() {
        return Err(ApiError::bad_header("Upload-Concat: final names no partial uploads"));
    }
    Ok(CreateConcat::Final(parts))
}

fn parse_upload_url(url: &str, base_path: &str) -> Result<UploadId, ApiError> {
    let path = match url.find("://") {
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            rest.find('/').map_or("", |slash| &rest[slash..])
        }
        None => url,
    };
    path.strip_prefix(base_path)
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| ApiError::bad_header(format!("'{url}' in Upload-Concat is not an upload URL of this server")))
}

/// Whether `If-None-Match` names `etag` (a quoted entity tag) or is `*`. Weak comparison, as
/// RFC 9110 asks for GET: `W/"x"` matches `"x"`.
pub fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |candidate| {
            let candidate = candidate.trim();
            candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
        },
    )
}

/// `scheme://host` of the URL the client asked for. Without `behind_proxy` that is plain HTTP to
/// `Host`. With it, the proxy's `Forwarded` (RFC 7239; the first, client-most element) wins, then
/// `X-Forwarded-Proto` and `X-Forwarded-Host` (first value of a list), then `Host`.
/// `None` when no usable host was given.
pub fn origin(headers: &HeaderMap, behind_proxy: bool) -> Option<String> {
    let first =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next()).map(str::trim);
    let (mut proto, mut host) = (None::<String>, None::<String>);
    if behind_proxy {
        if let Some(element) = first("forwarded") {
            for pair in element.split(';') {
                let Some((key, value)) = pair.split_once('=') else { continue };
                let value = value.trim().trim_matches('"').to_string();
                match key.trim().to_ascii_lowercase().as_str() {
                    "proto" => proto = Some(value),
                    "host" => host = Some(value),
                    _ => {}
                }
            }
        }
        proto = proto.or_else(|| first("x-forwarded-proto").map(str::to_string));
        host = host.or_else(|| first("x-forwarded-host").map(str::to_string));
    }
    let host = host.filter(|h| !h.is_empty()).or_else(|| first(header::HOST.as_str()).map(str::to_string))?;
    if host.is_empty() || host.contains(['/', ' ', '@', '\\', '?', '#']) || !host.is_ascii() {
        return None;
    }
    let proto = match proto.map(|p| p.to_ascii_lowercase()) {
        Some(p) if p == "https" => "https",
        _ => "http",
    };
    Some(format!("{proto}://{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn counts_are_strict() {
        assert_eq!(parse_count("n", "0").unwrap(), 0);
        assert_eq!(parse_count("n", "9223372036854775807").unwrap(), i64::MAX as u64);
        for bad in ["", "-1", "+1", "1.5", "1e3", "0x10", "9223372036854775808", "99999999999999999999999"] {
            assert!(parse_count("n", bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn concat_values() {
        let id = UploadId::new();
        let h = headers(&[("upload-concat", &format!("final;http://host/files/{id} /files/{id}"))]);
        match concat(&h, "/files/").unwrap() {
            CreateConcat::Final(parts) => assert_eq!(parts, vec![id, id]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(concat(&headers(&[("upload-concat", "partial")]), "/files/").unwrap(), CreateConcat::Partial));
        assert!(concat(&headers(&[("upload-concat", "final;/other/x")]), "/files/").is_err());
        assert!(concat(&headers(&[("upload-concat", "whole")]), "/files/").is_err());
    }

    #[test]
    fn checksum_plans() {
        assert_eq!(checksum(&headers(&[])).unwrap(), ChecksumPlan::None);
        assert_eq!(checksum(&headers(&[("trailer", "Upload-Checksum")])).unwrap(), ChecksumPlan::Trailer);
        assert!(checksum(&headers(&[("upload-checksum", "nope AAAA")])).is_err());
    }
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    #[test]
    fn if_none_match_compares_weakly() {
        let etag = "\"abc\"";
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_NONE_MATCH, http::HeaderValue::from_str(value).unwrap());
            if_none_match(&headers, etag)
        };
        assert!(with("\"abc\""));
        assert!(with("W/\"abc\""));
        assert!(with("\"x\", \"abc\""));
        assert!(with("*"));
        assert!(!with("\"abd\""));
        assert!(!if_none_match(&HeaderMap::new(), etag));
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn host_alone_is_plain_http() {
        let h = headers(&[("host", "ferry:8080"), ("x-forwarded-proto", "https"), ("x-forwarded-host", "up.example")]);
        assert_eq!(origin(&h, false).as_deref(), Some("http://ferry:8080"));
    }

    #[test]
    fn behind_a_proxy_the_forwarded_headers_win() {
        let h = headers(&[("host", "ferry:8080"), ("x-forwarded-proto", "https"), ("x-forwarded-host", "up.example")]);
        assert_eq!(origin(&h, true).as_deref(), Some("https://up.example"));
        // Two proxies: the first value is what the client asked the first one for.
        let h =
            headers(&[("host", "ferry"), ("x-forwarded-proto", "https, http"), ("x-forwarded-host", "a.example, b")]);
        assert_eq!(origin(&h, true).as_deref(), Some("https://a.example"));
        let h = headers(&[
            ("host", "ferry"),
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=192.0.2.1;proto=https;host=\"up.example:8443\", for=10.0.0.1;proto=http"),
        ]);
        assert_eq!(origin(&h, true).as_deref(), Some("https://up.example:8443"));
        // Only the scheme forwarded: the host is still Host.
        let h = headers(&[("host", "up.example"), ("x-forwarded-proto", "https")]);
        assert_eq!(origin(&h, true).as_deref(), Some("https://up.example"));
    }

    #[test]
    fn hosts_that_would_bend_the_url_are_refused() {
        assert_eq!(origin(&headers(&[("host", "evil.example/x")]), false), None);
        assert_eq!(origin(&headers(&[("host", "a"), ("x-forwarded-host", "u@evil")]), true), None);
        assert_eq!(origin(&headers(&[("x-forwarded-proto", "https")]), true), None);
    }
}
