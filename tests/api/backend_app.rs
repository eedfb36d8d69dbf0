//! Issue 4's acceptance: the example app of `examples/python/` (Flask under gunicorn, sync workers,
//! default timeout, in its test mode) receives real deliveries from real `ferry serve` processes,
//! answers ferry's pre-create hook and issues the upload tokens ferry checks.
//!
//! Each test has its own temporary folder, its own app database (`APP_DB`) and port, and its own
//! ferry database: SQLite, or PostgreSQL where two instances share one. The app runs under the
//! Python of `FERRY_TEST_EXAMPLE_PYTHON` (default `tests/clients/.venv/bin/python`), which needs
//! `examples/python/requirements.txt` installed; without it these tests fail, they never skip.
//!
//! What the app received comes from its `GET /events` (test mode) and, for the payloads and what
//! its queue consumer made of them, from its SQLite file; what ferry still has to send comes from
//! `ferry events list`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Stdio,
    sync::OnceLock,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{KeyInit, Mac};
use reqwest::{Method, RequestBuilder, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{Backend, drop_database, fresh_database, header, random_bytes, upload_id};

/// Where ferry keeps its state in a scene (its store is always a local folder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Db {
    Sqlite,
    /// One PostgreSQL database, for several instances.
    Postgres,
}

/// The webhook secret the app verifies with (its `FERRY_WEBHOOK_SECRET`).
pub(crate) const WEBHOOK_SECRET: &str = "whsec_ZmVycnktYmFja2VuZC1hcHAtdGVzdC1zZWNyZXQtMDE=";
/// A secret being rotated out: ferry signs with it too, the app does not know it.
const OLD_WEBHOOK_SECRET: &str = "whsec_YW4tb2xkLXNlY3JldC10aGUtYXBwLW5ldmVyLWtuZXc=";
/// A secret nobody configured.
const STRANGER_SECRET: &str = "whsec_YS1zZWNyZXQtbm9ib2R5LWNvbmZpZ3VyZWQtaGVyZSE=";
/// The HS256 key of upload tokens: the app's `FERRY_TOKEN_SECRET`, ferry's `--token-secret`.
pub(crate) const TOKEN_SECRET: &str = "ferry-backend-app-token-secret-0123456789";
const APP_SECRET_KEY: &str = "ferry-backend-app-flask-secret-key-0123456789";

const KIB: usize = 1024;
const MIB: u64 = 1024 * 1024;
/// The example app's limit for bob (alice may upload 1 GiB).
const BOB_MAX: u64 = MIB;

const CREATED: &str = "upload.created";
pub(crate) const COMPLETED: &str = "upload.completed";
const TERMINATED: &str = "upload.terminated";

// ------------------------------------------------------------------------------------------------
// The Python side.

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python")
}

/// The Python that runs the example app; fails the test (once per process, with how to fix it)
/// when it cannot import what the app needs.
fn python() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PYTHON.get_or_init(find_python) {
        Ok(python) => python,
        Err(problem) => panic!("{problem}"),
    }
}

