//! `ferry upload`, the command-line client: the real binary against real servers (in-process
//! `TestApp`s, and `ferry serve` processes where the server must die and come back). Every
//! upload is checked byte for byte through a download and against the server's SHA-256.

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use reqwest::Method;
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};

use crate::{
    db_backend_tests,
    helpers::{Backend, Cluster, Storage, TestApp, assert_same_bytes, header, random_bytes, sha256_b64, wait_for},
    nginx::Nginx,
};

db_backend_tests!(
    several_files_at_once_arrive_byte_exact,
    a_killed_upload_resumes_without_resending_what_arrived,
    ctrl_c_stops_at_once_and_says_how_to_resume,
    metadata_flags_arrive,
    tokens_are_sent_and_a_bad_one_is_a_clear_failure,
    chunks_never_exceed_the_advertised_limit,
    an_upload_the_server_lost_starts_over,
    lost_answers_and_busy_proxies_are_retried_without_resending,
    the_exit_status_is_zero_only_when_every_file_made_it,
    with_the_ietf_draft_an_upload_killed_mid_request_resumes_byte_exact,
    a_conflict_is_resumed_where_the_server_says,
);

const MIB: usize = 1 << 20;
/// How long one run of the client may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// A folder with the files to upload and the client's state folder.
pub(crate) struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    pub(crate) fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("temp dir") }
    }

    /// Writes a file of `len` pseudo-random bytes; returns its path and content.
    fn file(&self, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
        let data = random_bytes(len, seed);
        let path = self.dir.path().join(name);
        std::fs::write(&path, &data).expect("write a test file");
        (path, data)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The upload URLs remembered in the state folder.
    pub(crate) fn remembered_urls(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.state_dir()) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| {
                let record: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).expect("a JSON state file");
                record["upload_url"].as_str().expect("upload_url").to_string()
            })
            .collect()
    }

    /// The protocols remembered in the state folder.
    fn remembered_protocols(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.state_dir()) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| {
                let record: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).expect("a JSON state file");
                record["protocol"].as_str().expect("protocol").to_string()
            })
            .collect()
    }

    /// Starts `ferry upload FILES --to TO` with `extra` arguments and `env`.
    pub(crate) fn start(&self, to: &str, files: &[&Path], extra: &[&str], env: &[(&str, &str)]) -> Run {
        let n = self.runs();
        let stdout = self.dir.path().join(format!("run-{n}.stdout"));
        let stderr = self.dir.path().join(format!("run-{n}.stderr"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        command
            .arg("upload")
            .args(files)
            .args(["--to", to])
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FERRY_") {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().copied());
        let child = command.spawn().expect("start ferry upload");
        Run { child, stdout, stderr }
    }

    fn runs(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "stdout")))
            .count()
    }

    /// Runs `ferry upload` to its end.
    pub(crate) async fn upload(&self, to: &str, files: &[&Path], extra: &[&str]) -> Finished {
        self.start(to, files, extra, &[]).wait().await
    }
}

/// A running `ferry upload`.
pub(crate) struct Run {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// A finished one.
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Finished {
    /// The lines printed for uploaded files: (url, size, sha256 hex, path).
    pub(crate) fn uploaded(&self) -> Vec<(String, u64, String, String)> {
        self.stdout
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                assert_eq!(fields.len(), 4, "a result line is URL, size, SHA-256, file: {line:?}");
                (fields[0].into(), fields[1].parse().expect("a size"), fields[2].into(), fields[3].into())
            })
            .collect()
    }

    /// The URL printed for `path`.
    pub(crate) fn url_of(&self, path: &Path) -> String {
        let uploaded = self.uploaded();
        let line = uploaded.iter().find(|(_, _, _, p)| Path::new(p) == path);
        line.unwrap_or_else(|| panic!("no line for {} in {:?}\nstderr: {}", path.display(), self.stdout, self.stderr))
            .0
            .clone()
    }

    pub(crate) fn assert_success(&self) {
        assert!(self.status.success(), "ferry upload failed ({}):\n{}", self.status, self.stderr);
    }
}

