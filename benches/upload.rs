//! Upload benchmark: `cargo bench --bench upload` (see docs/benchmark.md).
//!
//! Every measure is a ratio against a reference measured in the same run, on this machine:
//! - **ingest**: one upload of 256 MiB in 8 MiB and 1 MiB chunks, data on tmpfs, medians of 5
//!   interleaved rounds, each upload terminated after its timing; ferry on SQLite and on
//!   PostgreSQL against (a) a minimal receiver that streams each body to a file with one
//!   `fdatasync` per request, (b) the same with SHA-256 on the request task, and rustus when a
//!   `rustus` binary is installed; server CPU seconds per GiB;
//! - **concurrency**: 8 uploads at once against one upload's speed, and ferry's peak memory;
//! - **slow**: 1,000 uploads of 1 MiB at once, bodies paced at 128 KiB/s, on SQLite and on
//!   PostgreSQL: all complete byte-exact, ferry's peak memory, HEAD latency meanwhile;
//! - **stores**: on an S3 API and on Azurite, ferry against a plain multipart upload of the same
//!   bytes in 8 MiB parts.
//!
//! At the end every target of the acceptance list is printed with its measured value.
//!
//! Environment: `FERRY_BENCH` (comma-separated sections, default all), `FERRY_BENCH_DIR` (where
//! servers keep their data; default `/dev/shm`, a tmpfs), `FERRY_BENCH_ROUNDS` (default 5),
//! `FERRY_BENCH_FILE_MIB` (default 256), `FERRY_BENCH_POSTGRES` (admin URL, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; a database is made for the run and dropped).

#[path = "../tests/api/azurite.rs"]
#[allow(dead_code)]
mod azurite;
#[path = "support/client.rs"]
mod client;
#[path = "support/reference.rs"]
mod reference;
#[path = "../tests/api/s3api.rs"]
#[allow(dead_code)]
mod s3api;
#[path = "support/servers.rs"]
mod servers;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use servers::Server;

const MIB: usize = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// A file's worth of bytes that do not repeat within any chunk.
fn test_data(len: usize) -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(len);
    data.into()
}

/// A target of the acceptance list and what the run measured.
struct Target {
    what: String,
    measured: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Targets(Vec<Target>);

impl Targets {
    fn ratio(&mut self, what: &str, value: f64, at_least: f64) {
        let met = value.is_finite().then_some(value >= at_least);
        self.0.push(Target { what: what.into(), measured: format!("{value:.2}x"), met });
    }

    fn at_most(&mut self, what: &str, value: f64, limit: f64, unit: &str) {
        let met = value.is_finite().then_some(value <= limit);
        self.0.push(Target { what: what.into(), measured: format!("{value:.2} {unit}"), met });
    }

    fn check(&mut self, what: &str, ok: bool, measured: String) {
        self.0.push(Target { what: what.into(), measured, met: Some(ok) });
    }

    fn missing(&mut self, what: &str, why: &str) {
        self.0.push(Target { what: what.into(), measured: why.into(), met: None });
    }

    fn print(&self) {
        println!("\n== targets");
        for target in &self.0 {
            let verdict = match target.met {
                Some(true) => "met",
                Some(false) => "NOT MET",
                None => "not measured",
            };
            println!("{:<13} {:<72} {}", verdict, target.what, target.measured);
        }
    }
}

/// A PostgreSQL database made for this run, dropped at the end.
struct Database {
    admin: String,
    name: String,
    url: String,
}

impl Database {
    async fn create() -> Option<Self> {
        use sqlx::{Connection, Executor};
        let admin = std::env::var("FERRY_BENCH_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let mut conn = match sqlx::PgConnection::connect(&admin).await {
            Ok(conn) => conn,
            Err(e) => {
                println!("(no PostgreSQL rows: {admin}: {e})");
                return None;
            }
        };
        let name = format!("ferry_bench_{}", uuid::Uuid::new_v4().simple());
        conn.execute(format!("CREATE DATABASE {name}").as_str()).await.unwrap();
        let (prefix, _) = admin.rsplit_once('/').unwrap();
        let url = format!("{prefix}/{name}");
        Some(Self { admin, name, url })
    }