fn find_python() -> Result<PathBuf, String> {
    let (python, origin) = match std::env::var_os("FERRY_TEST_EXAMPLE_PYTHON") {
        Some(value) if !value.is_empty() => (PathBuf::from(value), "from FERRY_TEST_EXAMPLE_PYTHON"),
        _ => (Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/.venv/bin/python"), "the default"),
    };
    let output = std::process::Command::new(&python)
        .args(["-c", "import gunicorn, flask, standardwebhooks, jwt"])
        .stdin(Stdio::null())
        .output();
    let problem = match output {
        Ok(output) if output.status.success() => return Ok(python),
        Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_string(),
        Err(e) => format!("it cannot be run: {e}"),
    };
    Err(format!(
        "the example app's tests need a Python with examples/python/requirements.txt installed \
         (gunicorn, Flask, standardwebhooks, PyJWT), but {} ({origin}) cannot import them: {problem}\n\
         Install them with `{} -m pip install -r examples/python/requirements.txt` (tests/run does), \
         or set FERRY_TEST_EXAMPLE_PYTHON to a python that has them.",
        python.display(),
        python.display(),
    ))
}

/// A free port of 127.0.0.1 (free now; taken when the server binds it).
fn free_addr() -> std::net::SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    ([127, 0, 0, 1], port).into()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The last `lines` lines of a log file.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn send_signal(signal: &str, target: &str) {
    let _ = std::process::Command::new("kill")
        .args([signal, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// One event as the app's `GET /events` lists it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct AppEvent {
    webhook_id: String,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) upload_id: Option<String>,
    /// How many times ferry sent it.
    deliveries: i64,
    processed_at: Option<String>,
}

/// A row of the app's `files` table: what its queue consumer (worker.py) made of the events.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AppFile {
    upload_id: String,
    owner: Option<String>,
    filename: Option<String>,
    size: Option<i64>,
    sha256: Option<String>,
    status: String,
}

/// The example app under gunicorn: a process group (the master and its sync workers).
pub(crate) struct PyApp {
    addr: std::net::SocketAddr,
    base: String,
    db: PathBuf,
    log: PathBuf,
    workers: usize,
    /// Where the page tells browsers to find ferry (`FERRY_URL`), when not the app's default.
    ferry_url: Option<String>,
    child: Option<tokio::process::Child>,
    /// Follows no redirects (the login's 303 carries the session cookie).
    http: reqwest::Client,
}

impl PyApp {
    /// The app's settings in `dir`, on a port of its own; not started yet.
    pub(crate) fn new(dir: &Path, workers: usize) -> Self {
        let addr = free_addr();
        PyApp {
            addr,
            base: format!("http://{addr}"),
            db: dir.join("app.sqlite3"),
            log: dir.join("gunicorn.log"),
            workers,
            ferry_url: None,
            child: None,
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
        }
    }

    /// `http://127.0.0.1:<port>`: the app's origin.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// Tells the app's page where browsers find ferry (before `start`).
    pub(crate) fn set_ferry_url(&mut self, url: &str) {
        self.ferry_url = Some(url.to_string());
    }

    pub(crate) fn webhook_url(&self) -> String {
        format!("{}/webhooks/ferry", self.base)
    }

    fn pre_create_url(&self) -> String {
        format!("{}/hooks/pre-create", self.base)
    }

    fn app_env(&self, command: &mut tokio::process::Command) {
        command
            .current_dir(example_dir())
            .env_remove("GUNICORN_CMD_ARGS")
            .env("APP_BIND", self.addr.to_string())
            .env("APP_DB", &self.db)
            .env("WEB_CONCURRENCY", self.workers.to_string())
            .env("APP_SECRET_KEY", APP_SECRET_KEY)
            .env("FERRY_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .env("FERRY_TOKEN_SECRET", TOKEN_SECRET)
            .env("FERRY_EXAMPLE_TEST_MODE", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null());
        if let Some(url) = &self.ferry_url {
            command.env("FERRY_URL", url);
        }
    }

    /// Starts gunicorn (on the same port every time) and waits until the app answers.
    pub(crate) async fn start(&mut self) {
        assert!(self.child.is_none(), "the app is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("app log");
        let mut command = tokio::process::Command::new(python());
        command.args(["-m", "gunicorn", "-c", "gunicorn.conf.py"]);
        self.app_env(&mut command);
        command
            .stdout(log.try_clone().expect("app log"))
            .stderr(log)
            // Its own process group: the workers go with the master however the test ends.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().expect("start gunicorn");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("gunicorn exited with {status} before the app answered:\n{}", log_tail(&self.log, 40));
            }
            if matches!(self.http.get(format!("{}/events", self.base)).send().await, Ok(r) if r.status() == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "the app did not answer within 30 s:\n{}", log_tail(&self.log, 40));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.child = Some(child);
    }

    /// SIGTERM to gunicorn's master (a graceful stop), and waits until it has exited.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("the app is running");
        send_signal("-TERM", &child.id().expect("running").to_string());
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(status) => assert!(status.expect("wait for gunicorn").success(), "gunicorn's exit after SIGTERM"),
            Err(_) => panic!("gunicorn did not stop within 30 s of SIGTERM:\n{}", log_tail(&self.log, 40)),
        }
    }

    /// Every event the app received, in arrival order.
    pub(crate) async fn events(&self) -> Result<Vec<AppEvent>, String> {
        #[derive(Deserialize)]
        struct Listing {
            events: Vec<AppEvent>,
        }
        let response = self.http.get(format!("{}/events", self.base)).send().await.map_err(|e| format!("{e}"))?;
        if response.status() != 200 {
            return Err(format!("GET /events: {}", response.status()));
        }
        let body = response.text().await.map_err(|e| format!("GET /events: {e}"))?;
        Ok(serde_json::from_str::<Listing>(&body).map_err(|e| format!("GET /events: {e}: {body}"))?.events)
    }

    /// `POST /test/behaviour`: how the webhook endpoint misbehaves next.
    async fn set_behaviour(&self, behaviour: Value) {
        let response = self
            .http
            .post(format!("{}/test/behaviour", self.base))
            .header("content-type", "application/json")
            .body(behaviour.to_string())
            .send()
            .await
            .expect("POST /test/behaviour");
        assert_eq!(response.status(), 204, "POST /test/behaviour {behaviour}");
    }

    /// Logs in through the app's form; returns the session cookie (`name=value`).
    async fn login(&self, user: &str) -> String {
        let response = self
            .http
            .post(format!("{}/login", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("username={user}&password={user}"))
            .send()
            .await
            .expect("POST /login");
        assert_eq!(response.status(), 303, "log in as {user}");
        let cookie = header(&response, "set-cookie");
        cookie.split(';').next().expect("a cookie").to_string()
    }

    /// `POST /upload-token` for the logged-in user of `cookie`: the token and its size limit.
    async fn upload_token(&self, cookie: &str) -> (String, u64) {
        let response = self
            .http
            .post(format!("{}/upload-token", self.base))
            .header("cookie", cookie)
            .send()
            .await
            .expect("POST /upload-token");
        assert_eq!(response.status(), 200, "POST /upload-token");
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).expect("JSON");
        (body["token"].as_str().expect("a token").to_string(), body["max_size"].as_u64().expect("max_size"))
    }

    /// Runs the queue consumer (`worker.py --once`); returns how many events it handled.
    async fn run_worker(&self) -> usize {
        let mut command = tokio::process::Command::new(python());
        command.args(["worker.py", "--once"]);
        self.app_env(&mut command);
        let output = command.output().await.expect("run worker.py");
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "worker.py --once failed:\n{log}");
        log.split("handled ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("worker.py --once did not say how many events it handled:\n{log}"))
    }

    async fn db(&self) -> sqlx::SqliteConnection {
        use sqlx::Connection;
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", self.db.display())).await.expect("open the app's db")
    }

    /// The verified bodies the app stored, by webhook-id.
    async fn payloads(&self) -> BTreeMap<String, Value> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT webhook_id, payload FROM events").fetch_all(&mut self.db().await).await.unwrap();
        rows.into_iter().map(|(id, body)| (id, serde_json::from_str(&body).expect("a JSON payload"))).collect()
    }

    /// The `upload.completed` payload the app stored for an upload.
    pub(crate) async fn completed_payload(&self, url: &str) -> Value {
        let id = upload_id(url);
        self.payloads()
            .await
            .into_values()
            .find(|p| p["type"] == COMPLETED && p["data"]["id"] == id)
            .unwrap_or_else(|| panic!("the app has no upload.completed for {id}"))
    }

    async fn files(&self) -> Vec<AppFile> {
        type Row = (String, Option<String>, Option<String>, Option<i64>, Option<String>, String);
        let rows: Vec<Row> =
            sqlx::query_as("SELECT upload_id, owner, filename, size, sha256, status FROM files ORDER BY upload_id")
                .fetch_all(&mut self.db().await)
                .await
                .unwrap();
        rows.into_iter()
            .map(|(upload_id, owner, filename, size, sha256, status)| AppFile {
                upload_id,
                owner,
                filename,
                size,
                sha256,
                status,
            })
            .collect()
    }

    /// Requests the test behaviour still affects (None: none configured, or until changed).
    async fn behaviour_remaining(&self) -> Option<i64> {
        sqlx::query_scalar::<_, Option<i64>>("SELECT remaining FROM test_behaviour WHERE id = 1")
            .fetch_optional(&mut self.db().await)
            .await
            .unwrap()
            .flatten()
    }

    /// POSTs a webhook straight to the app, as an attacker (or a broken sender) would.
    async fn post_webhook(&self, id: &str, timestamp: i64, signature: Option<String>, body: &str) -> u16 {
        let mut request = self
            .http
            .post(self.webhook_url())
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .body(body.to_string());
        if let Some(signature) = signature {
            request = request.header("webhook-signature", signature);
        }
        request.send().await.expect("POST to the app's webhook endpoint").status().as_u16()
    }
}

impl Drop for PyApp {
    fn drop(&mut self) {
        if let Some(child) = &self.child
            && let Some(pid) = child.id()
        {
            send_signal("-KILL", &format!("-{pid}"));
        }
    }
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, computed here, independently of ferry.
pub(crate) fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let key = STANDARD.decode(secret.trim_start_matches("whsec_")).unwrap();
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// An HS256 JWT with these claims.
fn jwt(secret: &str, claims: Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

// ------------------------------------------------------------------------------------------------
// The ferry side: `ferry serve` child processes and `ferry events`.

/// One `ferry serve` process.
struct Ferry {
    name: String,
    /// The tus endpoint, `http://127.0.0.1:<port>/files/`.
    files: String,
    log: PathBuf,
    args: Vec<String>,
    child: Option<tokio::process::Child>,
    http: reqwest::Client,
}

/// Request headers a client adds (cookies, tokens).
type Extra<'a> = &'a [(&'a str, &'a str)];
/// The same, owned by a table of cases.
type Headers<'a> = Vec<(&'a str, &'a str)>;

fn ferry_command() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
    // Only what the test sets: no FERRY_* or AWS_* settings from the caller's environment.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("FERRY_") || key.starts_with("AWS_") {
            command.env_remove(key.as_ref());
        }
    }
    command.env("NO_COLOR", "1").env("RUST_BACKTRACE", "1").stdin(Stdio::null());
    command
}

impl Ferry {
    /// Starts `ferry serve` with `args` on a free port and waits until it answers.
    async fn start(name: &str, log: PathBuf, args: Vec<String>) -> Self {
        let mut ferry = Ferry {
            name: name.to_string(),
            files: String::new(),
            log,
            args,
            child: None,
            http: reqwest::Client::new(),
        };
        ferry.run().await;
        ferry
    }

