//! The two protocols `ferry upload` speaks: tus 1.0.0 and the IETF draft "Resumable Uploads for
//! HTTP" (draft-ietf-httpbis-resumable-upload-12, interop version 9). Both do the same four
//! things (create an upload, ask its offset, append a chunk, terminate it); each
//! [`Protocol`] only says how a request is dressed and how an answer is read, so that the
//! transfer loop, its retry rules, the resume state and the progress are one for both.

mod ietf;
mod tus;

use reqwest::{RequestBuilder, StatusCode, header::HeaderMap};

pub(crate) use ietf::{INTEROP_HEADER, INTEROP_VERSION, Ietf};
pub(crate) use tus::Tus;

use super::policy::UploadLimit;
use crate::uploads::types::Metadata;

/// `--protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// tus 1.0.0.
    Tus,
    /// The IETF resumable-uploads draft, interop version 9.
    Ietf,
    /// tus when the server speaks it, else the IETF draft.
    Auto,
}

/// A protocol, by name (as the state file keeps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tus,
    Ietf,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Tus => "tus",
            Kind::Ietf => "ietf",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "tus" => Some(Kind::Tus),
            "ietf" => Some(Kind::Ietf),
            _ => None,
        }
    }

    pub(crate) fn protocol(self) -> &'static dyn Protocol {
        match self {
            Kind::Tus => &Tus,
            Kind::Ietf => &Ietf,
        }
    }
}

/// What the server's OPTIONS offers. It is asked with `Upload-Draft-Interop-Version`: a tus
/// server ignores it, and ferry answers a request naming it with the draft's `Upload-Limit`
/// (`max-size`, `max-age`) besides the tus headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Offer {
    /// `Tus-Version` lists 1.0.0.
    pub tus: bool,
    /// `Tus-Max-Size`.
    pub tus_max_size: Option<u64>,
    /// `Tus-Checksum-Algorithm` lists sha256.
    pub sha256: bool,
    /// `Upload-Limit`, which the draft requires of a server taking resumable uploads (with
    /// `min-size=0` when it has no limits).
    pub limit: Option<UploadLimit>,
}

impl Offer {
    pub(crate) fn read(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let list = |name: &str, wanted: &str| {
            text(name).is_some_and(|list| list.split(',').any(|v| v.trim().eq_ignore_ascii_case(wanted)))
        };
        Self {
            tus: list("tus-version", "1.0.0"),
            tus_max_size: text("tus-max-size").and_then(|v| v.trim().parse().ok()),
            sha256: list("tus-checksum-algorithm", "sha256"),
            limit: text("upload-limit").and_then(UploadLimit::parse),
        }
    }

    /// Whether the answer looks like the IETF draft's: an `Upload-Limit`.
    pub(crate) fn ietf(&self) -> bool {
        self.limit.is_some()
    }

    /// The largest chunk the server asks for (`max-append-size`), if any.
    pub(crate) fn append_limit(&self) -> Option<u64> {
        self.limit.and_then(|l| l.max_append_size).filter(|n| *n > 0)
    }
}

/// `--protocol auto`: tus whenever the server lists tus 1.0.0 (every ferry does, and the tus
/// path is the one with per-chunk checksums the server announces), the IETF draft when the
/// server announces only its `Upload-Limit`; None when the answer shows neither.
pub(crate) fn choose(choice: Choice, offer: &Offer) -> Option<Kind> {
    match choice {
        Choice::Tus => offer.tus.then_some(Kind::Tus),
        Choice::Ietf => Some(Kind::Ietf),
        Choice::Auto if offer.tus => Some(Kind::Tus),
        Choice::Auto => offer.ietf().then_some(Kind::Ietf),
    }
}

/// What a creation request carries.
pub(crate) struct Creation<'a> {
    pub size: u64,
    pub metadata: &'a Metadata,
    /// The SHA-256 of the file when the request's body is the whole file.
    pub whole: Option<[u8; 32]>,
}

/// A creation's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Created {
    pub location: Option<String>,
    /// The bytes of the request's body the server kept.
    pub offset: u64,
}

