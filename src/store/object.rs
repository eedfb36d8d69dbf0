//! Object stores (S3 and S3-compatible stores, GCS, Azure): appends go straight into a native
//! multipart upload.
//!
//! Parts all have the upload's part size (the last may be shorter), so part `i` always covers
//! `[i * part_size, (i + 1) * part_size)`: which part a byte belongs to never depends on how the
//! client chunked the file. That keeps stores that require equal part sizes (Cloudflare R2)
//! happy, and makes a superseded writer harmless: if it still uploads a part, it uploads the same
//! bytes under the same number. A request whose bytes do not fill a part stages them as an
//! object of their own; the next append merges the staged bytes into its first part (a copy
//! bounded by the part size, never by the file). Completing is `complete_multipart`: no byte is
//! copied again.

use std::{collections::VecDeque, ops::Range, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::{
    BackoffConfig, MultipartId, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    aws::AmazonS3Builder,
    azure::MicrosoftAzureBuilder,
    gcp::GoogleCloudStorageBuilder,
    multipart::{MultipartStore, PartId},
    path::Path,
    signer::Signer,
};

use super::{
    AppendContext, AppendOutcome, Appender, ByteStream, Download, Part, Result, Staged, StagedObject, Store,
    StoreError, StoreUpload, WriterCheck,
};
use crate::model::types::UploadId;

/// The smallest part S3 (and GCS's XML API) accept, but for the last.
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Most parts a multipart upload may have.
pub const MAX_PARTS: u64 = 10_000;

#[derive(Debug, Clone)]
pub struct ObjectStoreOptions {
    /// Preferred part size; raised per upload when needed to stay within 10,000 parts.
    pub part_size: u64,
    /// object_store configuration keys and values (`aws_endpoint`, `aws_allow_http`,
    /// `google_service_account`, `azure_storage_account_name`, ...), applied over the environment.
    pub config: Vec<(String, String)>,
    /// How long after a call's first attempt it is retried (with exponential backoff and
    /// jitter) when the store answers 5xx or 429, resets, or times out (`--store-retry-budget`).
    pub retry_budget: Duration,
    /// How long one attempt of a call may take (`--store-timeout`).
    pub timeout: Duration,
}

impl Default for ObjectStoreOptions {
    fn default() -> Self {
        Self {
            part_size: 8 << 20,
            config: Vec::new(),
            retry_budget: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
        }
    }
}

impl ObjectStoreOptions {
    /// object_store's retry rules for these options: retries of idempotent calls (every call
    /// ferry makes is: a part or an object is put under its own name, a completion names its
    /// parts) with backoff from 100 ms to 2 s and decorrelated jitter, within the budget.
    fn retry(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 20,
            retry_timeout: self.retry_budget,
        }
    }

    /// The configuration in force: the per-attempt timeout first, then the operator's own keys
    /// (which may override it).
    fn config(&self) -> Vec<(String, String)> {
        let mut config = vec![("timeout".to_string(), format!("{}ms", self.timeout.as_millis()))];
        config.extend(self.config.iter().cloned());
        config
    }
}

/// Which object store: they differ in how an unfinished multipart upload is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    S3,
    Gcs,
    Azure,
}

pub struct ObjectBackend {
    kind: Kind,
    store: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    signer: Arc<dyn Signer>,
    prefix: String,
    description: String,
    part_size: u64,
}