    /// (Re)starts the process, with the same arguments, on a free port.
    async fn run(&mut self) {
        assert!(self.child.is_none(), "ferry {} is already running", self.name);
        for attempt in 1.. {
            let addr = free_addr();
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("ferry log");
            let mut command = ferry_command();
            command
                .arg("serve")
                .args(["--listen", &addr.to_string()])
                .args(&self.args)
                .env("FERRY_LOG", "info,ferry=debug")
                .stdout(log.try_clone().expect("ferry log"))
                .stderr(log)
                .kill_on_drop(true);
            let mut child = command.spawn().expect("start ferry serve");
            let base = format!("http://{addr}");
            let deadline = Instant::now() + Duration::from_secs(30);
            let exited = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    break Some(status);
                }
                if matches!(self.http.get(format!("{base}/healthz")).send().await, Ok(r) if r.status() == 200) {
                    break None;
                }
                assert!(
                    Instant::now() < deadline,
                    "ferry {} not ready in 30 s:\n{}",
                    self.name,
                    log_tail(&self.log, 40)
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            match exited {
                None => {
                    self.files = format!("{base}/files/");
                    self.child = Some(child);
                    return;
                }
                Some(_) if attempt < 3 && log_tail(&self.log, 5).contains("in use") => continue,
                Some(status) => panic!("ferry {} exited with {status}:\n{}", self.name, log_tail(&self.log, 40)),
            }
        }
    }

    /// SIGKILL, and waits until the process is gone.
    async fn sigkill(&mut self) {
        let mut child = self.child.take().expect("ferry is running");
        child.start_kill().expect("SIGKILL");
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("ferry gone within 10 s of SIGKILL")
            .expect("wait for ferry");
    }

    /// The same upload's URL on this instance.
    fn at(&self, url: &str) -> String {
        format!("{}{}", self.files, upload_id(url))
    }

    fn tus(&self, method: Method, url: &str, extra: Extra<'_>) -> RequestBuilder {
        let mut request = self.http.request(method, url).header("Tus-Resumable", "1.0.0");
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        request
    }

    /// POST: a new upload of `length` bytes (None: a deferred length) with `metadata`.
    async fn create(&self, length: Option<u64>, metadata: &[(&str, &str)], extra: Extra<'_>) -> Response {
        let mut request = self.tus(Method::POST, &self.files, extra);
        request = match length {
            Some(length) => request.header("Upload-Length", length.to_string()),
            None => request.header("Upload-Defer-Length", "1"),
        };
        if !metadata.is_empty() {
            let pairs: Vec<String> =
                metadata.iter().map(|(k, v)| format!("{k} {}", STANDARD.encode(v.as_bytes()))).collect();
            request = request.header("Upload-Metadata", pairs.join(","));
        }
        request.send().await.unwrap_or_else(|e| panic!("POST to ferry {}: {e}", self.name))
    }

    /// Creates an upload and returns its URL; fails the test on anything but 201.
    async fn create_ok(&self, length: u64, metadata: &[(&str, &str)], extra: Extra<'_>) -> String {
        let response = self.create(Some(length), metadata, extra).await;
        let status = response.status();
        let location = response.headers().get("location").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status, 201, "create on {}: {}", self.name, response.text().await.unwrap_or_default());
        location.expect("Location")
    }

    async fn patch(&self, url: &str, offset: u64, body: &[u8], extra: Extra<'_>) -> Response {
        self.tus(Method::PATCH, &self.at(url), extra)
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .body(body.to_vec())
            .send()
            .await
            .unwrap_or_else(|e| panic!("PATCH through ferry {}: {e}", self.name))
    }

    /// Sends `data` from `offset` in chunks of `chunk` bytes, each of which must succeed.
    async fn send(&self, url: &str, offset: usize, data: &[u8], chunk: usize, extra: Extra<'_>) {
        let mut at = offset;
        for piece in data.chunks(chunk) {
            let response = self.patch(url, at as u64, piece, extra).await;
            let status = response.status();
            assert_eq!(
                status,
                204,
                "PATCH at {at} through {}: {}",
                self.name,
                response.text().await.unwrap_or_default()
            );
            at += piece.len();
        }
    }

    /// A whole upload: create, then PATCHes of `chunk` bytes; returns its URL.
    async fn upload(&self, data: &[u8], chunk: usize, metadata: &[(&str, &str)], extra: Extra<'_>) -> String {
        let url = self.create_ok(data.len() as u64, metadata, extra).await;
        self.send(&url, 0, data, chunk, extra).await;
        url
    }

    async fn delete(&self, url: &str, extra: Extra<'_>) -> u16 {
        let response = self.tus(Method::DELETE, &self.at(url), extra).send().await.expect("DELETE");
        response.status().as_u16()
    }

    async fn head(&self, url: &str, extra: Extra<'_>) -> u16 {
        self.tus(Method::HEAD, &self.at(url), extra).send().await.expect("HEAD").status().as_u16()
    }
}

/// One event of ferry's outbox, as `ferry events list` shows it.
#[derive(Debug, Clone)]
struct OutboxEvent {
    id: String,
    kind: String,
    state: String,
    attempts: i64,
    error: String,
}

/// Replaces the value of `flag` in `args`.
fn set_arg(args: &mut [String], flag: &str, value: &str) {
    let at = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} in {args:?}"));
    args[at + 1] = value.to_string();
}

/// The event types per upload id, in order.
type Timeline = BTreeMap<String, Vec<String>>;

fn timeline(events: &[AppEvent]) -> Timeline {
    let mut timeline = Timeline::new();
    for event in events {
        timeline.entry(event.upload_id.clone().unwrap_or_default()).or_default().push(event.kind.clone());
    }
    timeline
}

/// The expected timeline: upload URLs and their events in order.
fn expect(entries: &[(&str, &[&str])]) -> Timeline {
    entries
        .iter()
        .map(|(url, kinds)| (upload_id(url).to_string(), kinds.iter().map(|k| k.to_string()).collect()))
        .collect()
}

/// Polls `probe` every 100 ms until it gives a value; fails the test after `limit` with the
/// probe's last account of what it saw.
pub(crate) async fn until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => {
                assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}; last seen:\n{seen}")
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One test's world: a temporary folder, a ferry database, the app, ferry instances.
struct Scene {
    backend: Db,
    db_url: String,
    app: PyApp,
    ferries: Vec<Ferry>,
    dir: Option<tempfile::TempDir>,
}

impl Scene {
    /// A fresh ferry database on `backend` and the app (not started) with `workers` sync workers.
    async fn new(backend: Db, workers: usize) -> Self {
        python(); // fail first, and clearly, without the Python side
        let dir = tempfile::tempdir().expect("temp dir");
        let db_url = match backend {
            Db::Sqlite => fresh_database(Backend::Sqlite, dir.path()).await,
            Db::Postgres => fresh_database(Backend::Postgres, dir.path()).await,
        };
        let app = PyApp::new(dir.path(), workers);
        Scene { backend, db_url, app, ferries: Vec::new(), dir: Some(dir) }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("temp dir").path()
    }

    /// Delivering to the app, with quick retries (100 ms, doubling).
    fn webhook_args(&self) -> Vec<String> {
        ["--webhook-url", &self.app.webhook_url(), "--webhook-secret", WEBHOOK_SECRET, "--webhook-retry-min", "100ms"]
            .map(String::from)
            .to_vec()
    }