    async fn drop_now(&self) {
        use sqlx::{Connection, Executor};
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = conn.execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str()).await;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--reference-server") {
        let dir = PathBuf::from(&args[at + 1]);
        reference::serve(dir, args.iter().any(|a| a == "--sha"));
        return;
    }
    // `cargo test --all-targets` runs benches once as tests, without `--bench`: nothing to do then.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    // FERRY_BENCH_TARGET=HOST:PORT uploads to a server started by hand (for profiling it):
    // FERRY_BENCH_ROUNDS uploads of FERRY_BENCH_FILE_MIB in FERRY_BENCH_CHUNK_MIB chunks.
    if let Ok(target) = std::env::var("FERRY_BENCH_TARGET") {
        let addr = target.parse().expect("FERRY_BENCH_TARGET is HOST:PORT");
        let data = test_data(env_number("FERRY_BENCH_FILE_MIB", 256) * MIB);
        let chunk = env_number("FERRY_BENCH_CHUNK_MIB", 8) * MIB;
        for _ in 0..env_number("FERRY_BENCH_ROUNDS", 5) {
            let took = client::timed_upload(addr, "/files/", &data, chunk).await;
            println!("{:.0} MB/s", mb_per_s(data.len(), took));
        }
        return;
    }
    let sections: Vec<String> = std::env::var("FERRY_BENCH")
        .unwrap_or_else(|_| "ingest,concurrency,slow,stores,completion".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let wants = |s: &str| sections.iter().any(|x| x == s);
    // Before the tmpfs is warmed up, so that the warm-up lasts.
    let host = Host::watch();
    let tmpfs = match std::env::var_os("FERRY_BENCH_DIR") {
        Some(dir) => Scratch::Given(PathBuf::from(dir)),
        None => Scratch::mount(),
    };
    let scratch = tempfile::tempdir_in(tmpfs.path()).expect("a folder for the servers' data");
    let mut targets = Targets::default();
    let database = Database::create().await;
    let postgres = database.as_ref().map(|d| d.url.as_str());

    let mut single_8mib = None;
    if wants("ingest") {
        single_8mib = ingest(scratch.path(), postgres, &mut targets).await;
    }
    if wants("concurrency") {
        concurrency(scratch.path(), single_8mib, &mut targets).await;
    }
    if wants("slow") {
        slow(scratch.path(), None, &mut targets).await;
        match postgres {
            Some(url) => slow(scratch.path(), Some(url), &mut targets).await,
            None => targets.missing("1,000 slow uploads on PostgreSQL", "no PostgreSQL"),
        }
    }
    if wants("stores") {
        stores(scratch.path(), postgres, &mut targets).await;
    }
    if wants("completion") {
        completion(scratch.path(), postgres, &mut targets).await;
    }
    if let Some(database) = &database {
        database.drop_now().await;
    }
    targets.print();
    host.print();
    drop(scratch);
    drop(tmpfs);
}

/// What the virtual machine's host does to a run.
///
/// Free page reporting (virtio-balloon) hands memory the guest freed back to the host, which
/// backs it again lazily: a page freed by one upload and reused by the next then costs a host
/// fault on its first write, several times the write itself, at random moments of the run.
/// Where the kernel lets a page stay free for a while before it is reported
/// (`/sys/module/page_reporting/parameters/min_free_ms`, on some virtual machines' kernels), the
/// benchmark, as root, holds reporting off for the run and restores the setting after it.
///
/// Steal time is CPU time the host gave to others while this machine wanted it: a round that
/// meets it is slower for reasons none of the servers has.
struct Host {
    /// The setting to restore, when it was changed.
    restore: Option<String>,
    reported_at_start: Option<u64>,
    steal_at_start: Option<u64>,
}

const PAGE_REPORTING: &str = "/sys/module/page_reporting/parameters";
const HOLD_MS: &str = "300000";

impl Host {
    fn watch() -> Self {
        let setting = Path::new(PAGE_REPORTING).join("min_free_ms");
        let restore = std::fs::read_to_string(&setting).ok().filter(|old| {
            // Five minutes, the longest the kernel takes: a page freed and reused within a
            // section stays hot.
            let held = std::fs::write(&setting, HOLD_MS).is_ok();
            if held {
                println!(
                    "(free page reporting held off: {PAGE_REPORTING}/min_free_ms {} -> {HOLD_MS} for the run)",
                    old.trim()
                );
            }
            held
        });
        Self { restore, reported_at_start: Self::reported_kib(), steal_at_start: Self::steal_ticks() }
    }

    /// The machine's steal time so far, in clock ticks (the eighth number of `/proc/stat`'s
    /// `cpu` line).
    fn steal_ticks() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        stat.lines().next()?.split_whitespace().nth(8)?.parse().ok()
    }

    fn reported_kib() -> Option<u64> {
        std::fs::read_to_string(Path::new(PAGE_REPORTING).join("reported_kib")).ok()?.trim().parse().ok()
    }

