//! Command line and environment configuration.
//!
//! Every flag can also be set through a `FERRY_*` environment variable; flags win over the environment,
//! and both win over the defaults below.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ferry", version, about = "Resumable chunked uploads (tus 1.0) into object storage")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options for `serve` when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the upload service (what a bare `ferry` does).
    Serve(Box<ServeArgs>),
    /// Apply database migrations and exit (`serve` applies them at start too).
    Migrate(DatabaseArgs),
    /// Inspect and redeliver webhook events.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Upload files to a ferry (or any tus 1.0, or IETF resumable-uploads) server, resumably: rerun
    /// the same command to resume.
    Upload(Box<crate::cli::upload::UploadArgs>),
    /// Check the way from a client to ferry: the proxies' body limit and buffering, latency,
    /// throughput; recommends a chunk size and proxy settings.
    Doctor(crate::cli::doctor::DoctorArgs),
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List events, newest first.
    List {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Only events in this state.
        #[arg(long, value_enum)]
        state: Option<EventStateArg>,
        /// How many to show.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Make events due for delivery again: one by its id, or every dead one with `--dead`.
    Retry {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The event's id (`evt_...`, the webhook-id).
        #[arg(required_unless_present = "dead", conflicts_with = "dead")]
        id: Option<String>,
        /// Retry every dead event.
        #[arg(long)]
        dead: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventStateArg {
    Pending,
    Delivered,
    Dead,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Folder for the default SQLite database and the default local store.
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Database URL: `postgres://...` selects PostgreSQL, `sqlite://...` a SQLite file.
    /// Default: `sqlite://<data-dir>/ferry.db`.
    #[arg(long, env = "FERRY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// How long a request waits for a database connection, and how long one statement may run,
    /// before the request is answered `503` with `Retry-After` (the database is down or
    /// overloaded). `/readyz` answers within a second whatever this is.
    #[arg(long, env = "FERRY_DATABASE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub database_timeout: Duration,
}

impl DatabaseArgs {
    /// The database URL in force, with the SQLite default filled in.
    pub fn url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("ferry.db").display()),
        }
    }

    /// The folder of the SQLite database file, when the database is SQLite (not in memory),
    /// read the way sqlx reads the URL.
    pub fn sqlite_folder(&self) -> Option<PathBuf> {
        use std::str::FromStr;
        let url = self.url();
        // sqlx would read any other URL as a file name too (a PostgreSQL URL among them), and
        // names an in-memory database's shared cache as if it were a file.
        if !crate::repo::is_sqlite(&url) || url.contains(":memory:") || url.contains("mode=memory") {
            return None;
        }
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url).ok()?;
        let file = options.get_filename();
        if file.as_os_str().is_empty() {
            return None;
        }
        let parent = file.parent()?;
        Some(if parent.as_os_str().is_empty() { PathBuf::from(".") } else { parent.to_path_buf() })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Where upload bytes go: a folder path or `file:///path` (local disk).
    /// Default: `<data-dir>/store`.
    #[arg(long, env = "FERRY_STORE")]
    pub store: Option<String>,

    /// object_store settings for `s3://`, `gs://` and `az://` stores as KEY=VALUE, applied over the
    /// `AWS_*`, `GOOGLE_*`, `AZURE_*` environment (e.g. `aws_endpoint=http://127.0.0.1:9000`,
    /// `aws_allow_http=true`). Repeat the flag, or separate pairs by commas in the variable.
    #[arg(long = "store-option", env = "FERRY_STORE_OPTIONS", value_delimiter = ',', hide_env_values = true, value_parser = parse_pair)]
    pub store_options: Vec<(String, String)>,

    /// Part size for object stores (`s3://`, `gs://`, `az://`): appends are cut into parts of
    /// exactly this size (raised per upload when needed to stay within 10,000 parts; at least 5 MiB).
    #[arg(long, env = "FERRY_PART_SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub part_size: u64,

    /// Object stores: how long after a call's first attempt it is retried, with exponential
    /// backoff and jitter, when the store answers 5xx or 429 (S3's `503 SlowDown`), resets the
    /// connection or times out. Then the request gets `503` with `Retry-After`.
    #[arg(long, env = "FERRY_STORE_RETRY_BUDGET", default_value = "10s", value_parser = parse_duration)]
    pub store_retry_budget: Duration,

    /// Object stores: how long one attempt of a store call may take before it counts as failed
    /// (and is retried within `--store-retry-budget`). Long enough for one part to upload.
    #[arg(long, env = "FERRY_STORE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub store_timeout: Duration,

    /// How completed uploads are downloaded: `stream` (through ferry) or `redirect` (a 302 to a
    /// short-lived presigned URL of the object store, where the store supports it).
    #[arg(long, env = "FERRY_DOWNLOAD", value_enum, default_value_t = DownloadMode::Stream)]
    pub download: DownloadMode,

    /// How long a signed download link stays valid: the links on the upload page, in
    /// `upload.completed` webhooks (counted from each delivery) and from `GET {base}{id}/link`.
    #[arg(long, env = "FERRY_DOWNLOAD_LINK_TTL", default_value = "1h", value_parser = parse_link_ttl)]
    pub download_link_ttl: Duration,

    /// The URL clients reach ferry at, e.g. `https://uploads.example.com` (used for download URLs
    /// in webhook events). Default: `http://<listen>`.
    #[arg(long, env = "FERRY_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// URL path under which the tus endpoint lives; uploads are `<base-path><id>`.
    #[arg(long, env = "FERRY_BASE_PATH", default_value = "/files/", value_parser = parse_base_path)]
    pub base_path: String,

    /// Largest upload accepted, advertised as `Tus-Max-Size` (e.g. `100GiB`, `512MiB`, `1048576`).
    #[arg(long, env = "FERRY_MAX_SIZE", default_value = "100GiB", value_parser = parse_size)]
    pub max_size: u64,

    /// The largest request body ferry asks clients to send (e.g. `1MiB`): advertised on OPTIONS,
    /// POST and HEAD as `Upload-Limit: max-append-size=N` and obeyed by ferry's own clients. Set it
    /// to the smallest body limit of the proxies in front (nginx's default `client_max_body_size`
    /// is 1 MiB; `ferry doctor` measures it). Larger bodies are still accepted when they arrive.
    /// Unset: nothing is advertised.
    #[arg(long, env = "FERRY_MAX_APPEND_SIZE", value_parser = parse_size)]
    pub max_append_size: Option<u64>,

    /// Trust `Forwarded` and `X-Forwarded-Proto`/`X-Forwarded-Host` from the proxy in front when
    /// building absolute URLs (the `Location` of a new upload). Only set this when every request
    /// reaches ferry through a proxy that sets or strips those headers.
    #[arg(long, env = "FERRY_BEHIND_PROXY")]
    pub behind_proxy: bool,

    /// When to send the IETF draft's `104 Upload Resumption Supported` before reading a
    /// creation's body: `auto` only to clients that reach ferry directly (not with
    /// `--behind-proxy`, nor when the request carries `Forwarded`, `X-Forwarded-For`,
    /// `X-Real-IP` or `Via`: nginx 1.22 takes an upstream's 104 for its final answer), `always`
    /// for proxies that forward interim responses, `never`.
    #[arg(long, env = "FERRY_INTERIM_RESPONSES", value_enum, default_value_t = InterimResponses::Auto)]
    pub interim_responses: InterimResponses,

    /// Incomplete uploads with no activity for this long are expired and their bytes deleted
    /// (e.g. `24h`, `30m`, `90s`).
    #[arg(long, env = "FERRY_EXPIRE_AFTER", default_value = "24h", value_parser = parse_duration)]
    pub expire_after: Duration,

    /// Origins allowed to call the API from a browser (comma-separated; `*` allows any).
    /// Empty: no CORS headers are sent.
    #[arg(long, env = "FERRY_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,

    /// How long a client may take to send a request's headers before the connection is closed
    /// (stops slowloris clients). Also bounds how long an idle keep-alive connection stays open.
    #[arg(long, env = "FERRY_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// How long a request body may stall between two reads before ferry keeps what arrived and
    /// ends the request. A slow upload that keeps moving is never cut off.
    #[arg(long, env = "FERRY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Serve `/metrics` (Prometheus) on this address instead of on the main listener.
    #[arg(long, env = "FERRY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// On SIGTERM, how long requests in flight may go on before the appends still running keep
    /// what arrived and end (Kubernetes sends SIGKILL 30 s after SIGTERM by default).
    #[arg(long, env = "FERRY_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Where events (upload.created, upload.completed, upload.terminated, upload.expired) are
    /// POSTed. Without it, events are still recorded (see `ferry events list`).
    #[arg(long, env = "FERRY_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// Signing secret(s), `whsec_<base64>` (Standard Webhooks). Give two, comma-separated, while
    /// rotating: each delivery is signed with both.
    #[arg(long, env = "FERRY_WEBHOOK_SECRET", value_delimiter = ',', hide_env_values = true, value_parser = parse_secret)]
    pub webhook_secret: Vec<crate::hooks::Secret>,

    /// How long one delivery may take before it counts as failed.
    #[arg(long, env = "FERRY_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,

    /// How long an event is retried before it is marked dead.
    #[arg(long, env = "FERRY_WEBHOOK_RETRY_BUDGET", default_value = "24h", value_parser = parse_duration)]
    pub webhook_retry_budget: Duration,

    /// Delay before the first retry; it doubles with each attempt (up to an hour), with jitter.
    #[arg(long, env = "FERRY_WEBHOOK_RETRY_MIN", default_value = "1s", value_parser = parse_duration)]
    pub webhook_retry_min: Duration,

    /// HS256 secret shared with the application for upload tokens (JWT). With a token key set,
    /// every tus request needs `Authorization: Bearer <token>` and uploads are bound to its `sub`.
    #[arg(long, env = "FERRY_TOKEN_SECRET", hide_env_values = true, conflicts_with = "token_public_key")]
    pub token_secret: Option<String>,

    /// Ed25519 public key (PEM file) for EdDSA upload tokens, instead of `--token-secret`.
    #[arg(long, env = "FERRY_TOKEN_PUBLIC_KEY")]
    pub token_public_key: Option<PathBuf>,

    /// The application's pre-create hook: asked before every upload is created, it allows (and
    /// may name the owner, add metadata, lower the size limit) or denies with a status and message.
    #[arg(long, env = "FERRY_PRE_CREATE_URL")]
    pub pre_create_url: Option<String>,

    /// How long the pre-create hook may take; slower or unreachable means 503, nothing created.
    #[arg(long, env = "FERRY_PRE_CREATE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub pre_create_timeout: Duration,

    /// Request headers passed on to the pre-create hook (comma-separated).
    #[arg(long, env = "FERRY_PRE_CREATE_HEADERS", value_delimiter = ',', default_value = "authorization,cookie")]
    pub pre_create_headers: Vec<String>,

    /// Memory all appends of this instance may hold at once (received bytes not yet written and
    /// hashed; on object stores, the parts being filled and uploaded), whatever the number of
    /// connections. While it is spent, requests wait and TCP pushes back on their clients; a slow
    /// connection holds only what it has received. At least 1 MiB, and on object stores at least
    /// two parts.
    #[arg(long, env = "FERRY_MEMORY_BUDGET", default_value = "64MiB", value_parser = parse_size)]
    pub memory_budget: u64,

    /// Free space the local store's volume keeps: below it, bodies are refused with `507` and
    /// `Retry-After` (creating without a body, HEAD, GET, DELETE and expiry go on working, and
    /// the database on the same volume keeps room to record them), and `/readyz` says so. A
    /// size, `0` for no reserve, or `auto`: 1 GiB or 5% of the volume, whichever is smaller.
    #[arg(long, env = "FERRY_MIN_FREE_SPACE", default_value = "auto", value_parser = parse_min_free_space)]
    pub min_free_space: MinFreeSpace,

    /// Room kept beside the SQLite database (a file, `EMERGENCY_BALLAST`) and released when the
    /// volume is so full that a termination or expiry cannot be recorded (`auto`: 1% of the
    /// volume, at most 32 MiB; `0`: none).
    #[arg(long, env = "FERRY_EMERGENCY_BALLAST", default_value = "auto", value_parser = parse_ballast_size)]
    pub emergency_ballast: BallastSize,

    /// How often the background sweeper looks for expired uploads and leftover bytes.
    #[arg(long, env = "FERRY_SWEEP_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// How old a staged object (object stores) that no upload points to must be before the
    /// sweeper deletes it: younger ones may belong to a request still committing. Also how long
    /// after deleting a gone upload's bytes the sweeper deletes them once more, for a writer that
    /// was still sending then. Longer than any append takes to commit.
    #[arg(long, env = "FERRY_ORPHAN_AGE", default_value = "10m", value_parser = parse_duration)]
    pub orphan_age: Duration,

    /// Turn off the probe endpoint (`POST <base-path>probe`) that `ferry doctor` measures the
    /// proxies in front with.
    #[arg(long, env = "FERRY_NO_PROBE")]
    pub no_probe: bool,

    /// Largest body the probe endpoint reads; larger ones get ferry's own 413 (`Ferry-Probe: limit`).
    #[arg(long, env = "FERRY_PROBE_MAX_SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub probe_max_size: u64,

    /// Bytes per minute all probes of one instance may read together (429 with `Retry-After` beyond).
    #[arg(long, env = "FERRY_PROBE_BUDGET", default_value = "1GiB", value_parser = parse_size)]
    pub probe_budget: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InterimResponses {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DownloadMode {
    Stream,
    Redirect,
}

impl ServeArgs {
    pub fn public_url(&self) -> String {
        self.public_url.clone().unwrap_or_else(|| format!("http://{}", self.listen))
    }

    /// The store location in force, with the local default filled in.
    pub fn store_url(&self) -> String {
        match &self.store {
            Some(store) => store.clone(),
            None => self.database.data_dir.join("store").display().to_string(),
        }
    }
}

/// `--min-free-space`: the reserve of free space on the local store's volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFreeSpace {
    /// 1 GiB or 5% of the volume, whichever is smaller.
    Auto,
    Bytes(u64),
}