impl Run {
    pub(crate) fn stderr_so_far(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    pub(crate) async fn wait_limit(mut self, limit: Duration) -> Finished {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for ferry upload"),
            Err(_) => panic!("ferry upload did not finish within {limit:?}; stderr so far:\n{}", self.stderr_so_far()),
        };
        Finished {
            status,
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }

    async fn wait(self) -> Finished {
        self.wait_limit(RUN_LIMIT).await
    }
}

/// `ferry_received_bytes_total` of a server: the upload bytes it committed.
async fn received_bytes(base: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics")).await.expect("GET /metrics").text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("ferry_received_bytes_total "))
        .map(|v| v.trim().parse::<f64>().expect("a number") as u64)
        .unwrap_or(0)
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks an upload on the server: complete, `Repr-Digest` of `expected`, and downloads exactly.
async fn assert_uploaded(app: &TestApp, url: &str, expected: &[u8]) {
    let head = app.head(url).await;
    assert_eq!(head.status(), 200, "HEAD {url}");
    assert_eq!(header(&head, "upload-offset"), expected.len().to_string());
    assert_eq!(header(&head, "repr-digest"), format!("sha-256=:{}:", sha256_b64(expected)));
    let downloaded = app.download(url).await;
    assert_same_bytes(&format!("GET {url}"), &downloaded, expected);
}

async fn several_files_at_once_arrive_byte_exact(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let work = Workspace::new();
    let files = [
        work.file("big.bin", 3 * MIB + 12_345, 1),
        work.file("medium.bin", MIB + 1, 2),
        work.file("small.txt", 5, 3),
        work.file("empty.dat", 0, 4),
    ];
    let paths: Vec<&Path> = files.iter().map(|(p, _)| p.as_path()).collect();
    let run = work.upload(&app.files, &paths, &["--parallel", "2", "--chunk-size", "1MiB"]).await;
    run.assert_success();
    assert_eq!(run.uploaded().len(), files.len(), "one line per file:\n{}", run.stdout);
    for (path, data) in &files {
        let url = run.url_of(path);
        let (_, size, sha256, _) = run.uploaded().into_iter().find(|(u, ..)| *u == url).unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(sha256, sha256_hex(data), "the SHA-256 printed for {}", path.display());
        assert_uploaded(&app, &url, data).await;
    }
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(received_bytes(&app.base).await, total as u64, "every byte sent once");
    assert_eq!(patch_statuses(&app.base).await, vec!["204".to_string()], "every chunk landed the first time");
}

/// The statuses ferry answered PATCH requests with (from its request-duration metric).
async fn patch_statuses(base: &str) -> Vec<String> {
    let text = reqwest::get(format!("{base}/metrics")).await.expect("GET /metrics").text().await.unwrap();
    let mut statuses: Vec<String> = text
        .lines()
        .filter(|line| {
            line.starts_with("ferry_http_request_duration_seconds_count") && line.contains("method=\"PATCH\"")
        })
        .filter_map(|line| line.split("status=\"").nth(1)?.split('"').next().map(str::to_string))
        .collect();
    statuses.sort();
    statuses.dedup();
    statuses
}

async fn a_killed_upload_resumes_without_resending_what_arrived(backend: Backend) {
    let app = TestApp::spawn_with(backend, |args| args.max_append_size = Some(MIB as u64)).await;
    let work = Workspace::new();
    let (path, data) = work.file("video.mp4", 12 * MIB + 999, 5);

    let run = work.start(&app.files, &[&path], &["--limit-rate", "3MiB"], &[]);
    wait_for("3 MiB to arrive", Duration::from_secs(60), || async {
        received_bytes(&app.base).await >= 3 * MIB as u64
    })
    .await;
    let mut run = run;
    run.child.kill().await.expect("SIGKILL ferry upload");
    let urls = work.remembered_urls();
    assert_eq!(urls.len(), 1, "the upload's URL was saved before its first chunk");
    let before = app.offset(&urls[0]).await;
    assert!(before >= 3 * MIB as u64 && before < data.len() as u64, "killed mid-upload at {before}");

    let rerun = work.upload(&app.files, &[&path], &[]).await;
    rerun.assert_success();
    assert!(rerun.stderr.contains("resuming at"), "the rerun says it resumes:\n{}", rerun.stderr);
    assert_eq!(rerun.url_of(&path), urls[0], "the same upload was continued");
    assert_uploaded(&app, &urls[0], &data).await;
    assert_eq!(received_bytes(&app.base).await, data.len() as u64, "no byte the server had committed was sent again");

    // A third run finds it complete: nothing is sent, the same line is printed.
    let again = work.upload(&app.files, &[&path], &[]).await;
    again.assert_success();
    assert_eq!(again.url_of(&path), urls[0]);
    assert!(again.stderr.contains("already uploaded"), "{}", again.stderr);
    assert_eq!(received_bytes(&app.base).await, data.len() as u64);
}

async fn ctrl_c_stops_at_once_and_says_how_to_resume(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let work = Workspace::new();
    let (path, data) = work.file("slow.bin", 8 * MIB, 6);
    let run = work.start(&app.files, &[&path], &["--limit-rate", "1MiB", "--chunk-size", "256KiB"], &[]);
    wait_for("the first chunk to arrive", Duration::from_secs(60), || async { received_bytes(&app.base).await > 0 })
        .await;
    run.signal("INT");
    let finished = run.wait_limit(Duration::from_secs(10)).await;
    assert_eq!(finished.status.code(), Some(130), "Ctrl-C exits with 130:\n{}", finished.stderr);
    assert!(
        finished.stderr.contains("run the same command again to resume"),
        "the message says how to resume:\n{}",
        finished.stderr
    );
    assert!(finished.stdout.is_empty());
    // And it does resume.
    let rerun = work.upload(&app.files, &[&path], &[]).await;
    rerun.assert_success();
    assert!(rerun.stderr.contains("resuming at"), "{}", rerun.stderr);
    assert_uploaded(&app, &rerun.url_of(&path), &data).await;
}

async fn metadata_flags_arrive(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let work = Workspace::new();
    let (path, data) = work.file("report.pdf", 10_000, 7);
    let run = work.upload(&app.files, &[&path], &["--meta", "project=apollo 11", "--meta", "team=ops"]).await;
    run.assert_success();
    let url = run.url_of(&path);
    let head = app.head(&url).await;
    let metadata: std::collections::HashMap<String, String> = header(&head, "upload-metadata")
        .split(',')
        .map(|pair| {
            let (key, value) = pair.split_once(' ').unwrap_or((pair, ""));
            (key.to_string(), String::from_utf8(STANDARD.decode(value).unwrap()).unwrap())
        })
        .collect();
    assert_eq!(metadata.get("filename").map(String::as_str), Some("report.pdf"));
    assert_eq!(metadata.get("filetype").map(String::as_str), Some("application/pdf"));
    assert_eq!(metadata.get("project").map(String::as_str), Some("apollo 11"));
    assert_eq!(metadata.get("team").map(String::as_str), Some("ops"));
    assert_uploaded(&app, &url, &data).await;
    // The download is served under the file's name and type.
    let response = app.client.get(&url).send().await.unwrap();
    assert_eq!(header(&response, "content-type"), "application/pdf");
}

const SECRET: &str = "cli-test-secret";

async fn tokens_are_sent_and_a_bad_one_is_a_clear_failure(backend: Backend) {
    let app = TestApp::spawn_with(backend, |args| args.token_secret = Some(SECRET.into())).await;
    let work = Workspace::new();
    let (path, data) = work.file("private.bin", 300_000, 8);

    // No token: ferry says one is needed, and the client says so.
    let run = work.upload(&app.files, &[&path], &[]).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("401 Unauthorized") && run.stderr.contains("token is required"), "{}", run.stderr);

    // A token signed with another key.
    let forged = crate::access::token("another-secret", "mallory", 600, None);
    let run = work.upload(&app.files, &[&path], &["--token", &forged]).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("401 Unauthorized")
            && run.stderr.contains("signature is invalid")
            && run.stderr.contains("FERRY_TOKEN"),
        "the message names the cause and where the token comes from:\n{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
    assert_eq!(app.upload_count().await, 0, "nothing was created");

    // A good token from the environment.
    let good = crate::access::token(SECRET, "alice", 600, None);
    let run = work.start(&app.files, &[&path], &[], &[("FERRY_TOKEN", &good)]).wait().await;
    run.assert_success();
    let url = run.url_of(&path);
    let head = app.tus(Method::HEAD, &url).bearer_auth(&good).send().await.unwrap();
    assert_eq!(header(&head, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&data)));
    let other = crate::access::token(SECRET, "bob", 600, None);
    let head = app.tus(Method::HEAD, &url).bearer_auth(&other).send().await.unwrap();
    assert_eq!(head.status(), 404, "the upload belongs to the token's subject");
}