    /// How much memory went back to the host during the run, and how much CPU time the host
    /// took (where the kernel says).
    fn print(&self) {
        println!();
        if let (Some(start), Some(end)) = (self.reported_at_start, Self::reported_kib()) {
            let reported = end.saturating_sub(start) / 1024;
            let which = match (&self.restore, reported) {
                (_, 0) => "",
                (Some(_), _) => " (memory freed before the run or over 5 minutes earlier)",
                (None, _) => " (pages reused after that came back cold: compare sections run on their own)",
            };
            println!("free page reporting: {reported} MiB handed back to the host during the run{which}");
        }
        if let (Some(start), Some(end)) = (self.steal_at_start, Self::steal_ticks()) {
            let stolen = end.saturating_sub(start) as f64 / servers::clock_ticks() as f64;
            println!("steal time: the host kept {stolen:.1} CPU s from this machine during the run");
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(old) = &self.restore {
            let _ = std::fs::write(Path::new(PAGE_REPORTING).join("min_free_ms"), old.trim());
        }
    }
}

/// Where the servers keep their data: a tmpfs of the benchmark's own when it may mount one (as
/// root), else `/dev/shm`.
///
/// The benchmark's tmpfs uses huge pages and is written through once before measuring. On a
/// virtual machine whose host backs guest memory lazily, the first write to a page costs several
/// times the write itself (seen here: 0.5 GB/s for fresh 4 KiB tmpfs pages, 4-5 GB/s once
/// touched): every server would pay it, and it would drown what the servers differ in.
enum Scratch {
    Given(PathBuf),
    Mounted(tempfile::TempDir),
}

impl Scratch {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=12G,huge=within_size", "ferry-bench"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            println!("(could not mount a tmpfs of its own: the servers' data go to /dev/shm)");
            return Self::Given(PathBuf::from("/dev/shm"));
        }
        // Touch the memory the measurements will use once, so that none of them pays for it.
        let warm = dir.path().join("warm-up");
        let block = vec![0u8; 8 * MIB];
        let mut file = std::fs::File::create(&warm).unwrap();
        for _ in 0..(3 << 30) / block.len() {
            std::io::Write::write_all(&mut file, &block).unwrap();
        }
        drop(file);
        std::fs::remove_file(&warm).unwrap();
        Self::Mounted(dir)
    }

