//! A fresh world per test: its own database, its own store folder, its own server on port 0.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use ferry::config::{Cli, ServeArgs};
use reqwest::{Method, RequestBuilder, Response};
use sha2::{Digest, Sha256};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::azurite;

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
        mod s3 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::helpers::Backend::S3).await })*
        }
    };
}

/// Like `backend_tests!`, on the two databases with the local store only (for features whose
/// store does not matter).
#[macro_export]
macro_rules! db_backend_tests {
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
    /// PostgreSQL and an S3 store (a fresh bucket on FERRY_TEST_S3_ENDPOINT).
    S3,
    /// PostgreSQL and Azure Blob Storage (a fresh container on FERRY_TEST_AZURE_ENDPOINT).
    Azure,
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
    /// The bucket of an S3 test.
    pub bucket: Option<S3Bucket>,
    /// The container of an Azure test.
    pub container: Option<AzureContainer>,
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
        Backend::Postgres | Backend::S3 | Backend::Azure => {
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
        // Small: hundreds of instances start in a run (tests/api/faults.rs tests the default).
        "--emergency-ballast",
        "64KiB",
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
        let bucket = match backend {
            Backend::S3 => {
                let bucket = S3Bucket::create().await;
                args.store = Some(bucket.store_url());
                args.store_options = bucket.env().into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
                Some(bucket)
            }
            _ => None,
        };
        let container = match backend {
            Backend::Azure => {
                let container = AzureContainer::create().await;
                args.store = Some(container.store_url());
                args.store_options = azurite::store_options(&container.endpoint);
                Some(container)
            }
            _ => None,
        };
        configure(&mut args);
        let mut app = Self::start(backend, dir, db_url, args).await;
        app.bucket = bucket;
        app.container = container;
        app
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
            bucket: None,
            container: None,
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
        self.create_as(length, None).await
    }

    /// Creates a partial upload (`Upload-Concat: partial`) of `length` bytes; its URL.
    pub async fn create_partial(&self, length: u64) -> String {
        self.create_as(length, Some("partial")).await
    }

    async fn create_as(&self, length: u64, concat: Option<&str>) -> String {
        let mut request = self.tus(Method::POST, &self.files).header("Upload-Length", length.to_string());
        if let Some(concat) = concat {
            request = request.header("Upload-Concat", concat);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 201, "create ({concat:?}): {}", response.text().await.unwrap_or_default());
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

    /// Waits until an append to `url` has started writing (it holds the writer generation and,
    /// on local disk, has written at least 256 KiB; an S3 append buffers a whole part first).
    pub async fn wait_writing(&self, url: &str) {
        wait_for("the append to be writing", Duration::from_secs(20), || async {
            match self.backend {
                Backend::S3 | Backend::Azure => generation(self, url).await >= 1,
                _ => self.stored_bytes(url).len() >= 256 * 1024,
            }
        })
        .await;
    }

    /// How many uploads the database holds, in any state.
    pub async fn upload_count(&self) -> i64 {
        self.scalar("SELECT COUNT(*) FROM uploads").await
    }

    /// The key download links are signed with, as the database keeps it.
    pub async fn link_key(&self) -> Vec<u8> {
        self.scalar("SELECT value FROM secrets WHERE name = 'download-links'").await
    }

    /// The one value `query` selects, from this app's database.
    async fn scalar<T>(&self, query: &str) -> T
    where
        T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        use sqlx::Connection;
        match self.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.db_url).await.unwrap();
                sqlx::query_scalar(query).fetch_one(&mut conn).await.unwrap()
            }
            Backend::Postgres | Backend::S3 | Backend::Azure => {
                let mut conn = sqlx::PgConnection::connect(&self.db_url).await.unwrap();
                sqlx::query_scalar(query).fetch_one(&mut conn).await.unwrap()
            }
        }
    }

    /// What the store holds: files in the `uploads/` folder, or for S3 the bucket's objects
    /// (`<id>` or `staging/<id>/...`) and unfinished multipart uploads (`multipart <id>`).
    pub fn stored_files(&self) -> Vec<String> {
        if let Some(bucket) = &self.bucket {
            let inventory = block_on(bucket.inventory());
            return inventory
                .into_iter()
                .map(|line| line.split(" (").next().unwrap_or_default().replace("uploads/", ""))
                .collect();
        }
        let mut names: Vec<String> = std::fs::read_dir(self.store_dir.join("uploads"))
            .map(|dir| dir.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The bytes stored for an upload URL, read straight from disk; for S3 the object, or before
    /// it is complete the staged bytes.
    pub fn stored_bytes(&self, url: &str) -> Vec<u8> {
        let id = url.rsplit('/').next().unwrap();
        if let Some(bucket) = &self.bucket {
            return block_on(async {
                if let Some(bytes) = bucket.get(&format!("{S3_PREFIX}/uploads/{id}")).await {
                    return bytes;
                }
                let mut staged = Vec::new();
                for (key, _) in bucket.objects().await {
                    if key.starts_with(&format!("{S3_PREFIX}/staging/{id}/")) {
                        staged.extend(bucket.get(&key).await.unwrap_or_default());
                    }
                }
                staged
            });
        }
        std::fs::read(self.store_dir.join("uploads").join(id)).unwrap_or_default()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if self.backend != Backend::Sqlite {
            drop_database(&self.db_url);
        }
    }
}

/// Drops a test's PostgreSQL database (from a thread of its own: `Drop` cannot await).
pub fn drop_database(url: &str) {
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

/// Panics with the first difference between two byte strings (never dumps them).
pub fn assert_same_bytes(what: &str, actual: &[u8], expected: &[u8]) {
    if actual == expected {
        return;
    }
    let first = actual.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(actual.len().min(expected.len()));
    panic!("{what}: {} bytes where {} were expected; first difference at byte {first}", actual.len(), expected.len());
}

// ------------------------------------------------------------------------------------------------
// S3 for the tests: a real S3 server (Garage, started by tests/run through tests/garage), a fresh
// bucket per test. Every request is signed with the key tests/garage made.

pub use crate::s3api::*;

/// One test's own bucket on the S3 endpoint; emptied and removed when dropped.
pub struct S3Bucket {
    pub endpoint: String,
    pub name: String,
    credentials: S3Credentials,
    store: object_store::aws::AmazonS3,
    http: reqwest::Client,
}

impl S3Bucket {
    /// Creates a new, empty bucket (CreateBucket with the tests' key, which may create buckets).
    pub async fn create() -> Self {
        let credentials = S3Credentials::from_env();
        let endpoint = credentials.endpoint.clone();
        let name = format!("ferry-test-{}", uuid::Uuid::new_v4().simple());
        let http = reqwest::Client::new();
        let (status, body) = s3_call(&http, &credentials, Method::PUT, &format!("/{name}"), &[])
            .await
            .unwrap_or_else(|e| panic!("the S3 API at {endpoint} ({S3_ENDPOINT_VAR}) does not answer: {e}"));
        assert!(
            status.is_success(),
            "CreateBucket {name} on {endpoint} with key {} ({S3_KEY_ID_VAR}): {status}: {body}",
            credentials.key_id
        );
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_allow_http(true)
            .with_bucket_name(&name)
            .with_region(&credentials.region)
            .with_access_key_id(&credentials.key_id)
            .with_secret_access_key(&credentials.secret)
            .build()
            .expect("S3 client for the test bucket");
        Self { endpoint, name, credentials, store, http }
    }

    /// The `--store` URL for ferry.
    pub fn store_url(&self) -> String {
        format!("s3://{}/{S3_PREFIX}", self.name)
    }

    /// The environment ferry reads its S3 settings from (object_store's `AmazonS3Builder::from_env`).
    pub fn env(&self) -> Vec<(String, String)> {
        let c = &self.credentials;
        [
            ("AWS_ENDPOINT", c.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", c.key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", c.secret.as_str()),
            ("AWS_REGION", c.region.as_str()),
            ("AWS_DEFAULT_REGION", c.region.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Every object in the bucket: key and size, sorted by key.
    pub async fn objects(&self) -> Vec<(String, u64)> {
        list_objects(&self.store, &format!("bucket {}", self.name)).await
    }

    /// An object's bytes, or None when there is no such object.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        get_object(&self.store, key, &format!("bucket {}", self.name)).await
    }

    /// Writes an object (as a leftover of some other writer would be).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) {
        use object_store::ObjectStoreExt;
        self.store
            .put(&object_store::path::Path::from(key), bytes.into())
            .await
            .unwrap_or_else(|e| panic!("PUT {key} in bucket {}: {e}", self.name));
    }

    /// Multipart uploads begun and neither completed nor aborted: (key, upload id), sorted.
    pub async fn multipart_uploads(&self) -> Vec<(String, String)> {
        let mut uploads = list_multipart_uploads(&self.http, &self.credentials, &self.name)
            .await
            .unwrap_or_else(|e| panic!("ListMultipartUploads of bucket {}: {e}", self.name));
        uploads.sort();
        uploads
    }

    /// How many parts a multipart upload holds so far (ListParts); None when it is no longer
    /// there (completed or aborted since it was listed).
    pub async fn part_count(&self, key: &str, upload_id: &str) -> Option<usize> {
        let path = format!("/{}/{key}", self.name);
        let mut count = 0;
        let mut marker = String::new();
        loop {
            let mut query = vec![("uploadId", upload_id)];
            if !marker.is_empty() {
                query.push(("part-number-marker", marker.as_str()));
            }
            let (status, xml) = s3_call(&self.http, &self.credentials, Method::GET, &path, &query)
                .await
                .unwrap_or_else(|e| panic!("ListParts of {key}: {e}"));
            if status == reqwest::StatusCode::NOT_FOUND
                && xml_values(&xml, "Code").first().map(String::as_str) == Some("NoSuchUpload")
            {
                return None;
            }
            assert!(status.is_success(), "ListParts of {key} ({upload_id}): {status}: {xml}");
            // The part numbers only: <NextPartNumberMarker> and <PartNumberMarker> are other tags.
            count += xml_values(&xml, "PartNumber").len();
            if xml_values(&xml, "IsTruncated").first().map(String::as_str) != Some("true") {
                return Some(count);
            }
            marker = xml_values(&xml, "NextPartNumberMarker").pop().expect("a truncated ListParts has a marker");
        }
    }

    /// Everything the bucket holds, one line each: `<key> (<size>)` for objects and
    /// `multipart <key> (<n> parts)` for unfinished multipart uploads. Keys are shown without
    /// the `ferry/` prefix. A multipart upload that ends between the listing and its ListParts
    /// (a sweeper aborting it while a test waits for that) is left out, as it is gone.
    pub async fn inventory(&self) -> Vec<String> {
        let mut lines: Vec<String> =
            self.objects().await.into_iter().map(|(key, size)| format!("{} ({size})", strip_prefix(&key))).collect();
        for (key, id) in self.multipart_uploads().await {
            let Some(parts) = self.part_count(&key, &id).await else { continue };
            lines.push(format!("multipart {} ({parts} parts)", strip_prefix(&key)));
        }
        lines
    }
}

/// Every unfinished multipart upload of a bucket (ListMultipartUploads): (key, upload id).
async fn list_multipart_uploads(
    http: &reqwest::Client,
    credentials: &S3Credentials,
    bucket: &str,
) -> Result<Vec<(String, String)>, String> {
    let path = format!("/{bucket}");
    let mut uploads = Vec::new();
    let (mut key_marker, mut id_marker) = (String::new(), String::new());
    loop {
        let mut query = vec![("uploads", "")];
        if !key_marker.is_empty() {
            query.push(("key-marker", key_marker.as_str()));
            query.push(("upload-id-marker", id_marker.as_str()));
        }
        let (status, xml) = s3_call(http, credentials, Method::GET, &path, &query).await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {xml}"));
        }
        // Each <Upload> has one <Key> and one <UploadId>; the markers are other tags.
        for upload in xml.split("<Upload>").skip(1) {
            let (key, id) = (xml_values(upload, "Key"), xml_values(upload, "UploadId"));
            if let (Some(key), Some(id)) = (key.first(), id.first()) {
                uploads.push((key.clone(), id.clone()));
            }
        }
        if xml_values(&xml, "IsTruncated").first().map(String::as_str) != Some("true") {
            return Ok(uploads);
        }
        key_marker = xml_values(&xml, "NextKeyMarker").pop().unwrap_or_default();
        id_marker = xml_values(&xml, "NextUploadIdMarker").pop().unwrap_or_default();
        if key_marker.is_empty() {
            return Err(format!("a truncated ListMultipartUploads without NextKeyMarker: {xml}"));
        }
    }
}

impl Drop for S3Bucket {
    fn drop(&mut self) {
        // Give back what this test stored: abort its multipart uploads, delete its objects, then
        // the bucket (DeleteBucket needs it empty).
        let (store, http, credentials, name) =
            (self.store.clone(), self.http.clone(), self.credentials.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                use futures_util::TryStreamExt;
                use object_store::{ObjectStore, ObjectStoreExt, multipart::MultipartStore};
                for (key, id) in list_multipart_uploads(&http, &credentials, &name).await.ok()? {
                    let _ = store.abort_multipart(&object_store::path::Path::from(key), &id).await;
                }
                let keys: Vec<_> = store.list(None).map_ok(|meta| meta.location).try_collect().await.ok()?;
                for key in keys {
                    let _ = store.delete(&key).await;
                }
                s3_call(&http, &credentials, Method::DELETE, &format!("/{name}"), &[]).await.ok()
            })
        })
        .join();
    }
}

