//! ferry's own dependencies failing: the store's volume filling up (a small tmpfs the test
//! mounts; it needs root, and says so and skips where mounting is impossible) and the database
//! going away (a private PostgreSQL the test starts with Debian's `initdb`/`pg_ctl`, stops, and
//! kills with SIGKILL). The answers are clear (507, 503, with `Retry-After`), offsets stay
//! honest, and ferry recovers by itself.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ferry::config::MinFreeSpace;
use reqwest::Method;

use crate::{
    helpers::{Backend, TestApp, header, random_bytes, serve_args, wait_for},
    webhooks::{Receiver, SECRET},
};

const MIB: usize = 1 << 20;

// ------------------------------------------------------------------------------ disk full

/// A tmpfs of `size` mounted on a temporary folder, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// None, with the reason printed, where mounting is impossible (not root, no mount(8)).
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(status) if status.success() => Some(Self { dir }),
            other => {
                eprintln!("SKIPPED: mounting a tmpfs needs root and mount(8) ({other:?}); this test did not run");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// ferry with its SQLite database and its store both on `volume`.
async fn app_on(volume: &Path, min_free: MinFreeSpace) -> TestApp {
    let db_url = format!("sqlite://{}", volume.join("ferry.db").display());
    let mut args = serve_args(volume, &db_url);
    args.min_free_space = min_free;
    TestApp::start(Backend::Sqlite, tempfile::tempdir().unwrap(), db_url, args).await
}

/// PATCHes `data` from `offset` in `chunk`-sized requests until one is refused; that answer.
async fn patch_until_refused(app: &TestApp, url: &str, data: &[u8], chunk: usize) -> reqwest::Response {
    let mut offset = 0;
    loop {
        assert!(offset < data.len(), "every chunk was taken: the volume never filled");
        let end = (offset + chunk).min(data.len());
        let response = app.patch(url, offset as u64, data[offset..end].to_vec()).await;
        if response.status() != 204 {
            return response;
        }
        offset = end;
    }
}

/// PATCHes the rest of `data` from `offset` in `chunk`-sized requests, each answered 204.
async fn patch_rest(app: &TestApp, url: &str, data: &[u8], mut offset: usize, chunk: usize) {
    while offset < data.len() {
        let end = (offset + chunk).min(data.len());
        let response = app.patch(url, offset as u64, data[offset..end].to_vec()).await;
        assert_eq!(response.status(), 204, "PATCH at {offset}");
        offset = end;
    }
}

async fn offset_of(app: &TestApp, url: &str) -> usize {
    let head = app.head(url).await;
    assert_eq!(head.status(), 200, "HEAD {url}");
    header(&head, "upload-offset").parse().unwrap()
}

async fn readyz(app: &TestApp) -> (u16, String) {
    let response = app.client.get(format!("{}/readyz", app.base)).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The offset HEAD reports is backed by the bytes on disk, which are the file's.
fn assert_honest(app: &TestApp, url: &str, offset: usize, data: &[u8]) {
    let stored = app.stored_bytes(url);
    assert!(stored.len() >= offset, "{} bytes on disk under an offset of {offset}", stored.len());
    assert!(stored[..offset] == data[..offset], "the bytes under the offset are the file's");
}

/// The data folder (SQLite and the store together) on a 24 MiB tmpfs with a 4 MiB reserve: a
/// 40 MiB upload is refused with 507 once the reserve is reached, keeping what arrived; HEAD,
/// a creation without a body, DELETE and `/readyz` (which says why) all work on the full
/// volume, and once the DELETE freed the space a new upload completes, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_refuses_bodies_and_recovers_after_a_delete() {
    let Some(volume) = Tmpfs::mount("24m") else { return };
    let app = app_on(volume.path(), MinFreeSpace::Bytes(4 << 20)).await;
    let data = random_bytes(40 * MIB, 131);
    let url = app.create(data.len() as u64).await;

    let refused = patch_until_refused(&app, &url, &data, 3 * MIB).await;
    assert_eq!(refused.status(), 507, "the PATCH that reaches the reserve");
    assert_eq!(header(&refused, "retry-after"), "60");
    let message = refused.text().await.unwrap();
    assert!(message.contains("--min-free-space"), "the message says why: {message}");

    let offset = offset_of(&app, &url).await;
    assert!(offset > 0 && offset < 24 * MIB, "what arrived before the reserve was reached is kept: {offset}");
    assert_honest(&app, &url, offset, &data);
    // A further body is refused before it is read, and changes nothing.
    let again = app.patch(&url, offset as u64, data[offset..offset + MIB].to_vec()).await;
    assert_eq!(again.status(), 507);
    assert_eq!(offset_of(&app, &url).await, offset);

    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "readyz on a full volume: {body}");
    assert!(body.contains("store below --min-free-space"), "readyz says why: {body}");
    let metrics = app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("ferry_store_free_bytes "), "free bytes are a metric");
    let healthz = app.client.get(format!("{}/healthz", app.base)).send().await.unwrap();
    assert_eq!(healthz.status(), 200, "the process itself is fine");

    // Creating without a body still works (the reserve keeps room for the database).
    let other = app.create(5).await;
    let ietf = app
        .client
        .post(&app.files)
        .header("Upload-Complete", "?0")
        .header("Upload-Draft-Interop-Version", "9")
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(ietf.status(), 201, "an IETF creation without content on a full volume");

    // DELETE frees the space, and ferry is ready again by itself.
    let deleted = app.tus(Method::DELETE, &url).send().await.unwrap();
    assert_eq!(deleted.status(), 204, "DELETE on a full volume");
    wait_for("readyz after the DELETE", Duration::from_secs(10), || async { readyz(&app).await.0 == 200 }).await;
    let fresh = random_bytes(8 * MIB + 3, 132);
    let url = app.create(fresh.len() as u64).await;
    patch_rest(&app, &url, &fresh, 0, 3 * MIB).await;
    assert_eq!(app.download(&url).await, fresh);
    assert_eq!(app.tus(Method::DELETE, &other).send().await.unwrap().status(), 204);
}

