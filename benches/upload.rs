//! Upload benchmark: `cargo bench --bench upload`.
//!
//! Runs the release `ferry` binary (SQLite + local disk in a temp folder) and reports, each as a
//! ratio against a reference measured in the same run:
//! - throughput of chunked uploads against writing the same chunks to a file with fsync;
//! - the latency of the last PATCH of a large upload against an early PATCH of the same size
//!   (1.0 means completing an upload costs nothing extra, whatever the file size);
//! - the server's peak memory growth against the chunk size (bodies are streamed, not buffered).
//!
//! With `moto_server` on the PATH (or in `tests/clients/.venv`, where `tests/run` installs it), the
//! same uploads run against an S3 store too, and each S3 row adds the time from the last PATCH's
//! answer to the upload being downloadable (the multipart completion; it must not grow with the
//! file). `FERRY_BENCH_SIZES` (MiB, comma-separated; default `64,1024`) sets the file sizes.
//!
//! With Azurite installed (in `tests/azurite`, where `tests/run` installs it, or `azurite-blob` on
//! the PATH), the same again on an Azure store: throughput against a plain Put Block / Put Block
//! List upload of the same bytes, and the completion time against Azurite's own Put Block List
//! of as many blocks.

#[path = "../tests/api/azurite.rs"]
mod azurite;

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const MIB: usize = 1 << 20;

/// Where a server keeps upload bytes.
#[derive(Clone)]
enum Backing {
    Disk,
    /// The S3 endpoint and its bucket `bench`.
    S3(String),
    /// The Azurite endpoint and its container `bench`.
    Azure(String),
}

struct Server {
    child: Child,
    base: String,
    backing: Backing,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts ferry on local disk, or on an object store.
fn start_server(backing: &Backing) -> Server {
    let dir = tempfile::tempdir_in(std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "target".into())).unwrap();
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::null());
    match backing {
        Backing::Disk => {}
        Backing::S3(endpoint) => {
            command
                .args(["--store", "s3://bench/ferry"])
                .env("AWS_ENDPOINT", endpoint)
                .env("AWS_ALLOW_HTTP", "true")
                .env("AWS_ACCESS_KEY_ID", "bench")
                .env("AWS_SECRET_ACCESS_KEY", "bench")
                .env("AWS_REGION", "us-east-1");
        }
        Backing::Azure(endpoint) => {
            command.args(["--store", "az://bench/ferry"]);
            for (key, value) in azurite::store_options(endpoint) {
                command.arg("--store-option").arg(format!("{key}={value}"));
            }
        }
    }
    let child = command.spawn().expect("start ferry");
    wait_for_port(port, "ferry");
    Server { child, base: format!("http://127.0.0.1:{port}"), backing: backing.clone(), _dir: dir }
}

/// moto_server, a real S3 API, from the PATH or tests/clients/.venv.
fn start_moto() -> Option<(Child, String)> {
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/.venv/bin/moto_server");
    let program = if std::path::Path::new(venv).exists() { venv.to_string() } else { "moto_server".to_string() };
    let port = free_port();
    let child = Command::new(program)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for_port(port, "moto_server");
    Some((child, format!("http://127.0.0.1:{port}")))
}

