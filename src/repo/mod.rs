//! Metadata and offsets behind one trait, with a PostgreSQL and a SQLite implementation.
//! All SQL lives in this module.

mod sql;

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{
    parts::{AppendOutcome, Part, Piece, Staged, StoreUpload},
    types::{Concat, Metadata, UploadId, UploadState},
};

pub use sql::{PgRepo, SqliteRepo};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row for upload {id}: {reason}")]
    Corrupt { id: String, reason: String },
}

impl RepoError {
    /// The database did not answer in time, or the connection to it is gone: it is down,
    /// restarting or overloaded, and asking again later may work.
    pub fn is_unavailable(&self) -> bool {
        let Self::Database(e) = self else { return false };
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // PostgreSQL: connection exceptions (08), shutting down or starting up (57P0x),
                // a statement cancelled by statement_timeout (57014), too many connections
                // (53300). SQLite: the database is locked by another process (5, 6 and their
                // extended codes).
                match sqlite_code(db.as_ref()) {
                    Some(primary) => matches!(primary, 5 | 6),
                    None => code.starts_with("08") || code.starts_with("57P0") || code == "57014" || code == "53300",
                }
            }
            _ => false,
        }
    }

    /// The database's disk is full (SQLite's `SQLITE_FULL`, PostgreSQL's `disk_full`, ENOSPC).
    pub fn is_disk_full(&self) -> bool {
        let Self::Database(e) = self else { return false };
        match e {
            sqlx::Error::Database(db) => match sqlite_code(db.as_ref()) {
                Some(primary) => primary == 13,
                None => db.code().is_some_and(|code| code == "53100"),
            },
            sqlx::Error::Io(io) => crate::store::is_disk_full(io),
            _ => false,
        }
    }
}

/// SQLite's primary result code of an error from SQLite (its extended code's low byte).
fn sqlite_code(error: &dyn sqlx::error::DatabaseError) -> Option<i32> {
    error.try_downcast_ref::<sqlx::sqlite::SqliteError>()?;
    Some(error.code()?.parse::<i32>().ok()? & 0xff)
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// An upload as stored.
#[derive(Debug, Clone)]
pub struct UploadRow {
    pub id: UploadId,
    pub length: Option<u64>,
    pub offset: u64,
    pub metadata: Metadata,
    pub state: UploadState,
    pub concat: Concat,
    pub hash_state: Vec<u8>,
    pub sha256: Option<[u8; 32]>,
    pub owner: Option<String>,
    pub write_gen: i64,
    pub store: StoreUpload,
    /// How many staged objects the upload has (object stores), so an append knows whether it
    /// needs to look them up.
    pub staged_count: i64,
    /// A smaller size limit than `--max-size` for this upload.
    pub size_limit: Option<u64>,
    /// The whole upload's SHA-256 as the client announced it, to be checked on completion.
    pub expected_sha256: Option<[u8; 32]>,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: Option<i64>,
}

/// A new upload to insert.
#[derive(Debug, Clone)]
pub struct NewUpload {
    pub id: UploadId,
    pub length: Option<u64>,
    pub metadata: Metadata,
    pub state: UploadState,
    pub concat: Concat,
    pub hash_state: Vec<u8>,
    pub sha256: Option<[u8; 32]>,
    pub owner: Option<String>,
    pub store: StoreUpload,
    pub size_limit: Option<u64>,
    pub expected_sha256: Option<[u8; 32]>,
    /// A final upload's pieces: its partial uploads' objects, in order.
    pub pieces: Vec<Piece>,
    pub now: i64,
    pub expires_at: Option<i64>,
}

/// An append's request for the right to write, taken by [`Repo::lease_append`]: granted only
/// when everything the upload's row can tell about the request is fine.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: UploadId,
    /// The upload's offset must be exactly this.
    pub offset: u64,
    /// When set, the upload must belong to this owner.
    pub owner: Option<String>,
    /// A length declared with the append: equal to the known one, or (deferred) at most the
    /// upload's size limit and `max_size`.
    pub length: Option<u64>,
    /// The body's size when announced: at most what remains before the length (or the limit).
    pub content_length: Option<u64>,
    /// `--max-size`.
    pub max_size: u64,
    pub now: i64,
    pub expires_at: Option<i64>,
}