/// With no reserve (`--min-free-space 0`) the volume really fills: the write that meets ENOSPC
/// is answered 507, not 500, and the offset stays honest (nothing past what is durable). Once
/// space is freed by hand, the same upload resumes from HEAD's offset and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_meets_enospc_gets_507_and_the_upload_resumes() {
    let Some(volume) = Tmpfs::mount("24m") else { return };
    let app = app_on(volume.path(), MinFreeSpace::Bytes(0)).await;
    // Leave about 10 MiB for the upload (the database and its WAL take some).
    let filler = volume.path().join("filler");
    std::fs::write(&filler, vec![0u8; 13 * MIB]).expect("the filler file");
    let data = random_bytes(16 * MIB, 133);
    let url = app.create(data.len() as u64).await;

    let refused = patch_until_refused(&app, &url, &data, 2 * MIB).await;
    assert_eq!(refused.status(), 507, "the write that fills the volume");
    assert!(refused.headers().contains_key("retry-after"));
    let message = refused.text().await.unwrap();
    assert!(message.contains("full"), "the message says the disk is full: {message}");
    let offset = offset_of(&app, &url).await;
    assert_honest(&app, &url, offset, &data);

    std::fs::remove_file(&filler).unwrap();
    patch_rest(&app, &url, &data, offset_of(&app, &url).await, 2 * MIB).await;
    assert_eq!(app.download(&url).await, data);
}

/// Writes zeros to `path` until the volume is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("a filler file");
    let block = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = file.write_all(&block).and_then(|()| file.sync_all()) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling {}: {e}", path.display());
            return;
        }
    }
}

