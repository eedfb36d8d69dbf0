//! The append pipeline (receive beside hash and write, one memory budget per instance) and what
//! it must keep: a cut-off body keeps exactly what was written, a checksum mismatch discards a
//! whole body, a superseded writer writes nothing more, a client that resumes at once loses
//! nothing, a request waiting for memory is not taken for a stalled one, and a PATCH costs two
//! database statements.
//!
//! To hold frames inside the pipeline the tests take the upload's lock file on local disk (as a
//! second writer on another instance would): the write stage then waits with its batch, and what
//! arrives meanwhile queues up to the pipeline's limits and the memory budget.

use std::{
    fs::File,
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::io::AsyncWriteExt;

use crate::db_backend_tests;
use crate::helpers::{
    Backend, TestApp, generation, header, random_bytes, read_answer, sha256_b64, upload_id, wait_for,
};

const MIB: usize = 1 << 20;

/// A metric of the server, read from `/metrics` (0 when absent).
async fn metric(app: &TestApp, name: &str) -> u64 {
    let text = app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn memory_in_use(app: &TestApp) -> u64 {
    metric(app, "ferry_append_memory_in_use_bytes").await
}

/// Holds an upload's lock file (the local store takes it for every write), so that the upload's
/// write stage waits; dropping it lets go.
struct WriteLock(#[allow(dead_code)] File);

impl WriteLock {
    async fn take(app: &TestApp, url: &str) -> Self {
        let path: PathBuf = app.store_dir.join("uploads").join(format!("{}.lock", upload_id(url)));
        let file = tokio::task::spawn_blocking(move || {
            let file = File::options().read(true).write(true).open(&path).expect("the lock file of a started append");
            file.lock().expect("flock");
            file
        })
        .await
        .unwrap();
        Self(file)
    }
}

/// A PATCH sent by hand on a socket of its own, so the test decides when bytes go and when the
/// connection ends.
struct RawPatch {
    stream: tokio::net::TcpStream,
}

impl RawPatch {
    async fn start(app: &TestApp, url: &str, offset: u64, content_length: usize, extra: &str) -> Self {
        let path = url.strip_prefix(&app.base).unwrap();
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "PATCH {path} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n\
             Content-Type: application/offset+octet-stream\r\n{extra}Content-Length: {content_length}\r\n\r\n",
            app.addr
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        Self { stream }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Reads the answer's status line (the server answers once it is done with the request).
    async fn status(mut self) -> u16 {
        read_answer(&mut self.stream, Duration::from_secs(30))
            .await
            .expect("connection closed without an answer")
            .status
    }
}

async fn wait_stored(app: &TestApp, url: &str, at_least: usize) {
    wait_for(&format!("{at_least} bytes to be written"), Duration::from_secs(20), || async {
        app.stored_bytes(url).len() >= at_least
    })
    .await;
}

async fn wait_in_use(app: &TestApp, at_least: u64) {
    wait_for(&format!("{at_least} bytes to wait in the pipeline"), Duration::from_secs(20), || async {
        memory_in_use(app).await >= at_least
    })
    .await;
}

/// A body cut off while frames still wait for the write stage: what arrived is written and
/// committed, nothing more, and the saved hash state continues exactly from there.
async fn cut_off_with_frames_queued(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(4 * MIB, 31);
    let url = app.create(data.len() as u64).await;
    let mut patch = RawPatch::start(&app, &url, 0, data.len(), "").await;
    patch.send(&data[..300_000]).await;
    wait_stored(&app, &url, 300_000).await;
    let lock = WriteLock::take(&app, &url).await;
    let sent = 300_000 + 3 * MIB / 2;
    patch.send(&data[300_000..sent]).await;
    wait_in_use(&app, MIB as u64).await;
    drop(patch);
    drop(lock);

    wait_for("the cut-off append to commit", Duration::from_secs(20), || async {
        app.offset(&url).await == sent as u64
    })
    .await;
    assert_eq!(app.stored_bytes(&url).len(), sent, "bytes past the committed offset were written");
    assert_eq!(app.stored_bytes(&url), data[..sent]);
    assert_eq!(app.patch(&url, sent as u64, data[sent..].to_vec()).await.status(), 204);
    assert_eq!(header(&app.head(&url).await, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&data)));
    assert_eq!(memory_in_use(&app).await, 0, "every frame gave its memory back");
}

/// A body that does not match its checksum is discarded whole, also when most of it was still in
/// the pipeline when the body ended.
async fn checksum_mismatch_with_pipeline_full(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(2 * MIB, 32);
    let url = app.create(data.len() as u64).await;
    let checksum = {
        use base64::Engine;
        use sha2::Digest;
        format!(
            "Upload-Checksum: sha256 {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&data))
        )
    };
    let mut corrupt = data.clone();
    corrupt[2 * MIB - 5] ^= 0x55;
    let mut patch = RawPatch::start(&app, &url, 0, data.len(), &checksum).await;
    patch.send(&corrupt[..300_000]).await;
    wait_stored(&app, &url, 300_000).await;
    let lock = WriteLock::take(&app, &url).await;
    patch.send(&corrupt[300_000..]).await;
    wait_in_use(&app, MIB as u64).await;
    drop(lock);
    assert_eq!(patch.status().await, 460);
    assert_eq!(app.offset(&url).await, 0, "nothing of a mismatching body is kept");

    let response = app
        .tus(reqwest::Method::PATCH, &url)
        .header("Upload-Offset", "0")
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Checksum", checksum.trim().trim_start_matches("Upload-Checksum: "))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(header(&app.head(&url).await, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&data)));
    assert_eq!(app.download(&url).await, data);
}

/// A writer superseded while its batches wait for the write stage stops there: not one more of
/// its bytes reaches the file, not even past the end of what the newer request wrote.
async fn superseded_writer_writes_nothing_more(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.create(4 * MIB as u64).await;
    let mut older = RawPatch::start(&app, &url, 0, 2 * MIB, "").await;
    older.send(&vec![b'A'; 300_000]).await;
    wait_stored(&app, &url, 300_000).await;
    let lock = WriteLock::take(&app, &url).await;
    older.send(&vec![b'A'; MIB]).await;
    wait_in_use(&app, MIB as u64 / 2).await;

    let newer = {
        let request = app
            .tus(reqwest::Method::PATCH, &url)
            .header("Upload-Offset", "0")
            .header("Content-Type", "application/offset+octet-stream")
            .body(vec![b'B'; 400_000]);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    // The newer request takes the lease at once (the older one's writes wait on the lock),
    // then finishes once the lock is free.
    wait_for("the newer request to lease the upload", Duration::from_secs(20), || async {
        generation(&app, &url).await == 2
    })
    .await;
    drop(lock);
    let newer = newer.await.unwrap();
    assert_eq!(newer.status(), 204);
    assert_eq!(header(&newer, "upload-offset"), "400000");
    // The older request's client sends the rest of its body, and hears that it lost.
    older.send(&vec![b'A'; 2 * MIB - 300_000 - MIB]).await;
    assert_eq!(older.status().await, 409);
    let stored = app.stored_bytes(&url);
    assert_eq!(stored.len(), 400_000, "the superseded writer wrote past the newer one's bytes");
    assert!(stored.iter().all(|b| *b == b'B'), "the superseded writer's bytes are in the file");
}

/// The instant a PATCH's connection is cut, a HEAD on another connection already shows the bytes
/// that PATCH delivered (it waits for the cut-off writer's commit), so a client that resumes at
/// once does not send them again and lose them. Cut both ways: closed (FIN) and reset (RST).
async fn head_at_the_cut_sees_the_bytes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for round in 0..6 {
        let data = random_bytes(2 * MIB, 40 + round);
        let url = app.create(data.len() as u64).await;
        let mut patch = RawPatch::start(&app, &url, 0, data.len(), "").await;
        patch.send(&data[..MIB]).await;
        wait_stored(&app, &url, MIB).await;
        if round % 2 == 1 {
            patch.stream.set_zero_linger().unwrap();
        }
        drop(patch);
        let offset = app.offset(&url).await;
        assert_eq!(offset, MIB as u64, "round {round}: HEAD right after the cut");
        assert_eq!(app.patch(&url, offset, data[MIB..].to_vec()).await.status(), 204);
        assert_eq!(app.download(&url).await, data);
    }
}

/// A request waiting for the memory budget reads nothing meanwhile, and must not be mistaken
/// for a stalled one: the idle timeout does not end it, and it completes once memory is back.
async fn budget_wait_is_not_idle(backend: Backend) {
    let idle = Duration::from_secs(1);
    let app = TestApp::spawn_with(backend, |args| {
        args.memory_budget = MIB as u64;
        args.idle_timeout = idle;
    })
    .await;
    // Upload A fills the whole budget: its write stage waits on the lock.
    let a_data = random_bytes(3 * MIB, 50);
    let a = app.create(a_data.len() as u64).await;
    let mut a_patch = RawPatch::start(&app, &a, 0, a_data.len(), "").await;
    a_patch.send(&a_data[..300_000]).await;
    wait_stored(&app, &a, 300_000).await;
    let lock = WriteLock::take(&app, &a).await;
    let a_sender = tokio::spawn(async move {
        a_patch.send(&a_data[300_000..]).await;
        a_patch
    });
    wait_in_use(&app, MIB as u64).await;

    // Upload B waits for memory for longer than the idle timeout.
    let b_data = random_bytes(MIB, 51);
    let b = app.create(b_data.len() as u64).await;
    let b_request = app
        .tus(reqwest::Method::PATCH, &b)
        .header("Upload-Offset", "0")
        .header("Content-Type", "application/offset+octet-stream")
        .body(b_data.clone());
    let b_patch = tokio::spawn(async move { b_request.send().await.unwrap() });
    let waited = Instant::now();
    // Time passing is what this test is about: B must outlive the idle timeout while it waits.
    tokio::time::sleep(idle * 3).await;
    assert!(!b_patch.is_finished(), "B was answered while the budget was spent");
    assert_eq!(memory_in_use(&app).await, MIB as u64, "the budget is spent");
    drop(lock);

    let b_answer = b_patch.await.unwrap();
    assert!(waited.elapsed() > idle * 3);
    assert_eq!(b_answer.status(), 204, "{}", b_answer.text().await.unwrap_or_default());
    assert_eq!(app.download(&b).await, b_data);
    assert_eq!(a_sender.await.unwrap().status().await, 204);
    assert_eq!(app.offset(&a).await, 3 * MIB as u64);
}

/// The database statements of each PATCH, counted in the log of a real `ferry serve` (sqlx logs
/// every statement it sends at debug level, inside the request's span): one to lease the upload,
/// which also reads it, and one to commit, which is its own transaction; a PATCH that completes
/// the upload commits its event in the same transaction.
async fn statements_per_patch(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db_url = crate::helpers::fresh_database(backend, dir.path()).await;
    let log_path = dir.path().join("ferry.log");
    let log = File::create(&log_path).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database-url", &db_url, "--data-dir"])
        .arg(dir.path())
        .env("FERRY_LOG", "warn,sqlx::query=debug,tower_http=debug")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_for("ferry to answer", Duration::from_secs(30), || async {
        matches!(client.get(format!("{base}/healthz")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    let response = client
        .post(format!("{base}/files/"))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", "2000000")
        .send()
        .await
        .unwrap();
    let url = header(&response, "location");
    let patch = |offset: u64, len: usize| {
        client
            .patch(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .body(vec![7u8; len])
            .send()
    };
    // The statements logged inside PATCH requests so far, without BEGIN, COMMIT and the request
    // for a durable commit (PostgreSQL's `SET LOCAL synchronous_commit`); and the transactions.
    let statements = || {
        let text = std::fs::read_to_string(&log_path).unwrap();
        let of_patches: Vec<&str> = text
            .split('\n')
            .filter(|l| l.contains(" DEBUG ") && l.contains("sqlx::query") && l.contains("method=PATCH"))
            .collect();
        let count = |prefix: &str| of_patches.iter().filter(|l| l.contains(&format!("summary=\"{prefix}"))).count();
        let transactions = count("BEGIN");
        (of_patches.len() - transactions - count("COMMIT") - count("SET LOCAL"), transactions)
    };

    assert_eq!(patch(0, 1_000_000).await.unwrap().status(), 204);
    assert_eq!(
        statements(),
        (2, 0),
        "a PATCH: the lease and the commit, each its own transaction; log:\n{}",
        std::fs::read_to_string(&log_path).unwrap()
    );
    assert_eq!(patch(1_000_000, 1_000_000).await.unwrap().status(), 204);
    let (total, transactions) = statements();
    assert_eq!(total - 2, 3, "the completing PATCH: the lease, the commit and its event");
    assert!(transactions <= 1, "the commit and its event are one transaction");
    child.kill().await.unwrap();
    if backend != Backend::Sqlite {
        crate::helpers::drop_database(&db_url);
    }
}

db_backend_tests!(
    cut_off_with_frames_queued,
    checksum_mismatch_with_pipeline_full,
    superseded_writer_writes_nothing_more,
    head_at_the_cut_sees_the_bytes,
    budget_wait_is_not_idle,
    statements_per_patch,
);
