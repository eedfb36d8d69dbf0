//! Upload bytes behind one trait, on `object_store`. Only this module touches object_store.
//!
//! Two backends: local disk ([`LocalStore`]: bytes written once, at their offset) and object
//! stores ([`ObjectBackend`]: S3, GCS, Azure; appends go straight into a native multipart upload
//! whose parts the repo records, so any instance can add the next part or complete it).

mod instrumented;
pub(crate) mod local;
mod object;

use std::{ops::Range, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use object_store::{ObjectStore, ObjectStoreExt, path::Path};

pub use crate::model::parts::{AppendOutcome, Part, Staged, StoreUpload, valid_key_prefix};
use crate::model::types::UploadId;

pub use instrumented::Instrumented;
pub use local::LocalStore;
pub use object::{ObjectBackend, ObjectStoreOptions};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A newer request for the same upload took over; this writer must stop.
    #[error("a newer request for this upload took over")]
    Superseded,
    #[error("object not found")]
    NotFound,
    #[error("storage error: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage error: {0}")]
    Other(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Whether an I/O error says the disk (or the quota) is full.
pub fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || error.kind() == std::io::ErrorKind::StorageFull
}

impl StoreError {
    /// The store's disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io(e) if is_disk_full(e))
    }

    /// The store did not answer, or answered that it cannot serve now (after object_store's own
    /// retries): asking again later may work.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::ObjectStore(e) => !matches!(
                e,
                object_store::Error::NotFound { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }
                    | object_store::Error::NotModified { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            _ => false,
        }
    }
}

/// Space on the volume of a local store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes an unprivileged writer may still use.
    pub available: u64,
    /// The volume's size.
    pub total: u64,
}

/// A stream of bytes read back from the store.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// A download: the object's size and a stream of the requested range.
pub struct Download {
    pub size: u64,
    pub stream: ByteStream,
}

/// Guards the uploads of parts: a writer uploads a part only while it is the newest writer and
/// no older writer is still mid-way through uploading one, so the last upload of any part
/// number is always the newest writer's.
#[async_trait]
pub trait WriterCheck: Send + Sync {
    /// Waits until this writer may upload a part; [`StoreError::Superseded`] once a newer
    /// writer took over.
    async fn begin_part(&self) -> Result<()>;

    /// Lets other writers upload parts again.
    async fn end_part(&self);

    /// Whether the database still names this writer's generation as the upload's newest. A
    /// local store asks when its lock file records a newer one: a PostgreSQL that crashed loses
    /// the last leases it had not flushed, and hands their generations out again.
    async fn is_newest(&self) -> Result<bool> {
        Ok(false)
    }
}

/// Everything an append needs to continue an upload.
pub struct AppendContext {
    pub id: UploadId,
    /// Where this request's bytes start.
    pub offset: u64,
    pub generation: i64,
    pub upload: StoreUpload,
    /// Staged bytes that end at `offset`, in order.
    pub staged: Vec<Staged>,
    pub check: Arc<dyn WriterCheck>,
    /// Cancelled when a newer append for the same upload took over on this instance: a write
    /// that was waiting for its turn must not happen then.
    pub stop: tokio_util::sync::CancellationToken,
}

/// Bytes of uploads.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Prepares a new upload of at most `max_length` bytes under `key_prefix`; `empty` uploads
    /// are complete at once.
    async fn create(
        &self,
        id: UploadId,
        key_prefix: Option<String>,
        max_length: u64,
        empty: bool,
    ) -> Result<StoreUpload>;

    /// Opens an append. Bytes become durable with [`Appender::finish`]; a writer of an older
    /// generation gets [`StoreError::Superseded`].
    async fn append(&self, context: AppendContext) -> Result<Box<dyn Appender>>;

    /// True when an upload's bytes are readable as soon as the last append is durable (local
    /// disk); false when [`Store::complete`] has to assemble them (object stores).
    fn completes_in_place(&self) -> bool;

    /// Completes an upload from its parts (a multipart completion: no byte is copied).
    async fn complete(&self, id: UploadId, upload: &StoreUpload, parts: &[Part]) -> Result<()>;

    /// Reads an upload's bytes, or a range of them.
    async fn read(&self, id: UploadId, upload: &StoreUpload, range: Option<Range<u64>>) -> Result<Download>;

    /// Writes an upload's bytes in one go from a stream (used by background jobs).
    async fn write_stream(&self, id: UploadId, upload: &StoreUpload, stream: ByteStream) -> Result<u64>;

    /// Deletes everything stored for an upload: bytes, multipart upload, staged objects.
    /// Deleting twice is fine.
    async fn delete(&self, id: UploadId, upload: &StoreUpload, staged: &[Staged]) -> Result<()>;

    /// Staged objects in the store, with the upload they belong to and their age, so the sweeper
    /// can reclaim those left behind by crashed or superseded requests.
    async fn staged_objects(&self) -> Result<Vec<StagedObject>>;

    /// Deletes one staged object.
    async fn delete_staged(&self, key: &str) -> Result<()>;

    /// A short-lived URL the client can download a completed upload from directly, where the
    /// store supports it.
    async fn presign(&self, id: UploadId, upload: &StoreUpload, expires_in: Duration) -> Result<Option<String>>;

    /// A readable description of where an upload's bytes are (a path or a bucket and key).
    fn location(&self, id: UploadId, upload: &StoreUpload) -> String;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<()>;

    /// The free space of the volume the store writes to, where it has one (local disk).
    fn space(&self) -> Option<Space> {
        None
    }

    /// The size of the parts an upload of `max_length` bytes is cut into, on stores that keep a
    /// part in memory until it is uploaded; None for local disk.
    fn largest_part(&self, _max_length: u64) -> Option<u64> {
        None
    }
}