impl ObjectBackend {
    /// Builds the store for `s3://`, `gs://` or `az://` URLs from the environment
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`, as object_store reads them).
    pub fn from_url(url: &str, options: ObjectStoreOptions) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("store URL '{url}': {e}"))?;
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| anyhow::anyhow!("store URL '{url}' names no bucket (expected e.g. s3://bucket/prefix)"))?;
        let prefix = parsed.path().trim_matches('/').to_string();
        let (store, multipart, signer): (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>, Arc<dyn Signer>) =
            match parsed.scheme() {
                "s3" | "s3a" => {
                    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(options.retry());
                    for (key, value) in &options.config() {
                        builder = builder.with_config(key.parse()?, value);
                    }
                    let s3 = Arc::new(builder.build()?);
                    (s3.clone(), s3.clone(), s3)
                }
                "gs" => {
                    let mut builder =
                        GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket).with_retry(options.retry());
                    for (key, value) in &options.config() {
                        builder = builder.with_config(key.parse()?, value);
                    }
                    let gcs = Arc::new(builder.build()?);
                    (gcs.clone(), gcs.clone(), gcs)
                }
                "az" | "azure" => {
                    let mut builder =
                        MicrosoftAzureBuilder::from_env().with_container_name(bucket).with_retry(options.retry());
                    for (key, value) in &options.config() {
                        builder = builder.with_config(key.parse()?, value);
                    }
                    let azure = Arc::new(builder.build()?);
                    (azure.clone(), azure.clone(), azure)
                }
                other => anyhow::bail!("unsupported store scheme '{other}' (use s3://, gs://, az:// or a folder)"),
            };
        let kind = match parsed.scheme() {
            "gs" => Kind::Gcs,
            "az" | "azure" => Kind::Azure,
            _ => Kind::S3,
        };
        let description = match prefix.as_str() {
            "" => format!("{}://{bucket}", parsed.scheme()),
            p => format!("{}://{bucket}/{p}", parsed.scheme()),
        };
        let part_size = options.part_size.max(MIN_PART_SIZE);
        Ok(Self { kind, store, multipart, signer, prefix, description, part_size })
    }

    fn key(&self, relative: &str) -> Path {
        if self.prefix.is_empty() { Path::from(relative) } else { Path::from(format!("{}/{relative}", self.prefix)) }
    }

    fn upload_path(&self, id: UploadId, upload: &StoreUpload) -> Path {
        self.key(upload.object_path(id).as_ref())
    }

    /// Drops the parts of an unfinished multipart upload. Azure has no abort (object_store's is a
    /// no-op and the uncommitted blocks would stay for a week): committing an empty block list
    /// discards every uncommitted block of the blob, and leaves an empty blob to delete.
    async fn drop_parts(&self, path: &Path, multipart_id: &MultipartId) -> object_store::Result<()> {
        match self.kind {
            Kind::Azure => self.multipart.complete_multipart(path, multipart_id, Vec::new()).await.map(|_| ()),
            Kind::S3 | Kind::Gcs => self.multipart.abort_multipart(path, multipart_id).await,
        }
    }

    /// The part size for an upload of at most `max_length` bytes: the configured size, raised
    /// to a whole MiB that keeps the upload within 10,000 parts.
    fn part_size_for(&self, max_length: u64) -> u64 {
        let needed = max_length.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
        self.part_size.max(needed)
    }
}

fn ignore_not_found(result: object_store::Result<()>) -> Result<()> {
    match result {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[async_trait]
impl Store for ObjectBackend {
    async fn create(
        &self,
        id: UploadId,
        key_prefix: Option<String>,
        max_length: u64,
        empty: bool,
    ) -> Result<StoreUpload> {
        let upload = StoreUpload { key_prefix, ..Default::default() };
        let path = self.upload_path(id, &upload);
        if empty {
            self.store.put(&path, PutPayload::new()).await?;
            return Ok(upload);
        }
        let multipart_id = self.multipart.create_multipart(&path).await?;
        Ok(StoreUpload { multipart_id: Some(multipart_id), part_size: Some(self.part_size_for(max_length)), ..upload })
    }

    async fn append(&self, context: AppendContext) -> Result<Box<dyn Appender>> {
        let (Some(multipart_id), Some(part_size)) = (context.upload.multipart_id.clone(), context.upload.part_size)
        else {
            return Err(StoreError::Other(format!("upload {} has no multipart upload", context.id)));
        };
        let staged_len: u64 = context.staged.iter().map(|s| s.size).sum();
        let part_start =
            context.offset.checked_sub(staged_len).filter(|start| start % part_size == 0).ok_or_else(|| {
                StoreError::Other(format!("staged bytes of upload {} do not line up with its parts", context.id))
            })?;
        Ok(Box::new(ObjectAppender {
            parts: Arc::new(PartTarget {
                store: self.store.clone(),
                multipart: self.multipart.clone(),
                check: context.check,
                path: self.upload_path(context.id, &context.upload),
                multipart_id,
            }),
            staging: self.key(&format!("staging/{}", context.id)),
            part_size,
            generation: context.generation,
            next_index: part_start / part_size,
            staged: context.staged,
            staged_len,
            buffer: VecDeque::new(),
            buffered: 0,
            buffer_offset: context.offset,
            uploading: None,
            outcome: AppendOutcome::default(),
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    fn completes_in_place(&self) -> bool {
        false
    }

    async fn complete(&self, id: UploadId, upload: &StoreUpload, parts: &[Part]) -> Result<()> {
        let Some(multipart_id) = &upload.multipart_id else {
            return Ok(());
        };
        let mut ordered = parts.to_vec();
        ordered.sort_by_key(|p| p.index);
        if ordered.iter().enumerate().any(|(i, p)| p.index != i as u64) {
            return Err(StoreError::Other(format!("parts of upload {id} are not contiguous")));
        }
        let path = self.upload_path(id, upload);
        let ids = ordered.into_iter().map(|p| PartId { content_id: p.content_id }).collect();
        match self.multipart.complete_multipart(&path, multipart_id, ids).await {
            Ok(_) => Ok(()),
            // Completed before (by a request or a job that then died): the object is there.
            Err(e) => match self.store.head(&path).await {
                Ok(_) => Ok(()),
                Err(_) => Err(e.into()),
            },
        }
    }

    async fn read(&self, id: UploadId, upload: &StoreUpload, range: Option<Range<u64>>) -> Result<Download> {
        let path = self.upload_path(id, upload);
        super::read_object(self.store.as_ref(), &path, range).await
    }

    async fn write_stream(&self, id: UploadId, upload: &StoreUpload, stream: ByteStream) -> Result<u64> {
        let upload = self.store.put_multipart(&self.upload_path(id, upload)).await?;
        super::write_multipart(upload, self.part_size as usize, stream).await
    }

    async fn delete(&self, id: UploadId, upload: &StoreUpload, staged: &[Staged]) -> Result<()> {
        let path = self.upload_path(id, upload);
        if let Some(multipart_id) = &upload.multipart_id
            && let Err(e) = self.drop_parts(&path, multipart_id).await
        {
            // Aborting a completed or already aborted upload fails; what matters is that no
            // parts stay behind, which a later abort or the bucket's lifecycle rule handles.
            tracing::debug!(upload = %id, error = %e, "abort of the multipart upload failed");
        }
        for item in staged {
            ignore_not_found(self.store.delete(&Path::from(item.key.as_str())).await)?;
        }
        // Staged objects no row points to (a request that died before committing).
        let leftovers: Vec<Path> =
            self.store.list(Some(&self.key(&format!("staging/{id}")))).map_ok(|m| m.location).try_collect().await?;
        for key in leftovers {
            ignore_not_found(self.store.delete(&key).await)?;
        }
        ignore_not_found(self.store.delete(&path).await)
    }

    async fn staged_objects(&self) -> Result<Vec<StagedObject>> {
        let staging = self.key("staging");
        let objects: Vec<_> = self.store.list(Some(&staging)).try_collect().await?;
        Ok(objects
            .into_iter()
            .filter_map(|meta| {
                let key = meta.location.to_string();
                let relative = key.strip_prefix(&format!("{staging}/"))?;
                let upload = relative.split('/').next()?.parse().ok()?;
                Some(StagedObject { upload, key, modified_ms: meta.last_modified.timestamp_millis() })
            })
            .collect())
    }

    async fn delete_staged(&self, key: &str) -> Result<()> {
        ignore_not_found(self.store.delete(&Path::from(key)).await)
    }

    async fn presign(&self, id: UploadId, upload: &StoreUpload, expires_in: Duration) -> Result<Option<String>> {
        let url = self.signer.signed_url(http::Method::GET, &self.upload_path(id, upload), expires_in).await?;
        Ok(Some(url.to_string()))
    }

    fn location(&self, id: UploadId, upload: &StoreUpload) -> String {
        format!("{}/{}", self.description, upload.object_path(id))
    }

    fn largest_part(&self, max_length: u64) -> Option<u64> {
        Some(self.part_size_for(max_length))
    }

    async fn ping(&self) -> Result<()> {
        match self.store.head(&self.key(".ferry-ping")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Where an append's parts go, shared with the tasks that upload them.
struct PartTarget {
    store: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    check: Arc<dyn WriterCheck>,
    path: Path,
    multipart_id: String,
}

/// A part in the store, and the staged objects it merged (which can go once it is committed).
struct Uploaded {
    part: Part,
    consumed: Vec<String>,
}

/// A part on its way to the store: its index, the staged objects it merges, and its bytes.
struct PartUpload {
    index: u64,
    staged: Vec<Staged>,
    chunks: Vec<Bytes>,
}

impl PartTarget {
    /// Uploads a part while this writer holds the right to (see [`WriterCheck`]).
    async fn upload(&self, part: PartUpload) -> Result<Uploaded> {
        self.check.begin_part().await?;
        let uploaded = self.put(part).await;
        self.check.end_part().await;
        uploaded
    }

    async fn put(&self, part: PartUpload) -> Result<Uploaded> {
        let mut chunks: Vec<Bytes> = Vec::with_capacity(part.staged.len() + part.chunks.len());
        for staged in &part.staged {
            let bytes = self.store.get(&Path::from(staged.key.as_str())).await?.bytes().await?;
            if bytes.len() as u64 != staged.size {
                return Err(StoreError::Other(format!("staged object {} has the wrong size", staged.key)));
            }
            chunks.push(bytes);
        }
        chunks.extend(part.chunks);
        let size = chunks.iter().map(|c| c.len() as u64).sum();
        let payload = PutPayload::from_iter(chunks);
        let uploaded = self.multipart.put_part(&self.path, &self.multipart_id, part.index as usize, payload).await?;
        let consumed = part.staged.into_iter().map(|s| s.key).collect();
        Ok(Uploaded { part: Part { index: part.index, size, content_id: uploaded.content_id }, consumed })
    }
}

/// Appends to a multipart upload: while one part uploads (in a task of its own), the next one
/// fills from the request, so a PATCH costs about what the store's part uploads cost. At most
/// two parts are held: the one uploading and the one filling.
struct ObjectAppender {
    parts: Arc<PartTarget>,
    staging: Path,
    part_size: u64,
    generation: i64,
    /// Index of the next part to cut.
    next_index: u64,
    /// Staged bytes (not loaded) that open the next part.
    staged: Vec<Staged>,
    staged_len: u64,
    /// This request's bytes not yet in a part, in arrival order.
    buffer: VecDeque<Bytes>,
    buffered: u64,
    /// Offset of the first buffered byte.
    buffer_offset: u64,
    /// The part being uploaded. An append that ends early (superseded, failed) leaves it to
    /// finish on its own: it releases its part-upload claim when done, and a newer writer
    /// overwrites the part or the sweeper removes what no row points to.
    uploading: Option<tokio::task::JoinHandle<Result<Uploaded>>>,
    outcome: AppendOutcome,
    /// The runtime the store's calls run on; the write stage's thread waits for them.
    runtime: tokio::runtime::Handle,
}

impl ObjectAppender {
    /// Waits for the part in flight, recording it in the outcome.
    async fn settle(&mut self) -> Result<()> {
        if let Some(task) = self.uploading.take() {
            let uploaded = task.await.map_err(|e| StoreError::Other(format!("part upload task failed: {e}")))??;
            self.outcome.parts.push(uploaded.part);
            self.outcome.consumed.extend(uploaded.consumed);
        }
        Ok(())
    }

    /// Cuts the next part from the staged bytes and `from_buffer` of this request's bytes, and
    /// starts uploading it once the part before it is in.
    async fn start_part(&mut self, from_buffer: u64) -> Result<()> {
        let mut chunks = Vec::new();
        let mut needed = from_buffer;
        while needed > 0 {
            let Some(mut front) = self.buffer.pop_front() else { break };
            if front.len() as u64 > needed {
                let rest = front.split_off(needed as usize);
                self.buffer.push_front(rest);
            }
            needed -= front.len() as u64;
            chunks.push(front);
        }
        let part = PartUpload { index: self.next_index, staged: std::mem::take(&mut self.staged), chunks };
        self.staged_len = 0;
        self.buffered -= from_buffer;
        self.buffer_offset += from_buffer;
        self.next_index += 1;
        self.settle().await?;
        let target = self.parts.clone();
        self.uploading = Some(tokio::spawn(async move { target.upload(part).await }));
        Ok(())
    }
}

impl ObjectAppender {
    async fn write_async(&mut self, data: Vec<Bytes>) -> Result<()> {
        for piece in data {
            self.buffered += piece.len() as u64;
            self.buffer.push_back(piece);
        }
        while self.staged_len + self.buffered >= self.part_size {
            let from_buffer = self.part_size - self.staged_len;
            self.start_part(from_buffer).await?;
        }
        Ok(())
    }

    async fn finish_async(mut self, last: bool) -> Result<AppendOutcome> {
        if last {
            if self.staged_len + self.buffered > 0 {
                let rest = self.buffered;
                self.start_part(rest).await?;
            }
            self.settle().await?;
        } else {
            self.settle().await?;
            if self.buffered > 0 {
                let key = format!("{}/{:020}-{}", self.staging, self.buffer_offset, self.generation);
                let payload = PutPayload::from_iter(std::mem::take(&mut self.buffer));
                self.parts.store.put(&Path::from(key.as_str()), payload).await?;
                self.outcome.staged.push(Staged { key, offset: self.buffer_offset, size: self.buffered });
            }
        }
        Ok(self.outcome)
    }
}

impl Appender for ObjectAppender {
    fn write(&mut self, data: Vec<Bytes>) -> Result<()> {
        let runtime = self.runtime.clone();
        runtime.block_on(self.write_async(data))
    }

    fn finish(self: Box<Self>, last: bool) -> Result<AppendOutcome> {
        let runtime = self.runtime.clone();
        runtime.block_on((*self).finish_async(last))
    }

    fn holds_until(&self) -> Option<u64> {
        // The rest of the part filling now, and the staged bytes it will load.
        Some(self.part_size - self.buffered)
    }
}
