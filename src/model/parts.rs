//! Where an upload's bytes are, as the store sets it up and the repo saves it.

use object_store::path::Path;

use super::types::UploadId;

/// What the store set up for an upload, saved with it by the repo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreUpload {
    /// The native multipart upload receiving the parts (object stores).
    pub multipart_id: Option<String>,
    /// Every part but the last has exactly this size, so part `i` covers
    /// `[i * part_size, (i + 1) * part_size)`.
    pub part_size: Option<u64>,
    /// Put before the id in the object's key (`uploads/<key_prefix><id>`), as the pre-create
    /// hook asked; checked by [`valid_key_prefix`].
    pub key_prefix: Option<String>,
}

impl StoreUpload {
    /// The object key of this upload's bytes.
    pub fn object_path(&self, id: UploadId) -> Path {
        Path::from(format!("uploads/{}{id}", self.key_prefix.as_deref().unwrap_or("")))
    }
}

/// One partial upload's bytes inside a final (concatenated) upload: the final upload is read
/// from these objects in order, nothing is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The partial upload whose object holds the bytes.
    pub upload: UploadId,
    /// Where the piece begins in the final upload.
    pub start: u64,
    pub size: u64,
    /// The partial upload's key prefix: its object is `uploads/<key_prefix><upload>`.
    pub key_prefix: Option<String>,
}

impl Piece {
    /// The partial upload's bytes, as the store finds them.
    pub fn store(&self) -> StoreUpload {
        StoreUpload { key_prefix: self.key_prefix.clone(), ..Default::default() }
    }

    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// A key prefix is a relative path of letters, digits, `.`, `_`, `-` and `/`, with no empty or
/// dot-only segments, at most 128 characters.
pub fn valid_key_prefix(prefix: &str) -> bool {
    prefix.len() <= 128
        && !prefix.starts_with('/')
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        && prefix.trim_end_matches('/').split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// A part of a multipart upload, stored and ready to be completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub index: u64,
    pub size: u64,
    pub content_id: String,
}

/// Bytes smaller than a part, kept as an object of their own until merged into a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub key: String,
    pub offset: u64,
    pub size: u64,
}

/// What an append made durable, to be committed with the new offset.
#[derive(Debug, Clone, Default)]
pub struct AppendOutcome {
    pub parts: Vec<Part>,
    pub staged: Vec<Staged>,
    /// Keys of staged objects merged into a part (their rows go; the objects can be deleted).
    pub consumed: Vec<String>,
}
