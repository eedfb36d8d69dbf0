//! The domain: create, append, complete, terminate, expire. No HTTP or SQL types here.

mod admission;
mod append;
pub mod ballast;
pub mod events;
pub mod links;
mod pieces;
pub mod pipeline;
pub mod space;
mod worker;
mod writers;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::model::parts::Piece;
use crate::{
    repo::{NewEvent, NewUpload, Repo, RepoError, UploadRow},
    store::{Download, Store, StoreError, StoreUpload},
    telemetry::Metrics,
};
use events::EventKind;
use types::{Checksum, ChecksumPlan, Concat, FileHasher, Metadata, UploadId, UploadState};

pub use append::COMPLETION_WAIT;
pub use pipeline::Budget;
pub use worker::spawn_background;

/// How long a presigned download URL stays valid.
pub const PRESIGNED_URL_TTL: Duration = Duration::from_secs(300);

/// Terminated and expired uploads are remembered this long (to answer 410) before they are forgotten.
pub const TOMBSTONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Clone)]
pub struct Settings {
    pub max_size: u64,
    pub expire_after: Duration,
    pub idle_timeout: Duration,
    pub sweep_interval: Duration,
    /// The age at which a staged object no upload points to is deleted (`--orphan-age`).
    pub orphan_age: Duration,
    /// The URL clients reach ferry at (for download URLs in events), without the base path.
    pub public_url: String,
    pub base_path: String,
    /// The bytes all appends of the instance may hold in memory at once (`--memory-budget`).
    pub memory_budget: u64,
    /// The free space a local store's volume keeps (`--min-free-space`).
    pub min_free_space: crate::config::MinFreeSpace,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Gone(String),
    #[error("Upload-Offset is {provided} but the upload is at offset {expected}")]
    OffsetMismatch { expected: u64, provided: u64 },
    #[error("{0}")]
    Conflict(String),
    /// Complete, but its store is still assembling it: ready in a moment.
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Invalid(String),
    /// The upload has all its bytes: it takes no more.
    #[error("the upload is already complete")]
    AlreadyComplete,
    /// The body goes past the upload's known length (tus: too large; the IETF draft: an
    /// inconsistent length).
    #[error("{0}")]
    PastLength(String),
    /// The request's length disagrees with the upload's (declared, inferred, or what arrived).
    #[error("{0}")]
    LengthMismatch(String),
    /// The bytes of a completed upload do not match the `Repr-Digest` announced at creation.
    #[error(
        "the upload's SHA-256 does not match the Repr-Digest announced when it was created ({0}); it was discarded"
    )]
    DigestMismatch(String),
    /// The application's pre-create hook refused the upload: its status and message.
    #[error("{message}")]
    Refused { status: u16, message: String },
    /// A service the request needs did not answer.
    #[error("{0}")]
    Unavailable(String),
    /// The store's volume is full, or below `--min-free-space`.
    #[error("{0}")]
    StorageFull(String),
    #[error("the body does not match Upload-Checksum; the chunk was discarded")]
    ChecksumMismatch,
    #[error("the request body stalled for longer than {0:?}; the bytes received so far were kept")]
    BodyTimeout(Duration),
    #[error("the request body was cut off: {0}")]
    BodyCutOff(String),
    #[error("the server is shutting down; the bytes received so far were kept: resume from Upload-Offset")]
    ShuttingDown,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl UploadError {
    /// A refusal of a request whose body may still be arriving (not a stalled or broken body,
    /// not a fault of ferry).
    fn body_may_still_arrive(&self) -> bool {
        !matches!(self, Self::Internal(_) | Self::ShuttingDown | Self::BodyTimeout(_) | Self::BodyCutOff(_))
    }

    /// A body too large for what remains of an upload whose length is known goes past it.
    fn past_length_if(self, length_known: bool) -> Self {
        match self {
            Self::TooLarge(message) if length_known => Self::PastLength(message),
            other => other,
        }
    }
}

/// What a client is told when the database is down (the detail goes to the log).
const DATABASE_UNAVAILABLE: &str = "the database is not answering; nothing was changed, try again shortly";

impl From<RepoError> for UploadError {
    fn from(e: RepoError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "database unavailable");
            Self::Unavailable(DATABASE_UNAVAILABLE.into())
        } else if e.is_disk_full() {
            tracing::warn!(error = %e, "the database's disk is full");
            Self::StorageFull("the database's disk is full; nothing was changed, try again once space is freed".into())
        } else {
            Self::Internal(e.into())
        }
    }
}

