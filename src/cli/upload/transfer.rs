//! One file's upload, in either protocol: create (or find the saved upload and ask its offset),
//! send the chunks from the server's offset to the end, ask again after anything went wrong,
//! and compare the server's SHA-256 with the file's.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::{Bytes, BytesMut};
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{
    Done, MAX_STARTS, REQUEST_TIMEOUT, Uploader, guess_type,
    hasher::FileHasher,
    is_downgrade,
    policy::{AtFloor, ChunkPolicy, human_bytes},
    progress::FileProgress,
    protocol::{Chunk, Creation, Head, Kind, Protocol},
    retry::{Cause, FILE_SHRANK, Failure, Retry, fatal_text, from_server, gone, refused, retryable, status_text, who},
    state::{Fingerprint, Record, hex},
};
use crate::uploads::types::Metadata;

/// One file's upload.
pub(super) struct FileUpload<'a> {
    pub(super) uploader: &'a Uploader,
    pub(super) name: String,
    pub(super) fingerprint: Fingerprint,
    pub(super) key: String,
    pub(super) progress: Arc<FileProgress>,
    pub(super) hasher: FileHasher,
    pub(super) policy: ChunkPolicy,
    /// The run's protocol, or the one a resumed upload was created with.
    pub(super) protocol: &'static dyn Protocol,
}