/// A staged object found in the store.
#[derive(Debug, Clone)]
pub struct StagedObject {
    pub upload: UploadId,
    pub key: String,
    pub modified_ms: i64,
}

/// An append in progress. Its methods block: they run on the write stage's own thread (see
/// `uploads::pipeline`), which waits for the disk or for the store's answers.
pub trait Appender: Send {
    /// Writes the next bytes, in order (several received frames at once, so that a backend can
    /// write them with one vectored call). Returns [`StoreError::Superseded`] once a newer writer
    /// took over.
    fn write(&mut self, data: Vec<Bytes>) -> Result<()>;

    /// Makes everything written so far durable; `last` when these bytes complete the upload.
    fn finish(self: Box<Self>, last: bool) -> Result<AppendOutcome>;

    /// How many more bytes this appender keeps in memory after [`Appender::write`] returns
    /// before it lets go of any (the rest of an object store's part; staged bytes are loaded
    /// into it too). `None` when written bytes are let go at once (local disk). The caller
    /// reserves memory for that many bytes at once, so that a part can always be completed
    /// once begun.
    fn holds_until(&self) -> Option<u64> {
        None
    }
}

/// Reads an object, or a range of it, as a stream; its size comes with it.
async fn read_object(store: &dyn ObjectStore, path: &Path, range: Option<Range<u64>>) -> Result<Download> {
    use futures_util::{StreamExt, TryStreamExt};
    let size = match store.head(path).await {
        Ok(meta) => meta.size,
        Err(object_store::Error::NotFound { .. }) => return Err(StoreError::NotFound),
        Err(e) => return Err(e.into()),
    };
    let range = range.unwrap_or(0..size);
    if range.is_empty() {
        return Ok(Download { size, stream: futures_util::stream::empty().boxed() });
    }
    let options =
        object_store::GetOptions { range: Some(object_store::GetRange::Bounded(range)), ..Default::default() };
    let result = store.get_opts(path, options).await?;
    Ok(Download { size, stream: result.into_stream().map_err(StoreError::from).boxed() })
}

/// Writes a stream into an object through object_store's multipart writer (two parts in
/// flight at most), aborting it if the stream fails. Returns the bytes written.
async fn write_multipart(
    upload: Box<dyn object_store::MultipartUpload>,
    part_size: usize,
    mut stream: ByteStream,
) -> Result<u64> {
    use futures_util::StreamExt;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, part_size);
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                writer.abort().await?;
                return Err(e);
            }
        };
        writer.wait_for_capacity(2).await?;
        written += chunk.len() as u64;
        writer.put(chunk);
    }
    writer.finish().await?;
    Ok(written)
}

/// Opens the store named by `url`: a local folder (`/path`, `./path` or `file:///path`), or
/// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` configured from the
/// environment as object_store reads it (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
pub fn open(url: &str, options: ObjectStoreOptions) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Arc::new(LocalStore::new(path)?));
    }
    if url.contains("://") {
        return Ok(Arc::new(ObjectBackend::from_url(url, options)?));
    }
    Ok(Arc::new(LocalStore::new(url)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefixes() {
        for good in ["alice/", "team-1/2026/", "a.b_c", "x"] {
            assert!(valid_key_prefix(good), "{good}");
        }
        for bad in ["/abs/", "../up/", "a/../b/", "a//b/", "./", "sp ace/", "ümlaut/", &"x".repeat(129)] {
            assert!(!valid_key_prefix(bad), "{bad}");
        }
        let id = UploadId::new();
        let upload = StoreUpload { key_prefix: Some("alice/".into()), ..Default::default() };
        assert_eq!(upload.object_path(id).to_string(), format!("uploads/alice/{id}"));
        assert_eq!(StoreUpload::default().object_path(id).to_string(), format!("uploads/{id}"));
    }
}