impl From<StoreError> for UploadError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Superseded => superseded(),
            e if e.is_disk_full() => {
                tracing::warn!(error = %e, "the store's disk is full");
                Self::StorageFull(
                    "the store's disk is full; the bytes made durable before it filled are kept (check the offset \
                     with HEAD), try again once space is freed"
                        .into(),
                )
            }
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "object store unavailable");
                Self::Unavailable("the object store is not answering; try again shortly".into())
            }
            other => Self::Internal(other.into()),
        }
    }
}

fn superseded() -> UploadError {
    UploadError::Conflict("a newer request for this upload took over; check the offset with HEAD and resume".into())
}

pub type Result<T, E = UploadError> = std::result::Result<T, E>;

/// What arrives in a request body, as the HTTP layer hands it down.
pub enum BodyEvent {
    Data(Bytes),
    /// An `Upload-Checksum` sent as a trailer (checksum-trailer extension).
    TrailerChecksum(Result<Checksum, String>),
}

pub type BodyStream = BoxStream<'static, std::result::Result<BodyEvent, String>>;

/// What a client may ask for when creating an upload.
#[derive(Debug, Clone)]
pub enum CreateConcat {
    None,
    Partial,
    Final(Vec<UploadId>),
}

#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// None defers the length (creation-defer-length); always None for final uploads.
    pub length: Option<u64>,
    pub metadata: Metadata,
    pub concat: CreateConcat,
    pub owner: Option<String>,
    /// A smaller size limit than `--max-size` for this upload (from a token or the pre-create hook).
    pub max_size: Option<u64>,
    /// Where in the store the upload's object goes (from the pre-create hook).
    pub key_prefix: Option<String>,
    /// The whole upload's SHA-256 as the client knows it (the IETF protocol's `Repr-Digest`):
    /// an upload whose bytes do not match it is discarded when the last of them arrives.
    pub expected_sha256: Option<[u8; 32]>,
}

#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub id: UploadId,
    pub offset: u64,
    /// `Upload-Length` sent with the append (declares a deferred length).
    pub length: Option<u64>,
    pub checksum: ChecksumPlan,
    /// The body size when the client announced it.
    pub content_length: Option<u64>,
    /// The caller's identity when uploads have owners (upload tokens): another owner's upload
    /// is answered as if it did not exist.
    pub owner: Option<String>,
    /// The connection the body arrives on, when the caller can tell whether its client has
    /// stopped sending.
    pub client: Option<Arc<dyn ClientLink>>,
    /// The end of this body is the end of the upload (the IETF protocol's `Upload-Complete: ?1`):
    /// a body that arrives whole sets a deferred length.
    pub completes: bool,
}

/// What an append knows of the connection its body arrives on.
pub trait ClientLink: Send + Sync + std::fmt::Debug {
    /// The client has closed or reset its sending side: the body will end (once what was sent
    /// before has been read), whether or not the server has noticed yet.
    fn stopped_sending(&self) -> bool;
}

#[derive(Debug, Clone)]
pub struct Appended {
    pub offset: u64,
    /// The upload has all its bytes now.
    pub completed: bool,
    /// The whole upload's SHA-256, once it is complete.
    pub sha256: Option<[u8; 32]>,
    pub expires_at: Option<i64>,
}

/// An upload as clients see it.
#[derive(Debug, Clone)]
pub struct Upload {
    pub id: UploadId,
    pub length: Option<u64>,
    /// Bytes stored and readable. For final uploads, zero until assembled.
    pub offset: u64,
    pub metadata: Metadata,
    pub state: UploadState,
    pub concat: Concat,
    pub sha256: Option<[u8; 32]>,
    pub owner: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: Option<i64>,
    /// Where its bytes are kept.
    pub store: StoreUpload,
    /// Its own size limit, when smaller than `--max-size` (from a token or the pre-create hook).
    pub size_limit: Option<u64>,
}

