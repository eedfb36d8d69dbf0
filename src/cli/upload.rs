//! `ferry upload FILE... --to URL`: a resumable tus 1.0 client on the command line.
//!
//! For each file: OPTIONS tells the server's limits, POST creates the upload (its URL is saved in
//! the state folder at once), PATCH sends the file chunk by chunk, HEAD tells where to continue
//! after anything went wrong, and a final HEAD's `Repr-Digest` is compared with the file's own
//! SHA-256. A rerun of the same command finds the saved URL and continues from the server's
//! offset. See the README's "Command-line uploads" for the user's view.

pub(crate) mod policy;
mod progress;
mod state;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::{
    Method, RequestBuilder, Response, StatusCode,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use url::Url;

use crate::config::{parse_duration, parse_size};
use crate::uploads::types::Metadata;
use policy::{AtFloor, ChunkPolicy, human_bytes, human_duration};
use progress::{FileProgress, Reporter};
use state::{Fingerprint, Record, StateDir, hex};

/// Exit status when every file was uploaded and verified.
pub const EXIT_OK: i32 = 0;
/// Exit status when a file could not be uploaded or verified (the others may have been).
pub const EXIT_FAILED: i32 = 1;
/// Exit status after Ctrl-C (SIGINT); SIGTERM gives 143.
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Debug, Clone, clap::Args)]
pub struct UploadArgs {
    /// The files to upload.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,

    /// The tus endpoint, e.g. `https://uploads.example.com/files/`.
    #[arg(long, env = "FERRY_URL", value_name = "URL")]
    pub to: Url,

    /// Metadata sent with each upload as KEY=VALUE (repeatable). `filename` (the file's name)
    /// and `filetype` (guessed from its extension) are sent unless given here.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,

    /// Upload token, sent as `Authorization: Bearer <token>`. Prefer the variable: a flag is
    /// visible to other users in the process list.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true, value_parser = parse_token)]
    pub token: Option<Token>,

    /// An extra request header, `Name: value` (repeatable), e.g. for an authenticating proxy.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,

    /// How many files are uploaded at the same time.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,

    /// Size of the first chunk (default 8MiB, or the server's advertised limit when smaller).
    /// Chunks then grow and shrink with the measured speed.
    #[arg(long, value_parser = parse_size)]
    pub chunk_size: Option<u64>,

    /// Chunks never grow beyond this (nor beyond the server's `Upload-Limit: max-append-size`).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_chunk_size: u64,

    /// How long one chunk's transfer should take at most: chunks grow while they finish in well
    /// under this and shrink when they take longer. Keep it well below the proxies' timeouts.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub chunk_time: Duration,

    /// Retries of one chunk (or request) before giving up on the file; any progress resets it.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,

    /// Wait before the first retry; it doubles with each further retry (up to 30 s), with jitter.
    /// A 503's `Retry-After` is honoured.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub retry_delay: Duration,

    /// Where the URLs of unfinished uploads are kept between runs.
    /// Default: `$XDG_STATE_HOME/ferry`, else `~/.local/state/ferry`.
    #[arg(long, env = "FERRY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Start new uploads even where an earlier run left one to resume.
    #[arg(long)]
    pub new: bool,

    /// Send at most this many bytes per second in total (e.g. `2MiB`).
    #[arg(long, value_parser = parse_size)]
    pub limit_rate: Option<u64>,

    /// No progress and no notes on stderr (errors are still shown).
    #[arg(long, short)]
    pub quiet: bool,
}

/// A secret that never shows in `Debug` output.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(redacted)")
    }
}

fn parse_token(value: &str) -> Result<Token, String> {
    let value = value.trim();
    let value = value.strip_prefix("Bearer ").unwrap_or(value).trim();
    if value.is_empty() {
        return Err("the token is empty".into());
    }
    HeaderValue::from_str(&format!("Bearer {value}")).map_err(|_| "the token contains characters a header cannot")?;
    Ok(Token(value.to_string()))
}

fn parse_meta(value: &str) -> Result<(String, String), String> {
    let (key, value) = value.split_once('=').ok_or("expected KEY=VALUE")?;
    let key = key.trim();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(format!("'{key}' cannot be a metadata key: use letters, digits and punctuation but no comma"));
    }
    Ok((key.to_string(), value.to_string()))
}

fn parse_header(value: &str) -> Result<(String, String), String> {
    let (name, value) = value.split_once(':').ok_or("expected 'Name: value'")?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("'{}' is not a header name", name.trim()))?;
    let value = value.trim();
    HeaderValue::from_str(value).map_err(|_| format!("the value of {name} contains characters a header cannot"))?;
    Ok((name.as_str().to_string(), value.to_string()))
}

/// Runs `ferry upload`; returns the process's exit status.
pub async fn run(args: UploadArgs) -> i32 {
    let reporter = Reporter::new(args.quiet);
    match Uploader::start(args, reporter.clone()).await {
        Ok(uploader) => uploader.run().await,
        Err(message) => {
            reporter.clear();
            reporter.error(&format!("ferry upload: {message}"));
            EXIT_FAILED
        }
    }
}

/// What the server said on OPTIONS.
#[derive(Debug, Clone)]
struct ServerInfo {
    max_size: Option<u64>,
    sha256: bool,
    append_limit: Option<u64>,
}

struct Uploader {
    args: UploadArgs,
    client: reqwest::Client,
    headers: HeaderMap,
    server: ServerInfo,
    state: StateDir,
    reporter: Reporter,
    /// The smallest ceiling a proxy's 413 taught any file's upload in this run.
    learned_ceiling: AtomicU64,
    limiter: Option<RateLimiter>,
}

/// A file's successful upload.
struct Done {
    url: String,
    size: u64,
    sha256: String,
}