/// Every object a test's store holds (`what` names it in failures): key and size, sorted by key.
async fn list_objects(store: &dyn object_store::ObjectStore, what: &str) -> Vec<(String, u64)> {
    use futures_util::TryStreamExt;
    let mut objects: Vec<(String, u64)> = store
        .list(None)
        .map_ok(|meta| (meta.location.to_string(), meta.size))
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("listing {what}: {e}"));
    objects.sort();
    objects
}

/// An object's bytes, or None when there is no such object.
async fn get_object(store: &dyn object_store::ObjectStore, key: &str, what: &str) -> Option<Vec<u8>> {
    use object_store::ObjectStoreExt;
    match store.get(&object_store::path::Path::from(key)).await {
        Ok(result) => Some(result.bytes().await.expect("reading an object").to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("GET {key} from {what}: {e}"),
    }
}

/// A key as the inventories show it: without the `ferry/` prefix.
fn strip_prefix(key: &str) -> String {
    key.strip_prefix(&format!("{S3_PREFIX}/")).unwrap_or(key).to_string()
}

/// The text of every `<tag>...</tag>` element, in order (enough for S3's listings).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut values = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        rest = &rest[start + open.len()..];
        let Some(end) = rest.find(&close) else { break };
        values.push(rest[..end].replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"));
        rest = &rest[end + close.len()..];
    }
    values
}