impl From<&NewUpload> for UploadRow {
    fn from(new: &NewUpload) -> Self {
        let complete = new.state == UploadState::Completed;
        Self {
            id: new.id,
            length: new.length,
            offset: if complete { new.length.unwrap_or(0) } else { 0 },
            metadata: new.metadata.clone(),
            state: new.state,
            concat: new.concat.clone(),
            hash_state: new.hash_state.clone(),
            sha256: new.sha256,
            owner: new.owner.clone(),
            write_gen: 0,
            store: new.store.clone(),
            staged_count: 0,
            size_limit: new.size_limit,
            expected_sha256: new.expected_sha256,
            created_at: new.now,
            updated_at: new.now,
            expires_at: new.expires_at,
        }
    }
}

impl From<UploadRow> for Upload {
    fn from(row: UploadRow) -> Self {
        Self {
            id: row.id,
            length: row.length,
            offset: row.offset,
            metadata: row.metadata,
            state: row.state,
            concat: row.concat,
            sha256: row.sha256,
            owner: row.owner,
            created_at: row.created_at,
            updated_at: row.updated_at,
            expires_at: row.expires_at,
            store: row.store,
            size_limit: row.size_limit,
        }
    }
}

pub use crate::model::{now_ms, types};

/// The upload service shared by all requests of one instance. Holds no upload state itself:
/// everything lives in the repo and the store, so any instance can serve any request.
#[derive(Clone)]
pub struct Uploads {
    repo: Arc<dyn Repo>,
    store: Arc<dyn Store>,
    settings: Settings,
    /// Wakes this instance's completion worker early; other instances find the job by polling.
    completion_wanted: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Cancelled when the instance shuts down: appends still running keep what arrived and end.
    stopping: CancellationToken,
    /// The appends running on this instance (see [`writers`]).
    writers: Arc<writers::Writers>,
    /// The memory all appends of this instance share.
    budget: Budget,
    /// The application's pre-create hook, when configured.
    precreate: Option<Arc<crate::hooks::precreate::PreCreate>>,
    /// Signs the download links of completed uploads.
    links: Arc<links::DownloadLinks>,
    /// Room kept beside a SQLite database for recording terminations on a full volume.
    ballast: Option<Arc<ballast::Ballast>>,
    /// The free space kept on a local store's volume.
    reserve: space::Reserve,
}

pub use admission::{Grant, Proposal};

impl Uploads {
    pub fn new(
        repo: Arc<dyn Repo>,
        store: Arc<dyn Store>,
        settings: Settings,
        metrics: Arc<Metrics>,
        links: Arc<links::DownloadLinks>,
    ) -> Self {
        let settings_budget = settings.memory_budget;
        let reserve = space::Reserve::new(store.clone(), settings.min_free_space);
        Self {
            reserve,
            repo,
            store,
            settings,
            completion_wanted: Arc::new(Notify::new()),
            metrics,
            stopping: CancellationToken::new(),
            writers: Arc::default(),
            budget: Budget::new(settings_budget),
            precreate: None,
            links,
            ballast: None,
        }
    }

    /// Keeps `ballast` for recording terminations and expiries on a full volume.
    pub fn with_ballast(mut self, ballast: Option<Arc<ballast::Ballast>>) -> Self {
        self.ballast = ballast;
        self
    }

    /// Makes the emergency ballast where it is missing and there is room (at start and by the
    /// sweeper).
    pub async fn ensure_ballast(&self) {
        let Some(ballast) = &self.ballast else { return };
        match ballast.ensure(self.settings.min_free_space).await {
            Ok(true) => {}
            Ok(false) => tracing::debug!(path = %ballast.path().display(), "no room for the emergency ballast yet"),
            Err(e) => {
                tracing::warn!(path = %ballast.path().display(), error = %e, "could not make the emergency ballast")
            }
        }
    }

    /// A database write that frees space (a termination, an expiry): when the database's volume
    /// is full, the emergency ballast is released and the write tried once more.
    async fn freeing<T, F, Fut>(&self, id: UploadId, write: F) -> std::result::Result<T, RepoError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, RepoError>>,
    {
        match write().await {
            Err(e) if e.is_disk_full() => {
                let Some(ballast) = &self.ballast else { return Err(e) };
                // Retried also when another caller released it a moment ago: that room may
                // still be there. Nobody makes the ballast again until the retry is done.
                ballast
                    .release_then(|released| async move {
                        if released {
                            tracing::warn!(
                                upload = %id,
                                path = %ballast.path().display(),
                                "the database's volume is full: released the emergency ballast to record the \
                                 change; it is made again once there is room"
                            );
                        }
                        write().await
                    })
                    .await
            }
            other => other,
        }
    }