/// A reverse proxy in front of a server that records each request's method, protocol headers,
/// `Content-Length` and arrival, and passes everything through unchanged (including `Host`, so
/// that `Location`s point at the proxy), except for the PATCH requests it was told to disturb,
/// and, when asked to, the tus headers of OPTIONS answers (a server of the IETF draft only).
struct Recorder {
    files: String,
    requests: Recorded,
    /// How many body bytes of each PATCH were passed on so far.
    forwarded: Arc<Mutex<Vec<u64>>>,
    _server: tokio::task::JoinHandle<()>,
}

struct Seen {
    method: String,
    length: Option<u64>,
    at: std::time::Instant,
    /// `Upload-Draft-Interop-Version`, `Tus-Resumable`, `Upload-Complete`, `Content-Type`.
    interop: Option<String>,
    tus: Option<String>,
    complete: Option<String>,
    content_type: Option<String>,
}

type Recorded = Arc<Mutex<Vec<Seen>>>;

/// What the recorder does to one PATCH.
#[derive(Clone, Copy)]
enum Fault {
    /// Passes it on, then answers 502 instead of the server's answer (a proxy that timed out
    /// while the server stored the chunk).
    LoseAnswer,
    /// Answers 503 with `Retry-After: <seconds>` without passing it on (an overloaded proxy).
    Busy(u64),
    /// Passes it on twice, as a proxy retrying a request it thought lost, and answers with the
    /// server's answer to the second (a 409: the first one stored the chunk).
    Twice,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self._server.abort();
    }
}

impl Recorder {
    async fn start(upstream: &str) -> Self {
        Self::disturbing(upstream, &[]).await
    }

    /// `faults`: (index among PATCH requests, from 0, and what happens to it).
    async fn disturbing(upstream: &str, faults: &[(usize, Fault)]) -> Self {
        Self::with(upstream, faults, false).await
    }

    /// In front of a server that speaks only the IETF draft: OPTIONS answers lose `Tus-*`.
    async fn hiding_tus(upstream: &str, faults: &[(usize, Fault)]) -> Self {
        Self::with(upstream, faults, true).await
    }