    /// Starts one more ferry instance on the scene's database and store, with `extra` arguments.
    async fn start_ferry(&mut self, extra: &[String]) -> &Ferry {
        let name = ((b'a' + self.ferries.len() as u8) as char).to_string();
        let mut args: Vec<String> = [
            "--database-url",
            &self.db_url,
            "--data-dir",
            &self.dir().join("ferry-data").display().to_string(),
            "--store",
            &self.dir().join("store").display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend_from_slice(extra);
        let log = self.dir().join(format!("ferry-{name}.log"));
        self.ferries.push(Ferry::start(&name, log, args).await);
        self.ferries.last().expect("just started")
    }

    /// A `ferry events ...` command on the scene's database; returns its standard output.
    async fn events_cli(&self, args: &[&str]) -> String {
        let output = ferry_command()
            .arg("events")
            .args(args)
            .args(["--database-url", &self.db_url, "--data-dir", &self.dir().join("ferry-data").display().to_string()])
            .env("FERRY_LOG", "error")
            .output()
            .await
            .expect("run ferry events");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "ferry events {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Ferry's outbox, oldest first (`ferry events list`).
    async fn outbox(&self) -> Vec<OutboxEvent> {
        let listing = self.events_cli(&["list", "--limit", "1000"]).await;
        let mut events: Vec<OutboxEvent> = listing
            .lines()
            .filter(|line| line.starts_with("evt_"))
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                assert!(fields.len() >= 5, "a line of `ferry events list`: {line}");
                OutboxEvent {
                    id: fields[0].to_string(),
                    kind: fields[1].to_string(),
                    state: fields[3].to_string(),
                    attempts: fields[4].parse().expect("attempts"),
                    error: fields[5..].join(" "),
                }
            })
            .collect();
        events.reverse();
        events
    }

    /// How many uploads ferry's database holds.
    async fn upload_count(&self) -> i64 {
        use sqlx::Connection;
        let query = "SELECT COUNT(*) FROM uploads";
        match self.backend {
            Db::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.db_url).await.unwrap();
                sqlx::query_scalar(query).fetch_one(&mut conn).await.unwrap()
            }
            Db::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.db_url).await.unwrap();
                sqlx::query_scalar(query).fetch_one(&mut conn).await.unwrap()
            }
        }
    }

    /// Waits until the app has received exactly the `expected` events, in order per upload, and
    /// ferry's outbox holds exactly those events, all delivered (so nothing more will come).
    async fn delivered_exactly(&self, expected: &Timeline, limit: Duration) -> Vec<AppEvent> {
        let wanted: usize = expected.values().map(Vec::len).sum();
        let events = until("the app to receive the expected events", limit, || async {
            let events = self.app.events().await?;
            let got = timeline(&events);
            assert!(
                events.len() <= wanted,
                "the app received more events than expected: {got:#?}\nexpected {expected:#?}"
            );
            if got == *expected { Ok(events) } else { Err(format!("{got:#?}\nexpected {expected:#?}")) }
        })
        .await;
        let received: BTreeSet<&str> = events.iter().map(|e| e.webhook_id.as_str()).collect();
        until("ferry's outbox to hold exactly the received events, all delivered", Duration::from_secs(10), || async {
            let outbox = self.outbox().await;
            let ids: BTreeSet<&str> = outbox.iter().map(|e| e.id.as_str()).collect();
            assert!(ids.len() <= received.len(), "ferry has events the app did not get: {outbox:#?}\n{events:#?}");
            if ids == received && outbox.iter().all(|e| e.state == "delivered") {
                Ok(())
            } else {
                Err(format!("{outbox:#?}"))
            }
        })
        .await;
        events
    }

    /// Waits until ferry has tried every event of `kinds` at least `attempts` times and failed,
    /// with an error containing `error`.
    async fn failing(&self, count: usize, attempts: i64, error: &str) -> Vec<OutboxEvent> {
        until("ferry to fail delivering", Duration::from_secs(20), || async {
            let outbox = self.outbox().await;
            let tried: Vec<&OutboxEvent> = outbox.iter().filter(|e| e.attempts > 0).collect();
            assert!(outbox.iter().all(|e| e.state == "pending"), "nothing can have been delivered: {outbox:#?}");
            if tried.len() == count && tried.iter().all(|e| e.attempts >= attempts && e.error.contains(error)) {
                Ok(outbox.clone())
            } else {
                Err(format!("{outbox:#?}"))
            }
        })
        .await
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for ferry in &mut self.ferries {
            if let Some(child) = &mut ferry.child {
                let _ = child.start_kill();
            }
        }
        if let Some(child) = &self.app.child
            && let Some(pid) = child.id()
        {
            send_signal("-KILL", &format!("-{pid}"));
        }
        if std::thread::panicking() {
            for ferry in &self.ferries {
                eprintln!("\n----- log of ferry {}, last lines -----\n{}", ferry.name, log_tail(&ferry.log, 60));
            }
            eprintln!("\n----- log of the app (gunicorn), last lines -----\n{}", log_tail(&self.app.log, 60));
            if let Some(dir) = self.dir.take() {
                eprintln!("(kept {} for a look)", dir.keep().display());
            }
        }
        if self.backend == Db::Postgres {
            drop_database(&self.db_url);
        }
    }
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

// ------------------------------------------------------------------------------------------------
// The tests.