impl FileUpload<'_> {
    fn note(&self, message: &str) {
        self.uploader.reporter.note(&self.name, message);
    }

    fn size(&self) -> u64 {
        self.fingerprint.size
    }

    pub(super) async fn run(&mut self) -> Result<Done, String> {
        let uploader = self.uploader;
        let mut record = if uploader.args.new { None } else { uploader.state.load(&self.key) };
        let mut starts = 0;
        loop {
            let (url, start) = match record.take() {
                Some(record) => {
                    let Some(protocol) = self.resume_with(&record) else {
                        uploader.state.remove(&self.key);
                        continue;
                    };
                    self.protocol = protocol;
                    // Completed and verified before, and the file has the same fingerprint: the
                    // server only needs to confirm it still holds those bytes.
                    if let Some(sha256) = &record.sha256
                        && let Some(done) = self.confirm(&record.upload_url, sha256).await
                    {
                        self.note("already uploaded");
                        return Ok(done);
                    }
                    (record.upload_url, None)
                }
                None => {
                    starts += 1;
                    if starts > MAX_STARTS {
                        return Err(format!("the server lost the upload {MAX_STARTS} times; giving up"));
                    }
                    self.protocol = uploader.protocol;
                    let (url, offset) = self.create().await.map_err(fatal_text)?;
                    (url, Some(offset))
                }
            };
            match self.transfer(&url, start).await {
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

    /// The protocol a saved upload continues in: the one that created it (an upload of one
    /// protocol need not be one of the other on every server), as long as the server still
    /// offers it; None to start anew.
    fn resume_with(&self, record: &Record) -> Option<&'static dyn Protocol> {
        let uploader = self.uploader;
        let chosen = uploader.protocol.kind();
        let Some(recorded) = record.protocol.as_deref().map_or(Some(Kind::Tus), Kind::from_name) else {
            self.note("the saved upload was made by another version of ferry upload; starting a new one");
            return None;
        };
        if recorded == chosen {
            return Some(recorded.protocol());
        }
        let offered = match recorded {
            Kind::Tus => uploader.offer.tus,
            Kind::Ietf => uploader.offer.ietf(),
        };
        if offered {
            self.note(&format!("continuing with {}, the protocol the upload was started with", recorded.name()));
            Some(recorded.protocol())
        } else {
            self.note(&format!(
                "the saved upload was started with {}, which the server no longer offers; starting a new one",
                recorded.name()
            ));
            None
        }
    }

    fn metadata(&self) -> Metadata {
        let mut metadata = Metadata::default();
        let file_name = self.fingerprint.path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(file_name) = &file_name {
            metadata.insert("filename", file_name);
            if let Some(kind) = guess_type(file_name) {
                metadata.insert("filetype", kind);
            }
        }
        for (key, value) in &self.uploader.args.meta {
            metadata.insert(key, value);
        }
        metadata
    }

    /// POST: creates the upload and saves its URL before any byte is sent, or, where the
    /// protocol allows it and the file fits one chunk, sends the whole file with the creation
    /// (nothing to resume: a failed one is sent again). Returns the URL and the server's offset.
    async fn create(&mut self) -> Result<(String, u64), Failure> {
        let uploader = self.uploader;
        let target = uploader.args.to.to_string();
        let metadata = self.metadata();
        let size = self.size();
        let mut retry = Retry::new(&uploader.args);
        let created = loop {
            let whole = self.protocol.creates_with_content() && size <= self.policy.size();
            let sha256 = if whole { self.hasher.chunk(0, size, true).await? } else { None };
            let creation = Creation { size, metadata: &metadata, whole: sha256 };
            let mut request = self.protocol.create(uploader.request(Method::POST, &target), &creation);
            let timeout = if whole {
                let body = self.body(0, size);
                request = request.header(reqwest::header::CONTENT_LENGTH, size).body(body);
                uploader.patch_timeout()
            } else {
                REQUEST_TIMEOUT
            };
            let started = Instant::now();
            let cause = match uploader.send(request, timeout).await {
                Ok(response) => {
                    if let Some(created) = self.protocol.created(response.status(), response.headers(), &creation) {
                        if whole {
                            self.policy.sent(size, started.elapsed());
                        }
                        break created;
                    }
                    let status = response.status();
                    if whole && status == StatusCode::PAYLOAD_TOO_LARGE && !from_server(&response) {
                        self.shrink(size, &who(&response))?;
                        self.progress.set(0);
                        continue;
                    }
                    if !retryable(status) {
                        return Err(Failure::Fatal(refused("creating the upload", response).await));
                    }
                    Cause::of_response(response).await
                }
                Err(Cause::FileChanged(message)) => return Err(Failure::Fatal(message)),
                Err(cause) => {
                    if whole && matches!(cause, Cause::Timeout(_)) {
                        self.policy.timed_out();
                    }
                    cause
                }
            };
            self.progress.set(0);
            retry.failed(&uploader.reporter, &self.name, cause).await?;
        };
        let location = created.location.ok_or("the server created the upload but sent no Location")?;
        let url =
            uploader.args.to.join(&location).map_err(|e| format!("the Location '{location}' is not a URL: {e}"))?;
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
            protocol: Some(self.protocol.kind().name().to_string()),
        };
        uploader.state.save(&self.key, &record).map_err(|e| format!("{e:#}"))?;
        Ok((url.to_string(), created.offset.min(size)))
    }

    /// The file's bytes `[offset, offset + length)` as a request body, counted as progress.
    fn body(&self, offset: u64, length: u64) -> reqwest::Body {
        let limiter = self.uploader.limiter.clone();
        file_body(self.hasher.path.clone(), offset, length, self.progress.clone(), limiter)
    }

    /// A proxy answered 413 to a body of `length` bytes: smaller chunks from now on, for every
    /// file of the run (they go through the same proxy).
    fn shrink(&mut self, length: u64, who: &str) -> Result<(), Failure> {
        match self.policy.too_large(length) {
            Ok(smaller) => {
                self.uploader.learned_ceiling.fetch_min(smaller, Ordering::Relaxed);
                self.note(&format!(
                    "{who} refused a {} chunk (413); continuing with {} chunks",
                    human_bytes(length),
                    human_bytes(smaller)
                ));
                Ok(())
            }
            Err(AtFloor { floor }) => Err(Failure::Fatal(format!(
                "{who} answered 413 at {} chunks: the proxy's body limit (nginx: client_max_body_size) is smaller \
                 than that; raise it to at least 1 MiB",
                human_bytes(floor.min(length))
            ))),
        }
    }

    /// HEAD, retried through network errors and 5xx.
    async fn head(&self, url: &str, retry: &mut Retry) -> Result<Head, Failure> {
        let uploader = self.uploader;
        loop {
            let request = self.protocol.offset(uploader.request(Method::HEAD, url));
            match uploader.send(request, REQUEST_TIMEOUT).await {
                Ok(response) if response.status().is_success() => {
                    return self.protocol.read_offset(response.headers()).map_err(Failure::Fatal);
                }
                Ok(response) if gone(response.status()) => {
                    return Err(Failure::Gone(status_text(response.status())));
                }
                Ok(response) if retryable(response.status()) => {
                    retry.failed(&uploader.reporter, &self.name, Cause::of_response(response).await).await?
                }
                Ok(response) => return Err(Failure::Fatal(refused("asking for the upload's offset", response).await)),
                Err(cause) => retry.failed(&uploader.reporter, &self.name, cause).await?,
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

    /// Sends the file from the server's offset to the end: from `start` after a creation, from
    /// what HEAD says otherwise.
    async fn transfer(&mut self, url: &str, start: Option<u64>) -> Result<(), Failure> {
        let uploader = self.uploader;
        let size = self.size();
        let checksums = self.protocol.checksums(&uploader.offer);
        let mut retry = Retry::new(&uploader.args);
        let (mut offset, mut done) = match start {
            Some(offset) => (offset, offset == size),
            None => {
                let head = self.head(url, &mut retry).await?;
                if head.length != Some(size) {
                    return Err(Failure::Gone(format!(
                        "its length is {}, not the file's {size} bytes",
                        head.length.map(|l| l.to_string()).unwrap_or_else(|| "not known".into())
                    )));
                }
                if head.offset > 0 && head.offset < size {
                    self.note(&format!("resuming at {} of {} ({url})", human_bytes(head.offset), human_bytes(size)));
                }
                (head.offset, head.done(size))
            }
        };
        self.progress.restart_at(offset);
        while !done {
            self.policy.cap(uploader.learned_ceiling.load(Ordering::Relaxed));
            let length = self.policy.size().min(size - offset);
            let sha256 = self.hasher.chunk(offset, length, checksums).await?;
            // While this chunk is on the wire, read and hash the next one, for each size it may
            // have: the same, twice (it may grow) or half (it may shrink).
            let next = offset + length;
            if next < size {
                let guess = self.policy.size();
                let mut lengths = vec![guess / 2, guess, guess.saturating_mul(2).min(self.policy.ceiling())];
                lengths.iter_mut().for_each(|l| *l = (*l).min(size - next).max(1));
                lengths.dedup();
                self.hasher.prepare(next, lengths, checksums);
            }
            let chunk = Chunk { offset, length, last: next == size, sha256 };
            let started = Instant::now();
            let request = self
                .protocol
                .append(uploader.request(Method::PATCH, url), &chunk)
                .header(reqwest::header::CONTENT_LENGTH, length)
                .body(self.body(offset, length));
            let cause = match uploader.send(request, uploader.patch_timeout()).await {
                Ok(response) if response.status().is_success() => {
                    // Forward, within the file; an empty chunk only completes the upload.
                    let appended = self
                        .protocol
                        .appended(response.headers(), &chunk)
                        .filter(|a| a.offset <= size && (a.offset > offset || length == 0));
                    let Some(appended) = appended else {
                        return Err(Failure::Fatal(format!(
                            "the server answered the chunk at {offset} with {} but no valid Upload-Offset",
                            status_text(response.status())
                        )));
                    };
                    self.policy.sent(appended.offset - offset, started.elapsed());
                    offset = appended.offset;
                    done = appended.complete.unwrap_or(offset == size);
                    self.progress.set(offset);
                    retry.reset();
                    continue;
                }
                Ok(response) if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !from_server(&response) => {
                    self.shrink(length, &who(&response))?;
                    self.progress.set(offset);
                    continue;
                }
                Ok(response) if gone(response.status()) => {
                    return Err(Failure::Gone(status_text(response.status())));
                }
                Ok(response) if response.status() == StatusCode::CONFLICT => {
                    // The offset moved under us (another client, or a cut-off body was kept):
                    // continue from where the server says, without waiting; ask when it does not say.
                    let headers = response.headers().clone();
                    let (cause, body) = Cause::with_body(response).await;
                    retry.count(&cause)?;
                    if let Some(named) = self.protocol.conflict(&headers, &body).filter(|a| a.offset <= size) {
                        self.note(&format!("{}; continuing at {}", cause.describe(), human_bytes(named.offset)));
                        if named.offset > offset {
                            retry.reset();
                        }
                        offset = named.offset;
                        done = named.complete.unwrap_or(offset == size);
                        self.progress.set(offset);
                        continue;
                    }
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
                retry.failed(&uploader.reporter, &self.name, cause).await?;
            }
            let head = self.head(url, &mut retry).await?;
            if head.offset > offset {
                retry.reset();
            }
            offset = head.offset;
            done = head.done(size);
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

/// Paces the bytes of all uploads of the run to `--limit-rate`.
#[derive(Clone)]
pub(super) struct RateLimiter {
    bytes_per_second: f64,
    next: Arc<Mutex<tokio::time::Instant>>,
}

impl RateLimiter {
    pub(super) fn new(bytes_per_second: u64) -> Self {
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
