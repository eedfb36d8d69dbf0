//! `ferry upload FILE... --to URL`: a resumable upload client on the command line, speaking tus
//! 1.0.0 or the IETF draft "Resumable Uploads for HTTP" (`--protocol`).
//!
//! For each file: OPTIONS tells the protocols and the server's limits, POST creates the upload
//! (its URL is saved in the state folder at once; with the IETF draft a file that fits one chunk
//! goes in the POST itself and its URL is saved when it is answered), PATCH sends the file chunk by
//! chunk, HEAD tells where to continue after anything went wrong, and a final HEAD's
//! `Repr-Digest` is compared with the file's own SHA-256. A rerun of the same command finds the
//! saved URL and continues from the server's offset. See docs/cli.md for
//! the user's view.
//!
//! The pieces: [`protocol`] (how each protocol dresses requests and reads answers), `transfer`
//! (one file's upload, the same loop for both), `retry` (what is retried and how failures are
//! told), `hasher` (the file's and the chunks' SHA-256), `policy` (chunk sizes, backoff, limits),
//! `state` (what a rerun resumes) and `progress`.

mod hasher;
pub(crate) mod policy;
mod progress;
pub(crate) mod protocol;
pub(crate) mod retry;
mod state;
mod transfer;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use reqwest::{
    Method, RequestBuilder, Response, StatusCode,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use url::Url;

use crate::config::{parse_duration, parse_size};
use hasher::FileHasher;
use policy::{ChunkPolicy, human_bytes};
use progress::Reporter;
use protocol::{Choice, Ietf, Offer, Protocol, Tus};
use retry::{Cause, Retry, fatal_text, refused, retryable, status_text, text_header};
use state::{Fingerprint, StateDir};
use transfer::{FileUpload, RateLimiter};

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

    /// The upload endpoint, e.g. `https://uploads.example.com/files/`.
    #[arg(long, env = "FERRY_URL", value_name = "URL")]
    pub to: Url,

    /// The protocol: `tus` (tus 1.0.0), `ietf` (the IETF draft "Resumable Uploads for HTTP",
    /// -12, interop version 9) or `auto`. `auto` asks OPTIONS (with
    /// `Upload-Draft-Interop-Version: 9`) and uses tus when its `Tus-Version` lists 1.0.0, as
    /// every ferry's does: tus announces the checksum algorithms the server verifies, and a chunk
    /// damaged on the way gets a 460 that is retried. It uses the IETF draft when the answer has no
    /// `Tus-Version` but the draft's `Upload-Limit`. An upload being resumed keeps the protocol
    /// it was started with.
    #[arg(long, value_enum, default_value_t = Choice::Auto, env = "FERRY_PROTOCOL")]
    pub protocol: Choice,

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

struct Uploader {
    args: UploadArgs,
    client: reqwest::Client,
    /// The token and `--header`s: every request of either protocol carries them.
    headers: HeaderMap,
    /// What OPTIONS said.
    offer: Offer,
    /// The protocol new uploads are made with.
    protocol: &'static dyn Protocol,
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

impl Uploader {
    async fn start(args: UploadArgs, reporter: Reporter) -> Result<Arc<Self>, String> {
        let state_dir = match &args.state_dir {
            Some(dir) => dir.clone(),
            None => state::default_dir().map_err(|e| e.to_string())?,
        };
        let state = StateDir::open(state_dir).map_err(|e| format!("{e:#}"))?;
        let mut headers = HeaderMap::new();
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
            offer: Offer::default(),
            protocol: &Tus,
            args,
            client,
            headers,
            state,
            reporter,
            learned_ceiling: AtomicU64::new(u64::MAX),
            limiter,
        };
        (uploader.offer, uploader.protocol) = uploader.discover().await?;
        Ok(Arc::new(uploader))
    }

    /// OPTIONS: the protocols, the server's size limit, checksum algorithms and append limit.
    /// Asked in the draft's terms (the interop version) unless tus is asked for: a tus server
    /// ignores it, and ferry then adds the draft's limits to its tus headers.
    async fn discover(&self) -> Result<(Offer, &'static dyn Protocol), String> {
        let url = self.args.to.to_string();
        let choice = self.args.protocol;
        let asking: &dyn Protocol = if choice == Choice::Tus { &Tus } else { &Ietf };
        let mut retry = Retry::new(&self.args);
        let response = loop {
            let request = asking.speak(self.request(Method::OPTIONS, &url));
            match self.send(request, REQUEST_TIMEOUT).await {
                Ok(response) if retryable(response.status()) => {
                    let cause = Cause::of_response(response).await;
                    retry.failed(&self.reporter, "OPTIONS", cause).await.map_err(fatal_text)?;
                }
                Ok(response) => break response,
                Err(cause) => retry.failed(&self.reporter, "OPTIONS", cause).await.map_err(fatal_text)?,
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
        let offer = Offer::read(&headers);
        match protocol::choose(choice, &offer) {
            Some(kind) => Ok((offer, kind.protocol())),
            None => {
                let status = response.status();
                let cause = Cause::of_response(response).await;
                let detail = cause.detail().map(|d| format!(" ({d})")).unwrap_or_default();
                Err(if choice == Choice::Tus {
                    format!(
                        "{url} does not look like a tus endpoint (such as https://host/files/): OPTIONS answered {} \
                         without Tus-Version{detail}",
                        status_text(status)
                    )
                } else {
                    format!(
                        "{url} does not look like an upload endpoint (such as https://host/files/): OPTIONS \
                         answered {} with neither Tus-Version (tus) nor Upload-Limit (the IETF draft){detail}",
                        status_text(status)
                    )
                })
            }
        }
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
        if let Some((max, field)) = self.protocol.max_size(&self.offer)
            && size > max
        {
            return Err(format!(
                "the file is {} but the server accepts at most {} ({field})",
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
            protocol: self.protocol,
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
        if let Some(limit) = self.offer.append_limit() {
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
}