/// Something other than ferry fills the volume to the last byte, past `--min-free-space`, and
/// SQLite's WAL has no room left either: DELETE still works, because ferry releases its emergency
/// ballast to record the termination, then frees the upload's bytes (so HEAD never reports bytes
/// that are gone). Once there is room again, the ballast is made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_on_a_volume_full_to_the_last_byte_frees_the_bytes() {
    let Some(volume) = Tmpfs::mount("24m") else { return };
    let db_url = format!("sqlite://{}", volume.path().join("ferry.db").display());
    let mut args = serve_args(volume.path(), &db_url);
    args.min_free_space = MinFreeSpace::Bytes(0);
    args.emergency_ballast = ferry::config::BallastSize::Auto;
    args.sweep_interval = Duration::from_millis(500);
    let mut app = TestApp::start(Backend::Sqlite, tempfile::tempdir().unwrap(), db_url, args).await;
    let ballast = volume.path().join("EMERGENCY_BALLAST");
    let ballast_size = std::fs::metadata(&ballast).expect("the ballast is made at start").len();
    assert_eq!(ballast_size, (24 * MIB as u64) / 100, "1% of the volume");
    let data = random_bytes(6 * MIB, 134);
    let url = app.create(data.len() as u64).await;
    patch_rest(&app, &url, &data[..4 * MIB], 0, 2 * MIB).await;

    // SQLite's WAL truncated, so that any write needs new blocks, then the volume full to the
    // last byte.
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&app.db_url).await.unwrap();
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut conn).await.unwrap();
    }
    fill(&volume.path().join("filler-1"));
    fill(&volume.path().join("filler-2"));
    assert_eq!(app.patch(&url, 4 * MIB as u64, data[4 * MIB..].to_vec()).await.status(), 507, "no room for bytes");

    let deleted = app.tus(Method::DELETE, &url).send().await.unwrap();
    assert_eq!(deleted.status(), 204, "DELETE on a full volume: {}", deleted.text().await.unwrap_or_default());
    assert_eq!(app.head(&url).await.status(), 410, "the termination is recorded");
    let upload_id = url.rsplit('/').next().unwrap().to_string();
    wait_for("the upload's bytes deleted", Duration::from_secs(10), || {
        let stored = app.stored_files();
        let id = upload_id.clone();
        async move { !stored.iter().any(|f| f.contains(&id)) }
    })
    .await;

    // Room again: the sweeper makes the ballast again, and uploads work.
    for filler in ["filler-1", "filler-2"] {
        std::fs::remove_file(volume.path().join(filler)).unwrap();
    }
    wait_for("the ballast made again", Duration::from_secs(30), || async {
        std::fs::metadata(&ballast).is_ok_and(|m| m.len() == ballast_size)
    })
    .await;
    let fresh = app.upload(&data, 2 * MIB).await;
    assert_eq!(app.download(&fresh).await, data);
    app.stop().await.unwrap();
}

// ------------------------------------------------------------------- database unavailable