/// The result of an append, committed by compare-and-set.
#[derive(Debug, Clone)]
pub struct AppendCommit {
    pub id: UploadId,
    pub generation: i64,
    pub from_offset: u64,
    pub to_offset: u64,
    pub hash_state: Vec<u8>,
    /// A deferred length declared by this request; committed only if still unset or equal.
    pub length: Option<u64>,
    /// Set when this append completes the upload.
    pub sha256: Option<[u8; 32]>,
    /// Events caused by this append (`upload.completed`), committed with it.
    pub events: Vec<NewEvent>,
    /// The upload is complete but its store still has to assemble the parts: state `completing`.
    pub needs_assembly: bool,
    /// Parts and staged objects made durable by this append.
    pub outcome: AppendOutcome,
    pub now: i64,
    pub expires_at: Option<i64>,
}

#[async_trait]
pub trait Repo: Send + Sync + 'static {
    /// Applies the migrations of this backend.
    async fn migrate(&self) -> Result<()>;

    /// Checks that the database answers.
    async fn ping(&self) -> Result<()>;

    /// Connections open and idle in the pool.
    fn pool_stats(&self) -> (u32, usize);

    /// The secret kept under `name`: `candidate` if none was kept yet (it is stored then), else
    /// the one stored first, so that every instance ends up with the same.
    async fn secret(&self, name: &str, candidate: &[u8], now: i64) -> Result<Vec<u8>>;

    /// Inserts an upload and the events its creation causes, in one transaction. A final
    /// upload's pieces are inserted with it, and only while each partial upload they name is
    /// still complete (its row is locked meanwhile, so a concurrent termination either comes
    /// first and refuses the final upload, or comes after and sees the partial in use): false,
    /// and nothing inserted, when one is not.
    async fn insert(&self, upload: &NewUpload, events: &[NewEvent]) -> Result<bool>;

    async fn get(&self, id: UploadId) -> Result<Option<UploadRow>>;

    /// Takes the right to append (see [`Lease`]) and returns the upload's row with its new
    /// writer generation, in one statement: None when the upload refuses this append (unknown,
    /// another owner's, not receiving, another offset, a length that does not fit). Every lease
    /// bumps the writer generation, so an older request still in flight for the same upload
    /// loses its right to write and to commit.
    async fn lease_append(&self, lease: &Lease) -> Result<Option<UploadRow>>;

    /// Moves the offset from `from_offset` to `to_offset` if the writer still holds the newest
    /// generation, recording the append's parts and staged objects in the same transaction;
    /// completes the upload when `sha256` is set. Returns false when superseded.
    async fn commit_append(&self, commit: &AppendCommit) -> Result<bool>;

    /// Claims the right to upload a part for writer `generation`: granted only while it is the
    /// newest writer and no other writer's claim is live.
    async fn claim_part_upload(&self, id: UploadId, generation: i64, now: i64, until: i64) -> Result<PartClaim>;

    /// Releases a claim taken by [`Repo::claim_part_upload`].
    async fn release_part_upload(&self, id: UploadId, generation: i64) -> Result<()>;

    /// The committed parts of an upload's multipart upload, in order.
    async fn parts(&self, id: UploadId) -> Result<Vec<Part>>;

    /// The staged objects of an upload, in offset order.
    async fn staged(&self, id: UploadId) -> Result<Vec<Staged>>;

    /// A final upload's pieces, in order; empty for any other upload (and for final uploads
    /// assembled into an object of their own by earlier versions).
    async fn pieces(&self, id: UploadId) -> Result<Vec<Piece>>;

    /// True while a final upload that is not gone reads from this (partial) upload's bytes.
    async fn in_use(&self, id: UploadId) -> Result<bool>;

    /// Turns a final upload left `completing` by an earlier version (which copied the partials'
    /// bytes) into one read from `pieces`: completed, with its SHA-256 still to be computed.
    /// False when it moved on meanwhile or a partial is no longer complete.
    async fn adopt_pieces(&self, id: UploadId, pieces: &[Piece], now: i64) -> Result<bool>;

    /// Records the whole-file SHA-256 of a completed upload that had none yet (a final upload),
    /// with its events. False when it was terminated meanwhile or already has one.
    async fn record_digest(&self, id: UploadId, sha256: [u8; 32], now: i64, events: &[NewEvent]) -> Result<bool>;

    /// Marks an upload terminated unless it is gone already. Returns false when nothing changed.
    async fn terminate(&self, id: UploadId, now: i64, events: &[NewEvent]) -> Result<bool>;

    /// Receiving uploads whose expiry passed.
    async fn expiring(&self, now: i64, limit: i64) -> Result<Vec<UploadRow>>;

    /// Marks a receiving upload whose expiry passed as expired, with its events; false if it
    /// moved on meanwhile.
    async fn expire(&self, id: UploadId, now: i64, events: &[NewEvent]) -> Result<bool>;

    /// Terminated or expired uploads whose bytes still have to be deleted (and that no final
    /// upload still reads).
    async fn pending_deletions(&self, limit: i64) -> Result<Vec<UploadId>>;

    /// Records that an upload's bytes were deleted, and when to delete them once more (see
    /// [`Repo::pending_rechecks`]).
    async fn mark_bytes_deleted(&self, id: UploadId, recheck_at: i64) -> Result<()>;

    /// Terminated or expired uploads whose bytes were deleted and are due to be deleted once more
    /// (by `now`), in case a writer that was already sending landed a part after the first time.
    async fn pending_rechecks(&self, now: i64, limit: i64) -> Result<Vec<UploadId>>;

    /// Records the second deletion of an upload's bytes.
    async fn mark_rechecked(&self, id: UploadId) -> Result<()>;

    /// Forgets terminated and expired uploads (whose bytes are gone, twice) last changed before
    /// `before`.
    async fn purge_gone(&self, before: i64) -> Result<u64>;

    /// Claims one background completion job not held by a live lease: an upload in state
    /// `completing` (its store has to assemble it), or a completed one whose SHA-256 is still
    /// to be computed (a final upload).
    async fn claim_completion(&self, now: i64, lease_until: i64) -> Result<Option<UploadRow>>;

    /// Extends a completion lease; false if another worker took it over.
    async fn renew_completion(&self, id: UploadId, held_until: i64, lease_until: i64) -> Result<bool>;

    /// Marks a completing upload completed with its bytes assembled (and its SHA-256, when
    /// that was not known before).
    async fn finish_completion(
        &self,
        id: UploadId,
        sha256: Option<[u8; 32]>,
        now: i64,
        events: &[NewEvent],
    ) -> Result<bool>;

    /// Takes the next event due for delivery: the oldest undelivered one of its upload (events
    /// of one upload go out in order), not held by another instance's lease.
    async fn claim_event(&self, now: i64, lease_until: i64) -> Result<Option<EventRow>>;

    /// Records the outcome of a delivery attempt of a claimed event.
    async fn settle_event(&self, seq: i64, outcome: &EventOutcome) -> Result<()>;

    /// Events, newest first, optionally only those in one state.
    async fn list_events(&self, state: Option<EventState>, limit: i64) -> Result<Vec<EventRow>>;

    /// Makes events due again (dead or pending): one by id, or all dead ones. Returns how many.
    async fn retry_events(&self, id: Option<&str>, now: i64) -> Result<u64>;
}