/// Why a file's upload stopped.
enum Failure {
    /// Give up on this file, with the reason.
    Fatal(String),
    /// The server no longer has the upload (404/410): start a new one.
    Gone(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Fatal(e.to_string())
    }
}

impl Uploader {
    async fn start(args: UploadArgs, reporter: Reporter) -> Result<Arc<Self>, String> {
        let state_dir = match &args.state_dir {
            Some(dir) => dir.clone(),
            None => state::default_dir().map_err(|e| e.to_string())?,
        };
        let state = StateDir::open(state_dir).map_err(|e| format!("{e:#}"))?;
        let mut headers = HeaderMap::new();
        headers.insert("tus-resumable", HeaderValue::from_static("1.0.0"));
        if let Some(Token(token)) = &args.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        for (name, value) in &args.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
            headers.insert(name, HeaderValue::from_str(value).map_err(|e| e.to_string())?);
        }
        let client = reqwest::Client::builder()
            .user_agent(concat!("ferry-upload/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        let limiter = args.limit_rate.map(RateLimiter::new);
        let mut uploader = Self {
            server: ServerInfo { max_size: None, sha256: false, append_limit: None },
            args,
            client,
            headers,
            state,
            reporter,
            learned_ceiling: AtomicU64::new(u64::MAX),
            limiter,
        };
        uploader.server = uploader.discover().await?;
        Ok(Arc::new(uploader))
    }

    /// OPTIONS: the server's size limit, checksum algorithms and append limit.
    async fn discover(&self) -> Result<ServerInfo, String> {
        let url = self.args.to.to_string();
        let mut retry = Retry::new(&self.args);
        let response = loop {
            match self.send(self.request(Method::OPTIONS, &url), REQUEST_TIMEOUT).await {
                Ok(response) if retryable(response.status()) => {
                    let cause = Cause::of_response(response).await;
                    retry.failed(self, "OPTIONS", cause).await.map_err(fatal_text)?;
                }
                Ok(response) => break response,
                Err(cause) => retry.failed(self, "OPTIONS", cause).await.map_err(fatal_text)?,
            }
        };
        let headers = response.headers().clone();
        if matches!(response.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(refused("asking for the server's limits (OPTIONS)", response).await);
        }
        if response.status().is_redirection() {
            let location = text_header(&headers, "location").unwrap_or_default();
            return Err(format!("{url} redirects to {location}: give that URL with --to"));
        }
        if !headers.contains_key("tus-version") {
            let status = response.status();
            let cause = Cause::of_response(response).await;
            return Err(format!(
                "{url} does not look like a tus endpoint (such as https://host/files/): OPTIONS answered {} \
                 without Tus-Version{}",
                status_text(status),
                cause.detail().map(|d| format!(" ({d})")).unwrap_or_default()
            ));
        }
        let text = |name: &str| text_header(&headers, name);
        let sha256 = text("tus-checksum-algorithm")
            .is_some_and(|list| list.split(',').any(|a| a.trim().eq_ignore_ascii_case("sha256")));
        Ok(ServerInfo {
            max_size: text("tus-max-size").and_then(|v| v.trim().parse().ok()),
            sha256,
            append_limit: text("upload-limit").as_deref().and_then(policy::max_append_size),
        })
    }

    async fn run(self: Arc<Self>) -> i32 {
        let mut files: Vec<PathBuf> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for file in &self.args.files {
            let canonical = std::fs::canonicalize(file).unwrap_or_else(|_| file.clone());
            if seen.insert(canonical) {
                files.push(file.clone());
            } else {
                self.reporter.note(&file.display().to_string(), "listed more than once; uploading it once");
            }
        }
        let total = files.len();
        let mut failed = 0usize;
        let parallel = usize::from(self.args.parallel);
        let mut uploads = futures_util::stream::iter(files.into_iter().map(|file| {
            let uploader = self.clone();
            async move {
                let result = uploader.upload_file(&file).await;
                (file, result)
            }
        }))
        .buffer_unordered(parallel);
        let work = async {
            while let Some((file, result)) = uploads.next().await {
                match result {
                    Ok(done) => {
                        let line = format!("{}\t{}\t{}\t{}", done.url, done.size, done.sha256, file.display());
                        self.reporter.result(&line);
                    }
                    Err(message) => {
                        failed += 1;
                        self.reporter.error(&format!("ferry upload: {}: {message}", file.display()));
                    }
                }
            }
        };
        let code = tokio::select! {
            () = work => None,
            code = interrupted() => Some(code),
        };
        if let Some(code) = code {
            // Unfinished bars would be left half-drawn: remove them.
            self.reporter.clear();
            self.reporter.closing(&format!(
                "ferry upload: interrupted; the server keeps what it received: run the same command again to \
                 resume (state in {})",
                self.state.path().display()
            ));
            return code;
        }
        if failed > 0 {
            if total > 1 {
                self.reporter.closing(&format!(
                    "ferry upload: {} of {total} files uploaded, {failed} failed; run the same command again to \
                     retry them",
                    total - failed
                ));
            }
            return EXIT_FAILED;
        }
        EXIT_OK
    }

    /// Uploads one file to completion and verifies it; the error is a sentence for the user.
    async fn upload_file(&self, path: &Path) -> Result<Done, String> {
        let name = path.display().to_string();
        let owned = path.to_path_buf();
        let fingerprint = tokio::task::spawn_blocking(move || Fingerprint::of(&owned))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{e:#}"))?;
        let size = fingerprint.size;
        if let Some(max) = self.server.max_size
            && size > max
        {
            return Err(format!(
                "the file is {} but the server accepts at most {} (Tus-Max-Size)",
                human_bytes(size),
                human_bytes(max)
            ));
        }
        let target = self.args.to.to_string();
        let key = fingerprint.key(&target);
        let _lock = self.state.lock(&key).map_err(|e| format!("{e:#}"))?;
        self.state.forget_others(&key, &fingerprint, &target);
        let progress = self.reporter.file(&name, size);
        let mut file = FileUpload {
            uploader: self,
            name: name.clone(),
            fingerprint,
            key,
            progress: progress.clone(),
            hasher: FileHasher::new(path),
            policy: self.first_policy(),
        };
        match file.run().await {
            Ok(done) => {
                progress.finish("verified");
                Ok(done)
            }
            Err(message) => {
                progress.abandon("failed");
                Err(message)
            }
        }
    }

    fn first_policy(&self) -> ChunkPolicy {
        let mut ceiling = self.args.max_chunk_size;
        if let Some(limit) = self.server.append_limit {
            ceiling = ceiling.min(limit);
        }
        ceiling = ceiling.min(self.learned_ceiling.load(Ordering::Relaxed));
        let mut start = self.args.chunk_size.unwrap_or(policy::DEFAULT_CHUNK);
        if let Some(rate) = self.args.limit_rate {
            // With a rate limit, the first chunk takes at most half the target time.
            start = start.min((rate as f64 * self.args.chunk_time.as_secs_f64() / 2.0) as u64);
        }
        ChunkPolicy::new(start, ceiling, self.args.chunk_time)
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        self.client.request(method, url).headers(self.headers.clone())
    }

    /// Sends a request; a failure to get an answer becomes a [`Cause`].
    async fn send(&self, request: RequestBuilder, timeout: Duration) -> Result<Response, Cause> {
        request.timeout(timeout).send().await.map_err(|e| Cause::of_error(&e, timeout))
    }

    fn patch_timeout(&self) -> Duration {
        (self.args.chunk_time * 6).max(Duration::from_secs(60))
    }
}

/// Timeout of the small requests (OPTIONS, POST, HEAD).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times one file's upload may be started over because the server lost it.
const MAX_STARTS: u32 = 3;

/// Resolves on Ctrl-C (130) or SIGTERM (143).
async fn interrupted() -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => EXIT_INTERRUPTED,
        _ = terminate.recv() => 143,
    }
}