/// A PostgreSQL of the test's own, run as the `postgres` user from Debian's binaries, on a free
/// port with its data in a temporary folder.
struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    /// None, with the reason printed, where there is no Debian PostgreSQL or no root.
    fn init() -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.filter_map(|v| v.ok()).map(|v| v.path().join("bin")).max())
            .filter(|bin| bin.join("initdb").exists());
        let Some(bin) = bin else {
            eprintln!("SKIPPED: no /usr/lib/postgresql/*/bin/initdb (Debian's postgresql package)");
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let chown = Command::new("chown").arg("postgres:").arg(dir.path()).status();
        if !matches!(chown, Ok(s) if s.success()) {
            eprintln!("SKIPPED: the private PostgreSQL runs as the postgres user, which needs root ({chown:?})");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = Self { bin, dir, port };
        pg.run("initdb", &["-D", &pg.data(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        pg.start();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start(&self) {
        assert!(self.try_start(), "PostgreSQL did not start; its log: {}", self.log());
    }

    /// Starts the server; false when it would not (say, a killed one's backends are still there).
    fn try_start(&self) -> bool {
        let options =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("postgres.log").display().to_string();
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-l", &log, "-o", &options, "-w", "-t", "30", "start"])
            .output()
            .is_ok_and(|output| output.status.success())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    /// SIGKILL to the postmaster (its backends notice and exit on their own).
    fn kill(&self) {
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file).unwrap().lines().next().unwrap().trim().to_string();
        assert!(Command::new("kill").args(["-9", &pid]).status().unwrap().success());
    }

    /// Starts the server again, waiting for what a kill left behind to go.
    async fn restart(&self) {
        wait_for("PostgreSQL to start again", Duration::from_secs(60), || async { self.try_start() }).await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

/// Checks that a request answers 503 with Retry-After, and soon (a liveness bound, far above
/// the 2 s `--database-timeout`; not a speed target).
async fn assert_unavailable(what: &str, request: reqwest::RequestBuilder) {
    let started = Instant::now();
    let response = request.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 503, "{what} while the database is down");
    assert!(response.headers().contains_key("retry-after"), "{what}: Retry-After");
    assert!(elapsed < Duration::from_secs(8), "{what} answered after {elapsed:?}");
    let body = response.text().await.unwrap();
    assert!(what == "HEAD" || body.contains("database"), "{what}: the message names the database: {body}");
}

/// PostgreSQL goes away mid-upload, stopped or (`kill`) killed with SIGKILL: PATCH,
/// HEAD and POST answer 503 with Retry-After within the timeout, `/readyz` answers 503 within
/// a second and `/healthz` 200. Started again, the upload resumes, completes byte-exact, and its
/// `upload.completed` arrives once.
async fn database_goes_away(kill: bool) {
    let Some(pg) = PrivatePostgres::init() else { return };
    let (receiver, hook) = Receiver::start(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = serve_args(dir.path(), &pg.url());
    args.database.database_timeout = Duration::from_secs(2);
    args.webhook_url = Some(hook);
    args.webhook_secret = vec![ferry::hooks::Secret::parse(SECRET).unwrap()];
    args.webhook_retry_min = Duration::from_millis(100);
    let app = TestApp::start(Backend::Postgres, dir, pg.url(), args).await;
    let data = random_bytes(3 * MIB + 17, 140);
    let url = app.create(data.len() as u64).await;
    assert_eq!(app.patch(&url, 0, data[..MIB].to_vec()).await.status(), 204);

    if kill {
        pg.kill();
    } else {
        pg.stop();
    }
    let patch = app
        .tus(Method::PATCH, &url)
        .header("Upload-Offset", MIB.to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .body(data[MIB..2 * MIB].to_vec());
    assert_unavailable("PATCH", patch).await;
    assert_unavailable("HEAD", app.tus(Method::HEAD, &url)).await;
    assert_unavailable("POST", app.tus(Method::POST, &app.files).header("Upload-Length", "10")).await;
    let started = Instant::now();
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "readyz: {body}");
    assert!(body.contains("database"), "readyz names the database: {body}");
    assert!(started.elapsed() < Duration::from_millis(1500), "readyz took {:?}", started.elapsed());
    let healthz = app.client.get(format!("{}/healthz", app.base)).send().await.unwrap();
    assert_eq!(healthz.status(), 200);

    pg.restart().await;
    wait_for("readyz once PostgreSQL is back", Duration::from_secs(30), || async { readyz(&app).await.0 == 200 }).await;
    let offset = offset_of(&app, &url).await;
    // A clean stop keeps every commit; a SIGKILL may lose the last ones, which ferry commits
    // without waiting for the WAL flush: the offset may lag the bytes, never lead them.
    assert!(kill || offset >= MIB, "the committed offset survived a clean stop: {offset}");
    assert_honest(&app, &url, offset, &data);
    patch_rest(&app, &url, &data, offset, MIB).await;
    assert_eq!(app.download(&url).await, data);
    let completed = || receiver.all().into_iter().filter(|d| d.kind() == "upload.completed").count();
    wait_for("upload.completed", Duration::from_secs(30), || async { completed() >= 1 }).await;
    // Give a duplicate the time of several delivery rounds to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(completed(), 1, "upload.completed arrives once");
}

/// A PostgreSQL killed with SIGKILL loses the leases it had not flushed yet (ferry commits
/// them without waiting for the WAL), and hands their writer generations out again, lower than
/// what the local store's lock file recorded. The database is the truth of who the newest writer
/// is: the upload goes on, and a genuinely newer writer is still fenced off (tests/api/pipeline.rs).
async fn a_database_that_lost_leases_does_not_lock_the_upload_out(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(2 * MIB + 3, 141);
    let url = app.create(data.len() as u64).await;
    assert_eq!(app.patch(&url, 0, data[..MIB].to_vec()).await.status(), 204);
    // As after the loss: the lock file names a generation the database never handed out.
    let id = url.rsplit('/').next().unwrap();
    let lock = app.store_dir.join("uploads").join(format!("{id}.lock"));
    let recorded = i64::from_le_bytes(std::fs::read(&lock).expect("the lock file")[..8].try_into().unwrap());
    std::fs::write(&lock, (recorded + 100).to_le_bytes()).unwrap();
    let response = app.patch(&url, MIB as u64, data[MIB..].to_vec()).await;
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap_or_default());
    assert_eq!(app.download(&url).await, data);
}

crate::db_backend_tests!(a_database_that_lost_leases_does_not_lock_the_upload_out);

/// The connection a PATCH's statements ran on is ended by the server (`pg_terminate_backend`,
/// as when PostgreSQL is restarted or an operator cuts sessions): the next PATCH may meet that
/// and answer 503, but the connection is not used again, so the PATCH after it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_database_ended_is_not_used_again() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let data = random_bytes(3 * MIB, 142);
    let url = app.create(data.len() as u64).await;
    assert_eq!(app.patch(&url, 0, data[..MIB].to_vec()).await.status(), 204);
    // The backends whose last statement was a PATCH's commit: the connections of PATCHes.
    let admin = sqlx::PgPool::connect(&app.db_url).await.unwrap();
    let of_patches = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
                      AND query LIKE 'UPDATE uploads SET upload_offset%'";
    let ended: Vec<bool> =
        sqlx::query_scalar(&format!("SELECT pg_terminate_backend(pid) {of_patches}")).fetch_all(&admin).await.unwrap();
    assert_eq!(ended, [true], "one connection ran the PATCH's statements");
    let gone = || async {
        let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) {of_patches}")).fetch_one(&admin).await.unwrap();
        left == 0
    };
    wait_for("the backend to end", Duration::from_secs(10), gone).await;

    let first = app.patch(&url, MIB as u64, data[MIB..2 * MIB].to_vec()).await;
    let status = first.status();
    assert!(status == 204 || status == 503, "{status}: {}", first.text().await.unwrap_or_default());
    let offset = offset_of(&app, &url).await;
    let second = app.patch(&url, offset as u64, data[offset..2 * MIB].to_vec()).await;
    assert_eq!(second.status(), 204, "{}", second.text().await.unwrap_or_default());
    assert_eq!(app.patch(&url, 2 * MIB as u64, data[2 * MIB..].to_vec()).await.status(), 204);
    assert_eq!(app.download(&url).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_upload() {
    database_goes_away(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_mid_upload() {
    database_goes_away(true).await;
}

// ---------------------------------------------------------------------- store misbehaving

/// What the fault proxy does to one call instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// `503 SlowDown`, S3's throttling answer.
    SlowDown,
    /// `500 InternalError`.
    ServerError,
    /// No answer: the call times out (`--store-timeout`).
    Stall,
    /// The connection is closed without an answer.
    Reset,
    /// The call reaches the store and is carried out, but its answer is lost (the connection is
    /// closed instead).
    LoseAnswer,
}

/// The store calls faults are queued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `PUT ...?partNumber=`: a part upload.
    PartPut,
    /// `POST ...?uploadId=`: CompleteMultipartUpload.
    Complete,
    /// `GET` of an object (not a listing).
    Get,
    /// `DELETE` of an object or of a multipart upload, or `POST ?delete` (DeleteObjects, which
    /// object_store deletes with).
    Delete,
}

impl Call {
    fn of(method: &hyper::Method, path: &str, query: &str) -> Option<Self> {
        let object = path.trim_start_matches('/').contains('/');
        match *method {
            hyper::Method::PUT if query.contains("partNumber=") => Some(Self::PartPut),
            hyper::Method::POST if query.contains("uploadId=") => Some(Self::Complete),
            hyper::Method::POST if query.split('&').any(|p| p == "delete" || p == "delete=") => Some(Self::Delete),
            hyper::Method::GET if object && !query.contains("uploadId=") => Some(Self::Get),
            hyper::Method::DELETE if object => Some(Self::Delete),
            _ => None,
        }
    }
}

type Faults = std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<(Call, Fault)>>>;

/// An HTTP proxy between ferry and the S3 API that forwards every call, except that the calls
/// faults are queued for take them, one each, first (in the order queued, per kind of call).
struct FaultProxy {
    url: String,
    faults: Faults,
}

impl FaultProxy {
    async fn start(upstream: String) -> Self {
        use hyper::{server::conn::http1, service::service_fn};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let faults = Faults::default();
        let client = reqwest::Client::new();
        let queue = faults.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let (client, queue, upstream) = (client.clone(), queue.clone(), upstream.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request| forward(client.clone(), queue.clone(), upstream.clone(), request));
                    let _ = http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(socket), service).await;
                });
            }
        });
        Self { url, faults }
    }

    fn queue(&self, call: Call, faults: &[Fault]) {
        self.faults.lock().unwrap().extend(faults.iter().map(|fault| (call, *fault)));
    }

    fn left(&self) -> usize {
        self.faults.lock().unwrap().len()
    }

    fn clear(&self) {
        self.faults.lock().unwrap().clear();
    }
}