impl MinFreeSpace {
    /// The reserve in bytes on a volume of `total` bytes.
    pub fn of(self, total: u64) -> u64 {
        match self {
            Self::Auto => (1u64 << 30).min(total / 20),
            Self::Bytes(bytes) => bytes,
        }
    }
}

/// `--emergency-ballast`: the room kept beside a SQLite database for recording terminations on
/// a volume full to the last byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BallastSize {
    /// 1% of the volume, at most 32 MiB.
    Auto,
    /// This many bytes (0: no ballast).
    Bytes(u64),
}

impl BallastSize {
    /// The ballast in bytes on a volume of `total` bytes.
    pub fn of(self, total: u64) -> u64 {
        match self {
            Self::Auto => (total / 100).min(32 << 20),
            Self::Bytes(bytes) => bytes,
        }
    }
}

/// A download link lasts at most a year.
fn parse_link_ttl(value: &str) -> Result<Duration, String> {
    let ttl = parse_duration(value)?;
    if ttl > Duration::from_secs(366 * 86400) {
        return Err("a download link may last at most a year (366d)".into());
    }
    Ok(ttl)
}

fn parse_ballast_size(value: &str) -> Result<BallastSize, String> {
    match value.trim() {
        "auto" => Ok(BallastSize::Auto),
        "0" => Ok(BallastSize::Bytes(0)),
        other => parse_size(other).map(BallastSize::Bytes),
    }
}