// ------------------------------------------------------------------------------------------------
// Azure Blob Storage for the tests: Azurite (started by tests/run), a fresh container per test.

/// Where the Azure tests find Azurite's Blob service: `http://127.0.0.1:PORT`.
pub const AZURE_ENDPOINT_VAR: &str = "FERRY_TEST_AZURE_ENDPOINT";

/// The Azurite endpoint the tests use. The Azure tests fail (never skip) without one.
pub fn azure_endpoint() -> String {
    match std::env::var(AZURE_ENDPOINT_VAR) {
        Ok(value) if !value.trim().is_empty() => value.trim().trim_end_matches('/').to_string(),
        _ => panic!(
            "{AZURE_ENDPOINT_VAR} is not set, and the Azure tests need Azurite: run tests/run, which starts \
             it and sets it (or start `tests/azurite/node_modules/.bin/azurite-blob --blobPort PORT \
             --location DIR` yourself and export {AZURE_ENDPOINT_VAR}=http://127.0.0.1:PORT)"
        ),
    }
}

/// One test's own container on Azurite; removed with everything in it when dropped.
pub struct AzureContainer {
    pub endpoint: String,
    pub name: String,
    store: object_store::azure::MicrosoftAzure,
    http: reqwest::Client,
}

impl AzureContainer {
    /// Creates a new, empty container.
    pub async fn create() -> Self {
        let endpoint = azure_endpoint();
        let name = format!("ferry-test-{}", uuid::Uuid::new_v4().simple());
        let http = reqwest::Client::new();
        azurite::create_container(&http, &endpoint, &name).await;
        let store = azurite::container_store(&endpoint, &name);
        Self { endpoint, name, store, http }
    }