/// One file's upload.
struct FileUpload<'a> {
    uploader: &'a Uploader,
    name: String,
    fingerprint: Fingerprint,
    key: String,
    progress: Arc<FileProgress>,
    hasher: FileHasher,
    policy: ChunkPolicy,
}

/// What HEAD says.
struct Head {
    offset: u64,
    length: Option<u64>,
    /// The base64 SHA-256 from `Repr-Digest: sha-256=:...:`.
    sha256: Option<String>,
}

impl FileUpload<'_> {
    fn note(&self, message: &str) {
        self.uploader.reporter.note(&self.name, message);
    }

    fn size(&self) -> u64 {
        self.fingerprint.size
    }

    async fn run(&mut self) -> Result<Done, String> {
        let uploader = self.uploader;
        let mut record = if uploader.args.new { None } else { uploader.state.load(&self.key) };
        let mut starts = 0;
        loop {
            let (url, fresh) = match record.take() {
                Some(record) => {
                    // Completed and verified before, and the file has the same fingerprint: the
                    // server only needs to confirm it still holds those bytes.
                    if let Some(sha256) = &record.sha256
                        && let Some(done) = self.confirm(&record.upload_url, sha256).await
                    {
                        self.note("already uploaded");
                        return Ok(done);
                    }
                    (record.upload_url, false)
                }
                None => {
                    starts += 1;
                    if starts > MAX_STARTS {
                        return Err(format!("the server lost the upload {MAX_STARTS} times; giving up"));
                    }
                    (self.create().await.map_err(fatal_text)?, true)
                }
            };
            match self.transfer(&url, fresh).await {
                Ok(()) => {}
                Err(Failure::Gone(reason)) => {
                    self.note(&format!("the server no longer has the upload ({reason}); starting a new one"));
                    uploader.state.remove(&self.key);
                    continue;
                }
                Err(Failure::Fatal(message)) => return Err(message),
            }
            match self.verify(&url).await {
                Ok(done) => return Ok(done),
                Err(Failure::Gone(reason)) => {
                    self.note(&format!("the server no longer has the upload ({reason}); starting a new one"));
                    uploader.state.remove(&self.key);
                }
                Err(Failure::Fatal(message)) => return Err(message),
            }
        }
    }

    /// POST: creates the upload and saves its URL before any byte is sent.
    async fn create(&self) -> Result<String, Failure> {
        let uploader = self.uploader;
        let target = uploader.args.to.to_string();
        let mut metadata = Metadata::default();
        let file_name = self.fingerprint.path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(file_name) = &file_name {
            metadata.insert("filename", file_name);
            if let Some(kind) = guess_type(file_name) {
                metadata.insert("filetype", kind);
            }
        }
        for (key, value) in &uploader.args.meta {
            metadata.insert(key, value);
        }
        let mut retry = Retry::new(&uploader.args);
        let response = loop {
            let mut request = uploader.request(Method::POST, &target).header("upload-length", self.size());
            if !metadata.is_empty() {
                request = request.header("upload-metadata", metadata.to_header());
            }
            match uploader.send(request, REQUEST_TIMEOUT).await {
                Ok(response) if response.status() == StatusCode::CREATED => break response,
                Ok(response) if retryable(response.status()) => {
                    retry.failed(uploader, &self.name, Cause::of_response(response).await).await?
                }
                Ok(response) => return Err(Failure::Fatal(refused("creating the upload", response).await)),
                Err(cause) => retry.failed(uploader, &self.name, cause).await?,
            }
        };
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or("the server created the upload but sent no Location")?;
        let url =
            uploader.args.to.join(location).map_err(|e| format!("the Location '{location}' is not a URL: {e}"))?;
        if is_downgrade(&uploader.args.to, &url) {
            return Err(Failure::Fatal(format!(
                "the server answered with an upload URL over plain http ({url}) to a request made over https: \
                 behind a TLS proxy, start ferry with --behind-proxy (and have the proxy set X-Forwarded-Proto); \
                 nothing more was sent"
            )));
        }
        let record = Record {
            version: 1,
            fingerprint: self.fingerprint.clone(),
            target,
            upload_url: url.to_string(),
            created_at: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            sha256: None,
        };
        uploader.state.save(&self.key, &record).map_err(|e| format!("{e:#}"))?;
        Ok(url.to_string())
    }

    /// HEAD, retried through network errors and 5xx.
    async fn head(&self, url: &str, retry: &mut Retry) -> Result<Head, Failure> {
        let uploader = self.uploader;
        loop {
            match uploader.send(uploader.request(Method::HEAD, url), REQUEST_TIMEOUT).await {
                Ok(response) if response.status() == StatusCode::OK => {
                    let headers = response.headers();
                    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
                    let offset = number("upload-offset").ok_or("HEAD answered without a valid Upload-Offset")?;
                    let sha256 = headers
                        .get("repr-digest")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split(',').find_map(|d| d.trim().strip_prefix("sha-256=:")))
                        .and_then(|v| v.strip_suffix(':'))
                        .map(str::to_string);
                    return Ok(Head { offset, length: number("upload-length"), sha256 });
                }
                Ok(response) if gone(response.status()) => {
                    return Err(Failure::Gone(status_text(response.status())));
                }
                Ok(response) if retryable(response.status()) => {
                    retry.failed(uploader, &self.name, Cause::of_response(response).await).await?
                }
                Ok(response) => return Err(Failure::Fatal(refused("asking for the upload's offset", response).await)),
                Err(cause) => retry.failed(uploader, &self.name, cause).await?,
            }
        }
    }

    /// Whether a completed upload is still there with the SHA-256 it had.
    async fn confirm(&self, url: &str, sha256_hex: &str) -> Option<Done> {
        let mut retry = Retry::new(&self.uploader.args);
        let head = self.head(url, &mut retry).await.ok()?;
        let server = head.sha256.and_then(|b64| STANDARD.decode(b64).ok()).map(|b| hex(&b))?;
        (head.offset == self.size() && server == sha256_hex).then(|| {
            self.progress.restart_at(self.size());
            Done { url: url.to_string(), size: self.size(), sha256: server }
        })
    }

    /// Sends the file from the server's offset to the end.
    async fn transfer(&mut self, url: &str, fresh: bool) -> Result<(), Failure> {
        let uploader = self.uploader;
        let size = self.size();
        let mut retry = Retry::new(&uploader.args);
        let mut offset = 0;
        if !fresh {
            let head = self.head(url, &mut retry).await?;
            if head.length != Some(size) {
                return Err(Failure::Gone(format!(
                    "its length is {}, not the file's {size} bytes",
                    head.length.map(|l| l.to_string()).unwrap_or_else(|| "not known".into())
                )));
            }
            offset = head.offset;
            if offset > 0 && offset < size {
                self.note(&format!("resuming at {} of {} ({url})", human_bytes(offset), human_bytes(size)));
            }
        }
        self.progress.restart_at(offset);
        while offset < size {
            self.policy.cap(uploader.learned_ceiling.load(Ordering::Relaxed));
            let length = self.policy.size().min(size - offset);
            let checksum = self.hasher.chunk(offset, length, uploader.server.sha256).await?;
            // While this chunk is on the wire, read and hash the next one, for each size it may
            // have: the same, twice (it may grow) or half (it may shrink).
            let next = offset + length;
            if next < size {
                let guess = self.policy.size();
                let mut lengths = vec![guess / 2, guess, guess.saturating_mul(2).min(self.policy.ceiling())];
                lengths.iter_mut().for_each(|l| *l = (*l).min(size - next).max(1));
                lengths.dedup();
                self.hasher.prepare(next, lengths, uploader.server.sha256);
            }
            let started = Instant::now();
            let timeout = uploader.patch_timeout();
            let mut request = uploader
                .request(Method::PATCH, url)
                .header("upload-offset", offset)
                .header(reqwest::header::CONTENT_TYPE, "application/offset+octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, length);
            if let Some(checksum) = &checksum {
                request = request.header("upload-checksum", format!("sha256 {}", STANDARD.encode(checksum)));
            }
            let body =
                file_body(self.hasher.path.clone(), offset, length, self.progress.clone(), uploader.limiter.clone());
            let cause = match uploader.send(request.body(body), timeout).await {
                Ok(response) if response.status().is_success() => {
                    let reported = response
                        .headers()
                        .get("upload-offset")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    let Some(new_offset) = reported.filter(|o| *o > offset && *o <= size) else {
                        return Err(Failure::Fatal(format!(
                            "the server answered the chunk at {offset} with {} but no valid Upload-Offset",
                            status_text(response.status())
                        )));
                    };
                    self.policy.sent(new_offset - offset, started.elapsed());
                    offset = new_offset;
                    self.progress.set(offset);
                    retry.reset();
                    continue;
                }
                Ok(response) if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !from_tus(&response) => {
                    let who = who(&response);
                    match self.policy.too_large(length) {
                        Ok(smaller) => {
                            uploader.learned_ceiling.fetch_min(smaller, Ordering::Relaxed);
                            self.note(&format!(
                                "{who} refused a {} chunk (413); continuing with {} chunks",
                                human_bytes(length),
                                human_bytes(smaller)
                            ));
                            self.progress.set(offset);
                            continue;
                        }
                        Err(AtFloor { floor }) => {
                            return Err(Failure::Fatal(format!(
                                "{who} answered 413 at {} chunks: the proxy's body limit (nginx: \
                                 client_max_body_size) is smaller than that; raise it to at least 1 MiB",
                                human_bytes(floor.min(length))
                            )));
                        }
                    }
                }
                Ok(response) if gone(response.status()) => {
                    return Err(Failure::Gone(status_text(response.status())));
                }
                Ok(response) if response.status() == StatusCode::CONFLICT => {
                    // The offset moved under us (another client, or a cut-off body was kept):
                    // ask and continue from there, without waiting.
                    let cause = Cause::of_response(response).await;
                    retry.count(&cause)?;
                    self.note(&format!("{}; asking the server where to continue", cause.describe()));
                    None
                }
                Ok(response) if retryable(response.status()) => Some(Cause::of_response(response).await),
                Ok(response) => return Err(Failure::Fatal(refused("sending a chunk", response).await)),
                Err(cause) => {
                    if let Cause::FileChanged(message) = &cause {
                        return Err(Failure::Fatal(message.clone()));
                    }
                    if matches!(cause, Cause::Timeout(_)) {
                        self.policy.timed_out();
                    }
                    Some(cause)
                }
            };
            if let Some(cause) = cause {
                retry.failed(uploader, &self.name, cause).await?;
            }
            let head = self.head(url, &mut retry).await?;
            if head.offset > offset {
                retry.reset();
            }
            offset = head.offset;
            self.progress.set(offset);
        }
        Ok(())
    }

    /// Compares the server's SHA-256 of the complete upload with the file's.
    async fn verify(&mut self, url: &str) -> Result<Done, Failure> {
        let uploader = self.uploader;
        let size = self.size();
        let local = self.hasher.finish(size).await?;
        let mut retry = Retry::new(&uploader.args);
        let deadline = Instant::now() + Duration::from_secs(30);
        let server = loop {
            let head = self.head(url, &mut retry).await?;
            if head.offset < size {
                return Err(Failure::Fatal(format!(
                    "the server reports {} of {} bytes after the last chunk was accepted",
                    head.offset, size
                )));
            }
            if let Some(sha256) = head.sha256 {
                break sha256;
            }
            if Instant::now() >= deadline {
                return Err(Failure::Fatal(
                    "the server reports the upload complete but sends no Repr-Digest, so it cannot be verified".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let local_b64 = STANDARD.encode(local);
        let changed = {
            let path = self.fingerprint.path.clone();
            let before = self.fingerprint.clone();
            tokio::task::spawn_blocking(move || Fingerprint::of(&path).map(|now| now != before).unwrap_or(true))
                .await
                .unwrap_or(true)
        };
        if server != local_b64 || changed {
            uploader.state.remove(&self.key);
            let why = if changed {
                "the file changed while it was being uploaded".to_string()
            } else {
                format!("the server's SHA-256 ({server}) differs from the file's ({local_b64})")
            };
            return Err(Failure::Fatal(format!("{why}; run the command again to upload it anew")));
        }
        let sha256 = hex(&local);
        if let Some(mut record) = uploader.state.load(&self.key) {
            record.sha256 = Some(sha256.clone());
            uploader.state.save(&self.key, &record).map_err(|e| format!("{e:#}"))?;
        }
        Ok(Done { url: url.to_string(), size, sha256 })
    }
}

/// The SHA-256 of the whole file, computed chunk by chunk as the chunks are prepared (each byte
/// once, whatever the retries), and the per-chunk checksums. The next chunk is prepared while the
/// current one is being sent, so reading and hashing cost no time on the wire.
struct FileHasher {
    path: PathBuf,
    whole: Sha256,
    hashed_to: u64,
    /// The next chunk, being prepared.
    ahead: Option<tokio::task::JoinHandle<std::io::Result<Prepared>>>,
    /// Checksums prepared ahead: offset, and (length, SHA-256) for each length guessed.
    ready: Option<(u64, Sums)>,
}

/// A chunk's SHA-256 for each length it was prepared for.
type Sums = Vec<(u64, [u8; 32])>;

/// The outcome of one pass over a range of the file.
struct Prepared {
    whole: Sha256,
    hashed_to: u64,
    offset: u64,
    sums: Sums,
}

impl FileHasher {
    fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), whole: Sha256::new(), hashed_to: 0, ahead: None, ready: None }
    }

    /// Waits for the chunk being prepared ahead, and keeps what it hashed.
    async fn settle(&mut self) -> Result<(), Failure> {
        if let Some(ahead) = self.ahead.take() {
            let prepared = ahead.await?.map_err(|e| read_failure(&self.path, e))?;
            self.whole = prepared.whole;
            self.hashed_to = prepared.hashed_to;
            self.ready = Some((prepared.offset, prepared.sums));
        }
        Ok(())
    }

    /// The chunk `[offset, offset + length)`: feeds the whole-file hash with what it has not seen
    /// (first the bytes before `offset`, when resuming) and returns the chunk's SHA-256 when
    /// `checksum` is asked for (prepared ahead when the guess was right).
    async fn chunk(&mut self, offset: u64, length: u64, checksum: bool) -> Result<Option<[u8; 32]>, Failure> {
        self.settle().await?;
        if let Some((at, sums)) = self.ready.take()
            && at == offset
            && let Some((_, sum)) = sums.iter().find(|(l, _)| *l == length)
            && self.hashed_to >= offset + length
        {
            return Ok(checksum.then_some(*sum));
        }
        if !checksum && self.hashed_to >= offset + length {
            return Ok(None);
        }
        let task = self.pass(offset, vec![length], checksum);
        let prepared = task.await?.map_err(|e| read_failure(&self.path, e))?;
        self.whole = prepared.whole;
        self.hashed_to = prepared.hashed_to;
        Ok(prepared.sums.first().filter(|_| checksum).map(|(_, sum)| *sum))
    }

    /// Starts preparing the chunk at `offset`, for each of the `lengths` it may have.
    fn prepare(&mut self, offset: u64, lengths: Vec<u64>, checksum: bool) {
        if self.ahead.is_none() && !lengths.is_empty() {
            self.ahead = Some(self.pass(offset, lengths, checksum));
        }
    }

    /// One read of `[hashed_to, offset + max(lengths))` in a blocking thread.
    fn pass(
        &self,
        offset: u64,
        mut lengths: Vec<u64>,
        checksum: bool,
    ) -> tokio::task::JoinHandle<std::io::Result<Prepared>> {
        let path = self.path.clone();
        let mut whole = self.whole.clone();
        let mut hashed = self.hashed_to;
        lengths.sort_unstable();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let longest = lengths.last().copied().unwrap_or(0);
            let file = std::fs::File::open(&path)?;
            let mut buffer = vec![0u8; 1 << 20];
            // The bytes before the chunk that the whole-file hash has not seen (after a resume).
            while hashed < offset {
                let want = ((offset - hashed) as usize).min(buffer.len());
                file.read_exact_at(&mut buffer[..want], hashed)?;
                whole.update(&buffer[..want]);
                hashed += want as u64;
            }
            let mut chunk = Sha256::new();
            let mut sums = Vec::new();
            let mut at = offset;
            let mut next = lengths.iter().copied().peekable();
            while at < offset + longest {
                // Stop each read at the next guessed length, to take the chunk's hash there.
                let boundary = offset + next.peek().copied().unwrap_or(longest);
                let want = ((boundary - at) as usize).min(buffer.len());
                let data = &mut buffer[..want];
                file.read_exact_at(data, at)?;
                if checksum {
                    chunk.update(&*data);
                }
                let end = at + want as u64;
                if end > hashed {
                    whole.update(&data[(hashed.saturating_sub(at)) as usize..]);
                    hashed = end;
                }
                at = end;
                while next.peek().is_some_and(|l| offset + l == at) {
                    let length = next.next().expect("peeked");
                    if checksum {
                        sums.push((length, chunk.clone().finalize().into()));
                    } else {
                        sums.push((length, [0; 32]));
                    }
                }
            }
            if checksum && longest == 0 && lengths.contains(&0) {
                sums.push((0, Sha256::digest([]).into()));
            }
            Ok(Prepared { whole, hashed_to: hashed, offset, sums })
        })
    }

    /// The whole file's SHA-256 (reading what was not hashed yet).
    async fn finish(&mut self, size: u64) -> Result<[u8; 32], Failure> {
        self.settle().await?;
        if self.hashed_to < size {
            self.chunk(size, 0, false).await?;
        }
        Ok(self.whole.clone().finalize().into())
    }
}