    async fn with(upstream: &str, faults: &[(usize, Fault)], hide_tus: bool) -> Self {
        use axum::{body::Body, extract::Request, response::Response};
        use futures_util::StreamExt;
        use http_body_util::BodyExt;
        let requests: Recorded = Arc::default();
        let forwarded: Arc<Mutex<Vec<u64>>> = Arc::default();
        let (log, upstream, client) = (requests.clone(), upstream.to_string(), reqwest::Client::new());
        let faults = Arc::new(faults.to_vec());
        let counts = forwarded.clone();
        let app = axum::Router::new().fallback(move |request: Request| {
            let (log, upstream, client, faults) = (log.clone(), upstream.clone(), client.clone(), faults.clone());
            let counts = counts.clone();
            async move {
                let method = request.method().to_string();
                let seen = {
                    let headers = request.headers();
                    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                    Seen {
                        method: method.clone(),
                        length: text("content-length").and_then(|v| v.parse::<u64>().ok()),
                        at: std::time::Instant::now(),
                        interop: text("upload-draft-interop-version"),
                        tus: text("tus-resumable"),
                        complete: text("upload-complete"),
                        content_type: text("content-type"),
                    }
                };
                let length = seen.length;
                let fault = {
                    let mut log = log.lock().unwrap();
                    let patch = log.iter().filter(|seen| seen.method == "PATCH").count();
                    log.push(seen);
                    faults.iter().find(|(i, _)| method == "PATCH" && *i == patch).map(|(_, f)| *f)
                };
                let (parts, body) = request.into_parts();
                if let Some(Fault::Busy(seconds)) = fault {
                    let _ = body.collect().await;
                    return Response::builder()
                        .status(503)
                        .header("retry-after", seconds.to_string())
                        .body(Body::from("busy, come back later"))
                        .unwrap();
                }
                let url = format!("{upstream}{}", parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
                let has_body = length.is_some_and(|l| l > 0) || parts.headers.contains_key("transfer-encoding");
                let mut forwarded = client.request(parts.method.clone(), &url).headers(parts.headers.clone());
                if matches!(fault, Some(Fault::Twice)) {
                    let bytes = body.collect().await.unwrap().to_bytes();
                    let first = forwarded.body(bytes.clone()).send().await.unwrap();
                    assert!(first.status().is_success(), "the first of the two went through: {}", first.status());
                    forwarded = client.request(parts.method, &url).headers(parts.headers).body(bytes);
                } else if has_body && method == "PATCH" {
                    let index = {
                        let mut counts = counts.lock().unwrap();
                        counts.push(0);
                        counts.len() - 1
                    };
                    let counted = body.into_data_stream().inspect(move |piece| {
                        if let Ok(piece) = piece {
                            counts.lock().unwrap()[index] += piece.len() as u64;
                        }
                    });
                    forwarded = forwarded.body(reqwest::Body::wrap_stream(counted));
                } else if has_body {
                    forwarded = forwarded.body(reqwest::Body::wrap_stream(body.into_data_stream()));
                }
                match forwarded.send().await {
                    Ok(answer) if matches!(fault, Some(Fault::LoseAnswer)) => {
                        let _ = answer.bytes().await;
                        Response::builder().status(502).body(Body::from("the upstream's answer was lost")).unwrap()
                    }
                    Ok(answer) => {
                        let mut response = Response::builder().status(answer.status());
                        let options = method == "OPTIONS";
                        for (name, value) in answer.headers() {
                            if !(hide_tus && options && name.as_str().starts_with("tus-")) {
                                response = response.header(name, value);
                            }
                        }
                        response.body(Body::from_stream(answer.bytes_stream())).unwrap()
                    }
                    Err(e) => Response::builder().status(502).body(Body::from(e.to_string())).unwrap(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Recorder { files: format!("http://{addr}/files/"), requests, forwarded, _server: server }
    }

    /// The same URL, straight to the server (so that the test's own checks are not recorded).
    fn direct(&self, app: &TestApp, url: &str) -> String {
        url.replace(&self.files, &app.files)
    }

    /// The PATCH being passed on last, and how many of its bytes were.
    fn last_forwarded(&self) -> Option<(usize, u64)> {
        let counts = self.forwarded.lock().unwrap();
        counts.last().map(|bytes| (counts.len() - 1, *bytes))
    }

    fn patches(&self) -> Vec<Option<u64>> {
        self.requests.lock().unwrap().iter().filter(|seen| seen.method == "PATCH").map(|seen| seen.length).collect()
    }

    /// When each PATCH arrived.
    fn patch_times(&self) -> Vec<std::time::Instant> {
        self.requests.lock().unwrap().iter().filter(|seen| seen.method == "PATCH").map(|seen| seen.at).collect()
    }

    fn methods(&self) -> Vec<String> {
        self.requests.lock().unwrap().iter().map(|seen| seen.method.clone()).collect()
    }

    /// Fails unless every request was one of the IETF draft (interop version 9, no
    /// `Tus-Resumable`), with its appends typed `application/partial-upload`.
    fn assert_all_ietf(&self) {
        let requests = self.requests.lock().unwrap();
        assert!(!requests.is_empty());
        for seen in requests.iter() {
            assert_eq!(seen.interop.as_deref(), Some("9"), "{} without the interop version", seen.method);
            assert_eq!(seen.tus, None, "{} with Tus-Resumable", seen.method);
            if seen.method == "PATCH" {
                assert_eq!(seen.content_type.as_deref(), Some("application/partial-upload"));
                assert!(matches!(seen.complete.as_deref(), Some("?0" | "?1")), "a PATCH without Upload-Complete");
            }
        }
    }
}

async fn chunks_never_exceed_the_advertised_limit(backend: Backend) {
    const LIMIT: u64 = 256 * 1024;
    let app = TestApp::spawn_with(backend, |args| args.max_append_size = Some(LIMIT)).await;
    let recorder = Recorder::start(&app.base).await;
    let work = Workspace::new();
    let (path, data) = work.file("limited.bin", 3 * MIB + 777, 9);
    // Asked to start at 8 MiB and allowed to grow to 64 MiB: the server's limit wins.
    let run = work.upload(&recorder.files, &[&path], &["--chunk-size", "8MiB", "--max-chunk-size", "64MiB"]).await;
    run.assert_success();
    let url = run.url_of(&path);
    assert!(url.starts_with(&recorder.files), "the upload went through the recorder: {url}");
    assert_uploaded(&app, &url, &data).await;

    let patches = recorder.patches();
    let sizes: Vec<u64> = patches.iter().map(|l| l.expect("every PATCH has a Content-Length")).collect();
    assert!(sizes.iter().all(|s| *s <= LIMIT), "a chunk exceeded {LIMIT} bytes: {sizes:?}");
    assert_eq!(sizes.iter().sum::<u64>(), data.len() as u64, "each byte sent once: {sizes:?}");
    assert_eq!(sizes.len() as u64, (data.len() as u64).div_ceil(LIMIT), "chunks as large as allowed: {sizes:?}");
    let methods = recorder.methods();
    assert_eq!(methods.first().map(String::as_str), Some("OPTIONS"), "limits are asked for first: {methods:?}");
}

async fn an_upload_the_server_lost_starts_over(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let work = Workspace::new();
    let (path, data) = work.file("twice.bin", MIB + 5, 10);
    let first = work.upload(&app.files, &[&path], &[]).await;
    first.assert_success();
    let old = first.url_of(&path);
    let deleted = app.tus(Method::DELETE, &old).send().await.unwrap();
    assert_eq!(deleted.status(), 204);

    let second = work.upload(&app.files, &[&path], &[]).await;
    second.assert_success();
    assert!(
        second.stderr.contains("no longer has the upload (410 Gone)") && second.stderr.contains("starting a new one"),
        "the client says why it starts over:\n{}",
        second.stderr
    );
    let new = second.url_of(&path);
    assert_ne!(new, old);
    assert_uploaded(&app, &new, &data).await;
    assert_eq!(work.remembered_urls(), vec![new], "only the new upload is remembered");
}

async fn the_exit_status_is_zero_only_when_every_file_made_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let work = Workspace::new();
    let (good, data) = work.file("good.bin", 70_000, 11);
    let missing = work.dir.path().join("missing.bin");
    let run = work.upload(&app.files, &[&good, &missing], &[]).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert_uploaded(&app, &run.url_of(&good), &data).await;
    assert_eq!(run.uploaded().len(), 1, "only the uploaded file is printed");
    assert!(run.stderr.contains("missing.bin: cannot open"), "{}", run.stderr);
    assert!(run.stderr.contains("1 of 2 files uploaded, 1 failed"), "{}", run.stderr);
}

#[tokio::test]
async fn an_unreachable_server_is_named_as_the_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let work = Workspace::new();
    let (path, _) = work.file("nowhere.bin", 10, 12);
    let to = format!("http://{closed}/files/");
    let run = work.upload(&to, &[&path], &["--retries", "2", "--retry-delay", "10ms"]).await;
    assert_eq!(run.status.code(), Some(1));
    assert!(
        run.stderr.contains("server unreachable after 3 attempts: connection refused"),
        "the message names the cause:\n{}",
        run.stderr
    );
}

/// A `ferry serve` process dies (SIGKILL) or is stopped (SIGTERM, as in a rolling update) in the
/// middle of an upload and comes back on the same address: the client retries through the gap
/// and continues the same upload from the server's offset.
async fn survives_a_server_restart(signal: &str) {
    let mut cluster =
        Cluster::start(Storage::Local, 1, &["--max-append-size", "1MiB", "--shutdown-grace", "200ms"]).await;
    let work = Workspace::new();
    let (path, data) = work.file("restart.bin", 16 * MIB + 3, 13);
    let files = cluster.nodes[0].files.clone();
    let run = work.start(&files, &[&path], &["--limit-rate", "4MiB", "--retry-delay", "200ms", "--retries", "20"], &[]);
    let base = cluster.nodes[0].base.clone();
    wait_for("4 MiB to arrive", Duration::from_secs(60), || async { received_bytes(&base).await >= 4 * MIB as u64 })
        .await;
    match signal {
        "KILL" => cluster.nodes[0].sigkill().await,
        _ => {
            cluster.nodes[0].sigterm();
            cluster.nodes[0].wait_exit(Duration::from_secs(20)).await;
        }
    }
    wait_for("the client to notice", Duration::from_secs(30), || async { run.stderr_so_far().contains("retrying") })
        .await;
    cluster.restart(0).await;
    let finished = run.wait().await;
    finished.assert_success();
    assert!(!finished.stderr.contains("starting a new one"), "{}", finished.stderr);
    let url = finished.url_of(&path);
    cluster.assert_complete(&url, &data).await;
    let after_restart = received_bytes(&cluster.nodes[0].base).await;
    assert!(
        after_restart < data.len() as u64,
        "after the restart only the rest was sent ({after_restart} of {} bytes)",
        data.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_killed_server() {
    survives_a_server_restart("KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_server_stopped_for_an_update() {
    survives_a_server_restart("TERM").await;
}

/// nginx at its defaults (`client_max_body_size 1m`) in front of a ferry that advertises no
/// limit: the client starts with 8 MiB chunks, gets nginx's 413, halves until chunks get through
/// (8, 4, 2, then 1 MiB), never tries a refused size again, and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_shrink_to_fit_a_proxy_body_limit() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let nginx = Nginx::proxy(&app.addr.to_string());
    let files = format!("{}/files/", nginx.url);
    let work = Workspace::new();
    let (path, data) = work.file("through-nginx.bin", 12 * MIB + 17, 14);
    let run = work.upload(&files, &[&path], &["--chunk-size", "8MiB"]).await;
    run.assert_success();
    for (from, to) in [("8 MiB", "4 MiB"), ("4 MiB", "2 MiB"), ("2 MiB", "1 MiB")] {
        let note = format!("nginx refused a {from} chunk (413); continuing with {to} chunks");
        assert!(run.stderr.contains(&note), "the client says it adapts ({note}):\n{}", run.stderr);
    }
    let url = run.url_of(&path);
    assert!(url.starts_with(&files), "the upload went through nginx: {url}");
    assert_uploaded(&app, &url, &data).await;

    let log = nginx.access_log();
    let patches: Vec<&str> = log.lines().filter(|l| l.contains("\"PATCH ")).collect();
    let refused = patches.iter().filter(|l| l.contains("\" 413 ")).count();
    let landed = patches.iter().filter(|l| l.contains("\" 204 ")).count();
    assert_eq!(refused, 3, "one 413 per size that was too large:\n{log}");
    assert_eq!(landed, data.len().div_ceil(MIB), "then 1 MiB chunks, never larger again:\n{log}");
    assert_eq!(received_bytes(&app.base).await, data.len() as u64);
}

/// A proxy whose body limit is below the smallest chunk: the client gives up and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_limit_below_the_smallest_chunk_is_explained() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let nginx = Nginx::proxy_with(&app.addr.to_string(), "client_max_body_size 32k;");
    let work = Workspace::new();
    let (path, _) = work.file("too-big-for-the-proxy.bin", MIB, 15);
    let run = work.upload(&format!("{}/files/", nginx.url), &[&path], &["--chunk-size", "256KiB"]).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("nginx answered 413 at 64 KiB chunks")
            && run.stderr.contains("client_max_body_size) is smaller than that"),
        "the message names the proxy's limit:\n{}",
        run.stderr
    );
    assert_eq!(received_bytes(&app.base).await, 0);
}

/// A chunk stored by the server whose answer never reached the client (a 502 from the proxy),
/// and a proxy that says 503 with `Retry-After: 2`: the client asks for the offset and goes on
/// without sending the stored chunk again, and waits as long as it was asked to.
async fn lost_answers_and_busy_proxies_are_retried_without_resending(backend: Backend) {
    const LIMIT: u64 = 256 * 1024;
    let app = TestApp::spawn_with(backend, |args| args.max_append_size = Some(LIMIT)).await;
    let recorder = Recorder::disturbing(&app.base, &[(1, Fault::LoseAnswer), (3, Fault::Busy(2))]).await;
    let work = Workspace::new();
    let (path, data) = work.file("disturbed.bin", 2 * MIB + 5, 16);
    let run = work.upload(&recorder.files, &[&path], &["--retry-delay", "10ms"]).await;
    run.assert_success();
    assert_uploaded(&app, &run.url_of(&path), &data).await;
    assert!(run.stderr.contains("answered 502 Bad Gateway: the upstream's answer was lost"), "{}", run.stderr);
    assert!(
        run.stderr.contains("answered 503 Service Unavailable: busy, come back later; retrying in 2.0s"),
        "{}",
        run.stderr
    );
    assert_eq!(
        received_bytes(&app.base).await,
        data.len() as u64,
        "the chunk whose answer was lost was not sent again"
    );
    let sizes = recorder.patches();
    let sent: u64 = sizes.iter().map(|s| s.unwrap()).sum();
    assert_eq!(sent, data.len() as u64 + LIMIT, "only the refused chunk was sent twice: {sizes:?}");
    let times = recorder.patch_times();
    let waited = times[4].duration_since(times[3]);
    assert!(waited >= Duration::from_millis(1950), "Retry-After: 2 was honoured (waited {waited:?})");
}

/// An authenticating proxy (nginx wanting an API key) in front of ferry: without the header the
/// client fails and says who refused; with `--header` every request gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_headers_get_through_an_authenticating_proxy() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let nginx = Nginx::proxy_with(
        &app.addr.to_string(),
        "if ($http_x_api_key != \"open-sesame\") { return 401 \"an API key is needed\\n\"; }",
    );
    let files = format!("{}/files/", nginx.url);
    let work = Workspace::new();
    let (path, data) = work.file("guarded.bin", 700_000, 17);

    let run = work.upload(&files, &[&path], &[]).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("nginx refused asking for the server's limits (OPTIONS): 401 Unauthorized: an API key is needed")
            && run.stderr.contains("--header"),
        "{}",
        run.stderr
    );

    let run = work.upload(&files, &[&path], &["--header", "X-Api-Key: open-sesame", "-H", "X-Trace: cli-test"]).await;
    run.assert_success();
    let url = run.url_of(&path);
    assert!(url.starts_with(&files), "{url}");
    assert_uploaded(&app, &url.replace(&nginx.url, &app.base), &data).await;
    let log = nginx.access_log();
    assert!(log.lines().filter(|l| l.contains("\" 401 ")).count() >= 1, "{log}");
    assert!(log.lines().any(|l| l.contains("\"PATCH ") && l.contains("\" 204 ")), "{log}");
}

/// The IETF draft end to end: a 64 MiB file in 4 MiB appends, the client killed while an append
/// is half sent, and a rerun that asks the offset and sends only the rest, every request in the
/// draft's terms. The half-sent append is not kept: its `Content-Digest` vouches for all of it or
/// nothing (as tus's `Upload-Checksum` does), so the rerun starts where the last whole one ended.
async fn with_the_ietf_draft_an_upload_killed_mid_request_resumes_byte_exact(backend: Backend) {
    const CHUNK: u64 = 4 * MIB as u64;
    let app = TestApp::spawn_with(backend, |args| args.max_append_size = Some(CHUNK)).await;
    let recorder = Recorder::start(&app.base).await;
    let work = Workspace::new();
    let (path, data) = work.file("draft.bin", 64 * MIB, 18);

    let mut run = work.start(&recorder.files, &[&path], &["--protocol", "ietf", "--limit-rate", "4MiB"], &[]);
    // At 4 MiB/s an append takes a second: kill the client when a quarter to three quarters of
    // the third (or a later) one has been passed on, so that most of a second of it is unsent.
    let cut = Mutex::new(None);
    wait_for("an append to be half sent", Duration::from_secs(60), || async {
        let passing = recorder.last_forwarded().filter(|(i, n)| *i >= 2 && (CHUNK / 4..=3 * CHUNK / 4).contains(n));
        *cut.lock().unwrap() = passing.map(|(i, _)| i as u64);
        passing.is_some()
    })
    .await;
    run.child.kill().await.expect("SIGKILL ferry upload");
    let cut = cut.into_inner().unwrap().unwrap();
    let urls = work.remembered_urls();
    assert_eq!(urls.len(), 1, "the upload's URL was saved before its first append");
    assert_eq!(work.remembered_protocols(), ["ietf"]);
    let url = recorder.direct(&app, &urls[0]);
    // The appends before the cut one were answered, so committed; of the cut one, nothing.
    assert_eq!(app.offset(&url).await, cut * CHUNK, "append {cut} was cut off and dropped");

    let rerun = work.upload(&recorder.files, &[&path], &["--protocol", "ietf"]).await;
    rerun.assert_success();
    assert!(rerun.stderr.contains("resuming at"), "the rerun says it resumes:\n{}", rerun.stderr);
    assert_eq!(rerun.url_of(&path), urls[0], "the same upload was continued");
    recorder.assert_all_ietf();
    assert_uploaded(&app, &url, &data).await;
    assert_eq!(received_bytes(&app.base).await, data.len() as u64, "no byte the server had committed was sent again");
    let sizes: Vec<u64> = recorder.patches().into_iter().map(|l| l.expect("a Content-Length")).collect();
    assert!(sizes.iter().all(|s| *s <= CHUNK), "the server's max-append-size holds for the draft too: {sizes:?}");
}

/// `--protocol auto` (the default): tus against ferry, the IETF draft against a server that
/// announces only the draft; there, a file that fits one request goes in its creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_speaks_tus_where_offered_and_the_draft_elsewhere() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let work = Workspace::new();
    let (big, big_data) = work.file("big.bin", 3 * MIB + 7, 19);
    let (small, small_data) = work.file("small.txt", 10_000, 20);
    let (empty, _) = work.file("empty.dat", 0, 21);
    let files = [big.as_path(), small.as_path(), empty.as_path()];