/// Uploads completed, terminated and left unfinished produce exactly their events at the app, in
/// order, each verified by `standardwebhooks` (ferry signs with two secrets while rotating, the
/// app knows only the new one) and recorded once; the queue consumer turns them into the app's
/// file records. Requests POSTed straight to the app with a tampered body, a stale timestamp, a
/// stranger's key or no signature are refused with 400 and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_events_reach_the_app() {
    let mut scene = Scene::new(Db::Sqlite, 2).await;
    scene.app.start().await;
    // Rotating: ferry signs with the old secret and the new one; the app knows only the new one.
    let mut args = scene.webhook_args();
    set_arg(&mut args, "--webhook-secret", &format!("{OLD_WEBHOOK_SECRET},{WEBHOOK_SECRET}"));
    let ferry = scene.start_ferry(&args).await;

    let data = random_bytes(300 * KIB, 1);
    let done = ferry.upload(&data, 100 * KIB, &[("filename", "report.pdf")], &[]).await;
    let dropped = ferry.create_ok(10, &[], &[]).await;
    assert_eq!(ferry.delete(&dropped, &[]).await, 204, "DELETE");
    let partial = ferry.create_ok(1000, &[("filename", "half.bin")], &[]).await;
    ferry.send(&partial, 0, &random_bytes(400, 2), 400, &[]).await;

    let expected =
        expect(&[(&done, &[CREATED, COMPLETED]), (&dropped, &[CREATED, TERMINATED]), (&partial, &[CREATED])]);
    let events = scene.delivered_exactly(&expected, Duration::from_secs(20)).await;
    assert!(events.iter().all(|e| e.deliveries == 1), "each event delivered once: {events:#?}");
    assert!(events.iter().all(|e| e.webhook_id.starts_with("evt_")), "webhook-ids: {events:#?}");

    // The body the app verified and stored.
    let completed = scene.app.completed_payload(&done).await;
    let id = upload_id(&done);
    let data_of = &completed["data"];
    assert_eq!(data_of["size"], data.len(), "{completed:#}");
    assert_eq!(data_of["sha256"], sha256_hex(&data), "{completed:#}");
    assert_eq!(data_of["metadata"]["filename"], "report.pdf", "{completed:#}");
    assert!(data_of["url"].as_str().unwrap().ends_with(&format!("/files/{id}")), "{completed:#}");
    assert!(data_of["location"].as_str().unwrap().contains(id), "{completed:#}");
    assert!(data_of["owner"].is_null(), "no owner without a hook or token: {completed:#}");

    // The queue consumer handles each event once, outside the web request.
    assert_eq!(scene.app.run_worker().await, 5, "events handled by worker.py");
    let files = scene.app.files().await;
    let file = |url: &str| files.iter().find(|f| f.upload_id == upload_id(url)).cloned().expect("a file record");
    assert_eq!(file(&done).status, "completed");
    assert_eq!(file(&done).sha256, Some(sha256_hex(&data)));
    assert_eq!(file(&done).size, Some(data.len() as i64));
    assert_eq!(file(&done).filename.as_deref(), Some("report.pdf"));
    assert_eq!(file(&dropped).status, "terminated");
    assert_eq!(file(&partial).status, "uploading");
    assert!(scene.app.events().await.unwrap().iter().all(|e| e.processed_at.is_some()), "all processed");

    // Forgeries, POSTed straight to the app: refused, and nothing recorded.
    let event = events.iter().find(|e| e.kind == COMPLETED).unwrap();
    let body_text: String = sqlx::query_scalar("SELECT payload FROM events WHERE webhook_id = ?")
        .bind(&event.webhook_id)
        .fetch_one(&mut scene.app.db().await)
        .await
        .unwrap();
    let now = unix_now();
    let tampered = body_text.replace("report.pdf", "invoice.pdf");
    assert_ne!(tampered, body_text);
    let forgeries = [
        ("a tampered body", now, Some(sign(WEBHOOK_SECRET, &event.webhook_id, now, &body_text)), tampered),
        (
            "a stale timestamp",
            now - 600,
            Some(sign(WEBHOOK_SECRET, &event.webhook_id, now - 600, &body_text)),
            body_text.clone(),
        ),
        ("a stranger's key", now, Some(sign(STRANGER_SECRET, &event.webhook_id, now, &body_text)), body_text.clone()),
        ("no signature", now, None, body_text.clone()),
    ];
    for (what, timestamp, signature, body) in forgeries {
        let status = scene.app.post_webhook(&event.webhook_id, timestamp, signature, &body).await;
        assert_eq!(status, 400, "the app must refuse {what}");
    }
    let after = scene.app.events().await.unwrap();
    assert_eq!(timeline(&after), expected, "refused requests record nothing");
    assert!(after.iter().all(|e| e.deliveries == 1), "refused requests count no delivery: {after:#?}");

    // The same request, properly signed: a duplicate, answered 2xx and only counted.
    let signature = sign(WEBHOOK_SECRET, &event.webhook_id, now, &body_text);
    assert_eq!(scene.app.post_webhook(&event.webhook_id, now, Some(signature), &body_text).await, 204);
    let after = scene.app.events().await.unwrap();
    assert_eq!(timeline(&after), expected, "a duplicate is not recorded again");
    let counted = after.iter().find(|e| e.webhook_id == event.webhook_id).unwrap();
    assert_eq!(counted.deliveries, 2, "the duplicate is counted");
    assert_eq!(scene.app.run_worker().await, 0, "nothing new to handle");
}

/// The receiver is down, twice: not started yet, then stopped (SIGTERM) and started again. Ferry
/// keeps trying meanwhile; once it is up, every event arrives, in order per upload, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_then_up() {
    let mut scene = Scene::new(Db::Sqlite, 2).await;
    let args = scene.webhook_args();
    let ferry = scene.start_ferry(&args).await;

    let a = ferry.upload(&random_bytes(50 * KIB, 3), 20 * KIB, &[], &[]).await;
    let b = ferry.create_ok(100, &[], &[]).await;
    assert_eq!(ferry.delete(&b, &[]).await, 204);
    let c = ferry.upload(&random_bytes(10, 4), 10, &[], &[]).await;
    // The first event of each upload is tried (the others wait behind it), and fails.
    scene.failing(3, 2, "could not reach").await;

    scene.app.start().await;
    let mut expected =
        expect(&[(&a, &[CREATED, COMPLETED]), (&b, &[CREATED, TERMINATED]), (&c, &[CREATED, COMPLETED])]);
    scene.delivered_exactly(&expected, Duration::from_secs(30)).await;

    scene.app.stop().await;
    let ferry = &scene.ferries[0];
    let d = ferry.upload(&random_bytes(30 * KIB, 5), 10 * KIB, &[], &[]).await;
    let e = ferry.create_ok(100, &[], &[]).await;
    assert_eq!(ferry.delete(&e, &[]).await, 204);
    until("ferry to fail delivering the new events", Duration::from_secs(20), || async {
        let outbox = scene.outbox().await;
        let pending: Vec<&OutboxEvent> = outbox.iter().filter(|e| e.state == "pending").collect();
        let tried = pending.iter().filter(|e| e.attempts >= 2 && e.error.contains("could not reach")).count();
        if pending.len() == 4 && tried == 2 { Ok(()) } else { Err(format!("{outbox:#?}")) }
    })
    .await;

    scene.app.start().await;
    expected.extend(expect(&[(&d, &[CREATED, COMPLETED]), (&e, &[CREATED, TERMINATED])]));
    scene.delivered_exactly(&expected, Duration::from_secs(30)).await;
}

/// The receiver answers 500 three times, then 200: the event is retried until it is accepted,
/// and the next event of the upload waits for it. A 410 stops the deliveries of that event (the
/// upload's later events go on), and `ferry events retry` sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_errors_are_retried() {
    let mut scene = Scene::new(Db::Sqlite, 2).await;
    scene.app.start().await;
    scene.app.set_behaviour(json!({"status": 500, "count": 3})).await;
    let args = scene.webhook_args();
    let ferry = scene.start_ferry(&args).await;

    let a = ferry.upload(&random_bytes(20 * KIB, 6), 10 * KIB, &[], &[]).await;
    let mut expected = expect(&[(&a, &[CREATED, COMPLETED])]);
    let events = scene.delivered_exactly(&expected, Duration::from_secs(20)).await;
    assert!(events.iter().all(|e| e.deliveries == 1), "a 500 records nothing: {events:#?}");
    let outbox = scene.outbox().await;
    let attempts: Vec<(&str, i64)> = outbox.iter().map(|e| (e.kind.as_str(), e.attempts)).collect();
    assert_eq!(attempts, [(CREATED, 4), (COMPLETED, 1)], "three 500s, then the 200: {outbox:#?}");
    assert_eq!(scene.app.behaviour_remaining().await, Some(0));

    // 410: stop.
    scene.app.set_behaviour(json!({"status": 410, "count": 1})).await;
    let ferry = &scene.ferries[0];
    let b = ferry.upload(&random_bytes(10 * KIB, 7), 10 * KIB, &[], &[]).await;
    let dead = until("the 410 to kill upload.created", Duration::from_secs(20), || async {
        let outbox = scene.outbox().await;
        match outbox.iter().find(|e| e.kind == CREATED && e.state == "dead") {
            Some(dead) if outbox.iter().filter(|e| e.state == "delivered").count() == 3 => Ok(dead.clone()),
            _ => Err(format!("{outbox:#?}")),
        }
    })
    .await;
    assert_eq!(dead.attempts, 1, "{dead:?}");
    assert!(dead.error.contains("410"), "{dead:?}");
    expected.extend(expect(&[(&b, &[COMPLETED])]));
    until("b's upload.completed", Duration::from_secs(10), || async {
        let got = timeline(&scene.app.events().await?);
        if got == expected { Ok(()) } else { Err(format!("{got:#?}")) }
    })
    .await;

    let said = scene.events_cli(&["retry", &dead.id]).await;
    assert!(said.contains("1 event(s)"), "ferry events retry: {said}");
    expected.insert(upload_id(&b).to_string(), vec![COMPLETED.into(), CREATED.into()]);
    let events = scene.delivered_exactly(&expected, Duration::from_secs(20)).await;
    assert!(events.iter().all(|e| e.deliveries == 1), "{events:#?}");
}