async fn forward(
    client: reqwest::Client,
    faults: Faults,
    upstream: String,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::io::Error> {
    use http_body_util::BodyExt;
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map_err(std::io::Error::other)?.to_bytes();
    let query = parts.uri.query().unwrap_or_default();
    let fault = Call::of(&parts.method, parts.uri.path(), query).and_then(|call| {
        let mut queued = faults.lock().unwrap();
        let at = queued.iter().position(|(c, _)| *c == call)?;
        queued.remove(at).map(|(_, fault)| fault)
    });
    let answer = |status: u16, code: &str| {
        let xml = format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>injected</Message></Error>");
        Ok(hyper::Response::builder().status(status).body(http_body_util::Full::new(xml.into())).unwrap())
    };
    match fault {
        Some(Fault::SlowDown) => return answer(503, "SlowDown"),
        Some(Fault::ServerError) => return answer(500, "InternalError"),
        Some(Fault::Stall) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return answer(500, "InternalError");
        }
        Some(Fault::Reset) => return Err(std::io::Error::other("injected reset")),
        Some(Fault::LoseAnswer) | None => {}
    }
    let target = format!("{upstream}{}", parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut headers = parts.headers.clone();
    headers.remove(hyper::header::TRANSFER_ENCODING);
    // The Host the request was signed for stays.
    let response =
        client.request(parts.method, target).headers(headers).body(body).send().await.map_err(std::io::Error::other)?;
    let mut builder = hyper::Response::builder().status(response.status().as_u16());
    for (name, value) in response.headers() {
        if name != hyper::header::TRANSFER_ENCODING {
            builder = builder.header(name, value);
        }
    }
    let bytes = response.bytes().await.map_err(std::io::Error::other)?;
    if fault == Some(Fault::LoseAnswer) {
        return Err(std::io::Error::other("injected: the answer is lost"));
    }
    Ok(builder.body(http_body_util::Full::new(bytes)).unwrap())
}

/// ferry on S3 through a fault proxy, with a short per-call timeout and `budget` to retry in.
async fn app_behind(proxy: &FaultProxy, budget: Duration) -> TestApp {
    let url = proxy.url.clone();
    TestApp::spawn_with(Backend::S3, move |args| {
        for (key, value) in &mut args.store_options {
            if key == "aws_endpoint" {
                *value = url.clone();
            }
        }
        args.store_retry_budget = budget;
        args.store_timeout = Duration::from_secs(1);
        args.sweep_interval = Duration::from_secs(1);
        args.orphan_age = Duration::from_secs(2);
    })
    .await
}

/// Part uploads answered `503 SlowDown`, `500`, not at all (a stall) and with a reset are
/// retried within `--store-retry-budget`: the upload completes byte-exact, and nothing else is
/// left in the bucket after the sweeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_faults_are_retried_and_leave_nothing_behind() {
    let proxy = FaultProxy::start(crate::s3api::S3Credentials::from_env().endpoint).await;
    let app = app_behind(&proxy, Duration::from_secs(10)).await;
    proxy.queue(Call::PartPut, &[Fault::SlowDown, Fault::ServerError, Fault::Stall, Fault::Reset, Fault::SlowDown]);
    let data = random_bytes(24 * MIB + 5, 150);
    let url = app.create(data.len() as u64).await;
    patch_rest(&app, &url, &data, 0, 8 * MIB).await;
    assert_eq!(proxy.left(), 0, "every fault was met");
    assert_eq!(app.download(&url).await, data);
    let bucket = app.bucket.as_ref().unwrap();
    let id = url.rsplit('/').next().unwrap().to_string();
    wait_for("only the upload's object in the bucket", Duration::from_secs(30), || async {
        let inventory = bucket.inventory().await;
        inventory.len() == 1 && inventory[0].contains(&format!("uploads/{id}"))
    })
    .await;
}

