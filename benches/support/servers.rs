//! The servers measured, each a process of its own whose CPU time and peak memory are read from
//! `/proc`: ferry (release build), the reference receivers, and rustus when it is installed.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    /// The tus endpoint's path.
    pub base_path: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not start listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the process used so far (user + system, all threads, those ended included).
    pub fn cpu(&self) -> Duration {
        let fields = self.stat(&[11, 12]);
        Duration::from_millis((fields[0] + fields[1]) * 1000 / clock_ticks())
    }

    /// Minor page faults the process took so far (all threads, those ended included): every
    /// page of fresh memory it touches costs one, with the kernel zeroing the page.
    pub fn minor_faults(&self) -> u64 {
        self.stat(&[7])[0]
    }

    /// Numeric fields of `/proc/<pid>/stat`, counted from the one after the command name (which
    /// may hold spaces, in parentheses); 0 for any that cannot be read.
    fn stat(&self, indices: &[usize]) -> Vec<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
        indices.iter().map(|&i| fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0)).collect()
    }

    /// Peak resident memory since start or since [`Server::reset_peak_rss`], in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Starts a new peak-memory measurement (`VmHWM` falls back to the current resident size).
    pub fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }
}

pub fn clock_ticks() -> u64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux this runs on; getconf says so when present.
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// ferry's release binary, on SQLite (`database: None`) or the given PostgreSQL URL, storing in
/// a fresh folder under `scratch`, with extra arguments and environment.
pub fn ferry(name: &str, scratch: &Path, database: Option<&str>, extra: &[String], env: &[(String, String)]) -> Server {
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
    command.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"]).arg(dir.path());
    if let Some(url) = database {
        command.args(["--database-url", url]);
    }
    // FERRY_BENCH_LOG=<filter> shows ferry's log (for looking into a run).
    match std::env::var("FERRY_BENCH_LOG") {
        Ok(filter) => command.args(extra).env("FERRY_LOG", filter),
        Err(_) => command.args(extra).env("FERRY_LOG", "warn").stdout(Stdio::null()),
    };
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("start ferry");
    wait_for_port(port, name, &mut child);
    Server {
        name: name.to_string(),
        addr: ([127, 0, 0, 1], port).into(),
        base_path: "/files/".into(),
        child,
        _dir: dir,
    }
}

/// A reference receiver (this benchmark binary with `--reference-server`).
pub fn reference(name: &str, scratch: &Path, sha: bool) -> Server {
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.arg("--reference-server").arg(dir.path());
    if sha {
        command.arg("--sha");
    }
    let mut child = command.stdout(Stdio::piped()).spawn().expect("start the reference receiver");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().strip_prefix("listening ").and_then(|p| p.parse().ok()).expect("a port");
    Server {
        name: name.to_string(),
        addr: ([127, 0, 0, 1], port).into(),
        base_path: "/files/".into(),
        child,
        _dir: dir,
    }
}

/// rustus, when a `rustus` binary is on the PATH (or where `cargo install rustus --root
/// ~/.cache/ferry/rustus` put it).
pub fn rustus_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("rustus")).find(|p| p.is_file()));
    on_path.or_else(|| {
        let cache = std::env::var_os("FERRY_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ferry")))?;
        Some(cache.join("rustus/bin/rustus")).filter(|p| p.is_file())
    })
}

/// rustus with its file storage in a fresh folder under `scratch`; bodies up to 16 MiB (its
/// default of 256 KiB would refuse the benchmark's chunks).
pub fn rustus(binary: &Path, scratch: &Path) -> Server {
    let dir = tempfile::tempdir_in(scratch).unwrap();
    let port = free_port();
    let mut child = Command::new(binary)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--url", "/files"])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--info-dir")
        .arg(dir.path())
        .args(["--max-body-size", &(16 << 20).to_string(), "--log-level", "ERROR"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rustus");
    wait_for_port(port, "rustus", &mut child);
    Server { name: "rustus".into(), addr: ([127, 0, 0, 1], port).into(), base_path: "/files/".into(), child, _dir: dir }
}

/// A process the benchmark started for a store (Azurite), killed when dropped.
pub struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Azurite's Blob service (from tests/azurite, where tests/run installs it, or the PATH), its
/// data in `dir`; its endpoint.
pub fn azurite(dir: &Path) -> Option<(Helper, String)> {
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/azurite/node_modules/.bin/azurite-blob");
    let program = if Path::new(local).exists() { local.to_string() } else { "azurite-blob".to_string() };
    let port = free_port();
    let mut child = Command::new(program)
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--location"])
        .arg(dir)
        .args(["--silent", "--disableTelemetry", "--skipApiVersionCheck"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for_port(port, "Azurite", &mut child);
    Some((Helper(child), format!("http://127.0.0.1:{port}")))
}

/// A single-node Garage started with `tests/garage start` in `dir` (stopped when dropped), when
/// its binary is built (`tests/garage path` builds it); the settings it wrote to `dir/env`.
pub struct Garage {
    /// A folder of its own for each Garage started (sections start one each), holding `garage`;
    /// removed once the server is stopped.
    home: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

impl Garage {
    pub fn start(dir: &Path) -> Option<Self> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/garage");
        let cache = std::env::var_os("FERRY_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ferry")))?;
        if std::env::var_os("FERRY_GARAGE").is_none() && !cache.join("garage/bin/garage").is_file() {
            return None;
        }
        let home = tempfile::tempdir_in(dir).ok()?;
        let dir = Self::dir_in(&home);
        let started = Command::new(script).arg("start").arg(&dir).stdout(Stdio::null()).status().ok()?;
        if !started.success() {
            return None;
        }
        let text = std::fs::read_to_string(dir.join("env")).ok()?;
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').trim_matches('\'').to_string()))
            .collect();
        Some(Self { home, env })
    }

    fn dir_in(home: &tempfile::TempDir) -> PathBuf {
        home.path().join("garage")
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/garage");
        let _ = Command::new(script).arg("stop").arg(Self::dir_in(&self.home)).stdout(Stdio::null()).status();
    }
}