fn read_failure(path: &Path, e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Failure::Fatal("the file got shorter while it was being uploaded".into())
    } else {
        Failure::Fatal(format!("cannot read {}: {e}", path.display()))
    }
}

/// How large each read of a chunk's body is.
const PIECE: usize = 256 * 1024;

/// A chunk's body, streamed from the file: `length` bytes from `offset`.
fn file_body(
    path: PathBuf,
    offset: u64,
    length: u64,
    progress: Arc<FileProgress>,
    limiter: Option<RateLimiter>,
) -> reqwest::Body {
    struct Reading {
        path: PathBuf,
        file: Option<tokio::fs::File>,
        offset: u64,
        remaining: u64,
        progress: Arc<FileProgress>,
        limiter: Option<RateLimiter>,
    }
    let piece = limiter.as_ref().map(|l| l.piece()).unwrap_or(PIECE);
    let start = Reading { path, file: None, offset, remaining: length, progress, limiter };
    let stream = futures_util::stream::unfold(start, move |mut state| async move {
        if state.remaining == 0 {
            return None;
        }
        let result: std::io::Result<Bytes> = async {
            if state.file.is_none() {
                let mut file = tokio::fs::File::open(&state.path).await?;
                file.seek(std::io::SeekFrom::Start(state.offset)).await?;
                state.file = Some(file);
            }
            let file = state.file.as_mut().expect("opened above");
            let want = (state.remaining as usize).min(piece);
            if let Some(limiter) = &state.limiter {
                limiter.acquire(want as u64).await;
            }
            let mut buffer = BytesMut::with_capacity(want);
            while buffer.len() < want {
                if file.read_buf(&mut buffer).await? == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, FILE_SHRANK));
                }
            }
            buffer.truncate(want);
            Ok(buffer.freeze())
        }
        .await;
        match result {
            Ok(bytes) => {
                state.remaining -= bytes.len() as u64;
                state.progress.advance(bytes.len() as u64);
                Some((Ok(bytes), state))
            }
            Err(e) => {
                state.remaining = 0;
                Some((Err(e), state))
            }
        }
    });
    reqwest::Body::wrap_stream(stream)
}

