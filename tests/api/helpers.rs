//! A fresh world per test: its own database, its own store folder, its own server on port 0.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use ferry::config::{Cli, ServeArgs};
use reqwest::{Method, RequestBuilder, Response};
use sha2::{Digest, Sha256};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// Generates one `#[tokio::test]` per backend for each listed `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::helpers::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::helpers::Backend::Postgres).await })*
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    /// The tus endpoint, `<base>/files/`.
    pub files: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    pub store_dir: PathBuf,
    pub db_url: String,
    pub backend: Backend,
    _dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

fn init_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter("info,ferry=debug").with_test_writer().try_init();
    }
}

/// A new, empty database for one test.
pub async fn fresh_database(backend: Backend, dir: &std::path::Path) -> String {
    match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.join("ferry.db").display()),
        Backend::Postgres => {
            use sqlx::{Connection, Executor};
            let admin = std::env::var("FERRY_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let name = format!("ferry_test_{}", uuid::Uuid::new_v4().simple());
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed for the postgres tests: {e}"));
            conn.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create test database");
            let (prefix, _) = admin.rsplit_once('/').expect("database URL has a path");
            format!("{prefix}/{name}")
        }
    }
}

/// Serve arguments with test-friendly defaults, pointing at `dir`.
pub fn serve_args(dir: &std::path::Path, db_url: &str) -> ServeArgs {
    let cli = Cli::parse_from([
        "ferry",
        "--data-dir",
        dir.to_str().unwrap(),
        "--database-url",
        db_url,
        "--listen",
        "127.0.0.1:0",
    ]);
    cli.serve
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, configure: impl FnOnce(&mut ServeArgs)) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let db_url = fresh_database(backend, dir.path()).await;
        let mut args = serve_args(dir.path(), &db_url);
        configure(&mut args);
        Self::start(backend, dir, db_url, args).await
    }

    /// Starts a server with exactly these arguments (the database must exist).
    pub async fn start(backend: Backend, dir: tempfile::TempDir, db_url: String, args: ServeArgs) -> Self {
        let store_dir = PathBuf::from(args.store_url());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let base_path = args.base_path.clone();
        let task = tokio::spawn(ferry::launch(args, listener, async move {
            let _ = rx.await;
        }));
        let base = format!("http://{addr}");
        let app = TestApp {
            files: format!("{base}{base_path}"),
            base,
            addr,
            client: reqwest::Client::new(),
            store_dir,
            db_url,
            backend,
            _dir: dir,
            shutdown: Some(tx),
            task: Some(task),
        };
        app.wait_ready().await;
        app
    }

    async fn wait_ready(&self) {
        wait_for("the server to answer /healthz", Duration::from_secs(30), || async {
            matches!(self.client.get(format!("{}/healthz", self.base)).send().await, Ok(r) if r.status() == 200)
        })
        .await;
    }

    /// Stops the server gracefully and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }

    /// A tus request with `Tus-Resumable: 1.0.0`.
    pub fn tus(&self, method: Method, url: &str) -> RequestBuilder {
        self.client.request(method, url).header("Tus-Resumable", "1.0.0")
    }

    /// Creates an upload of `length` bytes and returns its URL.
    pub async fn create(&self, length: u64) -> String {
        let response =
            self.tus(Method::POST, &self.files).header("Upload-Length", length.to_string()).send().await.unwrap();
        assert_eq!(response.status(), 201, "create: {}", response.text().await.unwrap_or_default());
        header(&response, "location")
    }

    pub async fn patch(&self, url: &str, offset: u64, body: impl Into<reqwest::Body>) -> Response {
        self.tus(Method::PATCH, url)
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn head(&self, url: &str) -> Response {
        self.tus(Method::HEAD, url).send().await.unwrap()
    }

    /// The offset HEAD reports.
    pub async fn offset(&self, url: &str) -> u64 {
        let response = self.head(url).await;
        assert_eq!(response.status(), 200, "HEAD {url}");
        header(&response, "upload-offset").parse().unwrap()
    }

    /// Uploads `data` to a new upload in chunks of `chunk` bytes; returns the upload URL.
    pub async fn upload(&self, data: &[u8], chunk: usize) -> String {
        let url = self.create(data.len() as u64).await;
        let mut offset = 0;
        for piece in data.chunks(chunk.max(1)) {
            let response = self.patch(&url, offset as u64, piece.to_vec()).await;
            assert_eq!(response.status(), 204, "PATCH at {offset}: {}", response.text().await.unwrap_or_default());
            offset += piece.len();
        }
        url
    }

    pub async fn download(&self, url: &str) -> Vec<u8> {
        let response = self.client.get(url).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {url}");
        response.bytes().await.unwrap().to_vec()
    }

    /// How many uploads the database holds, in any state.
    pub async fn upload_count(&self) -> i64 {
        use sqlx::Connection;
        match self.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.db_url).await.unwrap();
                sqlx::query_scalar("SELECT COUNT(*) FROM uploads").fetch_one(&mut conn).await.unwrap()
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.db_url).await.unwrap();
                sqlx::query_scalar("SELECT COUNT(*) FROM uploads").fetch_one(&mut conn).await.unwrap()
            }
        }
    }

    /// Files in the store's `uploads/` folder.
    pub fn stored_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.store_dir.join("uploads"))
            .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The bytes stored for an upload URL, read straight from disk.
    pub fn stored_bytes(&self, url: &str) -> Vec<u8> {
        let id = url.rsplit('/').next().unwrap();
        std::fs::read(self.store_dir.join("uploads").join(id)).unwrap_or_default()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if self.backend == Backend::Postgres {
            drop_database(&self.db_url);
        }
    }
}

/// Drops a test's PostgreSQL database (from a thread of its own: `Drop` cannot await).
fn drop_database(url: &str) {
    let Some((_, name)) = url.rsplit_once('/') else { return };
    let name = name.to_string();
    let admin =
        std::env::var("FERRY_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        runtime.block_on(async {
            use sqlx::{Connection, Executor};
            let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
            conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await.ok()
        })
    })
    .join();
}

pub fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("response has no {name} header: {:?}", response.headers()))
        .to_str()
        .unwrap()
        .to_string()
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub fn sha256_b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

/// Polls `check` until it holds; fails the test after `limit`. Use instead of sleeping.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