    /// Asks `precreate` before every new upload.
    pub fn with_precreate(mut self, precreate: Option<Arc<crate::hooks::precreate::PreCreate>>) -> Self {
        self.precreate = precreate;
        self
    }

    /// The memory budget of this instance's appends.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The free-space reserve of the store's volume.
    pub fn reserve(&self) -> &space::Reserve {
        &self.reserve
    }

    /// Ends the appends still running (at shutdown): each keeps what arrived, commits it and
    /// answers 503, so its client resumes elsewhere from the saved offset.
    pub fn stop_appends(&self) {
        self.stopping.cancel();
    }

    /// The uploads whose appends run on this instance: (receiving, committing or leasing).
    pub fn appends_running(&self) -> (Vec<UploadId>, Vec<UploadId>) {
        self.writers.running()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn repo(&self) -> &Arc<dyn Repo> {
        &self.repo
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Where a completed upload downloads from.
    pub fn download_url(&self, id: UploadId) -> String {
        format!("{}{}{id}", self.settings.public_url.trim_end_matches('/'), self.settings.base_path)
    }

    /// The signer of download links.
    pub fn links(&self) -> &Arc<links::DownloadLinks> {
        &self.links
    }

    fn event(&self, kind: EventKind, upload: &UploadRow) -> NewEvent {
        // A final upload is read from its partials' objects: no one place holds its bytes.
        let location =
            (!matches!(upload.concat, Concat::Final(_))).then(|| self.store.location(upload.id, &upload.store));
        events::event(kind, upload, location, self.download_url(upload.id))
    }

    fn expiry(&self, now: i64) -> i64 {
        now + self.settings.expire_after.as_millis() as i64
    }

    /// The largest an upload may be: `--max-size`, or its own smaller limit.
    fn limit_of(&self, size_limit: Option<u64>) -> u64 {
        size_limit.map_or(self.settings.max_size, |l| l.min(self.settings.max_size))
    }

    fn check_size(&self, length: u64) -> Result<()> {
        if length > self.settings.max_size {
            return Err(UploadError::TooLarge(format!(
                "Upload-Length {length} is larger than the maximum of {} bytes (Tus-Max-Size)",
                self.settings.max_size
            )));
        }
        Ok(())
    }

    /// Loads an upload that still exists, mapping unknown and removed ones to 404 and 410.
    async fn load(&self, id: UploadId) -> Result<UploadRow> {
        self.load_owned(id, None).await
    }

    /// Like [`Uploads::load`]; with an owner, another owner's upload is 404 too, so that ids of
    /// others' uploads reveal nothing.
    async fn load_owned(&self, id: UploadId, owner: Option<&str>) -> Result<UploadRow> {
        match self.repo.get(id).await? {
            Some(row) if owner.is_some() && row.owner.as_deref() != owner => {
                Err(UploadError::NotFound("no upload with this id".into()))
            }
            None => Err(UploadError::NotFound("no upload with this id".into())),
            Some(row) if row.state == UploadState::Terminated => {
                Err(UploadError::Gone("this upload was terminated".into()))
            }
            Some(row) if row.state == UploadState::Expired => {
                Err(UploadError::Gone("this upload expired before it was completed".into()))
            }
            Some(row) => Ok(row),
        }
    }

    /// Where an upload stands, as `owner` (when uploads have owners) may see it. A writer of this
    /// instance that is committing a body which has just ended is waited for (briefly), so a
    /// client that resumes at once sees the bytes its cut-off request delivered.
    pub async fn status(&self, id: UploadId, owner: Option<&str>) -> Result<Upload> {
        self.writers.settled(id).await;
        self.load_owned(id, owner).await.map(Upload::from)
    }

    pub async fn get(&self, id: UploadId) -> Result<Upload> {
        self.load(id).await.map(Upload::from)
    }

    pub async fn create(&self, request: CreateRequest) -> Result<Upload> {
        if let (Some(limit), Some(length)) = (request.max_size, request.length)
            && length > limit
        {
            return Err(UploadError::TooLarge(format!(
                "Upload-Length {length} is larger than the {limit} bytes this upload may have"
            )));
        }
        let id = UploadId::new();
        let now = now_ms();
        let mut pieces = Vec::new();
        let mut hash_state = FileHasher::new().save();
        let (length, state, concat, sha256) = match request.concat {
            CreateConcat::Final(parts) => {
                if request.length.is_some() {
                    return Err(UploadError::Invalid(
                        "a final upload (Upload-Concat: final) must not carry Upload-Length".into(),
                    ));
                }
                let partials = self.check_partials(&parts, request.owner.as_deref()).await?;
                let mut start = 0u64;
                for partial in &partials {
                    let size = partial.length.unwrap_or(partial.offset);
                    pieces.push(Piece {
                        upload: partial.id,
                        start,
                        size,
                        key_prefix: partial.store.key_prefix.clone(),
                    });
                    start += size;
                }
                self.check_size(start)?;
                // The final upload is read from its partials' objects: complete at once, nothing
                // copied. Its SHA-256 is known now only when one partial holds every byte; else a
                // background job computes it, starting from the first partial's hash state.
                let sha256 = match partials.as_slice() {
                    _ if start == 0 => Some(empty_sha256()),
                    [only] => only.sha256,
                    _ => None,
                };
                hash_state = partials[0].hash_state.clone();
                (Some(start), UploadState::Completed, Concat::Final(parts), sha256)
            }
            other => {
                if let Some(length) = request.length {
                    self.check_size(length)?;
                }
                let concat = if matches!(other, CreateConcat::Partial) { Concat::Partial } else { Concat::None };
                let done = request.length == Some(0);
                let state = if done { UploadState::Completed } else { UploadState::Receiving };
                (request.length, state, concat, done.then(empty_sha256))
            }
        };
        if let (Some(expected), Some(actual)) = (request.expected_sha256, sha256)
            && expected != actual
        {
            return Err(UploadError::DigestMismatch("the upload is empty".into()));
        }
        let expires_at = (state == UploadState::Receiving).then(|| self.expiry(now));
        // A final upload has no object of its own.
        let store = if !matches!(concat, Concat::Final(_)) {
            let max_length = length.unwrap_or(self.limit_of(request.max_size));
            self.store.create(id, request.key_prefix.clone(), max_length, length == Some(0)).await?
        } else {
            StoreUpload::default()
        };
        let new = NewUpload {
            id,
            length,
            metadata: request.metadata,
            state,
            concat,
            hash_state,
            sha256,
            owner: request.owner,
            store,
            size_limit: request.max_size,
            expected_sha256: request.expected_sha256,
            pieces,
            now,
            expires_at,
        };
        let row = UploadRow::from(&new);
        let mut events = vec![self.event(EventKind::Created, &row)];
        // `upload.completed` carries the SHA-256: for a final upload whose digest is still to be
        // computed, the job that computes it records the event.
        if state == UploadState::Completed && sha256.is_some() {
            events.push(self.event(EventKind::Completed, &row));
        }
        match self.repo.insert(&new, &events).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(UploadError::Conflict(
                    "a partial upload named in Upload-Concat was terminated meanwhile".into(),
                ));
            }
            Err(e) => {
                let _ = self.store.delete(id, &new.store, &[]).await;
                return Err(e.into());
            }
        }
        self.metrics.uploads_created.inc();
        if state == UploadState::Completed {
            self.metrics.uploads_completed.inc();
            if sha256.is_none() {
                self.completion_wanted.notify_one();
            }
        }
        tracing::info!(upload = %id, length = ?length, "upload created");
        // What was just inserted, without reading it back.
        Ok(row.into())
    }