/// A store that keeps failing past `--store-retry-budget`: the PATCH gets 503 with
/// `Retry-After` and a message, the offset stays honest, and once the store answers again the
/// upload resumes and completes byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failing_past_the_budget_gets_503_and_the_upload_resumes() {
    let proxy = FaultProxy::start(crate::s3api::S3Credentials::from_env().endpoint).await;
    let app = app_behind(&proxy, Duration::from_secs(2)).await;
    let data = random_bytes(16 * MIB, 151);
    let url = app.create(data.len() as u64).await;
    assert_eq!(app.patch(&url, 0, data[..8 * MIB].to_vec()).await.status(), 204);
    proxy.queue(Call::PartPut, &[Fault::SlowDown; 200]);
    let started = Instant::now();
    let response = app.patch(&url, 8 * MIB as u64, data[8 * MIB..].to_vec()).await;
    assert_eq!(response.status(), 503, "a store failing past the budget");
    assert!(response.headers().contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(30), "answered after {:?}", started.elapsed());
    let message = response.text().await.unwrap();
    assert!(message.contains("object store"), "the message names the store: {message}");
    assert_eq!(offset_of(&app, &url).await, 8 * MIB, "the offset did not move");

    proxy.clear();
    assert_eq!(app.patch(&url, 8 * MIB as u64, data[8 * MIB..].to_vec()).await.status(), 204);
    assert_eq!(app.download(&url).await, data);
}

