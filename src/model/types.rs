//! Domain values, each parsed once and valid from then on.

use std::{fmt, str::FromStr};

use base64::{Engine, engine::general_purpose::STANDARD};
use digest::{Digest, common::hazmat::SerializableState};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An upload's id: a random UUID, written as 32 lowercase hex digits in URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UploadId(Uuid);

impl UploadId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn uuid(&self) -> Uuid {
        self.0
    }

    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl Default for UploadId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.simple())
    }
}

impl FromStr for UploadId {
    type Err = &'static str;

    /// Only the exact form ferry hands out is accepted, so ids never carry path separators,
    /// dots or other characters that could reach a storage path.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.len() != 32 || !value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err("not a valid upload id");
        }
        Uuid::try_parse(value).map(Self).map_err(|_| "not a valid upload id")
    }
}

/// Where an upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadState {
    /// Accepting appends.
    Receiving,
    /// All bytes are known; a background job is assembling them (final concatenations).
    Completing,
    /// All bytes are stored and readable; the SHA-256 is known.
    Completed,
    /// Deleted by its client.
    Terminated,
    /// Removed by the sweeper after a period without activity.
    Expired,
}

impl UploadState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Receiving => "receiving",
            Self::Completing => "completing",
            Self::Completed => "completed",
            Self::Terminated => "terminated",
            Self::Expired => "expired",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "receiving" => Self::Receiving,
            "completing" => Self::Completing,
            "completed" => Self::Completed,
            "terminated" => Self::Terminated,
            "expired" => Self::Expired,
            _ => return None,
        })
    }

    /// Terminated and expired uploads are remembered (to answer 410) but have no bytes.
    pub fn is_gone(self) -> bool {
        matches!(self, Self::Terminated | Self::Expired)
    }
}

/// The tus concatenation role of an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Concat {
    None,
    Partial,
    /// A final upload: the concatenation of these partial uploads, in order.
    Final(Vec<UploadId>),
}

/// `Upload-Metadata`: comma-separated `key base64value` pairs, kept in the client's order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata(Vec<(String, Option<String>)>);

impl Metadata {
    /// Largest `Upload-Metadata` value accepted, in bytes.
    pub const MAX_LEN: usize = 16 * 1024;

    pub fn parse(header: &str) -> Result<Self, String> {
        if header.len() > Self::MAX_LEN {
            return Err(format!("Upload-Metadata is longer than {} bytes", Self::MAX_LEN));
        }
        let mut pairs: Vec<(String, Option<String>)> = Vec::new();
        if header.trim().is_empty() {
            return Ok(Self(pairs));
        }
        for pair in header.split(',') {
            let pair = pair.trim();
            let mut parts = pair.splitn(2, ' ');
            let key = parts.next().unwrap_or_default();
            let value = parts.next().map(str::trim);
            if key.is_empty() {
                return Err("Upload-Metadata has an empty key".into());
            }
            if !key.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                return Err(format!("Upload-Metadata key '{key}' contains characters that are not allowed"));
            }
            if pairs.iter().any(|(existing, _)| existing == key) {
                return Err(format!("Upload-Metadata key '{key}' appears more than once"));
            }
            let value = match value {
                None | Some("") => None,
                Some(encoded) => {
                    STANDARD
                        .decode(encoded)
                        .map_err(|_| format!("Upload-Metadata value for '{key}' is not valid base64"))?;
                    Some(encoded.to_string())
                }
            };
            pairs.push((key.to_string(), value));
        }
        Ok(Self(pairs))
    }

    /// Sets `key` to a text value (replacing any value it had).
    pub fn insert(&mut self, key: &str, value: &str) {
        let encoded = Some(STANDARD.encode(value));
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = encoded,
            None => self.0.push((key.to_string(), encoded)),
        }
    }

    /// The header value to echo back, in the canonical form.
    pub fn to_header(&self) -> String {
        self.0
            .iter()
            .map(|(key, value)| match value {
                Some(value) => format!("{key} {value}"),
                None => key.clone(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A value decoded as UTF-8 text (lossy), if the key is present with a value.
    pub fn text(&self, key: &str) -> Option<String> {
        let (_, value) = self.0.iter().find(|(k, _)| k == key)?;
        let bytes = STANDARD.decode(value.as_ref()?).ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Decoded `(key, value)` pairs, for event payloads.
    pub fn decoded(&self) -> Vec<(String, Option<String>)> {
        self.0.iter().map(|(key, _)| (key.clone(), self.text(key))).collect()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("metadata serializes")
    }

    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json).map(Self)
    }
}

/// Checksum algorithms accepted in `Upload-Checksum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumAlgorithm {
    Sha1,
    Sha256,
    Sha512,
    Md5,
}

impl ChecksumAlgorithm {
    /// As advertised in `Tus-Checksum-Algorithm`.
    pub const ADVERTISED: &'static str = "sha1,sha256,sha512,md5";

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "sha1" => Self::Sha1,
            "sha256" => Self::Sha256,
            "sha512" => Self::Sha512,
            "md5" => Self::Md5,
            _ => return None,
        })
    }

    fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
            Self::Md5 => 16,
        }
    }
}

/// An expected per-request checksum (`Upload-Checksum: <algorithm> <base64 digest>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: ChecksumAlgorithm,
    pub digest: Vec<u8>,
}

impl Checksum {
    pub fn parse(header: &str) -> Result<Self, String> {
        let (name, encoded) =
            header.trim().split_once(' ').ok_or("Upload-Checksum must be '<algorithm> <base64 digest>'")?;
        let algorithm = ChecksumAlgorithm::parse(name).ok_or_else(|| {
            format!(
                "Upload-Checksum algorithm '{name}' is not supported (supported: {})",
                ChecksumAlgorithm::ADVERTISED
            )
        })?;
        let digest =
            STANDARD.decode(encoded.trim()).map_err(|_| "Upload-Checksum digest is not valid base64".to_string())?;
        if digest.len() != algorithm.digest_len() {
            return Err(format!(
                "Upload-Checksum digest is {} bytes, {name} digests are {}",
                digest.len(),
                algorithm.digest_len()
            ));
        }
        Ok(Self { algorithm, digest })
    }