    /// The `--store` URL for ferry.
    pub fn store_url(&self) -> String {
        format!("az://{}/{S3_PREFIX}", self.name)
    }

    /// ferry's `--store-option` arguments for this container.
    pub fn args(&self) -> Vec<String> {
        azurite::store_options(&self.endpoint)
            .into_iter()
            .flat_map(|(key, value)| ["--store-option".to_string(), format!("{key}={value}")])
            .collect()
    }

    /// Every committed blob: name and size, sorted by name.
    pub async fn objects(&self) -> Vec<(String, u64)> {
        list_objects(&self.store, &format!("container {}", self.name)).await
    }

    /// A blob's bytes, or None when there is no such (committed) blob.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        get_object(&self.store, key, &format!("container {}", self.name)).await
    }

    /// Puts one block (uncommitted) on the blob `key`.
    pub async fn put_block(&self, key: &str) {
        use object_store::multipart::MultipartStore;
        let path = object_store::path::Path::from(key);
        let payload = object_store::PutPayload::from_static(b"block");
        self.store.put_part(&path, &String::new(), 0, payload).await.expect("Put Block");
    }

    /// Blobs holding uncommitted blocks (the parts of unfinished multipart uploads, which
    /// object_store cannot list): name and number of blocks, sorted.
    pub async fn uncommitted_blocks(&self) -> Vec<(String, usize)> {
        let list = format!("/{}?restype=container&comp=list&include=uncommittedblobs", self.name);
        let names = xml_values(&self.rest_xml(&list).await.expect("the container"), "Name");
        let mut found = Vec::new();
        for name in names {
            let blocks = format!("/{}/{name}?comp=blocklist&blocklisttype=uncommitted", self.name);
            // Gone since the listing: nothing to count.
            let Some(xml) = self.rest_xml(&blocks).await else { continue };
            let uncommitted = xml.split("<UncommittedBlocks>").nth(1).unwrap_or_default();
            let count = xml_values(uncommitted, "Name").len();
            if count > 0 {
                found.push((name, count));
            }
        }
        found.sort();
        found
    }

    /// A GET's XML answer, or None when Azurite answers 404.
    async fn rest_xml(&self, path_and_query: &str) -> Option<String> {
        let response = azurite::send(&self.http, &self.endpoint, Method::GET, path_and_query)
            .await
            .unwrap_or_else(|e| panic!("GET {path_and_query} from Azurite: {e}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if status == 404 {
            return None;
        }
        assert!(status.is_success(), "GET {path_and_query} from Azurite: {status}: {body}");
        Some(body)
    }

    /// Everything the container holds, one line each: `<key> (<size>)` for blobs and
    /// `blocks <key> (<n> uncommitted)` for uncommitted blocks. Keys are shown without the
    /// `ferry/` prefix.
    pub async fn inventory(&self) -> Vec<String> {
        let mut lines: Vec<String> =
            self.objects().await.into_iter().map(|(key, size)| format!("{} ({size})", strip_prefix(&key))).collect();
        for (key, blocks) in self.uncommitted_blocks().await {
            lines.push(format!("blocks {} ({blocks} uncommitted)", strip_prefix(&key)));
        }
        lines
    }
}