const FILE_SHRANK: &str = "the file got shorter while it was being uploaded";

/// Paces the bytes of all uploads of the run to `--limit-rate`.
#[derive(Clone)]
struct RateLimiter {
    bytes_per_second: f64,
    next: Arc<Mutex<tokio::time::Instant>>,
}

impl RateLimiter {
    fn new(bytes_per_second: u64) -> Self {
        Self { bytes_per_second: bytes_per_second as f64, next: Arc::new(Mutex::new(tokio::time::Instant::now())) }
    }

    /// Reads small enough for a smooth pace: about a tenth of a second's worth.
    fn piece(&self) -> usize {
        ((self.bytes_per_second / 10.0) as usize).clamp(4096, PIECE)
    }

    async fn acquire(&self, bytes: u64) {
        let start = {
            let mut next = self.next.lock().expect("rate limiter lock");
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// Why a request failed, for retry notes and the final message.
#[derive(Debug, Clone)]
enum Cause {
    /// No answer: connection refused, reset, DNS...
    Network(String),
    Timeout(Duration),
    /// An answer with a status that may be retried.
    Status {
        status: StatusCode,
        who: String,
        message: Option<String>,
        retry_after: Option<Duration>,
    },
    /// Reading the file failed because it changed under us.
    FileChanged(String),
}

impl Cause {
    fn of_error(e: &reqwest::Error, timeout: Duration) -> Self {
        if e.is_timeout() {
            return Cause::Timeout(timeout);
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        let mut innermost = e.to_string();
        while let Some(error) = source {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::UnexpectedEof && io.to_string() == FILE_SHRANK {
                    return Cause::FileChanged(FILE_SHRANK.into());
                }
                use std::io::ErrorKind::*;
                let text = match io.kind() {
                    ConnectionRefused => Some("connection refused"),
                    ConnectionReset => Some("connection reset by the server"),
                    ConnectionAborted => Some("connection aborted"),
                    BrokenPipe => Some("the connection closed while the chunk was being sent"),
                    TimedOut => Some("connection timed out"),
                    _ => None,
                };
                if let Some(text) = text {
                    return Cause::Network(text.into());
                }
            }
            innermost = error.to_string();
            source = error.source();
        }
        Cause::Network(innermost)
    }

    async fn of_response(response: Response) -> Self {
        let status = response.status();
        let who = who(&response);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| policy::retry_after(v, SystemTime::now()));
        let message = message_of(response).await;
        Cause::Status { status, who, message, retry_after }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Cause::Status { message, .. } => message.clone(),
            _ => None,
        }
    }

    /// One line: what happened.
    fn describe(&self) -> String {
        match self {
            Cause::Network(text) => text.clone(),
            Cause::Timeout(limit) => format!("no answer within {}", human_duration(*limit)),
            Cause::Status { status, who, message, .. } => match message {
                Some(message) => format!("{who} answered {}: {message}", status_text(*status)),
                None => format!("{who} answered {}", status_text(*status)),
            },
            Cause::FileChanged(text) => text.clone(),
        }
    }

    /// The closing message after `attempts` attempts.
    fn give_up(&self, attempts: u32) -> String {
        match self {
            Cause::Network(text) => format!("server unreachable after {attempts} attempts: {text}"),
            Cause::Timeout(limit) => {
                format!("no answer within {} after {attempts} attempts", human_duration(*limit))
            }
            Cause::Status { .. } => format!("giving up after {attempts} attempts: {}", self.describe()),
            Cause::FileChanged(text) => text.clone(),
        }
    }
}

/// The retry budget of one step (a chunk, a HEAD, the POST): reset by progress.
struct Retry {
    failures: u32,
    retries: u32,
    first: Duration,
}

impl Retry {
    fn new(args: &UploadArgs) -> Self {
        Self { failures: 0, retries: args.retries, first: args.retry_delay }
    }

    fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a failure; fails when the budget is spent.
    fn count(&mut self, cause: &Cause) -> Result<(), Failure> {
        self.failures += 1;
        if self.failures > self.retries {
            return Err(Failure::Fatal(cause.give_up(self.failures)));
        }
        Ok(())
    }

    /// Counts a failure and waits before the retry (backoff with jitter, or the server's
    /// `Retry-After`).
    async fn failed(&mut self, uploader: &Uploader, name: &str, cause: Cause) -> Result<(), Failure> {
        self.count(&cause)?;
        let delay = match &cause {
            Cause::Status { retry_after: Some(after), .. } => *after,
            _ => policy::backoff(self.failures, self.first, Duration::from_secs(30), rand::random::<f64>()),
        };
        uploader.reporter.note(
            name,
            &format!(
                "{}; retrying in {} ({} of {})",
                cause.describe(),
                human_delay(delay),
                self.failures,
                self.retries
            ),
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

fn human_delay(delay: Duration) -> String {
    if delay < Duration::from_secs(10) { format!("{:.1}s", delay.as_secs_f64()) } else { human_duration(delay) }
}

fn fatal_text(failure: Failure) -> String {
    match failure {
        Failure::Fatal(message) | Failure::Gone(message) => message,
    }
}

/// Statuses worth retrying: the server or a proxy in front is unwell, busy or restarting, or the
/// upload is locked by a request that has not noticed its client left.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::LOCKED
        || status.as_u16() == 460
}

fn text_header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn gone(status: StatusCode) -> bool {
    status == StatusCode::NOT_FOUND || status == StatusCode::GONE
}

/// Whether ferry (or another tus server) answered, rather than a proxy in front of it.
fn from_tus(response: &Response) -> bool {
    response.headers().contains_key("tus-resumable")
}

/// Who answered, for messages: "the server", or the proxy's product name ("nginx").
fn who(response: &Response) -> String {
    if from_tus(response) {
        return "the server".into();
    }
    match response.headers().get(reqwest::header::SERVER).and_then(|v| v.to_str().ok()) {
        Some(server) if !server.trim().is_empty() => {
            server.split(['/', ' ']).next().unwrap_or(server).trim().to_string()
        }
        _ => "a proxy in front of the server".into(),
    }
}

fn status_text(status: StatusCode) -> String {
    match status.as_u16() {
        460 => "460 Checksum Mismatch".into(),
        _ => format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("")).trim().to_string(),
    }
}

/// The first line of a plain-text error body (HTML error pages say nothing the status does not).
async fn message_of(response: Response) -> Option<String> {
    let text = response.text().await.ok()?;
    let text = text.trim();
    if text.is_empty() || text.starts_with('<') {
        return None;
    }
    let line = text.lines().next()?.trim();
    Some(if line.chars().count() > 300 {
        format!("{}...", line.chars().take(300).collect::<String>())
    } else {
        line.to_string()
    })
}

/// A refusal that retrying will not change (401, 403, 413 from the server, other 4xx).
async fn refused(doing: &str, response: Response) -> String {
    let status = response.status();
    let who = who(&response);
    let message = message_of(response).await;
    let mut text = format!("{who} refused {doing}: {}", status_text(status));
    if let Some(message) = message {
        text.push_str(": ");
        text.push_str(&message);
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        text.push_str(if who == "the server" {
            " (check the token: --token or FERRY_TOKEN)"
        } else {
            " (check what the proxy wants: --header, or --token / FERRY_TOKEN)"
        });
    }
    text
}

/// `filetype` from a file name's extension (common types only; others send none).
fn guess_type(name: &str) -> Option<&'static str> {
    let (_, extension) = name.rsplit_once('.')?;
    Some(match extension.to_ascii_lowercase().as_str() {
        "txt" | "log" => "text/plain",
        "md" => "text/markdown",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "css" => "text/css",
        "js" | "mjs" => "text/javascript",
        "json" => "application/json",
        "xml" => "application/xml",
        "yaml" | "yml" => "application/yaml",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "tar" => "application/x-tar",
        "bz2" => "application/x-bzip2",
        "xz" => "application/x-xz",
        "zst" => "application/zstd",
        "7z" => "application/x-7z-compressed",
        "wasm" => "application/wasm",
        "iso" => "application/x-iso9660-image",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "ppt" => "application/vnd.ms-powerpoint",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "odt" => "application/vnd.oasis.opendocument.text",
        "epub" => "application/epub+zip",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "svg" => "image/svg+xml",
        "tif" | "tiff" => "image/tiff",
        "heic" => "image/heic",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "ogg" => "audio/ogg",
        "flac" => "audio/flac",
        "m4a" => "audio/mp4",
        "mp4" | "m4v" => "video/mp4",
        "mov" => "video/quicktime",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "avi" => "video/x-msvideo",
        _ => return None,
    })
}

/// Whether following `location` after asking `to` would leave https for plain http: the token
/// and the file would then travel in clear (ferry behind a TLS proxy without `--behind-proxy`).
fn is_downgrade(to: &Url, location: &Url) -> bool {
    to.scheme() == "https" && location.scheme() != "https"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_url_may_not_leave_https() {
        let url = |s: &str| Url::parse(s).unwrap();
        let to = url("https://up.example/files/");
        assert!(is_downgrade(&to, &url("http://up.example/files/abc")));
        assert!(!is_downgrade(&to, &url("https://up.example/files/abc")));
        assert!(!is_downgrade(&url("http://127.0.0.1:8080/files/"), &url("http://127.0.0.1:8080/files/abc")));
        assert!(!is_downgrade(&url("http://up.example/files/"), &url("https://up.example/files/abc")));
    }

    #[tokio::test]
    async fn chunks_prepared_ahead_or_not_have_the_right_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(7919) % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let sha = |range: std::ops::Range<usize>| -> [u8; 32] { Sha256::digest(&data[range]).into() };
        let mut hasher = FileHasher::new(&path);

        assert_eq!(hasher.chunk(0, 1000, true).await.ok(), Some(Some(sha(0..1000))));
        // Prepared ahead, and the guess was right (the chunk grew).
        hasher.prepare(1000, vec![500, 1000, 2000], true);
        assert_eq!(hasher.chunk(1000, 2000, true).await.ok(), Some(Some(sha(1000..3000))));
        // Prepared ahead, and the guess was wrong.
        hasher.prepare(3000, vec![100_000, 200_000], true);
        assert_eq!(hasher.chunk(3000, 150_000, true).await.ok(), Some(Some(sha(3000..153_000))));
        // Again from an earlier offset (the server kept less than was sent).
        assert_eq!(hasher.chunk(2000, 1000, true).await.ok(), Some(Some(sha(2000..3000))));
        // Further on (a resume): the bytes in between still go into the whole file's hash.
        hasher.prepare(153_000, vec![10], false);
        assert_eq!(hasher.chunk(4_000_000, 10, true).await.ok(), Some(Some(sha(4_000_000..4_000_010))));
        assert_eq!(hasher.chunk(4_000_010, 10, false).await.ok(), Some(None));
        assert_eq!(hasher.finish(5_000_000).await.ok(), Some(sha(0..5_000_000)));
    }