/// The receiver takes 3 s to answer the first request, longer than ferry's `--webhook-timeout`
/// (2 s): ferry gives up on it and sends the event again, which a free worker answers in time.
/// The slow request then records its copy too: the app counts two deliveries of one webhook-id
/// but records and processes the event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_is_retried_and_deduplicated() {
    let mut scene = Scene::new(Db::Sqlite, 3).await;
    scene.app.start().await;
    scene.app.set_behaviour(json!({"sleep": 3, "count": 1})).await;
    let mut args = scene.webhook_args();
    args.extend(["--webhook-timeout".into(), "2s".into()]);
    let ferry = scene.start_ferry(&args).await;

    let started = Instant::now();
    let data = random_bytes(20 * KIB, 8);
    let a = ferry.upload(&data, 10 * KIB, &[("filename", "slow.txt")], &[]).await;
    let expected = expect(&[(&a, &[CREATED, COMPLETED])]);
    scene.delivered_exactly(&expected, Duration::from_secs(20)).await;
    let events = until("the slow request to finish", Duration::from_secs(20), || async {
        let events = scene.app.events().await?;
        if events.iter().any(|e| e.deliveries == 2) { Ok(events) } else { Err(format!("{events:#?}")) }
    })
    .await;
    let elapsed = started.elapsed();
    assert_eq!(timeline(&events), expected, "recorded once each");
    let created = events.iter().find(|e| e.kind == CREATED).unwrap();
    let completed = events.iter().find(|e| e.kind == COMPLETED).unwrap();
    assert_eq!((created.deliveries, completed.deliveries), (2, 1), "{events:#?}");
    let outbox = scene.outbox().await;
    let attempts: Vec<(&str, i64)> = outbox.iter().map(|e| (e.kind.as_str(), e.attempts)).collect();
    assert_eq!(attempts, [(CREATED, 2), (COMPLETED, 1)], "one timeout, then in time: {outbox:#?}");
    assert!(elapsed >= Duration::from_secs(3), "the slow request lasts 3 s: {elapsed:?}");

    assert_eq!(scene.app.run_worker().await, 2, "each event handled once");
    let files = scene.app.files().await;
    assert_eq!(files.len(), 1, "{files:#?}");
    assert_eq!((files[0].status.as_str(), files[0].sha256.clone()), ("completed", Some(sha256_hex(&data))));
}

/// Ferry is killed (SIGKILL) with undelivered events, the receiver being down; the receiver comes
/// up, ferry is started again on the same database: every event is delivered, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ferry_delivers_after_restart() {
    let mut scene = Scene::new(Db::Sqlite, 2).await;
    // Retries 1-3 s apart: ferry is killed between two attempts, not while it holds an event
    // (an event claimed by a killed instance waits for its 60 s lease to run out).
    let mut args = scene.webhook_args();
    set_arg(&mut args, "--webhook-retry-min", "2s");
    let ferry = scene.start_ferry(&args).await;

    let a = ferry.upload(&random_bytes(40 * KIB, 9), 16 * KIB, &[], &[]).await;
    let b = ferry.create_ok(64, &[], &[]).await;
    assert_eq!(ferry.delete(&b, &[]).await, 204);
    let c = ferry.upload(&random_bytes(5, 10), 5, &[], &[]).await;
    scene.failing(3, 1, "could not reach").await;
    scene.ferries[0].sigkill().await;
    let outbox = scene.outbox().await;
    assert_eq!(outbox.len(), 6, "{outbox:#?}");
    assert!(outbox.iter().all(|e| e.state == "pending"), "{outbox:#?}");

    scene.app.start().await;
    scene.ferries[0].run().await;
    let expected = expect(&[(&a, &[CREATED, COMPLETED]), (&b, &[CREATED, TERMINATED]), (&c, &[CREATED, COMPLETED])]);
    let events = scene.delivered_exactly(&expected, Duration::from_secs(30)).await;
    assert!(events.iter().all(|e| e.deliveries == 1), "{events:#?}");
}

/// Two instances on one PostgreSQL database, clients using both: each event reaches the app
/// exactly once (its per-id delivery count is 1), was attempted once, and was delivered by one
/// instance or the other (their logs name each event once between them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_deliver_each_event_once() {
    let mut scene = Scene::new(Db::Postgres, 4).await;
    scene.app.start().await;
    let args = scene.webhook_args();
    scene.start_ferry(&args).await;
    scene.start_ferry(&args).await;

    let mut entries: Vec<(String, &[&str])> = Vec::new();
    for i in 0..8usize {
        let (first, second) = (&scene.ferries[i % 2], &scene.ferries[(i + 1) % 2]);
        let data = random_bytes(24 * KIB + i, 20 + i as u64);
        let url = first.create_ok(data.len() as u64, &[], &[]).await;
        if i % 3 == 2 {
            second.send(&url, 0, &data[..KIB], KIB, &[]).await;
            assert_eq!(second.delete(&url, &[]).await, 204);
            entries.push((url, &[CREATED, TERMINATED]));
        } else {
            first.send(&url, 0, &data[..12 * KIB], 12 * KIB, &[]).await;
            second.send(&url, 12 * KIB, &data[12 * KIB..], 12 * KIB, &[]).await;
            entries.push((url, &[CREATED, COMPLETED]));
        }
    }
    let entries: Vec<(&str, &[&str])> = entries.iter().map(|(url, kinds)| (url.as_str(), *kinds)).collect();
    let events = scene.delivered_exactly(&expect(&entries), Duration::from_secs(30)).await;
    assert_eq!(events.len(), 16);
    assert!(events.iter().all(|e| e.deliveries == 1), "no duplicates: {events:#?}");
    let outbox = scene.outbox().await;
    assert!(outbox.iter().all(|e| e.attempts == 1), "each event attempted once: {outbox:#?}");

    let logs: Vec<String> = scene.ferries.iter().map(|f| std::fs::read_to_string(&f.log).unwrap_or_default()).collect();
    let mut by_instance = Vec::new();
    for event in &events {
        let senders: usize = logs
            .iter()
            .map(|log| log.lines().filter(|l| l.contains("webhook delivered") && l.contains(&event.webhook_id)).count())
            .sum();
        assert_eq!(senders, 1, "{} delivered by exactly one instance, once", event.webhook_id);
    }
    for (ferry, log) in scene.ferries.iter().zip(&logs) {
        by_instance.push(format!("{}: {}", ferry.name, log.matches("webhook delivered").count()));
    }
    eprintln!("deliveries by instance: {}", by_instance.join(", "));
}