impl Drop for AzureContainer {
    fn drop(&mut self) {
        let (http, endpoint, name) = (self.http.clone(), self.endpoint.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime
                .block_on(azurite::send(&http, &endpoint, Method::DELETE, &format!("/{name}?restype=container")))
                .ok()
        })
        .join();
    }
}

// ------------------------------------------------------------------------------------------------
// Clusters: real `ferry serve` processes sharing one PostgreSQL database and one store.

/// Where a cluster keeps upload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// One local folder shared by every instance (`--store <dir>`).
    Local,
    /// One bucket on the S3 endpoint (`--store s3://<bucket>/ferry`).
    S3,
    /// One container on Azurite (`--store az://<container>/ferry`).
    Azure,
}

/// Several `ferry serve` processes on one PostgreSQL database and one store. Dropping it kills
/// what still runs and drops the database; when the test failed, the instances' logs are printed
/// and the temporary folder is kept.
pub struct Cluster {
    pub storage: Storage,
    pub db_url: String,
    pub store_url: String,
    pub bucket: Option<S3Bucket>,
    /// The container of an Azure cluster.
    pub container: Option<AzureContainer>,
    pub nodes: Vec<Node>,
    dir: Option<tempfile::TempDir>,
}

/// One `ferry serve` process.
pub struct Node {
    pub name: String,
    /// `http://127.0.0.1:<port>`
    pub base: String,
    /// The tus endpoint, `<base>/files/`.
    pub files: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    /// stdout and stderr of the process.
    pub log: PathBuf,
    child: tokio::process::Child,
    exited: Option<std::process::ExitStatus>,
    /// What it was started with, to start it again.
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl Cluster {
    /// Starts `count` instances with test-friendly settings (a sweep every second) plus `extra`
    /// arguments, and waits until each is ready.
    pub async fn start(storage: Storage, count: usize, extra: &[&str]) -> Self {
        Self::start_nodes(storage, &vec![extra; count]).await
    }

    /// Starts one instance per entry of `extra`, each with those arguments added.
    pub async fn start_nodes(storage: Storage, extra: &[&[&str]]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let bucket = match storage {
            Storage::S3 => Some(S3Bucket::create().await),
            Storage::Local | Storage::Azure => None,
        };
        let container = match storage {
            Storage::Azure => Some(AzureContainer::create().await),
            Storage::Local | Storage::S3 => None,
        };
        let db_url = fresh_database(Backend::Postgres, dir.path()).await;
        let store_url = match (&bucket, &container) {
            (Some(bucket), _) => bucket.store_url(),
            (_, Some(container)) => container.store_url(),
            _ => dir.path().join("store").display().to_string(),
        };
        let mut cluster = Cluster { storage, db_url, store_url, bucket, container, nodes: Vec::new(), dir: Some(dir) };
        for args in extra {
            cluster.add_node(args, &[]).await;
        }
        cluster
    }

    /// Starts one more instance with `extra` arguments and `env` on top of the cluster's
    /// environment (say an `AWS_ENDPOINT` of its own), and waits until it is ready. An S3 store
    /// is configured through the environment, an Azure one through `--store-option`.
    pub async fn add_node(&mut self, extra: &[&str], env: &[(&str, &str)]) -> &Node {
        let name = ((b'a' + self.nodes.len() as u8) as char).to_string();
        let store_args = self.container.as_ref().map(AzureContainer::args).unwrap_or_default();
        let extra: Vec<&str> = store_args.iter().map(String::as_str).chain(extra.iter().copied()).collect();
        let extra = extra.as_slice();
        let mut vars = self.bucket.as_ref().map(S3Bucket::env).unwrap_or_default();
        vars.retain(|(k, _)| !env.iter().any(|(key, _)| key == k));
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        // The port is picked free but only taken when ferry binds it: should another process
        // take it in between, start again on another.
        let mut attempts = 0;
        let node = loop {
            attempts += 1;
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let addr = ([127, 0, 0, 1], port).into();
            let mut node = Node::spawn(&name, addr, self.dir(), &self.db_url, &self.store_url, extra, &vars);
            match node.wait_ready().await {
                Ok(()) => break node,
                Err(log) if attempts < 3 && log.contains("in use") => continue,
                Err(log) => panic!("instance {name} did not start:\n{log}"),
            }
        };
        self.nodes.push(node);
        self.nodes.last().expect("just added")
    }

    fn dir(&self) -> &std::path::Path {
        self.dir.as_ref().expect("temp dir").path()
    }

    /// Starts instance `index` again, on the same address with the same arguments, after it
    /// was killed or stopped (it is killed first if it still runs); waits until it is ready.
    pub async fn restart(&mut self, index: usize) -> &Node {
        let node = &mut self.nodes[index];
        if node.exited.is_none() {
            node.sigkill().await;
        }
        let (name, addr, env) = (node.name.clone(), node.addr, node.env.clone());
        let extra: Vec<String> = node.extra.clone();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut fresh = Node::spawn(&name, addr, self.dir(), &self.db_url, &self.store_url, &extra, &env);
        if let Err(log) = fresh.wait_ready().await {
            panic!("instance {name} did not start again on {addr}:\n{log}");
        }
        self.nodes[index] = fresh;
        &self.nodes[index]
    }

    /// The shared folder of a local store.
    pub fn store_dir(&self) -> PathBuf {
        assert_eq!(self.storage, Storage::Local, "only a local store has a folder");
        PathBuf::from(&self.store_url)
    }

    /// The bytes the store holds for an upload, read from the store itself (not through ferry).
    pub async fn stored_object(&self, url: &str) -> Option<Vec<u8>> {
        let id = upload_id(url);
        let key = format!("{S3_PREFIX}/uploads/{id}");
        match (&self.bucket, &self.container) {
            (Some(bucket), _) => bucket.get(&key).await,
            (_, Some(container)) => container.get(&key).await,
            _ => std::fs::read(self.store_dir().join("uploads").join(id)).ok(),
        }
    }

    /// Everything the store holds, one line each, sorted: `<path> (<size>)` relative to the store
    /// folder, or bucket keys relative to the prefix and unfinished multipart uploads (see
    /// [`S3Bucket::inventory`] and [`AzureContainer::inventory`]).
    pub async fn store_inventory(&self) -> Vec<String> {
        match (&self.bucket, &self.container) {
            (Some(bucket), _) => bucket.inventory().await,
            (_, Some(container)) => container.inventory().await,
            _ => {
                let mut found = Vec::new();
                list_files(&self.store_dir(), &self.store_dir(), &mut found);
                found.sort();
                found
            }
        }
    }

    /// An upload's writer generation, bumped by the database each time an append starts: tells the
    /// tests that a request they cannot see into has begun its append.
    pub async fn write_generation(&self, url: &str) -> i64 {
        use sqlx::Connection;
        let id: uuid::Uuid = upload_id(url).parse().expect("upload id is a uuid");
        let mut conn = sqlx::PgConnection::connect(&self.db_url).await.expect("connect to the test database");
        sqlx::query_scalar("SELECT write_gen FROM uploads WHERE id = $1")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .expect("write_gen of an upload")
    }

    /// Waits for the upload to be complete and checks it everywhere: HEAD on every live instance
    /// reports the full offset and `Repr-Digest` with the SHA-256 of `expected`; GET through every
    /// live instance and the object in the store itself are byte-exact.
    pub async fn assert_complete(&self, url: &str, expected: &[u8]) {
        let live: Vec<&Node> = self.nodes.iter().filter(|n| n.exited.is_none()).collect();
        let first = live.first().expect("a live instance");
        let want_digest = format!("sha-256=:{}:", sha256_b64(expected));
        // Complete: HEAD says every byte is there, and the bytes can be downloaded (on object
        // stores the multipart upload is completed after the last append).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let response = first.head(url).await;
            let offset = response.headers().get("upload-offset").and_then(|v| v.to_str().ok()).map(String::from);
            let digest = response.headers().get("repr-digest").and_then(|v| v.to_str().ok()).map(String::from);
            let head = format!("HEAD: {}, offset {offset:?}, digest {digest:?}", response.status());
            let get = if offset.as_deref() == Some(&expected.len().to_string()) && digest.is_some() {
                let probe = first.client.get(first.at(url)).header("Range", "bytes=0-0").send().await;
                match probe {
                    Ok(r) if r.status() == 200 || r.status() == 206 => break,
                    Ok(r) => format!("GET: {}: {}", r.status(), r.text().await.unwrap_or_default()),
                    Err(e) => format!("GET: {e}"),
                }
            } else {
                String::new()
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "upload {url} did not complete within 30 s; last {head}; {get}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for node in &live {
            let response = node.head(url).await;
            assert_eq!(response.status(), 200, "HEAD through {}", node.name);
            assert_eq!(header(&response, "upload-offset"), expected.len().to_string(), "offset on {}", node.name);
            assert_eq!(header(&response, "repr-digest"), want_digest, "Repr-Digest on {}", node.name);
            let downloaded = node.download(url).await;
            assert_same_bytes(&format!("GET through {}", node.name), &downloaded, expected);
        }
        let stored = self.stored_object(url).await.unwrap_or_else(|| {
            panic!("the store holds no object for {url} ({:?} store at {})", self.storage, self.store_url)
        });
        assert_same_bytes("the object in the store", &stored, expected);
    }
}

pub fn list_files(root: &std::path::Path, dir: &std::path::Path, found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.is_dir() {
            list_files(root, &path, found);
        } else {
            let size = entry.metadata().map(|m| m.len()).unwrap_or_default();
            found.push(format!("{} ({size})", path.strip_prefix(root).unwrap_or(&path).display()));
        }
    }
}

