//! The SQL of both backends. PostgreSQL and SQLite share one dialect here (`$n` parameters,
//! `RETURNING`, epoch-millisecond integers), so the statements are written once and the
//! implementation is stamped out for each pool type by `sql_repo!`.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{
    Row,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
    sqlite::{
        SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};
use uuid::Uuid;

use super::{
    AppendCommit, EventOutcome, EventRow, EventState, Lease, NewEvent, NewUpload, PartClaim, Repo, RepoError, Result,
    UploadRow,
};
use crate::model::{
    parts::{Part, Piece, Staged, StoreUpload},
    types::{Concat, Metadata, UploadId, UploadState},
};

/// PostgreSQL: what production runs; several instances share one database.
pub struct PgRepo {
    /// Statements that write.
    pool: PgPool,
    /// Statements that only read (HEAD, GET, the sweeper's lists): a pool of their own, so that
    /// a burst of appends never makes a HEAD wait for a connection.
    reader: PgPool,
    /// The connections of the two statements every PATCH runs (the lease and the commit).
    hot: HotConnections,
}

/// How many connections the statements of every PATCH have, beside the pool's.
const HOT_CONNECTIONS: usize = 8;

/// Connections for the statements every PATCH runs, kept apart from sqlx's pool: the pool
/// tests every connection it takes back with a round trip to the server (a ping after each
/// statement, which would double what a PATCH costs PostgreSQL). A connection here goes back to
/// the idle ones only when its statement succeeded; one that met anything else (an error of the
/// server's or of the connection, a timeout, a request dropped mid-statement) is closed instead,
/// so that a session the server keeps refusing (a primary turned read-only, say) is replaced.
struct HotConnections {
    idle: std::sync::Mutex<Vec<Idle>>,
    permits: tokio::sync::Semaphore,
    timeout: Duration,
    /// A connection is closed once it is this old, or has sat idle this long: the limits of the
    /// pool it was opened by, which it keeps to.
    max_lifetime: Option<Duration>,
    idle_timeout: Option<Duration>,
}

/// A connection taken from [`HotConnections`]: it goes back when it is dropped, if
/// [`Settle::settle`] said it may.
pub struct HotConnection<'a> {
    connection: Option<sqlx::PgConnection>,
    opened: std::time::Instant,
    reusable: bool,
    owner: &'a HotConnections,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

/// An idle connection: since when it has been open, and since when idle.
struct Idle {
    connection: sqlx::PgConnection,
    opened: std::time::Instant,
    since: std::time::Instant,
}

impl HotConnections {
    fn new(pool: &PgPool, timeout: Duration) -> Self {
        Self {
            idle: std::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(HOT_CONNECTIONS),
            timeout,
            max_lifetime: pool.options().get_max_lifetime(),
            idle_timeout: pool.options().get_idle_timeout(),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection (tested first when it sat idle for a while), or a new one from
    /// `pool`, which opens it.
    async fn get<'a>(&'a self, pool: &PgPool) -> Result<HotConnection<'a>> {
        let permit = tokio::time::timeout(self.timeout, self.permits.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let Some(Idle { mut connection, opened, since }) = self.idle().pop() else { break };
            if self.max_lifetime.is_some_and(|max| opened.elapsed() >= max) {
                continue;
            }
            // A connection whose peer vanished without a word may not answer at all.
            let alive = since.elapsed() < TESTED_RECENTLY
                || matches!(
                    tokio::time::timeout(self.timeout, sqlx::Connection::ping(&mut connection)).await,
                    Ok(Ok(()))
                );
            if alive {
                return Ok(HotConnection {
                    connection: Some(connection),
                    opened,
                    reusable: false,
                    owner: self,
                    _permit: permit,
                });
            }
        }
        let connection = pool.acquire().await?.detach();
        let opened = std::time::Instant::now();
        Ok(HotConnection { connection: Some(connection), opened, reusable: false, owner: self, _permit: permit })
    }

    /// Open, and idle.
    fn stats(&self) -> (usize, usize) {
        let idle = self.idle().len();
        (idle + HOT_CONNECTIONS - self.permits.available_permits(), idle)
    }
}

impl std::ops::Deref for HotConnection<'_> {
    type Target = sqlx::PgConnection;

    fn deref(&self) -> &sqlx::PgConnection {
        self.connection.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for HotConnection<'_> {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        self.connection.as_mut().expect("held until dropped")
    }
}

impl Drop for HotConnection<'_> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take()
            && self.reusable
        {
            let mut idle = self.owner.idle();
            // The longest idle are at the bottom: the newest is taken first.
            let timeout = self.owner.idle_timeout;
            idle.retain(|idle| timeout.is_none_or(|timeout| idle.since.elapsed() < timeout));
            idle.push(Idle { connection, opened: self.opened, since: std::time::Instant::now() });
        }
    }
}

/// A connection that outlives a statement is told how the statement went.
trait Settle {
    /// Whether the connection may serve further statements: after a statement that succeeded,
    /// yes; after any error, no.
    fn settle<T>(&mut self, result: &std::result::Result<T, sqlx::Error>);
}