/// The pre-create hook allows a logged-in user (session cookie, or the app's upload token passed
/// on in `Authorization`): the owner and metadata it adds land in the events. It denies with its
/// status and message, which reach the tus client: 401 without a login or with a bad cookie or
/// token, 413 over the user's limit. Denied requests create nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_create_allows_and_denies() {
    let mut scene = Scene::new(Db::Sqlite, 2).await;
    scene.app.start().await;
    let mut args = scene.webhook_args();
    args.extend(["--pre-create-url".into(), scene.app.pre_create_url()]);
    scene.start_ferry(&args).await;
    let alice = scene.app.login("alice").await;
    let bob = scene.app.login("bob").await;
    let (bob_token, bob_max) = scene.app.upload_token(&bob).await;
    assert_eq!(bob_max, BOB_MAX);
    let bob_bearer = format!("Bearer {bob_token}");
    let ferry = &scene.ferries[0];

    let alice_data = random_bytes(200 * KIB, 11);
    let alice_url = ferry.create_ok(alice_data.len() as u64, &[("filename", "notes.txt")], &[("cookie", &alice)]).await;
    ferry.send(&alice_url, 0, &alice_data, 100 * KIB, &[]).await;
    let bob_data = random_bytes(1000, 12);
    let bob_url = ferry.upload(&bob_data, 1000, &[("filename", "bob.txt")], &[("authorization", &bob_bearer)]).await;

    let denials: [(&str, u64, Headers, u16, &str); 5] = [
        ("no login", 100, vec![], 401, "log in to upload"),
        ("a forged cookie", 100, vec![("cookie", "session=forged.cookie.value")], 401, "invalid or has expired"),
        ("a bad token", 100, vec![("authorization", "Bearer not.a.token")], 401, "invalid or has expired"),
        ("bob over his limit (cookie)", 2 * MIB, vec![("cookie", &bob)], 413, "bob may upload at most 1048576"),
        ("bob over his limit (token)", BOB_MAX + 1, vec![("authorization", &bob_bearer)], 413, "may upload at most"),
    ];
    for (what, length, extra, status, message) in denials {
        let response = ferry.create(Some(length), &[], &extra).await;
        let got = response.status().as_u16();
        let location = response.headers().get("location").cloned();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(got, status, "{what}: {body}");
        assert!(body.contains(message), "{what}: the app's message must reach the client, got {body:?}");
        assert!(location.is_none(), "{what}: nothing created, yet a Location: {location:?}");
    }
    assert_eq!(scene.upload_count().await, 2, "denied requests create nothing");

    let expected = expect(&[(&alice_url, &[CREATED, COMPLETED]), (&bob_url, &[CREATED, COMPLETED])]);
    scene.delivered_exactly(&expected, Duration::from_secs(20)).await;
    for (url, user, filename) in [(&alice_url, "alice", "notes.txt"), (&bob_url, "bob", "bob.txt")] {
        let payload = scene.app.completed_payload(url).await;
        assert_eq!(payload["data"]["owner"], user, "the hook's owner: {payload:#}");
        assert_eq!(payload["data"]["metadata"]["uploaded_by"], user, "the hook's metadata: {payload:#}");
        assert_eq!(payload["data"]["metadata"]["filename"], filename, "the client's metadata: {payload:#}");
    }
    assert_eq!(scene.app.run_worker().await, 4);
    let files = scene.app.files().await;
    for (url, user, data) in [(&alice_url, "alice", &alice_data), (&bob_url, "bob", &bob_data)] {
        let file = files.iter().find(|f| f.upload_id == upload_id(url)).expect("a file record");
        assert_eq!(file.owner.as_deref(), Some(user), "{file:?}");
        assert_eq!((file.status.as_str(), file.sha256.clone()), ("completed", Some(sha256_hex(data))), "{file:?}");
    }
}

/// The pre-create hook cannot answer in time (`--pre-create-timeout 1s`; the app's only sync
/// worker is asleep for 3 s in a webhook request): the client gets 503 at once and nothing is
/// created. The same with the app stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_create_timeout_creates_nothing() {
    let mut scene = Scene::new(Db::Sqlite, 1).await;
    scene.app.start().await;
    let mut args = scene.webhook_args();
    args.extend(["--pre-create-url".into(), scene.app.pre_create_url(), "--pre-create-timeout".into(), "1s".into()]);
    scene.start_ferry(&args).await;
    let alice = scene.app.login("alice").await;
    let cookie = [("cookie", alice.as_str())];

    // The upload's creation is approved at once; its upload.created then keeps the worker busy.
    scene.app.set_behaviour(json!({"sleep": 3, "count": 1})).await;
    let a = scene.ferries[0].create_ok(100, &[], &cookie).await;
    until("the webhook request to put the worker to sleep", Duration::from_secs(10), || async {
        match scene.app.behaviour_remaining().await {
            Some(0) => Ok(()),
            other => Err(format!("remaining: {other:?}")),
        }
    })
    .await;

    let started = Instant::now();
    let response = scene.ferries[0].create(Some(100), &[], &cookie).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let location = response.headers().get("location").cloned();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 503, "a hook slower than --pre-create-timeout: {body}");
    assert!(body.contains("did not answer") && body.contains("nothing was created"), "the message: {body:?}");
    assert!(location.is_none(), "{location:?}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2900),
        "answered after {elapsed:?}"
    );

    // Once the worker is free again, the slow hook request is answered (to nobody): still
    // nothing created, and the only events are the first upload's.
    scene.delivered_exactly(&expect(&[(&a, &[CREATED])]), Duration::from_secs(20)).await;
    assert_eq!(scene.upload_count().await, 1);

    scene.app.stop().await;
    let started = Instant::now();
    let response = scene.ferries[0].create(Some(100), &[], &cookie).await;
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 503, "the hook's app is down: {body}");
    assert!(started.elapsed() < Duration::from_secs(1), "no waiting for an app that is down: {:?}", started.elapsed());
    assert_eq!(scene.upload_count().await, 1);
    let created = scene.outbox().await.iter().filter(|e| e.kind == CREATED).count();
    assert_eq!(created, 1, "one upload.created in ferry's outbox");
}

