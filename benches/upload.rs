//! Upload benchmark: `cargo bench --bench upload`.
//!
//! Runs the release `ferry` binary (SQLite + local disk in a temp folder) and reports, each as a
//! ratio against a reference measured in the same run:
//! - throughput of chunked uploads against writing the same chunks to a file with fsync;
//! - the latency of the last PATCH of a large upload against an early PATCH of the same size
//!   (1.0 means completing an upload costs nothing extra, whatever the file size);
//! - the server's peak memory growth against the chunk size (bodies are streamed, not buffered).
//!
//! `FERRY_BENCH_SIZES` (MiB, comma-separated; default `64,1024`) sets the file sizes.

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const MIB: usize = 1 << 20;

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Server {
    let dir = tempfile::tempdir_in(std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| "target".into())).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start ferry");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "ferry did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, base, _dir: dir }
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
    Run { seconds: started.elapsed().as_secs_f64(), first_patch, last_patch }
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
    let server = start_server();
    let client = reqwest::Client::new();
    let scratch = tempfile::tempdir_in("target").unwrap();
    let baseline_rss = peak_rss(server.child.id());

    println!(
        "{:>8} {:>7} {:>10} {:>10} {:>8} {:>12} {:>12} {:>8}",
        "file", "chunk", "ferry", "reference", "ratio", "first PATCH", "last PATCH", "last/first"
    );
    for &size_mib in &sizes {
        for chunk_mib in [1usize, 8] {
            let (size, chunk) = (size_mib * MIB, chunk_mib * MIB);
            let run = upload(&client, &server.base, size, chunk, &data).await;
            let reference = reference_write(scratch.path(), size, chunk, &data);
            let rate = |s: f64| size as f64 / MIB as f64 / s;
            println!(
                "{:>5}MiB {:>4}MiB {:>6.0}MB/s {:>6.0}MB/s {:>8.2} {:>10.1}ms {:>10.1}ms {:>8.2}",
                size_mib,
                chunk_mib,
                rate(run.seconds),
                rate(reference),
                reference / run.seconds,
                run.first_patch.as_secs_f64() * 1000.0,
                run.last_patch.as_secs_f64() * 1000.0,
                run.last_patch.as_secs_f64() / run.first_patch.as_secs_f64(),
            );
        }
    }
    let peak = peak_rss(server.child.id());
    println!(
        "server peak RSS: {:.1} MiB at start, {:.1} MiB after all uploads; growth / largest chunk (8 MiB) = {:.2}",
        baseline_rss as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        peak.saturating_sub(baseline_rss) as f64 / (8 * MIB) as f64
    );
}