impl Settle for HotConnection<'_> {
    fn settle<T>(&mut self, result: &std::result::Result<T, sqlx::Error>) {
        // Errors are rare here (a refused lease is no row, not an error), so a fresh
        // connection after one costs little, and no state of a failed session is carried on.
        self.reusable = result.is_ok();
    }
}

/// SQLite's one writing connection is always kept.
impl Settle for tokio::sync::MutexGuard<'_, SqliteConnection> {
    fn settle<T>(&mut self, _result: &std::result::Result<T, sqlx::Error>) {}
}

impl PgRepo {
    /// Connects with `timeout` (`--database-timeout`) for acquiring a connection (which includes
    /// opening one) and for each statement, so that a database that went away is an error after
    /// that long, not a request that hangs.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self> {
        // Commits do not wait for PostgreSQL's WAL flush unless their transaction asks to (see
        // `DURABLE` below): a lease or an offset lost in a database crash only makes the offset
        // lag the bytes, which stay honest. That saves a disk flush, 0.3 ms here, twice a PATCH.
        let statement_timeout = timeout.as_millis().max(1).to_string();
        let options = PgConnectOptions::from_str(url)?
            .options([("synchronous_commit", "off"), ("statement_timeout", statement_timeout.as_str())]);
        let pool = pg_pool_options(timeout).max_connections(8).connect_with(options.clone()).await?;
        let reader = pg_pool_options(timeout).max_connections(4).connect_with(options).await?;
        let hot = HotConnections::new(&pool, timeout);
        Ok(Self { pool, reader, hot })
    }

    /// A connection for statements that write.
    async fn writer(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        Ok(self.pool.acquire().await?)
    }

    /// Where transactions that write begin (see [`PgBegin`]).
    async fn transactions(&self) -> Result<PgBegin<'_>> {
        Ok(PgBegin(&self.pool))
    }

    /// A connection for the statements every PATCH runs; tell it how each went.
    async fn hot_writer(&self) -> Result<HotConnection<'_>> {
        self.hot.get(&self.pool).await
    }

    async fn run_migrations(&self) -> Result<()> {
        sqlx::migrate!("migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    /// The connections that write: open, and idle.
    fn stats(&self) -> (u32, usize) {
        let (open, idle) = self.hot.stats();
        (self.pool.size() + open as u32, self.pool.num_idle() + idle)
    }
}

/// A connection that went back to the pool less than this long ago is used without testing it
/// first (sqlx tests every connection it returns to the pool).
const TESTED_RECENTLY: Duration = Duration::from_secs(1);

/// Tests a connection before use only when it sat idle for a while: testing it costs a round
/// trip to the server, which most statements here (two per PATCH) would otherwise pay once
/// more. A server that went away since is found out by the statement instead, which then
/// answers 503, and the connection is dropped.
fn pg_pool_options(timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new().acquire_timeout(timeout).test_before_acquire(false).before_acquire(|conn, meta| {
        Box::pin(async move {
            if meta.idle_for < TESTED_RECENTLY {
                return Ok(true);
            }
            Ok(sqlx::Connection::ping(conn).await.is_ok())
        })
    })
}

/// SQLite: the zero-setup default for one node.
pub struct SqliteRepo {
    /// The one connection that writes. SQLite lets one writer in at a time; several connections
    /// trying would wait for each other in SQLite's busy handler, which sleeps (up to 100 ms a
    /// try) instead of queueing, so writes queue here instead, in order. It is held here rather
    /// than in a pool: a pool tests every connection it takes back with a round trip to the
    /// connection's worker thread, and a connection to a file has nothing to test.
    writer: tokio::sync::Mutex<SqliteConnection>,
    /// How long a statement waits for the writer (`--database-timeout`).
    timeout: Duration,
    /// Connections that only read: in WAL mode they never wait for the writer.
    reader: SqlitePool,
}

impl SqliteRepo {
    /// Connects with `timeout` (`--database-timeout`) for waiting for a connection and for
    /// waiting on a lock held by another process.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self> {
        // WAL lets readers proceed while one connection writes; a crash loses at most commits
        // whose bytes are already stored, so offsets stay honest with `synchronous = NORMAL`.
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(timeout)
            .foreign_keys(true);
        let writer = tokio::time::timeout(timeout, sqlx::ConnectOptions::connect(&options))
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        // Nor is a reading connection tested before each use.
        let reader = SqlitePoolOptions::new()
            .acquire_timeout(timeout)
            .test_before_acquire(false)
            .max_connections(8)
            .connect_with(options)
            .await?;
        Ok(Self { writer: tokio::sync::Mutex::new(writer), timeout, reader })
    }

    /// The connection that writes, once the statements before have let go of it.
    async fn writer(&self) -> Result<tokio::sync::MutexGuard<'_, SqliteConnection>> {
        Ok(tokio::time::timeout(self.timeout, self.writer.lock()).await.map_err(|_| sqlx::Error::PoolTimedOut)?)
    }

    /// The same connection, for the statements every PATCH runs.
    async fn hot_writer(&self) -> Result<tokio::sync::MutexGuard<'_, SqliteConnection>> {
        self.writer().await
    }

    /// The same connection, for transactions.
    async fn transactions(&self) -> Result<tokio::sync::MutexGuard<'_, SqliteConnection>> {
        self.writer().await
    }

    async fn run_migrations(&self) -> Result<()> {
        let mut writer = self.writer().await?;
        sqlx::migrate!("migrations/sqlite").run_direct(&mut *writer).await?;
        Ok(())
    }

    /// The connections that write: open (the one), and idle.
    fn stats(&self) -> (u32, usize) {
        (1, usize::from(self.writer.try_lock().is_ok()))
    }
}