    fn path(&self) -> &Path {
        match self {
            Self::Given(path) => path,
            Self::Mounted(dir) => dir.path(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Self::Mounted(dir) = self {
            let _ = std::process::Command::new("umount").arg(dir.path()).status();
        }
    }
}

/// CPU seconds per GiB of SHA-256 alone on this machine (the sha2 crate ferry uses), on bytes
/// in the CPU's caches: a server hashes what it has just received, a batch of at most a few MiB
/// at a time. (Hashing one buffer of the file's size instead measures the memory as much as
/// SHA-256: on some virtual machines of this kind it costs 0.97 against 0.58 CPU s/GiB.)
/// Best of three passes over as many bytes as `data` holds, each timed by the CPU time of the
/// thread that hashes (not the clock: a pass the thread spent partly waiting for a core would
/// count that wait).
fn sha256_alone(data: &Bytes) -> f64 {
    use sha2::Digest;
    let thread_cpu = || {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `now` is a valid timespec for the call to fill in.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    };
    if data.is_empty() {
        return f64::NAN;
    }
    let batch = &data[..data.len().min(1 << 20)];
    let passes = data.len() / batch.len();
    let pass = || {
        let started = thread_cpu();
        let mut hash = sha2::Sha256::new();
        for _ in 0..passes {
            for piece in batch.chunks(128 * 1024) {
                hash.update(piece);
            }
        }
        std::hint::black_box(hash.finalize());
        (thread_cpu() - started).as_secs_f64() / ((passes * batch.len()) as f64 / GIB)
    };
    (0..3).map(|_| pass()).fold(f64::INFINITY, f64::min)
}

/// What one server did in the ingest rounds.
#[derive(Default)]
struct Ingest {
    rates: [Vec<f64>; 2],
    cpu: [Duration; 2],
    /// CPU time of the measuring client (this process) during the same uploads.
    client_cpu: [Duration; 2],
    /// The server's minor page faults during the uploads.
    faults: [u64; 2],
    bytes: [usize; 2],
}

/// CPU time (user and system) this process has used: during a timed upload, the measuring
/// client's (the servers are processes of their own).
fn own_cpu() -> Duration {
    // SAFETY: `usage` is a valid rusage for the call to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

const CHUNKS: [usize; 2] = [8 * MIB, MIB];

async fn ingest(scratch: &Path, postgres: Option<&str>, targets: &mut Targets) -> Option<f64> {
    let size = env_number("FERRY_BENCH_FILE_MIB", 256) * MIB;
    let rounds = env_number("FERRY_BENCH_ROUNDS", 5);
    let data = test_data(size);
    let mut servers: Vec<Server> = vec![
        servers::reference("(a) receiver", scratch, false),
        servers::reference("(b) receiver + SHA-256", scratch, true),
        servers::ferry("ferry, SQLite", scratch, None, &[], &[]),
    ];
    if let Some(url) = postgres {
        servers.push(servers::ferry("ferry, PostgreSQL", scratch, Some(url), &[], &[]));
    }
    match servers::rustus_binary() {
        Some(binary) => servers.push(servers::rustus(&binary, scratch)),
        None => println!("(no rustus row: no rustus binary; `cargo install rustus --locked` adds it)"),
    }
    // FERRY_BENCH_SERVERS (a part of a row's name) measures only some rows, for profiling.
    if let Ok(only) = std::env::var("FERRY_BENCH_SERVERS") {
        servers.retain(|s| s.name.contains(only.as_str()) || s.name.starts_with('('));
    }
    println!(
        "\n== ingest: one upload of {} MiB, {rounds} interleaved rounds, data in {}",
        size / MIB,
        scratch.display()
    );
    let mut results: Vec<Ingest> = servers.iter().map(|_| Ingest::default()).collect();
    for _round in 0..rounds {
        for (server, result) in servers.iter().zip(results.iter_mut()) {
            for (i, chunk) in CHUNKS.iter().enumerate() {
                // FERRY_BENCH_CHUNK_MIB measures one chunk size only (for profiling).
                if std::env::var("FERRY_BENCH_CHUNK_MIB").is_ok_and(|c| c != (chunk / MIB).to_string()) {
                    continue;
                }
                let (cpu, client_cpu, faults) = (server.cpu(), own_cpu(), server.minor_faults());
                let took = client::timed_upload(server.addr, &server.base_path, &data, *chunk).await;
                result.cpu[i] += server.cpu().saturating_sub(cpu);
                result.faults[i] += server.minor_faults().saturating_sub(faults);
                result.client_cpu[i] += own_cpu().saturating_sub(client_cpu);
                result.bytes[i] += size;
                result.rates[i].push(mb_per_s(size, took));
            }
        }
    }
    println!(
        "{:<26} {:>12} {:>12} {:>16} {:>16} {:>18}",
        "server", "MB/s 8 MiB", "MB/s 1 MiB", "CPU s/GiB 8 MiB", "CPU s/GiB 1 MiB", "faults/GiB 8/1 MiB"
    );
    let mut medians = Vec::new();
    let mut client_cpus = Vec::new();
    for (server, result) in servers.iter().zip(results.iter_mut()) {
        let m = [median(&mut result.rates[0]), median(&mut result.rates[1])];
        let per_gib = |amount: [f64; 2]| [0, 1].map(|i| amount[i] / (result.bytes[i] as f64 / GIB));
        let seconds = |spent: &[Duration; 2]| spent.map(|d| d.as_secs_f64());
        let cpu = per_gib(seconds(&result.cpu));
        let faults = per_gib(result.faults.map(|f| f as f64));
        println!(
            "{:<26} {:>12.0} {:>12.0} {:>16.2} {:>16.2} {:>11.0}/{:.0}",
            server.name, m[0], m[1], cpu[0], cpu[1], faults[0], faults[1]
        );
        client_cpus.push((server.name.clone(), per_gib(seconds(&result.client_cpu))));
        medians.push((server.name.clone(), m, cpu));
    }
    let find = |name: &str| medians.iter().find(|(n, _, _)| n.starts_with(name)).map(|(_, m, c)| (*m, *c));
    let (a, a_cpu) = find("(a)").expect("the references are always measured");
    let (b, _) = find("(b)").expect("the references are always measured");
    let Some((ferry, ferry_cpu)) = find("ferry, SQLite") else {
        targets.missing("ferry's ingest targets", "no ferry, SQLite row (FERRY_BENCH_SERVERS)");
        return None;
    };
    targets.ratio("single upload, 8 MiB chunks: ferry / (a) >= 0.6", ferry[0] / a[0], 0.6);
    targets.ratio("single upload, 1 MiB chunks: ferry / (a) >= 0.5", ferry[1] / a[1], 0.5);
    targets.ratio("single upload, 8 MiB chunks: ferry / (b) >= 1.2", ferry[0] / b[0], 1.2);
    match find("rustus") {
        Some((rustus, _)) => {
            targets.ratio("single upload, 8 MiB chunks: ferry / rustus >= 1.0", ferry[0] / rustus[0], 1.0);
            targets.ratio("single upload, 1 MiB chunks: ferry / rustus >= 1.0", ferry[1] / rustus[1], 1.0);
        }
        None => targets.missing("ferry / rustus >= 1.0 (both chunk sizes)", "rustus not installed"),
    }
    let sha = sha256_alone(&data);
    println!("SHA-256 alone: {sha:.2} CPU s/GiB on this machine (one thread, in the benchmark process)");
    // One upload's whole-file hash is one serial SHA-256 stream: no server that hashes every byte
    // can take one upload faster than one thread hashes, nor spend less CPU than (a) plus hashing.
    let ceiling = GIB / sha / 1e6;
    println!(
        "so here one hashed upload is capped at {ceiling:.0} MB/s ({:.2}x (a) with 8 MiB chunks, {:.2}x with 1 MiB) \
         and costs at least {:.2} CPU s/GiB ((a) + SHA-256)",
        ceiling / a[0],
        ceiling / a[1],
        a_cpu[0] + sha
    );
    // The client runs on the same cores: what it spends per GiB, with the least a hashing server
    // spends, bounds any hashed upload here even if no core ever idled.
    if let Some((_, client)) = client_cpus.iter().find(|(n, _)| n == "ferry, SQLite") {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let bound = |i: usize| (cores / (client[i] + a_cpu[i] + sha)).min(1.0 / sha) * GIB / 1e6;
        let (bound_8, bound_1) = (bound(0), bound(1));
        println!(
            "the client itself used {:.2} / {:.2} CPU s/GiB (8 / 1 MiB) sending to ferry; with the least a hashing server \
             spends, {cores:.0} cores fully busy take a hashed upload at most at {bound_8:.0} / {bound_1:.0} MB/s \
             ({:.2}x / {:.2}x (a))",
            client[0],
            client[1],
            bound_8 / a[0],
            bound_1 / a[1],
        );
        if let Some((rustus, _)) = find("rustus") {
            let needed = |i: usize| rustus[i] * 1e6 / GIB * (client[i] + a_cpu[i] + sha);
            println!(
                "matching rustus ({:.0} / {:.0} MB/s) while hashing would take {:.2} / {:.2} cores fully busy",
                rustus[0],
                rustus[1],
                needed(0),
                needed(1)
            );
        }
    }
    targets.at_most("server CPU per GiB with SHA-256, 8 MiB chunks <= 1.1 s", ferry_cpu[0], 1.1, "s");
    match find("ferry, PostgreSQL") {
        Some((pg, _)) => {
            targets.ratio("PostgreSQL / SQLite, 8 MiB chunks >= 0.9", pg[0] / ferry[0], 0.9);
            targets.ratio("PostgreSQL / SQLite, 1 MiB chunks >= 0.9", pg[1] / ferry[1], 0.9);
        }
        None => targets.missing("PostgreSQL / SQLite >= 0.9", "no PostgreSQL"),
    }
    Some(ferry[0])
}

async fn concurrency(scratch: &Path, single: Option<f64>, targets: &mut Targets) {
    let size = env_number("FERRY_BENCH_FILE_MIB", 256) * MIB;
    let data = test_data(size);
    let server = servers::ferry("ferry, SQLite", scratch, None, &[], &[]);
    let single = match single {
        Some(rate) => rate,
        None => mb_per_s(size, client::timed_upload(server.addr, &server.base_path, &data, 8 * MIB).await),
    };
    server.reset_peak_rss();
    let cpu = server.cpu();
    let started = Instant::now();
    let uploads = (0..8).map(|_| {
        let data = data.clone();
        let (addr, base) = (server.addr, server.base_path.clone());
        tokio::spawn(async move { client::timed_upload(addr, &base, &data, 8 * MIB).await })
    });
    for upload in futures_util::future::join_all(uploads).await {
        upload.unwrap();
    }
    let aggregate = mb_per_s(8 * size, started.elapsed());
    let cpu_per_gib = server.cpu().saturating_sub(cpu).as_secs_f64() / (8.0 * size as f64 / GIB);
    let peak = server.peak_rss() as f64 / MIB as f64;
    println!("\n== concurrency: 8 uploads of {} MiB at once, 8 MiB chunks, ferry on SQLite", size / MIB);
    println!(
        "aggregate {aggregate:.0} MB/s, one upload alone {single:.0} MB/s; ferry's peak RSS {peak:.1} MiB, \
         CPU {cpu_per_gib:.2} s/GiB"
    );
    targets.ratio("8 concurrent uploads: aggregate / one upload >= 1.0", aggregate / single, 1.0);
    targets.at_most("8 concurrent uploads: ferry's peak RSS <= 64 MiB", peak, 64.0, "MiB");
}

async fn slow(scratch: &Path, postgres: Option<&str>, targets: &mut Targets) {
    const UPLOADS: usize = 1000;
    const SIZE: usize = MIB;
    const PIECE: usize = 16 * 1024;
    let label = if postgres.is_some() { "PostgreSQL" } else { "SQLite" };
    let server = servers::ferry(&format!("ferry, {label}"), scratch, postgres, &[], &[]);
    let pool = test_data(8 * MIB);
    server.reset_peak_rss();
    let started = Instant::now();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (paths_tx, mut paths_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let uploads: Vec<_> = (0..UPLOADS)
        .map(|i| {
            let data = pool.slice(i * 7919 % (7 * MIB)..).slice(..SIZE);
            let (addr, base) = (server.addr, server.base_path.clone());
            let paths = paths_tx.clone();
            tokio::spawn(async move {
                // Spread the starts over a second, as real clients arrive.
                tokio::time::sleep(Duration::from_micros(i as u64 * 1000)).await;
                let mut conn = client::Conn::open(addr).await;
                // A refused creation is counted (the upload does not complete), not retried.
                let sent = Instant::now();
                let created = client::try_create(&mut conn, &base, SIZE).await;
                let creating = sent.elapsed().as_secs_f64() * 1000.0;
                let path = match created {
                    Ok(path) => path,
                    Err(refusal) => return (creating, Err(refusal)),
                };
                let _ = paths.send(path.clone());
                let body = client::paced(data.clone(), PIECE, Duration::from_millis(125));
                client::patch(&mut conn, &path, 0, SIZE, body).await;
                (creating, Ok((conn, path, data)))
            })
        })
        .collect();
    drop(paths_tx);
    // Meanwhile, HEAD requests on the uploads in flight, one after the other.
    let prober = {
        let (addr, done) = (server.addr, done.clone());
        tokio::spawn(async move {
            let mut known = Vec::new();
            let mut latencies = Vec::new();
            let mut conn = client::Conn::open(addr).await;
            let mut n = 0usize;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                while let Ok(path) = paths_rx.try_recv() {
                    known.push(path);
                }
                if known.is_empty() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                n = (n + 7) % known.len();
                let sent = Instant::now();
                client::head(&mut conn, &known[n]).await;
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                if std::env::var("FERRY_BENCH_SLOW_HEADS").is_ok() && sent.elapsed() > Duration::from_millis(50) {
                    eprintln!("slow HEAD at {:?}: {:?}", started.elapsed(), sent.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            latencies
        })
    };
    let mut finished = Vec::new();
    let mut refused = Vec::new();
    let mut creations = Vec::new();
    for upload in uploads {
        let (creating, outcome) = upload.await.unwrap();
        creations.push(creating);
        match outcome {
            Ok(upload) => finished.push(upload),
            Err(refusal) => refused.push(refusal),
        }
    }
    let took = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = prober.await.unwrap();
    let peak = server.peak_rss() as f64 / MIB as f64;
    // Byte-exact: each upload downloaded, once all are in (the downloads are not what is measured).
    let mut exact = 0;
    let mut paths = Vec::new();
    for (mut conn, path, data) in finished {
        let answer = conn.send("GET", &path, &[], client::empty()).await;
        exact += usize::from(answer.status == 200 && answer.body == data);
        paths.push(path);
    }
    if let Some(first) = refused.first() {
        println!("{} of {UPLOADS} creations were refused, the first with: {first}", refused.len());
    }
    let [p50, p99, _] = percentiles(&mut latencies);
    let [create_p50, create_p99, create_max] = percentiles(&mut creations);
    println!(
        "\n== slow: {UPLOADS} uploads of 1 MiB at once, bodies at 128 KiB/s, ferry on {label}\n\
         {exact} of {UPLOADS} complete and byte-exact in {:.1} s; ferry's peak RSS {peak:.1} MiB; \
         {} HEADs meanwhile: p50 {p50:.1} ms, p99 {p99:.1} ms\n\
         creations (one a millisecond): p50 {create_p50:.1} ms, p99 {create_p99:.1} ms, slowest {create_max:.1} ms",
        took.as_secs_f64(),
        latencies.len()
    );
    targets.check(
        &format!("1,000 slow uploads on {label}: all complete byte-exact"),
        exact == UPLOADS,
        format!("{exact} of {UPLOADS}"),
    );
    targets.at_most(&format!("1,000 slow uploads on {label}: ferry's peak RSS <= 256 MiB"), peak, 256.0, "MiB");
    targets.at_most(&format!("1,000 slow uploads on {label}: p99 HEAD latency <= 50 ms"), p99, 50.0, "ms");
    let mut conn = client::Conn::open(server.addr).await;
    for path in paths {
        let _ = conn.send("DELETE", &path, &[("tus-resumable", "1.0.0".into())], client::empty()).await;
    }
}

/// The median, the 99th percentile and the largest of `values` (NaN when there are none).
fn percentiles(values: &mut [f64]) -> [f64; 3] {
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |i: usize| values.get(i).copied().unwrap_or(f64::NAN);
    [at(values.len() / 2), at(values.len() * 99 / 100), values.last().copied().unwrap_or(f64::NAN)]
}

/// An object store the benchmark measures ferry on.
enum ObjectStoreRow {
    S3(s3api::S3Credentials, String),
    Azure(String, String),
}

impl ObjectStoreRow {
    fn name(&self) -> &'static str {
        match self {
            Self::S3(..) => "S3 (Garage)",
            Self::Azure(..) => "Azure (Azurite)",
        }
    }

    /// ferry's arguments and environment for this store.
    fn ferry_args(&self) -> (Vec<String>, Vec<(String, String)>) {
        match self {
            Self::S3(c, bucket) => (
                vec!["--store".into(), format!("s3://{bucket}/ferry")],
                [
                    ("AWS_ENDPOINT", c.endpoint.as_str()),
                    ("AWS_ALLOW_HTTP", "true"),
                    ("AWS_ACCESS_KEY_ID", c.key_id.as_str()),
                    ("AWS_SECRET_ACCESS_KEY", c.secret.as_str()),
                    ("AWS_REGION", c.region.as_str()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            Self::Azure(endpoint, container) => {
                let mut args = vec!["--store".to_string(), format!("az://{container}/ferry")];
                for (key, value) in azurite::store_options(endpoint) {
                    args.push("--store-option".into());
                    args.push(format!("{key}={value}"));
                }
                (args, Vec::new())
            }
        }
    }

    /// The reference's client: object_store on the same bucket or container.
    fn multipart(&self) -> Box<dyn object_store::multipart::MultipartStore> {
        match self {
            Self::S3(c, bucket) => Box::new(
                object_store::aws::AmazonS3Builder::new()
                    .with_endpoint(&c.endpoint)
                    .with_allow_http(true)
                    .with_bucket_name(bucket)
                    .with_region(&c.region)
                    .with_access_key_id(&c.key_id)
                    .with_secret_access_key(&c.secret)
                    .build()
                    .unwrap(),
            ),
            Self::Azure(endpoint, container) => Box::new(azurite::container_store(endpoint, container)),
        }
    }
}

/// The reference on an object store: the same bytes as one multipart upload of 8 MiB parts, one
/// part after the other (what any uploader has to do at least; on Azure, Put Block calls and one
/// Put Block List).
async fn plain_multipart(store: &dyn object_store::multipart::MultipartStore, data: &Bytes) -> Duration {
    use object_store::{PutPayload, path::Path};
    let path = Path::from(format!("reference-{}", uuid::Uuid::new_v4().simple()));
    let started = Instant::now();
    let id = store.create_multipart(&path).await.unwrap();
    let mut parts = Vec::new();
    for (index, part) in data.chunks(8 * MIB).enumerate() {
        let payload = PutPayload::from(data.slice_ref(part));
        parts.push(store.put_part(&path, &id, index, payload).await.unwrap());
    }
    store.complete_multipart(&path, &id, parts).await.unwrap();
    started.elapsed()
}

/// The object stores the benchmark measures ferry on, with what keeps them running.
struct StoreRows {
    rows: Vec<ObjectStoreRow>,
    _garage: Option<servers::Garage>,
    _azurite: Option<(servers::Helper, String)>,
    _azurite_dir: tempfile::TempDir,
}

/// S3: the API the tests use (FERRY_TEST_S3_*), or a Garage of the benchmark's own; and Azurite.
async fn store_rows(scratch: &Path, targets: &mut Targets, what: &str) -> StoreRows {
    let http = reqwest::Client::new();
    let mut rows = Vec::new();
    let mut garage = None;
    let credentials = match s3api::S3Credentials::try_from_env() {
        Some(credentials) => Some(credentials),
        None => {
            garage = servers::Garage::start(scratch);
            garage.as_ref().map(|g| {
                let get = |k: &str| g.env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default();
                s3api::S3Credentials {
                    endpoint: get(s3api::S3_ENDPOINT_VAR),
                    key_id: get(s3api::S3_KEY_ID_VAR),
                    secret: get(s3api::S3_SECRET_VAR),
                    region: get(s3api::S3_REGION_VAR),
                }
            })
        }
    };
    match credentials {
        Some(credentials) => {
            let bucket = format!("ferry-bench-{}", uuid::Uuid::new_v4().simple());
            let (status, body) =
                s3api::s3_call(&http, &credentials, reqwest::Method::PUT, &format!("/{bucket}"), &[]).await.unwrap();
            assert!(status.is_success(), "CreateBucket {bucket}: {status}: {body}");
            rows.push(ObjectStoreRow::S3(credentials, bucket));
        }
        None => {
            println!("(no S3 rows: no FERRY_TEST_S3_* settings and no Garage built; `tests/garage path` builds it)");
            targets.missing(&format!("S3 API: {what}"), "no S3 API");
        }
    }
    let azurite_dir = tempfile::tempdir_in(scratch).unwrap();
    let azurite = servers::azurite(azurite_dir.path());
    match &azurite {
        Some((_, endpoint)) => {
            azurite::create_container(&http, endpoint, "bench").await;
            rows.push(ObjectStoreRow::Azure(endpoint.clone(), "bench".into()));
        }
        None => {
            println!("(no Azure rows: Azurite is not installed; `bash tests/run` installs it)");
            targets.missing(&format!("Azurite: {what}"), "no Azurite");
        }
    }
    StoreRows { rows, _garage: garage, _azurite: azurite, _azurite_dir: azurite_dir }
}

async fn stores(scratch: &Path, postgres: Option<&str>, targets: &mut Targets) {
    let size = env_number("FERRY_BENCH_FILE_MIB", 256) * MIB;
    let rounds = env_number("FERRY_BENCH_ROUNDS", 5);
    let data = test_data(size);
    let stores = store_rows(scratch, targets, "ferry / plain multipart upload >= 0.8").await;
    let rows = &stores.rows;
    println!(
        "\n== stores: one upload of {} MiB through ferry (PostgreSQL) against a plain multipart upload in 8 MiB \
         parts, {rounds} interleaved rounds",
        size / MIB
    );
    println!(
        "{:<18} {:>14} {:>14} {:>14} {:>12} {:>12}",
        "store", "plain MB/s", "ferry 8 MiB", "ferry 1 MiB", "8 MiB ratio", "1 MiB ratio"
    );
    for row in rows {
        let (args, env) = row.ferry_args();
        let server = servers::ferry(&format!("ferry on {}", row.name()), scratch, postgres, &args, &env);
        let reference = row.multipart();
        let mut plain = Vec::new();
        let mut ferry = [Vec::new(), Vec::new()];
        let mut ratios = [Vec::new(), Vec::new()];
        for _round in 0..rounds {
            let plain_rate = mb_per_s(size, plain_multipart(reference.as_ref(), &data).await);
            plain.push(plain_rate);
            for (i, chunk) in CHUNKS.iter().enumerate() {
                let rate = mb_per_s(size, client::timed_upload(server.addr, &server.base_path, &data, *chunk).await);
                ferry[i].push(rate);
                ratios[i].push(rate / plain_rate);
            }
        }
        let ratio = [median(&mut ratios[0]), median(&mut ratios[1])];
        println!(
            "{:<18} {:>14.0} {:>14.0} {:>14.0} {:>11.2}x {:>11.2}x",
            row.name(),
            median(&mut plain),
            median(&mut ferry[0]),
            median(&mut ferry[1]),
            ratio[0],
            ratio[1]
        );
        targets.ratio(&format!("{}: ferry (8 MiB chunks) / plain multipart upload >= 0.8", row.name()), ratio[0], 0.8);
    }
}

/// On object stores: whether completing an upload costs the same whatever its size. For 64 MiB
/// and 1 GiB in 8 MiB chunks, the last PATCH's latency and the time from its answer until the
/// upload can be downloaded (a one-byte ranged GET answers), medians of the rounds.
async fn completion(scratch: &Path, postgres: Option<&str>, targets: &mut Targets) {
    let rounds = env_number("FERRY_BENCH_ROUNDS", 5).min(3);
    let sizes = [64 * MIB, 1024 * MIB];
    let stores = store_rows(scratch, targets, "completion time does not grow with the size").await;
    println!(
        "\n== completion: last PATCH and time until downloadable, 64 MiB and 1 GiB in 8 MiB chunks, ferry on \
         PostgreSQL, {rounds} rounds"
    );
    println!("{:<18} {:>8} {:>16} {:>22}", "store", "size", "last PATCH ms", "then downloadable ms");
    for row in &stores.rows {
        let (args, env) = row.ferry_args();
        let server = servers::ferry(&format!("ferry on {}", row.name()), scratch, postgres, &args, &env);
        let mut last = Vec::new();
        let mut ready = Vec::new();
        for size in sizes {
            let data = test_data(size);
            let (mut lasts, mut readies) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let (patch, downloadable) = completion_times(server.addr, &server.base_path, &data).await;
                lasts.push(patch.as_secs_f64() * 1000.0);
                readies.push(downloadable.as_secs_f64() * 1000.0);
            }
            let (l, r) = (median(&mut lasts), median(&mut readies));
            println!("{:<18} {:>7}M {:>16.1} {:>22.1}", row.name(), size / MIB, l, r);
            last.push(l);
            ready.push(r);
        }
        let name = row.name();
        targets.at_most(&format!("{name}: last PATCH, 1 GiB / 64 MiB <= 2"), last[1] / last[0], 2.0, "x");
        targets.at_most(
            &format!("{name}: downloadable after, 1 GiB / 64 MiB <= 2"),
            ready[1] / ready[0].max(1.0),
            2.0,
            "x",
        );
        targets.at_most(&format!("{name}: last PATCH of 1 GiB < 1 s"), last[1], 1000.0, "ms");
        targets.at_most(&format!("{name}: downloadable after the last PATCH of 1 GiB < 1 s"), ready[1], 1000.0, "ms");
    }
}

/// Uploads `data` in 8 MiB chunks; returns the last PATCH's latency and the time from its
/// answer until a ranged GET of the first byte succeeds. The upload is terminated afterwards.
async fn completion_times(addr: std::net::SocketAddr, base_path: &str, data: &Bytes) -> (Duration, Duration) {
    let chunk = 8 * MIB;
    let mut conn = client::Conn::open(addr).await;
    let path = client::create(&mut conn, base_path, data.len()).await;
    let mut offset = 0;
    let mut last = Duration::ZERO;
    while offset < data.len() {
        let end = (offset + chunk).min(data.len());
        let started = Instant::now();
        offset = client::patch(&mut conn, &path, offset, end - offset, client::full(data.slice(offset..end))).await;
        last = started.elapsed();
    }
    let answered = Instant::now();
    loop {
        let answer = conn.send("GET", &path, &[("range", "bytes=0-0".to_string())], client::empty()).await;
        if answer.status.is_success() {
            break;
        }
        assert!(answer.status == 409, "GET while completing: {}", answer.status);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let downloadable = answered.elapsed();
    client::terminate(&mut conn, &path).await;
    (last, downloadable)
}
