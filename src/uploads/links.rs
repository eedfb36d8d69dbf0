//! Signed download links: `{url}?expires=<unix seconds>&signature=<HMAC-SHA256>`, so that a
//! completed upload can be fetched with a plain GET (a link on a page, a webhook receiver's
//! worker, curl) without putting an upload token in a URL, where proxies and browsers log it.
//!
//! The signature covers the upload id and the expiry, with a key every instance reads from the
//! database (made once, by whichever instance starts first), so any instance verifies the links
//! another made.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{KeyInit, Mac};

use super::types::UploadId;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The name the key is kept under in the database.
pub const KEY_NAME: &str = "download-links";

/// Why a link does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("this download link expired at {0}; ask for a new one")]
    Expired(String),
    #[error("this download link's signature does not match: it was altered, or it is not a link ferry made")]
    Forged,
    #[error("a download link needs both 'expires' and 'signature'; {0}")]
    Malformed(&'static str),
}

#[derive(Clone)]
pub struct DownloadLinks {
    key: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for DownloadLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownloadLinks").field("key", &"redacted").field("ttl", &self.ttl).finish()
    }
}

/// A signed link's query parameters, as they arrived.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LinkQuery {
    pub expires: Option<String>,
    pub signature: Option<String>,
}

impl LinkQuery {
    /// The link parameters of a query string, if it has any.
    pub fn parse(query: Option<&str>) -> Option<Self> {
        let mut link = Self::default();
        for (key, value) in url::form_urlencoded::parse(query?.as_bytes()) {
            match &*key {
                "expires" => link.expires = Some(value.into_owned()),
                "signature" => link.signature = Some(value.into_owned()),
                _ => {}
            }
        }
        (link.expires.is_some() || link.signature.is_some()).then_some(link)
    }
}

/// An expiry (Unix seconds) as RFC 3339 in UTC, whole seconds: how links' expiries are shown.
pub fn rfc3339(expires: u64) -> String {
    let at = chrono::DateTime::from_timestamp(i64::try_from(expires).unwrap_or(i64::MAX), 0).unwrap_or_default();
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl DownloadLinks {
    /// Links valid for `ttl`, signed with `key` (at least 32 bytes).
    pub fn new(key: Vec<u8>, ttl: Duration) -> Self {
        assert!(key.len() >= 32, "a download link key holds at least 32 bytes");
        Self { key, ttl }
    }

    /// A fresh random key, for the first instance to store.
    pub fn new_key() -> Vec<u8> {
        use rand::RngCore;
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        key
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn mac(&self, id: UploadId, expires: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any size");
        mac.update(format!("ferry-download\n{id}\n{expires}").as_bytes());
        mac
    }

    /// `url` (the upload's URL) signed for `ttl` from `now_ms`, and when it expires (Unix seconds).
    pub fn sign(&self, url: &str, id: UploadId, now_ms: i64) -> (String, u64) {
        let expires = (now_ms.max(0) as u64 / 1000).saturating_add(self.ttl.as_secs().max(1));
        let signature = URL_SAFE_NO_PAD.encode(self.mac(id, expires).finalize().into_bytes());
        (format!("{url}?expires={expires}&signature={signature}"), expires)
    }

    /// Whether `link` opens upload `id` at `now_ms`.
    pub fn verify(&self, id: UploadId, link: &LinkQuery, now_ms: i64) -> Result<(), LinkError> {
        let (Some(expires), Some(signature)) = (&link.expires, &link.signature) else {
            return Err(LinkError::Malformed("ask for a new link"));
        };
        let expires: u64 = expires.parse().map_err(|_| LinkError::Malformed("'expires' is not a Unix time"))?;
        let signature = URL_SAFE_NO_PAD.decode(signature.trim_end_matches('=')).map_err(|_| LinkError::Forged)?;
        // The signature first: an altered expiry is a forgery, not an expired link.
        self.mac(id, expires).verify_slice(&signature).map_err(|_| LinkError::Forged)?;
        if (now_ms.max(0) as u64) / 1000 >= expires {
            return Err(LinkError::Expired(rfc3339(expires)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> DownloadLinks {
        DownloadLinks::new(vec![7; 32], Duration::from_secs(3600))
    }

    fn query_of(url: &str) -> LinkQuery {
        LinkQuery::parse(url.split_once('?').map(|(_, q)| q)).unwrap()
    }

    #[test]
    fn a_link_opens_its_upload_until_it_expires() {
        let id = UploadId::new();
        let now = 1_700_000_000_000;
        let (url, expires) = links().sign("http://h/files/x", id, now);
        assert_eq!(expires, 1_700_000_000 + 3600);
        let query = query_of(&url);
        assert_eq!(links().verify(id, &query, now), Ok(()));
        assert_eq!(links().verify(id, &query, now + 3_599_000), Ok(()));
        assert!(matches!(links().verify(id, &query, now + 3_600_000), Err(LinkError::Expired(_))));
    }

    #[test]
    fn altered_links_are_forgeries() {
        let id = UploadId::new();
        let now = 1_700_000_000_000;
        let (url, expires) = links().sign("http://h/files/x", id, now);
        let query = query_of(&url);
        // Another upload, a later expiry, another key, a changed signature.
        assert_eq!(links().verify(UploadId::new(), &query, now), Err(LinkError::Forged));
        let later = LinkQuery { expires: Some((expires + 1).to_string()), ..query.clone() };
        assert_eq!(links().verify(id, &later, now), Err(LinkError::Forged));
        let other = DownloadLinks::new(vec![8; 32], Duration::from_secs(3600));
        assert_eq!(other.verify(id, &query, now), Err(LinkError::Forged));
        let mut signature = query.signature.clone().unwrap();
        let last = signature.pop().unwrap();
        signature.push(if last == 'A' { 'B' } else { 'A' });
        let changed = LinkQuery { signature: Some(signature), ..query.clone() };
        assert_eq!(links().verify(id, &changed, now), Err(LinkError::Forged));
        let half = LinkQuery { signature: None, ..query };
        assert!(matches!(links().verify(id, &half, now), Err(LinkError::Malformed(_))));
        assert_eq!(LinkQuery::parse(Some("download=1")), None);
        assert_eq!(LinkQuery::parse(None), None);
    }

    #[test]
    fn the_key_is_redacted() {
        assert!(!format!("{:?}", links()).contains('7'));
    }
}