const COLUMNS: &str = "id, length, upload_offset, metadata, state, concat, concat_parts, hash_state, sha256, \
                       owner, write_gen, multipart_id, part_size, key_prefix, size_limit, staged_count, created_at, updated_at, \
                       expires_at, expected_sha256";

/// An upload's size limit in SQL: its own when smaller than `--max-size` (bound as `$7`).
const LIMIT: &str = "(CASE WHEN size_limit IS NOT NULL AND size_limit < $7 THEN size_limit ELSE $7 END)";

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).expect("sizes are validated to fit in i64")
}

fn corrupt(id: Uuid, reason: impl Into<String>) -> RepoError {
    RepoError::Corrupt { id: id.simple().to_string(), reason: reason.into() }
}

fn concat_columns(concat: &Concat) -> (Option<&'static str>, Option<String>) {
    match concat {
        Concat::None => (None, None),
        Concat::Partial => (Some("partial"), None),
        Concat::Final(parts) => {
            let ids: Vec<String> = parts.iter().map(ToString::to_string).collect();
            (Some("final"), Some(serde_json::to_string(&ids).expect("ids serialize")))
        }
    }
}

/// Decodes a row selected with [`COLUMNS`]; generic over the row type of either backend.
fn decode<R>(row: &R) -> Result<UploadRow>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> Uuid: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let uuid: Uuid = row.try_get("id")?;
    let length: Option<i64> = row.try_get("length")?;
    let offset: i64 = row.try_get("upload_offset")?;
    let metadata: String = row.try_get("metadata")?;
    let state: String = row.try_get("state")?;
    let concat: Option<String> = row.try_get("concat")?;
    let concat_parts: Option<String> = row.try_get("concat_parts")?;
    let sha256: Option<Vec<u8>> = row.try_get("sha256")?;
    let concat = match concat.as_deref() {
        None => Concat::None,
        Some("partial") => Concat::Partial,
        Some("final") => {
            let ids: Vec<String> = serde_json::from_str(concat_parts.as_deref().unwrap_or("[]"))
                .map_err(|e| corrupt(uuid, format!("concat_parts: {e}")))?;
            let ids = ids
                .iter()
                .map(|id| id.parse())
                .collect::<std::result::Result<Vec<UploadId>, _>>()
                .map_err(|e| corrupt(uuid, format!("concat_parts: {e}")))?;
            Concat::Final(ids)
        }
        Some(other) => return Err(corrupt(uuid, format!("concat '{other}'"))),
    };
    Ok(UploadRow {
        id: UploadId::from_uuid(uuid),
        length: length.map(|l| l as u64),
        offset: offset as u64,
        metadata: Metadata::from_json(&metadata).map_err(|e| corrupt(uuid, format!("metadata: {e}")))?,
        state: UploadState::parse(&state).ok_or_else(|| corrupt(uuid, format!("state '{state}'")))?,
        concat,
        hash_state: row.try_get("hash_state")?,
        sha256: sha256.map(|bytes| bytes.try_into().map_err(|_| corrupt(uuid, "sha256 length"))).transpose()?,
        expected_sha256: row
            .try_get::<Option<Vec<u8>>, _>("expected_sha256")?
            .map(|bytes| bytes.try_into().map_err(|_| corrupt(uuid, "expected_sha256 length")))
            .transpose()?,
        owner: row.try_get("owner")?,
        write_gen: row.try_get("write_gen")?,
        store: StoreUpload {
            multipart_id: row.try_get("multipart_id")?,
            part_size: row.try_get::<Option<i64>, _>("part_size")?.map(|s| s as u64),
            key_prefix: row.try_get("key_prefix")?,
        },
        size_limit: row.try_get::<Option<i64>, _>("size_limit")?.map(|s| s as u64),
        staged_count: row.try_get("staged_count")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

/// Inserts outbox events inside an open transaction.
macro_rules! insert_events {
    ($tx:ident, $events:expr) => {
        for event in $events {
            sqlx::query(
                "INSERT INTO events (id, upload_id, event_type, payload, created_at, next_attempt_at) \
                 VALUES ($1, $2, $3, $4, $5, $5)",
            )
            .bind(&event.id)
            .bind(event.upload_id.uuid())
            .bind(&event.event_type)
            .bind(&event.payload)
            .bind(event.created_at)
            .execute(&mut *$tx)
            .await?;
        }
    };
}

/// Inserts a final upload's pieces inside an open transaction, each only while its partial
/// upload is still complete; the UPDATE locks the partial's row until the commit, so that a
/// termination racing with this either comes first (and the partial is refused here) or waits
/// and then sees the partial in use. Evaluates to false when a partial is not complete.
macro_rules! insert_pieces {
    ($tx:ident, $final_id:expr, $pieces:expr) => {{
        let mut complete = true;
        for (position, piece) in $pieces.iter().enumerate() {
            let locked =
                sqlx::query("UPDATE uploads SET updated_at = updated_at WHERE id = $1 AND state = 'completed'")
                    .bind(piece.upload.uuid())
                    .execute(&mut *$tx)
                    .await?;
            if locked.rows_affected() != 1 {
                complete = false;
                break;
            }
            sqlx::query(
                "INSERT INTO upload_pieces (final_id, position, part_id, start_offset, size, key_prefix) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind($final_id.uuid())
            .bind(position as i32)
            .bind(piece.upload.uuid())
            .bind(to_i64(piece.start))
            .bind(to_i64(piece.size))
            .bind(&piece.key_prefix)
            .execute(&mut *$tx)
            .await?;
        }
        complete
    }};
}

/// Uploads a background completion job is due for: a store still has to assemble them, or
/// (final uploads) their SHA-256 is still to be computed.
const DUE: &str = "(state = 'completing' OR (state = 'completed' AND sha256 IS NULL))";

/// A final upload not gone that reads from the partial upload `$1`.
const IN_USE: &str = "EXISTS (SELECT 1 FROM upload_pieces p JOIN uploads f ON f.id = p.final_id \
                      WHERE p.part_id = $1 AND f.state NOT IN ('terminated', 'expired'))";

const EVENT_COLUMNS: &str = "seq, id, upload_id, event_type, payload, created_at, attempts, next_attempt_at, \
                             delivered_at, dead_at, last_error";

fn decode_event<R>(row: &R) -> Result<EventRow>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> Uuid: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i32: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(EventRow {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        upload_id: UploadId::from_uuid(row.try_get("upload_id")?),
        event_type: row.try_get("event_type")?,
        payload: row.try_get("payload")?,
        created_at: row.try_get("created_at")?,
        attempts: i64::from(row.try_get::<i32, _>("attempts")?),
        next_attempt_at: row.try_get("next_attempt_at")?,
        delivered_at: row.try_get("delivered_at")?,
        dead_at: row.try_get("dead_at")?,
        last_error: row.try_get("last_error")?,
    })
}

/// Begins the transactions of a backend's writing connection.
///
/// `durable`: the commit must be durable before the caller goes on (its effect is answered to a
/// client as final, such as a creation or a completion, or is followed by a side effect outside
/// the database, such as deleting bytes). PostgreSQL runs with `synchronous_commit = off`
/// otherwise; SQLite has nothing to ask.
trait BeginTx {
    type Db: sqlx::Database;

    async fn begin_tx(&mut self, durable: bool) -> Result<sqlx::Transaction<'_, Self::Db>>;
}

/// Where PostgreSQL transactions begin: on a connection of the writing pool.
struct PgBegin<'a>(&'a PgPool);

impl BeginTx for PgBegin<'_> {
    type Db = sqlx::Postgres;

    async fn begin_tx(&mut self, durable: bool) -> Result<sqlx::Transaction<'_, sqlx::Postgres>> {
        // sqlx 0.8 counts a PostgreSQL transaction as open only once its BEGIN is answered. A
        // caller dropped while the BEGIN is on the wire (the request of a client that hung up)
        // would put the connection back into the pool inside an open transaction, where the
        // statements of whoever takes it next would run, hold their locks and never commit. So
        // the BEGIN runs in a task of its own, which always reads the answer: a transaction
        // nobody awaits any more is then rolled back when it is dropped, like any other.
        // The durable kind asks for it in the same round trip.
        let statement = if durable { "BEGIN; SET LOCAL synchronous_commit = on" } else { "BEGIN" };
        let pool = self.0.clone();
        let begin = async move { pool.begin_with(statement).await };
        match tokio::spawn(tracing::Instrument::in_current_span(begin)).await {
            Ok(tx) => Ok(tx?),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(sqlx::Error::PoolClosed.into()),
        }
    }
}