/// The id at the end of an upload URL.
pub fn upload_id(url: &str) -> &str {
    url.rsplit('/').next().expect("upload URL")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.start_kill();
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!(
                    "\n----- log of instance {} ({}), last lines -----\n{}",
                    node.name,
                    node.log.display(),
                    node.log_tail(80)
                );
            }
            if let Some(dir) = self.dir.take() {
                eprintln!("(kept {} for a look)", dir.keep().display());
            }
        }
        drop_database(&self.db_url);
    }
}

impl Node {
    /// Starts an instance on `addr` (the log is appended to, so a restarted instance keeps its
    /// earlier lines).
    fn spawn(
        name: &str,
        addr: std::net::SocketAddr,
        dir: &std::path::Path,
        db_url: &str,
        store_url: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let data_dir = dir.join(format!("node-{name}"));
        let log = dir.join(format!("node-{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
        command
            .arg("serve")
            .args(["--listen", &addr.to_string()])
            .args(["--database-url", db_url])
            .args(["--data-dir", data_dir.to_str().expect("utf-8 path")])
            .args(["--store", store_url])
            .args(["--sweep-interval", "1s"])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        // Only what the test sets: no FERRY_*, AWS_* or AZURE_* settings from the caller's environment.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if ["FERRY_", "AWS_", "AZURE_", "AZURITE_"].iter().any(|prefix| key.starts_with(prefix)) {
                command.env_remove(key.as_ref());
            }
        }
        command.env("FERRY_LOG", "info,ferry=debug").env("NO_COLOR", "1").env("RUST_BACKTRACE", "1");
        command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = command.spawn().expect("start ferry serve");
        let base = format!("http://{addr}");
        Node {
            name: name.to_string(),
            files: format!("{base}/files/"),
            base,
            addr,
            client: reqwest::Client::new(),
            log,
            child,
            exited: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            env: env.to_vec(),
        }
    }