    let ferry = Recorder::start(&app.base).await;
    let run = work.upload(&ferry.files, &[&big], &["--chunk-size", "1MiB", "--max-chunk-size", "1MiB"]).await;
    run.assert_success();
    assert_uploaded(&app, &ferry.direct(&app, &run.url_of(&big)), &big_data).await;
    assert_eq!(work.remembered_protocols(), ["tus"]);
    {
        let requests = ferry.requests.lock().unwrap();
        let mut asked = requests.iter().filter(|seen| seen.method != "OPTIONS");
        assert!(asked.all(|seen| seen.tus.as_deref() == Some("1.0.0")), "every request after OPTIONS is tus");
        let patch = requests.iter().find(|seen| seen.method == "PATCH").expect("a PATCH");
        assert_eq!(patch.content_type.as_deref(), Some("application/offset+octet-stream"));
    }

    let draft_only = Recorder::hiding_tus(&app.base, &[]).await;
    let run = work.upload(&draft_only.files, &files, &["--chunk-size", "1MiB", "--max-chunk-size", "1MiB"]).await;
    run.assert_success();
    for (path, data) in [(&big, &big_data[..]), (&small, &small_data[..]), (&empty, &[][..])] {
        assert_uploaded(&app, &draft_only.direct(&app, &run.url_of(path)), data).await;
    }
    draft_only.assert_all_ietf();
    {
        let requests = draft_only.requests.lock().unwrap();
        let creations: Vec<(Option<&str>, Option<u64>)> = requests
            .iter()
            .filter(|seen| seen.method == "POST")
            .map(|seen| (seen.complete.as_deref(), seen.length))
            .collect();
        assert_eq!(creations.len(), 3, "{creations:?}");
        assert!(creations.contains(&(Some("?0"), Some(0))), "the big file is created empty: {creations:?}");
        assert!(creations.contains(&(Some("?1"), Some(10_000))), "the small one in its creation: {creations:?}");
        assert!(creations.contains(&(Some("?1"), Some(0))), "and the empty one: {creations:?}");
        let patches: Vec<Option<&str>> =
            requests.iter().filter(|seen| seen.method == "PATCH").map(|seen| seen.complete.as_deref()).collect();
        assert_eq!(patches, [Some("?0"), Some("?0"), Some("?0"), Some("?1")], "only the big file is appended to");
    }
    assert_eq!(received_bytes(&app.base).await, 2 * big_data.len() as u64 + small_data.len() as u64);