fn parse_min_free_space(value: &str) -> Result<MinFreeSpace, String> {
    match value.trim() {
        "auto" => Ok(MinFreeSpace::Auto),
        "0" => Ok(MinFreeSpace::Bytes(0)),
        other => parse_size(other).map(MinFreeSpace::Bytes),
    }
}

fn parse_pair(value: &str) -> Result<(String, String), String> {
    let (key, value) = value.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok((key.trim().to_string(), value.trim().to_string()))
}

fn parse_secret(value: &str) -> Result<crate::hooks::Secret, String> {
    crate::hooks::Secret::parse(value)
}

fn parse_base_path(value: &str) -> Result<String, String> {
    if !value.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if value.contains(['?', '#', ' ']) {
        return Err("must be a plain path".into());
    }
    let mut path = value.to_string();
    if !path.ends_with('/') {
        path.push('/');
    }
    Ok(path)
}

/// Parses a byte size: a plain number of bytes or a number with a unit (`KB`, `MB`, `GB`, `TB`
/// are powers of 1000; `KiB`, `MiB`, `GiB`, `TiB` and the bare `K`, `M`, `G`, `T` are powers of 1024).
pub fn parse_size(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let number: u64 =
        digits.parse().map_err(|_| format!("'{value}' is not a size such as 1048576, 512MiB or 10GiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000u64.pow(2),
        "gb" => 1000u64.pow(3),
        "tb" => 1000u64.pow(4),
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit '{other}'")),
    };
    let size = number
        .checked_mul(multiplier)
        .filter(|size| *size <= i64::MAX as u64)
        .ok_or_else(|| format!("'{value}' is too large"))?;
    if size == 0 {
        return Err("must be greater than zero".into());
    }
    Ok(size)
}

/// Parses a duration such as `24h`, `30m`, `90s`, `500ms` or `1d`; a bare number is seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let number: u64 =
        digits.parse().map_err(|_| format!("'{value}' is not a duration such as 24h, 30m, 90s or 500ms"))?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(number),
        "" | "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        "d" => Duration::from_secs(number.saturating_mul(86400)),
        other => return Err(format!("unknown duration unit '{other}'")),
    };
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(url: Option<&str>) -> DatabaseArgs {
        DatabaseArgs {
            data_dir: PathBuf::from("/var/lib/ferry"),
            database_url: url.map(str::to_string),
            database_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn only_a_sqlite_database_has_a_folder() {
        assert_eq!(database(None).sqlite_folder(), Some(PathBuf::from("/var/lib/ferry")));
        assert_eq!(database(Some("sqlite:///srv/db/ferry.db")).sqlite_folder(), Some(PathBuf::from("/srv/db")));
        assert_eq!(database(Some("sqlite::memory:")).sqlite_folder(), None);
        // The emergency ballast goes beside the database file: a PostgreSQL URL is no folder.
        assert_eq!(database(Some("postgres://postgres@127.0.0.1:5432/ferry")).sqlite_folder(), None);
        assert_eq!(database(Some("postgresql://db.internal/ferry")).sqlite_folder(), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn free_space_reserves() {
        assert_eq!(parse_min_free_space("auto"), Ok(MinFreeSpace::Auto));
        assert_eq!(parse_min_free_space("0"), Ok(MinFreeSpace::Bytes(0)));
        assert_eq!(parse_min_free_space("4MiB"), Ok(MinFreeSpace::Bytes(4 << 20)));
        assert!(parse_min_free_space("lots").is_err());
        // 5% of a small volume, 1 GiB of a large one.
        assert_eq!(MinFreeSpace::Auto.of(10 << 30), 512 << 20);
        assert_eq!(MinFreeSpace::Auto.of(100 << 30), 1 << 30);
        assert_eq!(MinFreeSpace::Bytes(7).of(100 << 30), 7);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn base_paths() {
        assert_eq!(parse_base_path("/files").unwrap(), "/files/");
        assert_eq!(parse_base_path("/up/files/").unwrap(), "/up/files/");
        assert!(parse_base_path("files/").is_err());
    }
}