    /// Waits until the instance answers `/readyz` (or `/healthz` where there is no `/readyz`);
    /// on failure, returns why with the end of its log.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return Err(format!("exited with {status} before it was ready:\n{}", self.log_tail(40)));
            }
            match self.client.get(format!("{}/readyz", self.base)).send().await {
                Ok(r) if r.status() == 200 => return Ok(()),
                Ok(r) if r.status() == 404 => {
                    if let Ok(r) = self.client.get(format!("{}/healthz", self.base)).send().await
                        && r.status() == 200
                    {
                        return Ok(());
                    }
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("not ready within 30 s:\n{}", self.log_tail(40)));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The last `lines` lines of the instance's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the instance is still running")
    }

    /// Sends SIGTERM (what Kubernetes does before stopping a pod).
    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Kills the instance with SIGKILL and waits until it is gone.
    pub async fn sigkill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.wait_exit(Duration::from_secs(10)).await;
    }

    /// Waits for the process to exit; fails the test after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for the instance"),
            Err(_) => panic!("instance {} did not exit within {limit:?}:\n{}", self.name, self.log_tail(40)),
        };
        self.exited = Some(status);
        status
    }

    /// The same upload's URL on this instance.
    pub fn at(&self, url: &str) -> String {
        format!("{}{}", self.files, upload_id(url))
    }

    /// A tus request to this instance for `url` (any instance's URL of the upload).
    pub fn tus(&self, method: Method, url: &str) -> RequestBuilder {
        self.client.request(method, self.at(url)).header("Tus-Resumable", "1.0.0")
    }

    /// Creates an upload of `length` bytes and returns its URL (on this instance).
    pub async fn create(&self, length: u64) -> String {
        self.create_as(length, None).await
    }

    /// Creates a partial upload (`Upload-Concat: partial`) of `length` bytes; its URL.
    pub async fn create_partial(&self, length: u64) -> String {
        self.create_as(length, Some("partial")).await
    }

    async fn create_as(&self, length: u64, concat: Option<&str>) -> String {
        let mut request = self.tus(Method::POST, &self.files).header("Upload-Length", length.to_string());
        if let Some(concat) = concat {
            request = request.header("Upload-Concat", concat);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("POST to {}: {e}", self.name));
        let status = response.status();
        assert_eq!(status, 201, "create ({concat:?}) on {}: {}", self.name, response.text().await.unwrap_or_default());
        header(&response, "location")
    }

    /// A PATCH request, built but not sent.
    pub fn patch_request(&self, url: &str, offset: u64) -> RequestBuilder {
        self.tus(Method::PATCH, url)
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
    }

    /// Sends a PATCH; fails the test when no answer comes back.
    pub async fn patch(&self, url: &str, offset: u64, body: impl Into<reqwest::Body>) -> Response {
        self.patch_request(url, offset)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PATCH at {offset} through {} got no answer: {e}", self.name))
    }

    pub async fn head(&self, url: &str) -> Response {
        self.tus(Method::HEAD, url).send().await.unwrap_or_else(|e| panic!("HEAD through {}: {e}", self.name))
    }

    /// The offset HEAD reports.
    pub async fn offset(&self, url: &str) -> u64 {
        let response = self.head(url).await;
        assert_eq!(response.status(), 200, "HEAD {url} through {}", self.name);
        header(&response, "upload-offset").parse().expect("Upload-Offset is a number")
    }

    pub async fn download(&self, url: &str) -> Vec<u8> {
        let response =
            self.client.get(self.at(url)).send().await.unwrap_or_else(|e| panic!("GET through {}: {e}", self.name));
        assert_eq!(response.status(), 200, "GET {url} through {}", self.name);
        response.bytes().await.expect("download body").to_vec()
    }
}