    // A rerun finds them all complete, through the draft's HEAD.
    let again = work.upload(&draft_only.files, &files, &[]).await;
    again.assert_success();
    assert_eq!(again.stderr.matches("already uploaded").count(), 3, "{}", again.stderr);
    assert_eq!(received_bytes(&app.base).await, 2 * big_data.len() as u64 + small_data.len() as u64);
}

/// A protocol that is asked for and not offered, or an endpoint offering neither: said plainly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_the_server_does_not_offer_is_a_clear_failure() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let work = Workspace::new();
    let (path, _) = work.file("unsent.bin", 100, 22);
    let draft_only = Recorder::hiding_tus(&app.base, &[]).await;
    let run = work.upload(&draft_only.files, &[&path], &["--protocol", "tus"]).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("does not look like a tus endpoint"), "{}", run.stderr);
    let run = work.upload(&format!("{}/healthz", app.base), &[&path], &[]).await;
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("with neither Tus-Version (tus) nor Upload-Limit (the IETF draft)"), "{}", run.stderr);
    assert_eq!(app.upload_count().await, 0);
}

/// An append stored twice, as a proxy that retries would: the second gets a 409. The draft's
/// 409 names the offset, and the client goes on from there without asking; tus asks with HEAD.
async fn a_conflict_is_resumed_where_the_server_says(backend: Backend) {
    const LIMIT: u64 = 256 * 1024;
    for protocol in ["ietf", "tus"] {
        let app = TestApp::spawn_with(backend, |args| args.max_append_size = Some(LIMIT)).await;
        let recorder = Recorder::disturbing(&app.base, &[(1, Fault::Twice)]).await;
        let work = Workspace::new();
        let (path, data) = work.file("twice.bin", MIB + 3, 23);
        let run = work.upload(&recorder.files, &[&path], &["--protocol", protocol]).await;
        run.assert_success();
        assert_uploaded(&app, &recorder.direct(&app, &run.url_of(&path)), &data).await;
        assert!(run.stderr.contains("answered 409 Conflict"), "{protocol}: {}", run.stderr);
        assert_eq!(received_bytes(&app.base).await, data.len() as u64, "{protocol}: the chunk was stored once");
        let methods = recorder.methods();
        let last_patch = methods.iter().rposition(|m| m == "PATCH").unwrap();
        let heads_between = methods[..last_patch].iter().filter(|m| *m == "HEAD").count();
        if protocol == "ietf" {
            assert!(run.stderr.contains("continuing at 512 KiB"), "{}", run.stderr);
            assert_eq!(heads_between, 0, "the 409 said where to go on: {methods:?}");
            recorder.assert_all_ietf();
        } else {
            assert!(run.stderr.contains("asking the server where to continue"), "{}", run.stderr);
            assert_eq!(heads_between, 1, "tus asks: {methods:?}");
        }
    }
}