impl BeginTx for tokio::sync::MutexGuard<'_, SqliteConnection> {
    type Db = sqlx::Sqlite;

    async fn begin_tx(&mut self, _durable: bool) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>> {
        // sqlx's SQLite worker rolls back by itself a BEGIN whose caller went away.
        Ok(sqlx::Connection::begin(&mut **self).await?)
    }
}

/// One guarded UPDATE (which has to change exactly one row) and the outbox events it causes, in
/// one durable transaction. Evaluates to `Ok(false)`, changing nothing, when the guard does not
/// hold.
macro_rules! guarded_update {
    ($repo:expr, $query:expr, $events:expr) => {{
        let mut conn = $repo.transactions().await?;
        let mut tx = conn.begin_tx(true).await?;
        if $query.execute(&mut *tx).await?.rows_affected() != 1 {
            return Ok(false);
        }
        insert_events!(tx, $events);
        tx.commit().await?;
        Ok(true)
    }};
}

macro_rules! sql_repo {
    ($repo:ty, $skip_locked:literal) => {

        #[async_trait]
        impl Repo for $repo {
            async fn migrate(&self) -> Result<()> {
                self.run_migrations().await
            }

            async fn ping(&self) -> Result<()> {
                sqlx::query("SELECT 1").execute(&self.reader).await?;
                Ok(())
            }

            fn pool_stats(&self) -> (u32, usize) {
                self.stats()
            }

            async fn secret(&self, name: &str, candidate: &[u8], now: i64) -> Result<Vec<u8>> {
                sqlx::query(
                    "INSERT INTO secrets (name, value, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(candidate)
                .bind(now)
                .execute(&mut *self.writer().await?)
                .await?;
                let value: Vec<u8> = sqlx::query_scalar("SELECT value FROM secrets WHERE name = $1")
                    .bind(name)
                    .fetch_one(&mut *self.writer().await?)
                    .await?;
                Ok(value)
            }

            async fn insert(&self, upload: &NewUpload, events: &[NewEvent]) -> Result<bool> {
                let (concat, concat_parts) = concat_columns(&upload.concat);
                let mut conn = self.transactions().await?;
                let mut tx = conn.begin_tx(true).await?;
                sqlx::query(
                    "INSERT INTO uploads (id, length, upload_offset, metadata, state, concat, concat_parts, \
                     hash_state, sha256, owner, created_at, updated_at, expires_at, multipart_id, part_size, size_limit, key_prefix, \
                     expected_sha256) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12, $13, $14, $15, $16, $17)",
                )
                .bind(upload.id.uuid())
                .bind(upload.length.map(to_i64))
                .bind(if upload.state == UploadState::Completed { upload.length.map(to_i64).unwrap_or(0) } else { 0 })
                .bind(upload.metadata.to_json())
                .bind(upload.state.as_str())
                .bind(concat)
                .bind(concat_parts)
                .bind(&upload.hash_state)
                .bind(upload.sha256.map(|h| h.to_vec()))
                .bind(&upload.owner)
                .bind(upload.now)
                .bind(upload.expires_at)
                .bind(&upload.store.multipart_id)
                .bind(upload.store.part_size.map(to_i64))
                .bind(upload.size_limit.map(to_i64))
                .bind(&upload.store.key_prefix)
                .bind(upload.expected_sha256.map(|h| h.to_vec()))
                .execute(&mut *tx)
                .await?;
                if !insert_pieces!(tx, upload.id, &upload.pieces) {
                    return Ok(false);
                }
                insert_events!(tx, events);
                tx.commit().await?;
                Ok(true)
            }

            async fn get(&self, id: UploadId) -> Result<Option<UploadRow>> {
                let row = sqlx::query(&format!("SELECT {COLUMNS} FROM uploads WHERE id = $1"))
                    .bind(id.uuid())
                    .fetch_optional(&self.reader)
                    .await?;
                row.as_ref().map(decode).transpose()
            }

            async fn lease_append(&self, lease: &Lease) -> Result<Option<UploadRow>> {
                // $7 is the upload's limit: its own size limit when smaller than --max-size.
                let statement = format!(
                    "UPDATE uploads SET write_gen = write_gen + 1, updated_at = $3, expires_at = $4 \
                     WHERE id = $1 AND upload_offset = $2 AND state = 'receiving' \
                     AND ($5 IS NULL OR owner = $5) \
                     AND ($6 IS NULL OR (length IS NULL AND $6 <= {LIMIT}) OR length = $6) \
                     AND ($8 IS NULL OR $8 <= COALESCE(length, $6, {LIMIT}) - upload_offset) \
                     RETURNING {COLUMNS}"
                );
                let query = sqlx::query(&statement)
                .bind(lease.id.uuid())
                .bind(to_i64(lease.offset))
                .bind(lease.now)
                .bind(lease.expires_at)
                .bind(&lease.owner)
                .bind(lease.length.map(to_i64))
                .bind(to_i64(lease.max_size))
                .bind(lease.content_length.map(to_i64));
                let mut conn = self.hot_writer().await?;
                let row = query.fetch_optional(&mut *conn).await;
                conn.settle(&row);
                row?.as_ref().map(decode).transpose()
            }

            async fn commit_append(&self, c: &AppendCommit) -> Result<bool> {
                let state = match (c.sha256.is_some(), c.needs_assembly) {
                    (false, _) => "receiving",
                    (true, false) => "completed",
                    (true, true) => "completing",
                };
                let staged_change = c.outcome.staged.len() as i64 - c.outcome.consumed.len() as i64;
                let update = sqlx::query(
                    "UPDATE uploads SET upload_offset = $4, hash_state = $5, length = COALESCE(length, $6), \
                     sha256 = $7, state = $8, updated_at = $9, expires_at = $10, staged_count = staged_count + $11 \
                     WHERE id = $1 AND write_gen = $2 AND upload_offset = $3 AND state = 'receiving' \
                     AND ($6 IS NULL OR length IS NULL OR length = $6)",
                )
                .bind(c.id.uuid())
                .bind(c.generation)
                .bind(to_i64(c.from_offset))
                .bind(to_i64(c.to_offset))
                .bind(&c.hash_state)
                .bind(c.length.map(to_i64))
                .bind(c.sha256.map(|h| h.to_vec()))
                .bind(state)
                .bind(c.now)
                .bind(c.expires_at)
                .bind(staged_change);
                let alone = c.outcome.parts.is_empty()
                    && c.outcome.staged.is_empty()
                    && c.outcome.consumed.is_empty()
                    && c.events.is_empty();
                if alone {
                    // One statement is its own transaction.
                    let mut conn = self.hot_writer().await?;
                    let result = update.execute(&mut *conn).await;
                    conn.settle(&result);
                    return Ok(result?.rows_affected() == 1);
                }
                let mut conn = self.transactions().await?;
                let mut tx = conn.begin_tx(!c.events.is_empty()).await?;
                if update.execute(&mut *tx).await?.rows_affected() != 1 {
                    return Ok(false);
                }
                for part in &c.outcome.parts {
                    sqlx::query(
                        "INSERT INTO upload_parts (upload_id, part_index, size, content_id) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(c.id.uuid())
                    .bind(to_i64(part.index))
                    .bind(to_i64(part.size))
                    .bind(&part.content_id)
                    .execute(&mut *tx)
                    .await?;
                }
                for key in &c.outcome.consumed {
                    sqlx::query("DELETE FROM upload_staged WHERE upload_id = $1 AND object_key = $2")
                        .bind(c.id.uuid())
                        .bind(key)
                        .execute(&mut *tx)
                        .await?;
                }
                for staged in &c.outcome.staged {
                    sqlx::query(
                        "INSERT INTO upload_staged (upload_id, chunk_offset, size, object_key) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(c.id.uuid())
                    .bind(to_i64(staged.offset))
                    .bind(to_i64(staged.size))
                    .bind(&staged.key)
                    .execute(&mut *tx)
                    .await?;
                }
                insert_events!(tx, &c.events);
                tx.commit().await?;
                Ok(true)
            }

            async fn claim_part_upload(&self, id: UploadId, generation: i64, now: i64, until: i64) -> Result<PartClaim> {
                let claimed = sqlx::query(
                    "UPDATE uploads SET part_writer = $2, part_writer_until = $4 \
                     WHERE id = $1 AND write_gen = $2 AND state = 'receiving' \
                     AND (part_writer IS NULL OR part_writer = $2 OR part_writer_until < $3)",
                )
                .bind(id.uuid())
                .bind(generation)
                .bind(now)
                .bind(until)
                .execute(&mut *self.writer().await?)
                .await?;
                if claimed.rows_affected() == 1 {
                    return Ok(PartClaim::Granted);
                }
                let current: Option<(i64, String)> = sqlx::query_as("SELECT write_gen, state FROM uploads WHERE id = $1")
                    .bind(id.uuid())
                    .fetch_optional(&mut *self.writer().await?)
                    .await?;
                Ok(match current {
                    Some((g, state)) if g == generation && state == "receiving" => PartClaim::Busy,
                    _ => PartClaim::Superseded,
                })
            }

            async fn release_part_upload(&self, id: UploadId, generation: i64) -> Result<()> {
                sqlx::query("UPDATE uploads SET part_writer = NULL, part_writer_until = NULL WHERE id = $1 AND part_writer = $2")
                    .bind(id.uuid())
                    .bind(generation)
                    .execute(&mut *self.writer().await?)
                    .await?;
                Ok(())
            }

            async fn parts(&self, id: UploadId) -> Result<Vec<Part>> {
                let rows = sqlx::query(
                    "SELECT part_index, size, content_id FROM upload_parts WHERE upload_id = $1 ORDER BY part_index",
                )
                .bind(id.uuid())
                .fetch_all(&self.reader)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(Part {
                            index: row.try_get::<i64, _>("part_index")? as u64,
                            size: row.try_get::<i64, _>("size")? as u64,
                            content_id: row.try_get("content_id")?,
                        })
                    })
                    .collect()
            }

            async fn staged(&self, id: UploadId) -> Result<Vec<Staged>> {
                let rows = sqlx::query(
                    "SELECT chunk_offset, size, object_key FROM upload_staged WHERE upload_id = $1 ORDER BY chunk_offset",
                )
                .bind(id.uuid())
                .fetch_all(&self.reader)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(Staged {
                            offset: row.try_get::<i64, _>("chunk_offset")? as u64,
                            size: row.try_get::<i64, _>("size")? as u64,
                            key: row.try_get("object_key")?,
                        })
                    })
                    .collect()
            }

            async fn terminate(&self, id: UploadId, now: i64, events: &[NewEvent]) -> Result<bool> {
                guarded_update!(
                    self,
                    sqlx::query(
                        "UPDATE uploads SET state = 'terminated', updated_at = $2, expires_at = NULL, \
                         write_gen = write_gen + 1 \
                         WHERE id = $1 AND state IN ('receiving', 'completing', 'completed')",
                    )
                    .bind(id.uuid())
                    .bind(now),
                    events
                )
            }

            async fn expiring(&self, now: i64, limit: i64) -> Result<Vec<UploadRow>> {
                let rows = sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM uploads WHERE state = 'receiving' AND expires_at < $1 \
                     ORDER BY expires_at LIMIT $2"
                ))
                .bind(now)
                .bind(limit)
                .fetch_all(&self.reader)
                .await?;
                rows.iter().map(decode).collect()
            }

            async fn expire(&self, id: UploadId, now: i64, events: &[NewEvent]) -> Result<bool> {
                guarded_update!(
                    self,
                    sqlx::query(
                        "UPDATE uploads SET state = 'expired', updated_at = $2, write_gen = write_gen + 1 \
                         WHERE id = $1 AND state = 'receiving' AND expires_at < $2",
                    )
                    .bind(id.uuid())
                    .bind(now),
                    events
                )
            }

            async fn pending_deletions(&self, limit: i64) -> Result<Vec<UploadId>> {
                let rows = sqlx::query(
                    "SELECT id FROM uploads u WHERE state IN ('terminated', 'expired') AND NOT bytes_deleted \
                     AND NOT EXISTS (SELECT 1 FROM upload_pieces p JOIN uploads f ON f.id = p.final_id \
                                     WHERE p.part_id = u.id AND f.state NOT IN ('terminated', 'expired')) \
                     LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.reader)
                .await?;
                rows.iter().map(|row| Ok(UploadId::from_uuid(row.try_get("id")?))).collect()
            }

            async fn mark_bytes_deleted(&self, id: UploadId, recheck_at: i64) -> Result<()> {
                sqlx::query("UPDATE uploads SET bytes_deleted = TRUE, bytes_recheck_at = $2 WHERE id = $1")
                    .bind(id.uuid())
                    .bind(recheck_at)
                    .execute(&mut *self.writer().await?)
                    .await?;
                Ok(())
            }

            async fn pending_rechecks(&self, now: i64, limit: i64) -> Result<Vec<UploadId>> {
                let rows = sqlx::query(
                    "SELECT id FROM uploads WHERE bytes_recheck_at IS NOT NULL AND bytes_recheck_at <= $1 \
                     AND state IN ('terminated', 'expired') AND bytes_deleted LIMIT $2",
                )
                .bind(now)
                .bind(limit)
                .fetch_all(&self.reader)
                .await?;
                rows.iter().map(|row| Ok(UploadId::from_uuid(row.try_get("id")?))).collect()
            }

            async fn mark_rechecked(&self, id: UploadId) -> Result<()> {
                sqlx::query("UPDATE uploads SET bytes_recheck_at = NULL WHERE id = $1")
                    .bind(id.uuid())
                    .execute(&mut *self.writer().await?)
                    .await?;
                Ok(())
            }

            async fn purge_gone(&self, before: i64) -> Result<u64> {
                let result = sqlx::query(
                    "DELETE FROM uploads WHERE state IN ('terminated', 'expired') AND bytes_deleted \
                     AND bytes_recheck_at IS NULL AND updated_at < $1",
                )
                .bind(before)
                .execute(&mut *self.writer().await?)
                .await?;
                Ok(result.rows_affected())
            }

            async fn claim_completion(&self, now: i64, lease_until: i64) -> Result<Option<UploadRow>> {
                let row = sqlx::query(&format!(
                    "UPDATE uploads SET claimed_until = $2 \
                     WHERE id = (SELECT id FROM uploads WHERE {DUE} AND (claimed_until IS NULL OR claimed_until < $1) LIMIT 1) \
                     AND {DUE} AND (claimed_until IS NULL OR claimed_until < $1) \
                     RETURNING {COLUMNS}"
                ))
                .bind(now)
                .bind(lease_until)
                .fetch_optional(&mut *self.writer().await?)
                .await?;
                row.as_ref().map(decode).transpose()
            }

            async fn renew_completion(&self, id: UploadId, held_until: i64, lease_until: i64) -> Result<bool> {
                let result = sqlx::query(
                    "UPDATE uploads SET claimed_until = $3 WHERE id = $1 AND claimed_until = $2",
                )
                .bind(id.uuid())
                .bind(held_until)
                .bind(lease_until)
                .execute(&mut *self.writer().await?)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn finish_completion(
                &self,
                id: UploadId,
                sha256: Option<[u8; 32]>,
                now: i64,
                events: &[NewEvent],
            ) -> Result<bool> {
                guarded_update!(
                    self,
                    sqlx::query(
                        "UPDATE uploads SET state = 'completed', upload_offset = length, sha256 = COALESCE($2, sha256), \
                         claimed_until = NULL, updated_at = $3, expires_at = NULL \
                         WHERE id = $1 AND state = 'completing'",
                    )
                    .bind(id.uuid())
                    .bind(sha256.map(|h| h.to_vec()))
                    .bind(now),
                    events
                )
            }

            async fn pieces(&self, id: UploadId) -> Result<Vec<Piece>> {
                let rows = sqlx::query(
                    "SELECT part_id, start_offset, size, key_prefix FROM upload_pieces WHERE final_id = $1 ORDER BY position",
                )
                .bind(id.uuid())
                .fetch_all(&self.reader)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(Piece {
                            upload: UploadId::from_uuid(row.try_get("part_id")?),
                            start: row.try_get::<i64, _>("start_offset")? as u64,
                            size: row.try_get::<i64, _>("size")? as u64,
                            key_prefix: row.try_get("key_prefix")?,
                        })
                    })
                    .collect()
            }

            async fn in_use(&self, id: UploadId) -> Result<bool> {
                let row = sqlx::query(&format!("SELECT {IN_USE} AS used"))
                    .bind(id.uuid())
                    .fetch_one(&mut *self.writer().await?)
                    .await?;
                Ok(row.try_get::<bool, _>("used")?)
            }

            async fn adopt_pieces(&self, id: UploadId, pieces: &[Piece], now: i64) -> Result<bool> {
                let mut conn = self.transactions().await?;
                let mut tx = conn.begin_tx(true).await?;
                let adopted = sqlx::query(
                    "UPDATE uploads SET state = 'completed', upload_offset = length, sha256 = NULL, claimed_until = NULL, \
                     updated_at = $2, expires_at = NULL WHERE id = $1 AND state = 'completing' AND concat = 'final'",
                )
                .bind(id.uuid())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if adopted.rows_affected() != 1 || !insert_pieces!(tx, id, pieces) {
                    return Ok(false);
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn record_digest(&self, id: UploadId, sha256: [u8; 32], now: i64, events: &[NewEvent]) -> Result<bool> {
                guarded_update!(
                    self,
                    sqlx::query(
                        "UPDATE uploads SET sha256 = $2, claimed_until = NULL, updated_at = $3 \
                         WHERE id = $1 AND state = 'completed' AND sha256 IS NULL",
                    )
                    .bind(id.uuid())
                    .bind(sha256.to_vec())
                    .bind(now),
                    events
                )
            }

            async fn claim_event(&self, now: i64, lease_until: i64) -> Result<Option<EventRow>> {
                let row = sqlx::query(&format!(
                    "UPDATE events SET claimed_until = $2, attempts = attempts + 1 \
                     WHERE seq = (SELECT e.seq FROM events e \
                                  WHERE e.delivered_at IS NULL AND e.dead_at IS NULL AND e.next_attempt_at <= $1 \
                                  AND (e.claimed_until IS NULL OR e.claimed_until < $1) \
                                  AND NOT EXISTS (SELECT 1 FROM events p WHERE p.upload_id = e.upload_id \
                                                  AND p.seq < e.seq AND p.delivered_at IS NULL AND p.dead_at IS NULL) \
                                  ORDER BY e.seq LIMIT 1 {}) \
                     AND delivered_at IS NULL AND dead_at IS NULL \
                     AND (claimed_until IS NULL OR claimed_until < $1) \
                     RETURNING {EVENT_COLUMNS}",
                    $skip_locked
                ))
                .bind(now)
                .bind(lease_until)
                .fetch_optional(&mut *self.writer().await?)
                .await?;
                row.as_ref().map(decode_event).transpose()
            }

            async fn settle_event(&self, seq: i64, outcome: &EventOutcome) -> Result<()> {
                let query = match outcome {
                    EventOutcome::Delivered { at } => sqlx::query(
                        "UPDATE events SET delivered_at = $2, claimed_until = NULL, last_error = NULL WHERE seq = $1",
                    )
                    .bind(seq)
                    .bind(*at),
                    EventOutcome::Retry { at, error } => sqlx::query(
                        "UPDATE events SET next_attempt_at = $2, claimed_until = NULL, last_error = $3 WHERE seq = $1",
                    )
                    .bind(seq)
                    .bind(*at)
                    .bind(error.as_str()),
                    EventOutcome::Dead { at, error } => sqlx::query(
                        "UPDATE events SET dead_at = $2, claimed_until = NULL, last_error = $3 WHERE seq = $1",
                    )
                    .bind(seq)
                    .bind(*at)
                    .bind(error.as_str()),
                };
                query.execute(&mut *self.writer().await?).await?;
                Ok(())
            }

            async fn list_events(&self, state: Option<EventState>, limit: i64) -> Result<Vec<EventRow>> {
                let filter = match state {
                    None => "TRUE",
                    Some(EventState::Pending) => "delivered_at IS NULL AND dead_at IS NULL",
                    Some(EventState::Delivered) => "delivered_at IS NOT NULL",
                    Some(EventState::Dead) => "dead_at IS NOT NULL AND delivered_at IS NULL",
                };
                let rows = sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE {filter} ORDER BY seq DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&self.reader)
                .await?;
                rows.iter().map(decode_event).collect()
            }

            async fn retry_events(&self, id: Option<&str>, now: i64) -> Result<u64> {
                let query = match id {
                    Some(id) => sqlx::query(
                        "UPDATE events SET dead_at = NULL, next_attempt_at = $2, claimed_until = NULL \
                         WHERE id = $1 AND delivered_at IS NULL",
                    )
                    .bind(id.to_string())
                    .bind(now),
                    None => sqlx::query(
                        "UPDATE events SET dead_at = NULL, next_attempt_at = $1, claimed_until = NULL \
                         WHERE dead_at IS NOT NULL AND delivered_at IS NULL",
                    )
                    .bind(now),
                };
                Ok(query.execute(&mut *self.writer().await?).await?.rows_affected())
            }
        }
    };
}

// PostgreSQL lets dispatchers on several instances skip each other's rows; SQLite serialises
// writers anyway.
sql_repo!(PgRepo, "FOR UPDATE SKIP LOCKED");
sql_repo!(SqliteRepo, "");