/// The writer generation of an upload, read from the database (0 before any append).
pub async fn generation(app: &TestApp, url: &str) -> i64 {
    column(app, url, "write_gen").await
}

/// The committed offset of an upload, read from the database (works with the server stopped).
pub async fn committed_offset(app: &TestApp, url: &str) -> i64 {
    column(app, url, "upload_offset").await
}

async fn column(app: &TestApp, url: &str, name: &str) -> i64 {
    use sqlx::Connection;
    let id: uuid::Uuid = url.rsplit('/').next().unwrap().parse().unwrap();
    let query = format!("SELECT {name} FROM uploads WHERE id = $1");
    match app.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(&app.db_url).await.unwrap();
            sqlx::query_scalar(&query).bind(id).fetch_one(&mut conn).await.unwrap()
        }
        Backend::Postgres | Backend::S3 | Backend::Azure => {
            let mut conn = sqlx::PgConnection::connect(&app.db_url).await.unwrap();
            sqlx::query_scalar(&query).bind(id).fetch_one(&mut conn).await.unwrap()
        }
    }
}

/// Runs a future to completion from synchronous test code (on the multi-threaded test runtime).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

/// An answer read off a raw connection.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The status line and headers.
    pub head: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Reads the head of the answer on a raw connection; None when the server closed the connection
/// without answering. An interim answer (`100 Continue`) is an answer of its own.
pub async fn read_answer(socket: &mut tokio::net::TcpStream, limit: Duration) -> Option<Answer> {
    let mut buffer = Vec::new();
    let read = async {
        let mut piece = [0u8; 4096];
        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::io::AsyncReadExt::read(socket, &mut piece).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&piece[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.unwrap_or_else(|_| panic!("no answer on the raw connection in {limit:?}"));
    let head = String::from_utf8_lossy(&buffer).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Answer { status, head })
}
