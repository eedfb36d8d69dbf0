//! The IETF draft (draft-ietf-httpbis-resumable-upload-12, interop version 9):
//! `Upload-Draft-Interop-Version: 9` on every request; a creation with `Upload-Complete: ?0`
//! and `Upload-Length` (or `?1` and the whole file as its content); appends typed
//! `application/partial-upload` with `Upload-Offset`, `Upload-Complete` and the chunk's
//! `Content-Digest` (RFC 9530); offsets from HEAD; errors as RFC 9457 problems, a 409 naming
//! the offset to continue from.

use base64::{Engine, engine::general_purpose::STANDARD};
use reqwest::{
    RequestBuilder, StatusCode,
    header::{HeaderMap, HeaderValue},
};

use super::{
    Appended, Chunk, Created, Creation, Head, Kind, Offer, Protocol, location, repr_sha256, sf_boolean, sf_integer,
};

pub(crate) const INTEROP_HEADER: &str = "upload-draft-interop-version";
/// The draft this client implements: -12.
pub(crate) const INTEROP_VERSION: u64 = 9;
const PARTIAL_UPLOAD: &str = "application/partial-upload";

pub(crate) struct Ietf;

fn boolean(value: bool) -> &'static str {
    if value { "?1" } else { "?0" }
}

fn content_digest(sha256: &[u8; 32]) -> String {
    format!("sha-256=:{}:", STANDARD.encode(sha256))
}

/// `inline; filename="..."` when the name fits a quoted string as it is; other names travel in
/// `Upload-Metadata` only.
fn disposition(name: &str) -> Option<String> {
    let plain = !name.is_empty() && name.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
    plain.then(|| format!("inline; filename=\"{name}\""))
}

impl Protocol for Ietf {
    fn kind(&self) -> Kind {
        Kind::Ietf
    }

    fn speak(&self, request: RequestBuilder) -> RequestBuilder {
        request.header(INTEROP_HEADER, INTEROP_VERSION)
    }

    /// Always: a server that does not check `Content-Digest` ignores it (RFC 9530), and the
    /// draft has no way to announce that it does.
    fn checksums(&self, _: &Offer) -> bool {
        true
    }

    fn max_size(&self, offer: &Offer) -> Option<(u64, &'static str)> {
        offer.limit.and_then(|l| l.max_size).map(|n| (n, "Upload-Limit max-size"))
    }

    fn creates_with_content(&self) -> bool {
        true
    }

    /// The representation's media type and name go where the draft puts them
    /// (`Content-Type`, `Content-Disposition`), and all the metadata in tus's `Upload-Metadata`,
    /// which ferry and tus-js-client use in this protocol too.
    fn create(&self, request: RequestBuilder, creation: &Creation) -> RequestBuilder {
        let metadata = creation.metadata;
        let mut request = self
            .speak(request)
            .header("upload-complete", boolean(creation.whole.is_some()))
            .header("upload-length", creation.size);
        if !metadata.is_empty() {
            request = request.header("upload-metadata", metadata.to_header());
        }
        if let Some(kind) = metadata.text("filetype").filter(|k| HeaderValue::from_str(k).is_ok()) {
            request = request.header(reqwest::header::CONTENT_TYPE, kind);
        }
        if let Some(value) = metadata.text("filename").as_deref().and_then(disposition) {
            request = request.header(reqwest::header::CONTENT_DISPOSITION, value);
        }
        match &creation.whole {
            Some(sha256) => request.header("content-digest", content_digest(sha256)),
            None => request.header(reqwest::header::CONTENT_LENGTH, 0),
        }
    }

    /// Any success: `201` is only recommended, and a complete upload may be answered by the
    /// target resource's own `200`.
    fn created(&self, status: StatusCode, headers: &HeaderMap, creation: &Creation) -> Option<Created> {
        if !status.is_success() {
            return None;
        }
        // A success means the content was processed whole; Upload-Offset is not required.
        let sent = if creation.whole.is_some() { creation.size } else { 0 };
        Some(Created { location: location(headers), offset: sf_integer(headers, "upload-offset").unwrap_or(sent) })
    }

    fn read_offset(&self, headers: &HeaderMap) -> Result<Head, String> {
        let offset = sf_integer(headers, "upload-offset").ok_or("HEAD answered without a valid Upload-Offset")?;
        Ok(Head {
            offset,
            length: sf_integer(headers, "upload-length"),
            sha256: repr_sha256(headers),
            complete: sf_boolean(headers, "upload-complete"),
        })
    }

    fn append(&self, request: RequestBuilder, chunk: &Chunk) -> RequestBuilder {
        let mut request = self
            .speak(request)
            .header(reqwest::header::CONTENT_TYPE, PARTIAL_UPLOAD)
            .header("upload-offset", chunk.offset)
            .header("upload-complete", boolean(chunk.last));
        if let Some(sha256) = &chunk.sha256 {
            request = request.header("content-digest", content_digest(sha256));
        }
        request
    }