/// nginx at its defaults (`client_max_body_size 1m`) and the IETF draft: a 3 MiB file fits the
/// first chunk, so it goes in its creation, which nginx refuses; the client creates the upload
/// empty instead and halves its appends until they get through, as it does for tus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_file_creation_a_proxy_refuses_is_sent_in_appends() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let nginx = Nginx::proxy(&app.addr.to_string());
    let files = format!("{}/files/", nginx.url);
    let work = Workspace::new();
    let (path, data) = work.file("one-request.bin", 3 * MIB, 24);
    let run = work.upload(&files, &[&path], &["--protocol", "ietf", "--chunk-size", "8MiB"]).await;
    run.assert_success();
    for (from, to) in [("3 MiB", "1.50 MiB"), ("1.50 MiB", "768 KiB")] {
        let note = format!("nginx refused a {from} chunk (413); continuing with {to} chunks");
        assert!(run.stderr.contains(&note), "the client says it adapts ({note}):\n{}", run.stderr);
    }
    let url = run.url_of(&path);
    assert_uploaded(&app, &url.replace(&nginx.url, &app.base), &data).await;
    let log = nginx.access_log();
    let posts: Vec<&str> = log.lines().filter(|l| l.contains("\"POST ")).collect();
    assert_eq!(posts.len(), 2, "{log}");
    // nginx logs a request when it is done with it, and it may finish discarding the refused
    // body after the creation that followed is answered: the lines need not be in request order.
    assert!(
        posts.iter().any(|l| l.contains("\" 413 ")) && posts.iter().any(|l| l.contains("\" 201 ")),
        "the whole file (413), and an empty creation (201):\n{log}"
    );
    assert_eq!(received_bytes(&app.base).await, data.len() as u64);
}