/// The answer to a part-upload claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartClaim {
    Granted,
    /// Another (older) writer is still uploading a part: wait for it.
    Busy,
    /// A newer writer took over: stop.
    Superseded,
}

/// An event to record in the outbox with the state change that causes it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The `webhook-id`: stable across redeliveries.
    pub id: String,
    pub upload_id: UploadId,
    pub event_type: String,
    /// The JSON body delivered.
    pub payload: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventState {
    Pending,
    Delivered,
    Dead,
}

/// An event as stored in the outbox.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub seq: i64,
    pub id: String,
    pub upload_id: UploadId,
    pub event_type: String,
    pub payload: String,
    pub created_at: i64,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub delivered_at: Option<i64>,
    pub dead_at: Option<i64>,
    pub last_error: Option<String>,
}

impl EventRow {
    pub fn state(&self) -> EventState {
        match (self.delivered_at, self.dead_at) {
            (Some(_), _) => EventState::Delivered,
            (None, Some(_)) => EventState::Dead,
            (None, None) => EventState::Pending,
        }
    }
}

/// How a delivery attempt ended.
#[derive(Debug, Clone)]
pub enum EventOutcome {
    Delivered { at: i64 },
    Retry { at: i64, error: String },
    Dead { at: i64, error: String },
}

/// Whether `url` names a SQLite database (`sqlite:...`).
pub fn is_sqlite(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// Connects to the database named by `url` (`postgres://` or `sqlite://`), with `timeout` for
/// acquiring a connection and for each statement (`--database-timeout`).
pub async fn connect(url: &str, timeout: std::time::Duration) -> anyhow::Result<Arc<dyn Repo>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgRepo::connect(url, timeout).await?))
    } else if is_sqlite(url) {
        Ok(Arc::new(SqliteRepo::connect(url, timeout).await?))
    } else {
        anyhow::bail!("unsupported database URL (expected postgres://... or sqlite://...)")
    }
}