/// What an offset request says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub offset: u64,
    pub length: Option<u64>,
    /// The base64 SHA-256 from `Repr-Digest: sha-256=:...:`.
    pub sha256: Option<String>,
    /// `Upload-Complete` (IETF); tus has none, an upload is complete at its length.
    pub complete: Option<bool>,
}

impl Head {
    /// Whether nothing more needs sending to an upload of `size` bytes.
    pub(crate) fn done(&self, size: u64) -> bool {
        self.complete.unwrap_or(self.offset == size)
    }
}

/// One append request: `length` bytes from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub offset: u64,
    pub length: u64,
    /// The chunk ends the file.
    pub last: bool,
    pub sha256: Option<[u8; 32]>,
}

/// An append's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    pub offset: u64,
    pub complete: Option<bool>,
}

/// How one protocol's requests are dressed and its answers read. Methods and URLs are the same
/// in both (POST to the endpoint, HEAD, PATCH and DELETE to the upload), so a request comes in
/// with them set and leaves with the protocol's headers.
pub(crate) trait Protocol: Send + Sync {
    fn kind(&self) -> Kind;

    /// The header every request of the protocol carries (`Tus-Resumable`, the interop version).
    fn speak(&self, request: RequestBuilder) -> RequestBuilder;

    /// Whether chunks carry their SHA-256.
    fn checksums(&self, offer: &Offer) -> bool;