    pub fn hasher(&self) -> ChecksumHasher {
        self.algorithm.hasher()
    }
}

impl ChecksumAlgorithm {
    pub const ALL: [Self; 4] = [Self::Sha1, Self::Sha256, Self::Sha512, Self::Md5];

    pub fn hasher(self) -> ChecksumHasher {
        match self {
            ChecksumAlgorithm::Sha1 => ChecksumHasher::Sha1(sha1::Sha1::new()),
            ChecksumAlgorithm::Sha256 => ChecksumHasher::Sha256(sha2::Sha256::new()),
            ChecksumAlgorithm::Sha512 => ChecksumHasher::Sha512(sha2::Sha512::new()),
            ChecksumAlgorithm::Md5 => ChecksumHasher::Md5(md5::Md5::new()),
        }
    }
}

/// A running per-request checksum.
#[derive(Clone)]
pub enum ChecksumHasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
    Md5(md5::Md5),
}

/// How a request's body is to be checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ChecksumPlan {
    #[default]
    None,
    /// `Upload-Checksum` sent as a header.
    Header(Checksum),
    /// `Upload-Checksum` announced in `Trailer`, to arrive after the body.
    Trailer,
}

impl ChecksumHasher {
    pub fn algorithm(&self) -> ChecksumAlgorithm {
        match self {
            Self::Sha1(_) => ChecksumAlgorithm::Sha1,
            Self::Sha256(_) => ChecksumAlgorithm::Sha256,
            Self::Sha512(_) => ChecksumAlgorithm::Sha512,
            Self::Md5(_) => ChecksumAlgorithm::Md5,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha1(h) => h.update(data),
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
            Self::Md5(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Vec<u8> {
        match self {
            Self::Sha1(h) => h.finalize().to_vec(),
            Self::Sha256(h) => h.finalize().to_vec(),
            Self::Sha512(h) => h.finalize().to_vec(),
            Self::Md5(h) => h.finalize().to_vec(),
        }
    }
}

/// The whole-file SHA-256, whose state is saved with the offset so that any instance can continue it.
#[derive(Clone)]
pub struct FileHasher(sha2::Sha256);

impl FileHasher {
    pub fn new() -> Self {
        Self(sha2::Sha256::new())
    }

    /// Restores a state saved by [`FileHasher::save`].
    pub fn restore(state: &[u8]) -> Result<Self, String> {
        let state = state.try_into().map_err(|_| "saved hash state has the wrong size".to_string())?;
        sha2::Sha256::deserialize(state).map(Self).map_err(|_| "saved hash state is corrupt".to_string())
    }

    pub fn save(&self) -> Vec<u8> {
        self.0.serialize().to_vec()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

impl Default for FileHasher {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_strict() {
        let id = UploadId::new();
        assert_eq!(id.to_string().parse::<UploadId>(), Ok(id));
        for bad in [
            "",
            "../etc/passwd",
            "0123456789abcdef0123456789ABCDEF",
            "0123456789abcdef0123456789abcde",
            "01234567-89ab-cdef-0123-456789abcdef",
            "0123456789abcdef0123456789abcdeg",
        ] {
            assert!(bad.parse::<UploadId>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn metadata_parses_and_echoes() {
        let meta = Metadata::parse("filename d29ybGQucGRm,is_confidential, type dGV4dC9wbGFpbg==").unwrap();
        assert_eq!(meta.text("filename").as_deref(), Some("world.pdf"));
        assert_eq!(meta.text("is_confidential"), None);
        assert_eq!(meta.to_header(), "filename d29ybGQucGRm,is_confidential,type dGV4dC9wbGFpbg==");
        assert_eq!(Metadata::from_json(&meta.to_json()).unwrap(), meta);
        assert!(Metadata::parse("").unwrap().is_empty());
    }

    #[test]
    fn metadata_rejects_bad_input() {
        assert!(Metadata::parse("a Zm9v,a YmFy").unwrap_err().contains("more than once"));
        assert!(Metadata::parse("a !!!").unwrap_err().contains("base64"));
        assert!(Metadata::parse("a Zm9v,,b").unwrap_err().contains("empty key"));
        assert!(Metadata::parse(&"x".repeat(Metadata::MAX_LEN + 1)).is_err());
    }

    #[test]
    fn checksums() {
        let sum = Checksum::parse("sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=").unwrap();
        assert_eq!(sum.algorithm, ChecksumAlgorithm::Sha1);
        let mut hasher = sum.hasher();
        hasher.update(b"hello world");
        assert_eq!(hasher.finish(), sum.digest);
        assert!(Checksum::parse("crc32 AAAA").unwrap_err().contains("not supported"));
        assert!(Checksum::parse("sha1 ***").unwrap_err().contains("base64"));
        assert!(Checksum::parse("sha1 AAAA").unwrap_err().contains("bytes"));
        assert!(Checksum::parse("sha1").is_err());
    }

    #[test]
    fn file_hash_state_survives_a_restart() {
        let mut whole = FileHasher::new();
        whole.update(b"hello world");
        let mut first = FileHasher::new();
        first.update(b"hello ");
        let mut resumed = FileHasher::restore(&first.save()).unwrap();
        resumed.update(b"world");
        assert_eq!(resumed.finish(), whole.finish());
        assert!(FileHasher::restore(b"short").is_err());
    }
}