/// Upload tokens from the app's `POST /upload-token` (HS256, `--token-secret`): a logged-in
/// user's token works end to end, and the upload's owner is the token's subject. Missing, forged
/// and expired tokens get 401, a length over the token's limit 413, and another user's token
/// 404 on every request for the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_tokens() {
    let mut scene = Scene::new(Db::Sqlite, 2).await;
    scene.app.start().await;
    let mut args = scene.webhook_args();
    args.extend(["--token-secret".into(), TOKEN_SECRET.into()]);
    scene.start_ferry(&args).await;
    let ferry = &scene.ferries[0];

    let anonymous = scene.app.http.post(format!("{}/upload-token", scene.app.base)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "the app issues tokens to logged-in users only");
    let alice_cookie = scene.app.login("alice").await;
    let bob_cookie = scene.app.login("bob").await;
    let (alice_token, alice_max) = scene.app.upload_token(&alice_cookie).await;
    assert_eq!(alice_max, 1024 * MIB);
    let (bob_token, _) = scene.app.upload_token(&bob_cookie).await;
    let alice = format!("Bearer {alice_token}");
    let bob = format!("Bearer {bob_token}");
    let as_alice = [("authorization", alice.as_str())];
    let as_bob = [("authorization", bob.as_str())];

    let data = random_bytes(150 * KIB, 13);
    let url = ferry.upload(&data, 50 * KIB, &[("filename", "alice.bin")], &as_alice).await;
    assert_eq!(ferry.head(&url, &as_alice).await, 200);
    let download = ferry.http.get(ferry.at(&url)).header("authorization", &alice).send().await.unwrap();
    assert_eq!(download.status(), 200, "alice downloads her file");
    assert_eq!(download.bytes().await.unwrap().as_ref(), data.as_slice());

    // Missing, forged, expired: 401.
    let later = unix_now() + 600;
    let forged =
        format!("Bearer {}", jwt("not-the-app-secret", json!({"sub": "alice", "exp": later, "max_size": MIB})));
    let expired = format!("Bearer {}", jwt(TOKEN_SECRET, json!({"sub": "alice", "exp": unix_now() - 120})));
    let refused: [(&str, Headers, &str); 3] = [
        ("no token", vec![], "token is required"),
        ("a forged token", vec![("authorization", &forged)], "signature is invalid"),
        ("an expired token", vec![("authorization", &expired)], "expired"),
    ];
    for (what, extra, message) in &refused {
        let response = ferry.create(Some(100), &[], extra).await;
        let status = response.status().as_u16();
        let challenge = response.headers().get("www-authenticate").cloned();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, 401, "create with {what}: {body}");
        assert!(body.contains(message), "create with {what}: {body:?}");
        assert_eq!(challenge.as_ref().and_then(|v| v.to_str().ok()), Some("Bearer"), "create with {what}");
        assert_eq!(ferry.head(&url, extra).await, 401, "HEAD with {what}");
        let response = ferry.patch(&url, data.len() as u64, b"x", extra).await;
        assert_eq!(response.status(), 401, "PATCH with {what}");
        assert_eq!(ferry.delete(&url, extra).await, 401, "DELETE with {what}");
    }

    // Over the token's limit: 413.
    let response = ferry.create(Some(BOB_MAX + 1), &[], &as_bob).await;
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 413, "bob's token allows {BOB_MAX} bytes: {body}");
    let bobs = ferry.upload(&random_bytes(BOB_MAX as usize, 14), 512 * KIB, &[], &as_bob).await;

    // Another user's upload: 404 for every request.
    assert_eq!(ferry.head(&url, &as_bob).await, 404, "HEAD of alice's upload with bob's token");
    assert_eq!(ferry.patch(&url, data.len() as u64, b"x", &as_bob).await.status(), 404, "PATCH");
    let download = ferry.http.get(ferry.at(&url)).header("authorization", &bob).send().await.unwrap();
    assert_eq!(download.status(), 404, "GET of alice's upload with bob's token");
    assert_eq!(ferry.delete(&url, &as_bob).await, 404, "DELETE of alice's upload with bob's token");
    assert_eq!(ferry.head(&bobs, &as_alice).await, 404, "HEAD of bob's upload with alice's token");
    assert_eq!(ferry.head(&url, &as_alice).await, 200, "alice's upload is still there");
    assert_eq!(scene.upload_count().await, 2, "refused requests create nothing");

    let expected = expect(&[(&url, &[CREATED, COMPLETED]), (&bobs, &[CREATED, COMPLETED])]);
    scene.delivered_exactly(&expected, Duration::from_secs(20)).await;
    for (upload, user) in [(&url, "alice"), (&bobs, "bob")] {
        let payload = scene.app.completed_payload(upload).await;
        assert_eq!(payload["data"]["owner"], user, "the token's subject owns the upload: {payload:#}");
    }

    // The app's download route sends the file's owner to a fresh signed link from ferry, which
    // opens without a token and has none in it; another user gets 404.
    assert!(scene.app.run_worker().await >= 4, "the worker recorded the completed files");
    let download_route = format!("{}/files/{}/download", scene.app.base, upload_id(&url));
    let to_ferry = scene.app.http.get(&download_route).header("cookie", &alice_cookie).send().await.unwrap();
    assert_eq!(to_ferry.status(), 303, "GET {download_route} as alice");
    let link = header(&to_ferry, "location");
    assert!(link.contains("?expires=") && link.contains("&signature="), "a signed link: {link}");
    assert!(!link.contains(&alice_token) && !link.contains("token"), "no token in {link}");
    let download = ferry.http.get(&link).send().await.unwrap();
    assert_eq!(download.status(), 200, "GET {link} without a token");
    assert_eq!(download.bytes().await.unwrap().as_ref(), data.as_slice());
    let as_bob = scene.app.http.get(&download_route).header("cookie", &bob_cookie).send().await.unwrap();
    assert_eq!(as_bob.status(), 404, "bob may not download alice's file");
}

/// A size limit given at creation holds for an upload created with a deferred length: the
/// pre-create hook's `max_size` (the app says "ferry enforces max_size later") and the token's
/// `max_size`. Declaring a larger length, or sending more bytes without declaring one, is 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_hold_for_deferred_lengths() {
    let mut scene = Scene::new(Db::Sqlite, 2).await;
    scene.app.start().await;
    // Instance a asks the pre-create hook; instance b checks tokens (and asks no hook).
    // (The app refuses pre-create calls that ferry did not sign with the webhook secret.)
    let hook = ["--pre-create-url", &scene.app.pre_create_url(), "--webhook-secret", WEBHOOK_SECRET].map(String::from);
    scene.start_ferry(&hook).await;
    scene.start_ferry(&["--token-secret".to_string(), TOKEN_SECRET.to_string()]).await;
    let bob = scene.app.login("bob").await;
    let (bob_token, _) = scene.app.upload_token(&bob).await;
    let bearer = format!("Bearer {bob_token}");
    let too_much = random_bytes(BOB_MAX as usize + KIB, 15);

    let cases: [(&str, usize, Headers); 2] = [
        ("the hook's max_size", 0, vec![("cookie", &bob)]),
        ("the token's max_size", 1, vec![("authorization", &bearer)]),
    ];
    let mut problems = Vec::new();
    for (what, instance, extra) in &cases {
        let ferry = &scene.ferries[*instance];
        let deferred = || async {
            let response = ferry.create(None, &[], extra).await;
            assert_eq!(response.status(), 201, "{what}: a deferred length is allowed");
            header(&response, "location")
        };
        // Declaring a length over the limit.
        let url = deferred().await;
        let response = ferry
            .tus(Method::PATCH, &ferry.at(&url), extra)
            .header("Upload-Offset", "0")
            .header("Upload-Length", (BOB_MAX + 1).to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .body(Vec::new())
            .send()
            .await
            .unwrap();
        if response.status() != 413 {
            let status = response.status();
            let offset = response.headers().get("upload-offset").cloned();
            problems.push(format!(
                "{what}: a PATCH declaring Upload-Length {} got {status} (Upload-Offset {offset:?}); HEAD then \
                 says Upload-Length {:?}",
                BOB_MAX + 1,
                ferry.tus(Method::HEAD, &ferry.at(&url), extra).send().await.unwrap().headers().get("upload-length")
            ));
        }
        // Sending more bytes than the limit without declaring a length.
        let url = deferred().await;
        let response = ferry.patch(&url, 0, &too_much, extra).await;
        if response.status() != 413 {
            problems.push(format!(
                "{what}: a PATCH of {} bytes (no Upload-Length) got {} (Upload-Offset {:?})",
                too_much.len(),
                response.status(),
                response.headers().get("upload-offset")
            ));
        }
    }
    assert!(problems.is_empty(), "limits not enforced:\n{}", problems.join("\n"));
}

/// The example app's own tests (pytest, `examples/python/test_app.py`), so that the suite keeps
/// them true: webhook verification, the worker, the pre-create hook, tokens and downloads.
#[tokio::test]
async fn the_example_apps_own_tests_pass() {
    let output = tokio::process::Command::new(python())
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .current_dir(example_dir())
        .output()
        .await
        .expect("run pytest");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "pytest in examples/python failed:\n{report}");
    assert!(report.contains(" passed"), "pytest ran no tests:\n{report}");
}
