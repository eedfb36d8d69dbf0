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
};

db_backend_tests!(
    several_files_at_once_arrive_byte_exact,
    a_killed_upload_resumes_without_resending_what_arrived,
    ctrl_c_stops_at_once_and_says_how_to_resume,
    metadata_flags_arrive,
    tokens_are_sent_and_a_bad_one_is_a_clear_failure,
    chunks_never_exceed_the_advertised_limit,
    an_upload_the_server_lost_starts_over,
    the_exit_status_is_zero_only_when_every_file_made_it,
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

/// A reverse proxy in front of a server that records each request's method and
/// `Content-Length`, and passes everything through unchanged (including `Host`, so that
/// `Location`s point at the proxy).
struct Recorder {
    files: String,
    requests: Recorded,
    _server: tokio::task::JoinHandle<()>,
}

/// Method and `Content-Length` of each request, in order.
type Recorded = Arc<Mutex<Vec<(String, Option<u64>)>>>;

impl Drop for Recorder {
    fn drop(&mut self) {
        self._server.abort();
    }
}

impl Recorder {
    async fn start(upstream: &str) -> Self {
        use axum::{body::Body, extract::Request, response::Response};
        let requests: Recorded = Arc::default();
        let (log, upstream, client) = (requests.clone(), upstream.to_string(), reqwest::Client::new());
        let app = axum::Router::new().fallback(move |request: Request| {
            let (log, upstream, client) = (log.clone(), upstream.clone(), client.clone());
            async move {
                let length = request
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                log.lock().unwrap().push((request.method().to_string(), length));
                let url = format!("{upstream}{}", request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
                let (parts, body) = request.into_parts();
                let has_body = length.is_some_and(|l| l > 0) || parts.headers.contains_key("transfer-encoding");
                let mut forwarded = client.request(parts.method, url).headers(parts.headers);
                if has_body {
                    forwarded = forwarded.body(reqwest::Body::wrap_stream(body.into_data_stream()));
                }
                let forwarded = forwarded.send().await;
                match forwarded {
                    Ok(answer) => {
                        let mut response = Response::builder().status(answer.status());
                        for (name, value) in answer.headers() {
                            response = response.header(name, value);
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
        Recorder { files: format!("http://{addr}/files/"), requests, _server: server }
    }

    fn patches(&self) -> Vec<Option<u64>> {
        self.requests.lock().unwrap().iter().filter(|(m, _)| m == "PATCH").map(|(_, l)| *l).collect()
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
    let methods: Vec<String> = recorder.requests.lock().unwrap().iter().map(|(m, _)| m.clone()).collect();
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