    /// The largest upload the server takes, and the field that said so.
    fn max_size(&self, offer: &Offer) -> Option<(u64, &'static str)>;

    /// Whether a file that fits one request is sent in the creation request itself.
    fn creates_with_content(&self) -> bool;

    /// POST to the endpoint.
    fn create(&self, request: RequestBuilder, creation: &Creation) -> RequestBuilder;

    /// The answer of a creation, when its status is a success.
    fn created(&self, status: StatusCode, headers: &HeaderMap, creation: &Creation) -> Option<Created>;

    /// HEAD to the upload.
    fn offset(&self, request: RequestBuilder) -> RequestBuilder {
        self.speak(request)
    }

    /// The answer of a successful HEAD.
    fn read_offset(&self, headers: &HeaderMap) -> Result<Head, String>;

    /// PATCH to the upload, with the chunk as its body.
    fn append(&self, request: RequestBuilder, chunk: &Chunk) -> RequestBuilder;

    /// The answer of a successful append; None when it does not say where the upload is.
    fn appended(&self, headers: &HeaderMap, chunk: &Chunk) -> Option<Appended>;

    /// Where a 409 says the upload is, from its headers or its body; None when it does not say.
    fn conflict(&self, headers: &HeaderMap, body: &str) -> Option<Appended>;

    /// DELETE to the upload.
    fn terminate(&self, request: RequestBuilder) -> RequestBuilder {
        self.speak(request)
    }
}

/// A non-negative Integer field (Structured Fields, RFC 9651): `Upload-Offset`, `Upload-Length`.
fn sf_integer(headers: &HeaderMap, name: &str) -> Option<u64> {
    let value = headers.get(name)?.to_str().ok()?;
    let item = sfv::Parser::new(value).parse::<sfv::Item>().ok()?;
    u64::try_from(i64::from(item.bare_item.as_integer()?)).ok()
}

/// A Boolean field: `Upload-Complete: ?1`.
fn sf_boolean(headers: &HeaderMap, name: &str) -> Option<bool> {
    let value = headers.get(name)?.to_str().ok()?;
    sfv::Parser::new(value).parse::<sfv::Item>().ok()?.bare_item.as_boolean()
}

/// The base64 SHA-256 of `Repr-Digest: sha-256=:...:`.
fn repr_sha256(headers: &HeaderMap) -> Option<String> {
    headers
        .get("repr-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').find_map(|d| d.trim().strip_prefix("sha-256=:")))
        .and_then(|v| v.strip_suffix(':'))
        .map(str::to_string)
}

fn location(headers: &HeaderMap) -> Option<String> {
    headers.get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    pub(super) fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (reqwest::header::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    const FERRY: &[(&str, &str)] = &[
        ("tus-version", "1.0.0"),
        ("tus-max-size", "107374182400"),
        ("tus-checksum-algorithm", "sha1,sha256,sha512,md5"),
        ("upload-limit", "max-size=107374182400, max-append-size=1048576, max-age=86400"),
    ];

    #[test]
    fn auto_prefers_tus_and_takes_the_draft_when_it_is_all_there_is() {
        let ferry = Offer::read(&headers(FERRY));
        assert!(ferry.tus && ferry.ietf() && ferry.sha256);
        assert_eq!(ferry.append_limit(), Some(1 << 20));
        assert_eq!(choose(Choice::Auto, &ferry), Some(Kind::Tus));
        assert_eq!(choose(Choice::Ietf, &ferry), Some(Kind::Ietf));

        let draft_only = Offer::read(&headers(&[("upload-limit", "min-size=0")]));
        assert_eq!(choose(Choice::Auto, &draft_only), Some(Kind::Ietf));
        assert_eq!(choose(Choice::Tus, &draft_only), None, "tus was asked for and is not spoken");

        let tusd = Offer::read(&headers(&[("tus-version", "1.0.0,0.2.2"), ("tus-extension", "creation")]));
        assert_eq!(choose(Choice::Auto, &tusd), Some(Kind::Tus));
        assert_eq!(tusd.append_limit(), None);

        let neither = Offer::read(&headers(&[("server", "nginx")]));
        assert_eq!(choose(Choice::Auto, &neither), None);
        // Forced, the draft is tried even where OPTIONS says nothing (it is only a SHOULD in -11).
        assert_eq!(choose(Choice::Ietf, &neither), Some(Kind::Ietf));
        // A malformed Upload-Limit is ignored, as the draft says.
        assert!(!Offer::read(&headers(&[("upload-limit", "max-size=big")])).ietf());
    }

    #[test]
    fn each_protocol_reads_its_limits() {
        let ferry = Offer::read(&headers(FERRY));
        assert_eq!(Tus.max_size(&ferry), Some((100 << 30, "Tus-Max-Size")));
        assert_eq!(Ietf.max_size(&ferry), Some((100 << 30, "Upload-Limit max-size")));
        assert!(Tus.checksums(&ferry) && Ietf.checksums(&ferry));
        let no_sums = Offer::read(&headers(&[("tus-version", "1.0.0")]));
        assert!(!Tus.checksums(&no_sums), "tus sends checksums the server lists");
        assert!(Ietf.checksums(&no_sums), "Content-Digest is ignored by servers that do not check it");
    }

    #[test]
    fn structured_fields() {
        let h = headers(&[("upload-offset", "42"), ("upload-complete", "?1"), ("upload-length", "-3")]);
        assert_eq!(sf_integer(&h, "upload-offset"), Some(42));
        assert_eq!(sf_boolean(&h, "upload-complete"), Some(true));
        assert_eq!(sf_integer(&h, "upload-length"), None);
        assert_eq!(sf_boolean(&headers(&[("upload-complete", "true")]), "upload-complete"), None);
        assert_eq!(sf_integer(&headers(&[("upload-offset", "7;x=1")]), "upload-offset"), Some(7));
        let digest =
            headers(&[("repr-digest", "sha-512=:AAAA:, sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:")]);
        assert_eq!(repr_sha256(&digest).as_deref(), Some("X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="));
    }

    #[test]
    fn an_upload_is_done_when_the_server_says_so_or_at_its_length() {
        let head = |offset, complete| Head { offset, length: Some(10), sha256: None, complete };
        assert!(head(10, None).done(10));
        assert!(!head(9, None).done(10));
        // The draft's Upload-Complete decides: all bytes there but not yet complete needs one
        // more (empty) append with Upload-Complete: ?1.
        assert!(!head(10, Some(false)).done(10));
        assert!(head(10, Some(true)).done(10));
    }
}