    /// A success means the whole chunk was appended; `Upload-Offset` says so too when sent.
    fn appended(&self, headers: &HeaderMap, chunk: &Chunk) -> Option<Appended> {
        let offset = sf_integer(headers, "upload-offset").unwrap_or(chunk.offset + chunk.length);
        Some(Appended { offset, complete: sf_boolean(headers, "upload-complete") })
    }

    /// The draft's 409 carries the right offset in `Upload-Offset`; its problem
    /// (`mismatching-upload-offset`) in `expected-offset`.
    fn conflict(&self, headers: &HeaderMap, body: &str) -> Option<Appended> {
        let offset = sf_integer(headers, "upload-offset").or_else(|| {
            let problem: serde_json::Value = serde_json::from_str(body).ok()?;
            problem.get("expected-offset")?.as_u64()
        })?;
        Some(Appended { offset, complete: sf_boolean(headers, "upload-complete") })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::headers;
    use super::*;
    use crate::uploads::types::Metadata;

    /// The headers a request was given.
    fn sent(request: RequestBuilder) -> HeaderMap {
        request.build().unwrap().headers().clone()
    }

    fn client() -> reqwest::Client {
        reqwest::Client::new()
    }

    #[test]
    fn creation_requests() {
        let mut metadata = Metadata::default();
        metadata.insert("filename", "report.pdf");
        metadata.insert("filetype", "application/pdf");
        let empty = Creation { size: 10, metadata: &metadata, whole: None };
        let h = sent(Ietf.create(client().post("http://x/files/"), &empty));
        assert_eq!(h["upload-draft-interop-version"], "9");
        assert_eq!(h["upload-complete"], "?0");
        assert_eq!(h["upload-length"], "10");
        assert_eq!(h["content-length"], "0");
        assert_eq!(h["content-type"], "application/pdf");
        assert_eq!(h["content-disposition"], "inline; filename=\"report.pdf\"");
        assert!(h.contains_key("upload-metadata") && !h.contains_key("tus-resumable"));

        let whole = Creation { size: 10, metadata: &metadata, whole: Some([0; 32]) };
        let h = sent(Ietf.create(client().post("http://x/files/"), &whole));
        assert_eq!(h["upload-complete"], "?1");
        assert_eq!(h["content-digest"], "sha-256=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:");

        assert_eq!(disposition("a \"quoted\" name"), None);
        assert_eq!(disposition("café.txt"), None);
    }

    #[test]
    fn append_requests() {
        let chunk = Chunk { offset: 4, length: 6, last: true, sha256: Some([0; 32]) };
        let h = sent(Ietf.append(client().patch("http://x/files/1"), &chunk));
        assert_eq!(h["content-type"], "application/partial-upload");
        assert_eq!(h["upload-offset"], "4");
        assert_eq!(h["upload-complete"], "?1");
        assert!(h["content-digest"].to_str().unwrap().starts_with("sha-256=:"));
        let middle = Chunk { last: false, sha256: None, ..chunk };
        let h = sent(Ietf.append(client().patch("http://x/files/1"), &middle));
        assert_eq!(h["upload-complete"], "?0");
        assert!(!h.contains_key("content-digest"));
    }

    #[test]
    fn answers() {
        let metadata = Metadata::default();
        let whole = Creation { size: 5, metadata: &metadata, whole: Some([0; 32]) };
        let created = Ietf.created(StatusCode::OK, &headers(&[("location", "/files/a")]), &whole).unwrap();
        assert_eq!(created, Created { location: Some("/files/a".into()), offset: 5 });
        assert_eq!(Ietf.created(StatusCode::CONFLICT, &HeaderMap::new(), &whole), None);

        let head = Ietf
            .read_offset(&headers(&[("upload-offset", "5"), ("upload-complete", "?0"), ("upload-length", "5")]))
            .unwrap();
        assert_eq!((head.offset, head.complete), (5, Some(false)));

        let chunk = Chunk { offset: 0, length: 5, last: true, sha256: None };
        let done = Ietf.appended(&headers(&[("upload-complete", "?1")]), &chunk).unwrap();
        assert_eq!(done, Appended { offset: 5, complete: Some(true) }, "no Upload-Offset: the whole chunk");

        // The offset a 409 names: its Upload-Offset, else the problem's expected-offset.
        let problem = r#"{"type":"https://iana.org/assignments/http-problem-types#mismatching-upload-offset",
            "expected-offset":12500000,"provided-offset":0}"#;
        let named = Ietf.conflict(&headers(&[("upload-offset", "7"), ("upload-complete", "?0")]), problem);
        assert_eq!(named, Some(Appended { offset: 7, complete: Some(false) }));
        assert_eq!(Ietf.conflict(&HeaderMap::new(), problem).map(|a| a.offset), Some(12_500_000));
        assert_eq!(Ietf.conflict(&HeaderMap::new(), "Conflict"), None);
    }
}