/// Calls that reach the store but whose answers are lost: a part upload (sent again, under the
/// same number) and the CompleteMultipartUpload of the last PATCH (which ferry cannot repeat:
/// the multipart upload is gone; it finds the object there instead). The upload completes once,
/// byte-exact, as one object with no multipart upload left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_of_a_part_and_of_the_completion_change_nothing() {
    let proxy = FaultProxy::start(crate::s3api::S3Credentials::from_env().endpoint).await;
    let (receiver, hook) = Receiver::start(Vec::new()).await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_with(Backend::S3, move |args| {
        for (key, value) in &mut args.store_options {
            if key == "aws_endpoint" {
                *value = url.clone();
            }
        }
        args.store_timeout = Duration::from_secs(1);
        args.webhook_url = Some(hook);
    })
    .await;
    proxy.queue(Call::PartPut, &[Fault::LoseAnswer]);
    proxy.queue(Call::Complete, &[Fault::LoseAnswer]);
    let data = random_bytes(24 * MIB + 9, 152);
    let url = app.create(data.len() as u64).await;
    patch_rest(&app, &url, &data, 0, 8 * MIB).await;
    assert_eq!(proxy.left(), 0, "both answers were lost");
    assert_eq!(offset_of(&app, &url).await, data.len());
    assert_eq!(app.download(&url).await, data);
    let bucket = app.bucket.as_ref().unwrap();
    let inventory = bucket.inventory().await;
    let id = url.rsplit('/').next().unwrap().to_string();
    assert_eq!(inventory.len(), 1, "one object, no multipart upload: {inventory:?}");
    assert!(inventory[0].contains(&format!("uploads/{id} ({})", data.len())), "{inventory:?}");
    wait_for("upload.completed", Duration::from_secs(20), || async {
        receiver.all().iter().any(|d| d.kind() == "upload.completed")
    })
    .await;
    let completed: Vec<_> = receiver.all().into_iter().filter(|d| d.kind() == "upload.completed").collect();
    let ids: std::collections::HashSet<_> = completed.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids.len(), 1, "one completion event: {completed:?}");
}

/// Downloads whose GET is answered `503 SlowDown`, `500` and a reset are retried before any byte
/// is sent, and arrive byte-exact. A deletion the store keeps refusing past the budget does not
/// fail the DELETE (the termination is recorded; the bytes are the sweeper's to free), and the
/// sweeper frees them once the store answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_and_deletions_ride_out_store_faults() {
    let proxy = FaultProxy::start(crate::s3api::S3Credentials::from_env().endpoint).await;
    let app = app_behind(&proxy, Duration::from_secs(2)).await;
    let data = random_bytes(9 * MIB + 1, 153);
    let url = app.create(data.len() as u64).await;
    patch_rest(&app, &url, &data, 0, 8 * MIB).await;

    proxy.queue(Call::Get, &[Fault::SlowDown, Fault::ServerError, Fault::Reset]);
    assert_eq!(app.download(&url).await, data);
    assert_eq!(proxy.left(), 0, "every GET fault was met");
    let ranged = app.client.get(&url).header("Range", "bytes=100-199").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), &data[100..200]);

    proxy.queue(Call::Delete, &[Fault::ServerError; 100]);
    let deleted = app.tus(Method::DELETE, &url).send().await.unwrap();
    assert_eq!(deleted.status(), 204, "DELETE while the store refuses deletions");
    assert_eq!(app.head(&url).await.status(), 410);
    assert!(proxy.left() < 100, "the store was asked");
    let bucket = app.bucket.as_ref().unwrap();
    assert!(!bucket.inventory().await.is_empty(), "the bytes are still there while the store refuses");
    proxy.clear();
    wait_for("the bucket empty after the sweeper", Duration::from_secs(30), || async {
        bucket.inventory().await.is_empty()
    })
    .await;
}