/// Azurite's Blob service (from tests/azurite or the PATH), keeping its data in `dir`.
fn start_azurite(dir: &std::path::Path) -> Option<(Child, String)> {
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/azurite/node_modules/.bin/azurite-blob");
    let program = if std::path::Path::new(local).exists() { local.to_string() } else { "azurite-blob".to_string() };
    let port = free_port();
    let child = Command::new(program)
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--location"])
        .arg(dir)
        .args(["--silent", "--disableTelemetry", "--skipApiVersionCheck"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for_port(port, "Azurite");
    Some((child, format!("http://127.0.0.1:{port}")))
}

/// Peak resident memory of a process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

struct Run {
    seconds: f64,
    first_patch: Duration,
    last_patch: Duration,
    /// From the last PATCH's answer to the upload being downloadable.
    completion: Duration,
}

async fn upload(client: &reqwest::Client, base: &str, size: usize, chunk: usize, data: &[u8]) -> Run {
    let response = client
        .post(format!("{base}/files/"))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", size.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let url = response.headers()["location"].to_str().unwrap().to_string();
    let started = Instant::now();
    let (mut first_patch, mut last_patch) = (Duration::ZERO, Duration::ZERO);
    let mut offset = 0;
    while offset < size {
        let len = chunk.min(size - offset);
        let body = data[..len].to_vec();
        let sent = Instant::now();
        let response = client
            .patch(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
        let took = sent.elapsed();
        if offset == 0 {
            first_patch = took;
        }
        offset += len;
        if offset == size {
            last_patch = took;
        }
    }
    let answered = Instant::now();
    loop {
        let ready = client.get(&url).header("Range", "bytes=0-0").send().await.unwrap().status();
        if ready.is_success() {
            break;
        }
        assert!(answered.elapsed() < Duration::from_secs(600), "the upload never completed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let completion = answered.elapsed();
    Run { seconds: started.elapsed().as_secs_f64(), first_patch, last_patch, completion }
}

/// The reference: the same chunks written to a file, with an fsync per chunk as ferry does.
fn reference_write(dir: &std::path::Path, size: usize, chunk: usize, data: &[u8]) -> f64 {
    let path = dir.join("reference.bin");
    let mut file = std::fs::File::create(&path).unwrap();
    let started = Instant::now();
    let mut offset = 0;
    while offset < size {
        let len = chunk.min(size - offset);
        file.write_all(&data[..len]).unwrap();
        file.sync_data().unwrap();
        offset += len;
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    seconds
}

/// The object store reference: the same bytes written straight to the same store as one
/// multipart upload of 8 MiB parts (what any uploader has to do at least; on Azure, Put Block
/// calls and one Put Block List). Returns the whole time and the time of the store's own
/// completion, which ferry's completion cannot beat.
async fn reference_multipart(
    store: &dyn object_store::multipart::MultipartStore,
    size: usize,
    data: &[u8],
) -> (f64, Duration) {
    use object_store::{PutPayload, path::Path};
    let path = Path::from("reference.bin");
    let started = Instant::now();
    let id = store.create_multipart(&path).await.unwrap();
    let mut parts = Vec::new();
    let mut offset = 0;
    while offset < size {
        let len = (8 * MIB).min(size - offset);
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(&data[..len]));
        parts.push(store.put_part(&path, &id, parts.len(), payload).await.unwrap());
        offset += len;
    }
    let completing = Instant::now();
    store.complete_multipart(&path, &id, parts).await.unwrap();
    let complete = completing.elapsed();
    (started.elapsed().as_secs_f64(), complete)
}

/// The S3 client of the bench bucket.
fn s3_store(endpoint: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_bucket_name("bench")
        .with_region("us-east-1")
        .with_access_key_id("bench")
        .with_secret_access_key("bench")
        .build()
        .unwrap()
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs benches once as tests, without `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("FERRY_BENCH_SIZES")
        .unwrap_or_else(|_| "64,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 31 % 251) as u8).collect();
    let client = reqwest::Client::new();
    let scratch = tempfile::tempdir_in("target").unwrap();
    println!(
        "{:>6} {:>8} {:>6} {:>10} {:>10} {:>6} {:>11} {:>11} {:>10} {:>11} {:>11} {:>6}",
        "store",
        "file",
        "chunk",
        "ferry",
        "reference",
        "ratio",
        "first PATCH",
        "last PATCH",
        "last/first",
        "completion",
        "store's own",
        "ratio"
    );

    let server = start_server(&Backing::Disk);
    let baseline_rss = peak_rss(server.child.id());
    rows(&client, &server, "disk", &sizes, &data, scratch.path()).await;
    let peak = peak_rss(server.child.id());
    drop(server);

    match start_moto() {
        Some((mut moto, endpoint)) => {
            let created = client.put(format!("{endpoint}/bench")).send().await.unwrap();
            assert!(created.status().is_success(), "could not create the bench bucket");
            let server = start_server(&Backing::S3(endpoint));
            rows(&client, &server, "s3", &sizes, &data, scratch.path()).await;
            drop(server);
            let _ = moto.kill();
            let _ = moto.wait();
        }
        None => println!("(no S3 rows: moto_server is not installed; `bash tests/run` installs it)"),
    }

    let azurite_data = tempfile::tempdir_in("target").unwrap();
    match start_azurite(azurite_data.path()) {
        Some((mut azurite, endpoint)) => {
            azurite::create_container(&client, &endpoint, "bench").await;
            let server = start_server(&Backing::Azure(endpoint));
            rows(&client, &server, "azure", &sizes, &data, scratch.path()).await;
            drop(server);
            let _ = azurite.kill();
            let _ = azurite.wait();
        }
        None => println!("(no Azure rows: Azurite is not installed; `bash tests/run` installs it)"),
    }
    println!(
        "disk server peak RSS: {:.1} MiB at start, {:.1} MiB after all uploads; growth / largest chunk (8 MiB) = {:.2}",
        baseline_rss as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        peak.saturating_sub(baseline_rss) as f64 / (8 * MIB) as f64
    );
}

async fn rows(
    client: &reqwest::Client,
    server: &Server,
    store: &str,
    sizes: &[usize],
    data: &[u8],
    scratch: &std::path::Path,
) {
    for &size_mib in sizes {
        for chunk_mib in [1usize, 8] {
            let (size, chunk) = (size_mib * MIB, chunk_mib * MIB);
            let run = upload(client, &server.base, size, chunk, data).await;
            let (reference, store_complete) = match &server.backing {
                Backing::Disk => (reference_write(scratch, size, chunk, data), None),
                Backing::S3(endpoint) => {
                    let (seconds, complete) = reference_multipart(&s3_store(endpoint), size, data).await;
                    (seconds, Some(complete))
                }
                Backing::Azure(endpoint) => {
                    let (seconds, commit) =
                        reference_multipart(&azurite::container_store(endpoint, "bench"), size, data).await;
                    (seconds, Some(commit))
                }
            };
            let rate = |s: f64| size as f64 / MIB as f64 / s;
            println!(
                "{:>6} {:>5}MiB {:>3}MiB {:>6.0}MB/s {:>6.0}MB/s {:>6.2} {:>9.1}ms {:>9.1}ms {:>10.2} {:>9.1}ms {}",
                store,
                size_mib,
                chunk_mib,
                rate(run.seconds),
                rate(reference),
                reference / run.seconds,
                run.first_patch.as_secs_f64() * 1000.0,
                run.last_patch.as_secs_f64() * 1000.0,
                run.last_patch.as_secs_f64() / run.first_patch.as_secs_f64(),
                run.completion.as_secs_f64() * 1000.0,
                store_complete.map_or(String::new(), |c| format!(
                    "{:>9.1}ms {:>6.2}",
                    c.as_secs_f64() * 1000.0,
                    run.completion.as_secs_f64() / c.as_secs_f64()
                )),
            );
        }
    }
}
