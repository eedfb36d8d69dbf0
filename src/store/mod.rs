//! Upload bytes behind one trait, on `object_store`. Only this module touches object_store.

mod local;

use std::{ops::Range, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use object_store::path::Path;

use crate::uploads::types::UploadId;

pub use local::LocalStore;

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

/// A stream of bytes read back from the store.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// A download: the object's size and a stream of the requested range.
pub struct Download {
    pub size: u64,
    pub stream: ByteStream,
}

/// Bytes of uploads.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Prepares an empty upload so that it reads back as zero bytes.
    async fn create(&self, id: UploadId) -> Result<()>;

    /// Opens an append at `offset` for writer `generation`. Bytes become durable with
    /// [`Appender::finish`]; a writer of an older generation gets [`StoreError::Superseded`].
    async fn append(&self, id: UploadId, offset: u64, generation: i64) -> Result<Box<dyn Appender>>;

    /// Reads an upload's bytes, or a range of them.
    async fn read(&self, id: UploadId, range: Option<Range<u64>>) -> Result<Download>;

    /// Writes an upload's bytes in one go from a stream (used by background jobs).
    async fn write_stream(&self, id: UploadId, stream: ByteStream) -> Result<u64>;

    /// Deletes an upload's bytes and anything staged for it. Deleting twice is fine.
    async fn delete(&self, id: UploadId) -> Result<()>;

    /// A readable description of where an upload's bytes are (a path or a bucket key).
    fn location(&self, id: UploadId) -> String;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<()>;
}

/// An append in progress.
#[async_trait]
pub trait Appender: Send {
    /// Writes the next bytes. Returns [`StoreError::Superseded`] once a newer writer took over.
    async fn write(&mut self, data: Bytes) -> Result<()>;

    /// Makes everything written so far durable and readable.
    async fn finish(self: Box<Self>) -> Result<()>;
}

/// The object key of an upload's bytes.
pub fn object_path(id: UploadId) -> Path {
    Path::from(format!("uploads/{id}"))
}

/// Opens the store named by `url`: a local folder (`/path`, `./path` or `file:///path`).
pub fn open(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Arc::new(LocalStore::new(path)?));
    }
    if url.contains("://") {
        anyhow::bail!("unsupported store '{url}' (expected a folder path or file:///path)");
    }
    Ok(Arc::new(LocalStore::new(url)?))
}