    /// Checks the partial uploads named by a final upload and returns their rows, in order. A
    /// partial whose store is still completing it (its last append just answered) is waited
    /// for, as long as an append waits for that.
    async fn check_partials(&self, parts: &[UploadId], owner: Option<&str>) -> Result<Vec<UploadRow>> {
        if parts.is_empty() {
            return Err(UploadError::Invalid("Upload-Concat: final names no partial uploads".into()));
        }
        let deadline = tokio::time::Instant::now() + append::COMPLETION_WAIT;
        let mut rows = Vec::with_capacity(parts.len());
        for id in parts {
            let row = loop {
                let row = match self.repo.get(*id).await? {
                    Some(row) if !row.state.is_gone() && row.owner.as_deref() == owner => row,
                    _ => return Err(UploadError::Invalid(format!("partial upload {id} does not exist"))),
                };
                if row.state != UploadState::Completing || tokio::time::Instant::now() >= deadline {
                    break row;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if row.concat != Concat::Partial {
                return Err(UploadError::Invalid(format!(
                    "upload {id} is not a partial upload (create it with Upload-Concat: partial)"
                )));
            }
            match row.state {
                UploadState::Completed => {}
                UploadState::Completing => {
                    return Err(UploadError::NotReady(format!(
                        "partial upload {id} has all its bytes and its store is still completing it; try again shortly"
                    )));
                }
                _ => {
                    return Err(UploadError::Invalid(format!(
                        "partial upload {id} is not complete yet ({} of {} bytes)",
                        row.offset,
                        row.length.map_or("?".to_string(), |l| l.to_string())
                    )));
                }
            }
            rows.push(row);
        }
        Ok(rows)
    }

    /// Completes an upload whose parts are all stored (object stores).
    pub(crate) async fn finish_parts(&self, id: UploadId, store: &StoreUpload) -> anyhow::Result<()> {
        let parts = self.repo.parts(id).await?;
        self.store.complete(id, store, &parts).await?;
        let Some(row) = self.repo.get(id).await? else { return Ok(()) };
        let done = UploadRow { state: UploadState::Completed, offset: row.length.unwrap_or(row.offset), ..row };
        let events = [self.event(EventKind::Completed, &done)];
        if self.repo.finish_completion(id, None, now_ms(), &events).await? {
            self.metrics.uploads_completed.inc();
            tracing::info!(upload = %id, parts = parts.len(), "upload completed");
        }
        Ok(())
    }

    /// Terminates an upload and deletes its bytes: a partial upload's only once no final upload
    /// reads them any more; a final upload's own, and then those of its partial uploads that
    /// were terminated before and that no other final upload reads.
    pub async fn terminate(&self, id: UploadId, owner: Option<&str>) -> Result<()> {
        self.writers.settled(id).await;
        let row = self.load_owned(id, owner).await?;
        let events = [self.event(EventKind::Terminated, &row)];
        let now = now_ms();
        if !self.freeing(id, || self.repo.terminate(id, now, &events)).await? {
            self.load(id).await?;
            return Err(UploadError::Conflict("the upload changed while it was being terminated; try again".into()));
        }
        self.metrics.uploads_terminated.inc();
        tracing::info!(upload = %id, "upload terminated");
        self.delete_bytes(id).await;
        if let Concat::Final(parts) = &row.concat {
            for part in parts {
                self.delete_bytes(*part).await;
            }
        }
        Ok(())
    }

    /// Deletes the bytes of a terminated or expired upload, unless a final upload still reads
    /// them; on failure the sweeper retries.
    async fn delete_bytes(&self, id: UploadId) {
        let stored = async {
            let Some(row) = self.repo.get(id).await? else { return Ok(None) };
            if !row.state.is_gone() {
                return Ok(None);
            }
            if self.repo.in_use(id).await? {
                tracing::debug!(upload = %id, "bytes kept: a final upload reads them");
                return Ok(None);
            }
            let staged = self.repo.staged(id).await?;
            Ok::<_, RepoError>(Some((row.store, staged)))
        };
        let (store, staged) = match stored.await {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(upload = %id, error = %e, "could not look up stored bytes; the sweeper will retry");
                return;
            }
        };
        match self.store.delete(id, &store, &staged).await {
            Ok(()) => {
                let recheck_at = now_ms() + self.settings.orphan_age.as_millis() as i64;
                if let Err(e) = self.repo.mark_bytes_deleted(id, recheck_at).await {
                    tracing::warn!(upload = %id, error = %e, "could not record deleted bytes");
                }
            }
            Err(e) => tracing::warn!(upload = %id, error = %e, "could not delete bytes; the sweeper will retry"),
        }
    }

    /// Deletes a gone upload's bytes a second time, `--orphan-age` after the first: a writer that
    /// was already sending when they were first deleted (on another instance, say) may have
    /// landed a part since, which no row points to. On Azure such a block would otherwise stay
    /// uncommitted for a week; on local disk the file would be back.
    async fn delete_late_parts(&self, id: UploadId) -> Result<()> {
        let Some(row) = self.repo.get(id).await? else { return Ok(()) };
        self.store.delete(id, &row.store, &[]).await?;
        self.repo.mark_rechecked(id).await?;
        Ok(())
    }

    /// A completed upload (as `owner` may see it); 409 for one still in progress.
    pub async fn completed(&self, id: UploadId, owner: Option<&str>) -> Result<Upload> {
        self.writers.settled(id).await;
        let row = self.load_owned(id, owner).await?;
        if row.state == UploadState::Completing {
            return Err(UploadError::NotReady(
                "the upload has all its bytes and is being assembled; ask again shortly".into(),
            ));
        }
        if row.state != UploadState::Completed {
            return Err(UploadError::Conflict(format!(
                "the upload is not complete yet ({} of {} bytes received)",
                row.offset,
                row.length.map_or("?".to_string(), |l| l.to_string())
            )));
        }
        Ok(row.into())
    }

    /// A short-lived URL of the store for downloading a completed upload directly, where the
    /// store supports it and the upload is one object (not a final upload read from pieces).
    pub async fn presign(&self, upload: &Upload) -> Result<Option<String>> {
        if matches!(upload.concat, Concat::Final(_)) && !self.repo.pieces(upload.id).await?.is_empty() {
            return Ok(None);
        }
        Ok(self.store.presign(upload.id, &upload.store, PRESIGNED_URL_TTL).await?)
    }

    /// Reads a completed upload's bytes, or a range of them.
    pub async fn download(&self, upload: &Upload, range: Option<std::ops::Range<u64>>) -> Result<Download> {
        let id = upload.id;
        let missing = |e: StoreError| match e {
            StoreError::NotFound => {
                UploadError::Internal(anyhow::anyhow!("bytes of completed upload {id} are missing"))
            }
            other => other.into(),
        };
        if matches!(upload.concat, Concat::Final(_)) {
            let pieces = self.repo.pieces(id).await?;
            if !pieces.is_empty() {
                return pieces::read(self.store.clone(), pieces, range).await.map_err(missing);
            }
        }
        self.store.read(id, &upload.store, range).await.map_err(missing)
    }

    /// One pass of the sweeper: expires idle incomplete uploads, deletes leftover bytes,
    /// forgets old tombstones. Safe to run on several instances at once.
    pub async fn sweep(&self) -> Result<()> {
        self.ensure_ballast().await;
        let now = now_ms();
        loop {
            let due = self.repo.expiring(now, 100).await?;
            for row in &due {
                let gone = UploadRow { state: UploadState::Expired, ..row.clone() };
                let events = [self.event(EventKind::Expired, &gone)];
                if self.freeing(row.id, || self.repo.expire(row.id, now, &events)).await? {
                    self.metrics.uploads_expired.inc();
                    tracing::info!(upload = %row.id, "upload expired");
                }
            }
            if due.len() < 100 {
                break;
            }
        }
        loop {
            let pending = self.repo.pending_deletions(100).await?;
            for id in &pending {
                self.delete_bytes(*id).await;
            }
            if pending.len() < 100 {
                break;
            }
        }
        loop {
            let due = self.repo.pending_rechecks(now, 100).await?;
            for id in &due {
                self.delete_late_parts(*id).await?;
            }
            if due.len() < 100 {
                break;
            }
        }
        self.repo.purge_gone(now - TOMBSTONE_RETENTION.as_millis() as i64).await?;
        self.reclaim_staged(now).await
    }

    /// Deletes staged objects no upload needs: those of uploads that are complete or gone, and
    /// those no row points to (left by a request that crashed or lost to a newer one before it
    /// committed) once they are old enough not to belong to a request still committing.
    async fn reclaim_staged(&self, now: i64) -> Result<()> {
        let mut known: std::collections::HashMap<UploadId, Option<Vec<String>>> = Default::default();
        for object in self.store.staged_objects().await? {
            if let std::collections::hash_map::Entry::Vacant(entry) = known.entry(object.upload) {
                let keys = match self.repo.get(object.upload).await? {
                    Some(row) if row.state == UploadState::Receiving => {
                        Some(self.repo.staged(object.upload).await?.into_iter().map(|s| s.key).collect())
                    }
                    _ => None,
                };
                entry.insert(keys);
            }
            let keep = match &known[&object.upload] {
                Some(keys) => {
                    keys.contains(&object.key) || object.modified_ms > now - self.settings.orphan_age.as_millis() as i64
                }
                None => false,
            };
            if !keep {
                tracing::info!(upload = %object.upload, key = %object.key, "deleting an orphaned staged object");
                self.store.delete_staged(&object.key).await?;
            }
        }
        Ok(())
    }
}

fn empty_sha256() -> [u8; 32] {
    FileHasher::new().finish()
}