    #[test]
    fn file_types_from_extensions() {
        assert_eq!(guess_type("report.PDF"), Some("application/pdf"));
        assert_eq!(guess_type("backup.tar.gz"), Some("application/gzip"));
        assert_eq!(guess_type("Makefile"), None);
        assert_eq!(guess_type("data.unknownext"), None);
    }

    #[test]
    fn flags_are_checked_on_the_way_in() {
        assert_eq!(parse_meta("project=apollo 11").unwrap(), ("project".into(), "apollo 11".into()));
        assert_eq!(parse_meta("empty=").unwrap(), ("empty".into(), String::new()));
        assert!(parse_meta("no value").is_err());
        assert!(parse_meta("bad,key=x").is_err());
        assert_eq!(parse_header("X-Api-Key: abc").unwrap(), ("x-api-key".into(), "abc".into()));
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
        assert_eq!(parse_token("Bearer abc").unwrap().0, "abc");
        assert!(parse_token(" ").is_err());
        assert_eq!(format!("{:?}", parse_token("secret").unwrap()), "Token(redacted)");
    }

    #[test]
    fn who_answered() {
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(retryable(StatusCode::LOCKED));
        assert!(!retryable(StatusCode::UNAUTHORIZED));
        assert!(!retryable(StatusCode::PAYLOAD_TOO_LARGE));
        assert_eq!(status_text(StatusCode::from_u16(460).unwrap()), "460 Checksum Mismatch");
        assert_eq!(status_text(StatusCode::PAYLOAD_TOO_LARGE), "413 Payload Too Large");
    }
}
