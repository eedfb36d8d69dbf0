//! `ferry doctor` and the probe endpoint it measures with: the probe's own limits, the doctor
//! against ferry directly, and through two real nginx at their defaults, whose advice, applied
//! to both, lets a plain single-request upload of a 256 MiB file through. On both ways the
//! doctor tells the protocols spoken, and whether the IETF draft's `104` gets through.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Backend, TestApp, header, list_files, random_bytes, read_answer};
use crate::nginx::ProxyChain;

const MIB: u64 = 1 << 20;
const TOKEN_SECRET: &str = "probe token secret";

fn probe_url(app: &TestApp) -> String {
    format!("{}probe", app.files)
}

async fn json(response: reqwest::Response) -> Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Everything the store folder holds (none of it may come from a probe).
fn store_contents(app: &TestApp) -> Vec<String> {
    let mut found = Vec::new();
    list_files(&app.store_dir, &app.store_dir, &mut found);
    found
}

/// A probe on a connection of its own, its body sent by the test in chunks; returns once the
/// probe holds its slot. ferry reads a probe's body only after taking a slot, and reading it is
/// what answers `Expect: 100-continue`, so the interim `100` says the slot is taken.
async fn held_probe(app: &TestApp) -> tokio::net::TcpStream {
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let path = probe_url(app).strip_prefix(&app.base).expect("the probe is on the app").to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        app.addr
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let interim = read_answer(&mut socket, Duration::from_secs(20)).await.expect("closed without an answer");
    assert_eq!(interim.status, 100, "the probe should hold a slot: {}", interim.head);
    socket
}

/// Sends one chunk of a held probe's body.
async fn send_chunk(socket: &mut tokio::net::TcpStream, data: &[u8]) {
    socket.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await.unwrap();
    socket.write_all(data).await.unwrap();
    socket.write_all(b"\r\n").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_reads_and_discards_the_body() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let answer = app.client.post(probe_url(&app)).body(vec![7u8; 8 << 20]).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(header(&answer, "ferry-probe"), "ok");
    assert_eq!(header(&answer, "cache-control"), "no-store");
    let result = json(answer).await;
    assert_eq!(result["received"], 8 << 20);
    assert_eq!(result["max_size"], 64 << 20);
    let first = result["first_byte_ms"].as_f64().unwrap();
    assert!(result["read_ms"].as_f64().unwrap() >= first, "{result}");

    // A chunked body (no Content-Length) is counted as it comes.
    let pieces = futures_util::stream::iter((0..3).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 1000]))));
    let answer = app.client.post(probe_url(&app)).body(reqwest::Body::wrap_stream(pieces)).send().await.unwrap();
    assert_eq!(json(answer).await["received"], 3000);

    assert_eq!(app.upload_count().await, 0, "a probe creates no upload");
    assert_eq!(store_contents(&app), Vec::<String>::new(), "a probe stores nothing");
    // The tus routes next to it are unchanged: an upload id still routes to the upload.
    let url = app.create(3).await;
    assert_eq!(app.patch(&url, 0, "abc").await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_answers_its_own_413_with_a_marker() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.probe_max_size = 64 << 10).await;
    // Exactly the maximum passes.
    let answer = app.client.post(probe_url(&app)).body(vec![0u8; 64 << 10]).send().await.unwrap();
    assert_eq!(answer.status(), 200);

    // A declared length over the maximum is refused from the headers alone: no body is sent.
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!("POST /files/probe HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n", app.addr, 1u64 << 40);
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&received).contains("probe takes bodies") {
        let mut buffer = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline, socket.read(&mut buffer)).await.expect("an answer in time");
        let read = read.unwrap();
        assert!(read > 0, "closed without an answer: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&received).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 413"), "{text}");
    assert!(text.contains("\r\nferry-probe: limit\r\n"), "{text}");
    assert!(text.contains("not a proxy's"), "{text}");

    // A chunked body is refused once it grows past the maximum.
    let pieces =
        futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 64 << 10])), Ok(Bytes::from("x"))]);
    let over = app.client.post(probe_url(&app)).body(reqwest::Body::wrap_stream(pieces)).send().await.unwrap();
    assert_eq!(over.status(), 413);
    assert_eq!(header(&over, "ferry-probe"), "limit");
    assert_eq!(json(over).await["max_size"], 64 << 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_runs_two_at_a_time() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut first = held_probe(&app).await;
    let mut second = held_probe(&app).await;
    for socket in [&mut first, &mut second] {
        send_chunk(socket, &[1u8; 1000]).await;
    }
    // Both hold their slots: a third is turned away.
    let answer = app.client.post(probe_url(&app)).body("x").send().await.unwrap();
    assert_eq!(answer.status(), 429);
    assert_eq!((header(&answer, "ferry-probe"), header(&answer, "retry-after")), ("busy".to_string(), "1".to_string()));

    for mut socket in [first, second] {
        send_chunk(&mut socket, &[2u8; 500]).await;
        socket.write_all(b"0\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut answer))
            .await
            .expect("an answer in time")
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("\"received\":1500"), "{text}");
    }
    let answer = app.client.post(probe_url(&app)).body("x").send().await.unwrap();
    assert_eq!(answer.status(), 200, "the slots are free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_has_a_byte_budget() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.probe_budget = 256 << 10).await;
    let answer = app.client.post(probe_url(&app)).body(vec![0u8; 256 << 10]).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    // The budget refills at 256 KiB a minute: 200 KiB more takes about 47 s.
    let spent = app.client.post(probe_url(&app)).body(vec![0u8; 200 << 10]).send().await.unwrap();
    assert_eq!(spent.status(), 429);
    assert_eq!(header(&spent, "ferry-probe"), "budget");
    let wait: u64 = header(&spent, "retry-after").parse().unwrap();
    assert!((30..=60).contains(&wait), "Retry-After {wait}");
    assert!(json(spent).await["error"].as_str().unwrap().contains("budget"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_needs_a_token_when_uploads_do() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.token_secret = Some(TOKEN_SECRET.into())).await;
    let missing = app.client.post(probe_url(&app)).body("x").send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(header(&missing, "www-authenticate"), "Bearer");
    let forged = crate::access::token("another secret", "alice", 60, None);
    let forged = app.client.post(probe_url(&app)).bearer_auth(forged).body("x").send().await.unwrap();
    assert_eq!(forged.status(), 401);
    let token = crate::access::token(TOKEN_SECRET, "alice", 60, None);
    let answer = app.client.post(probe_url(&app)).bearer_auth(token).body("x").send().await.unwrap();
    assert_eq!(answer.status(), 200);
}

// ------------------------------------------------------------------------------------------------
// The doctor, as the real binary.

struct DoctorRun {
    success: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `ferry doctor URL ARGS...` with only `env` set of ferry's variables.
async fn doctor(url: &str, args: &[&str], env: &[(&str, &str)]) -> DoctorRun {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
    command.arg("doctor").arg(url).args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FERRY_") {
            command.env_remove(&key);
        }
    }
    command.envs(env.iter().copied());
    let started = std::time::Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("ferry doctor finished within 5 minutes")
        .expect("run ferry doctor");
    DoctorRun {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// `ferry doctor --json`, which must succeed.
async fn doctor_json(url: &str, env: &[(&str, &str)]) -> Value {
    let run = doctor(url, &["--json"], env).await;
    assert!(run.success, "ferry doctor failed:\n{}\n{}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", run.stdout));
    eprintln!(
        "ferry doctor {url}: {:.1} s ({} requests): limit {}, buffering {}, {:.0} MB/s",
        run.took.as_secs_f64(),
        report["requests"],
        report["limit"],
        report["buffering"]["verdict"],
        report["throughput"]["bytes_per_second"].as_f64().unwrap_or_default() / 1e6
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_finds_nothing_in_the_way_of_ferry_itself() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.token_secret = Some(TOKEN_SECRET.into())).await;
    let token = crate::access::token(TOKEN_SECRET, "doctor", 600, None);
    let report = doctor_json(&app.files, &[("FERRY_TOKEN", &token)]).await;
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["tus"]["version"], "1.0.0");
    assert_eq!(report["tus"]["max_size"], 100u64 << 30);
    assert_eq!(report["probe"]["available"], true);
    assert_eq!(report["limit"]["found"], false, "{report:#}");
    assert_eq!(report["limit"]["largest_passing"], 64 << 20);
    assert_eq!(report["buffering"]["verdict"], "streaming", "{report:#}");
    assert!(report["throughput"]["bytes_per_second"].as_f64().unwrap() > 0.0);
    let chunk = report["recommendation"]["chunk_size"].as_u64().unwrap();
    assert!((MIB..=64 * MIB).contains(&chunk), "{chunk}");
    assert_eq!(report["recommendation"]["max_append_size"], chunk);
    assert_eq!(report["warnings"], serde_json::json!([]), "{report:#}");
    // The IETF draft: offered, and its test upload created with the 104 in front, then deleted.
    let ietf = &report["ietf"];
    assert_eq!((ietf["offered"].clone(), ietf["interop_version"].clone()), (true.into(), 9.into()), "{ietf:#}");
    assert!(ietf["upload_limit"].as_str().unwrap().starts_with("max-size=107374182400"), "{ietf:#}");
    let creation = &ietf["creation"];
    assert_eq!(creation["status"], 201, "{ietf:#}");
    assert_eq!(creation["upload_complete"], "?0");
    assert_eq!(creation["interim_104"], true, "ferry sends 104 to a request naming interop 9");
    let probe_upload = creation["location"].as_str().unwrap().to_string();
    assert!(probe_upload.starts_with(&app.files), "{probe_upload}");
    assert_eq!(creation["interim_location"], creation["location"], "the 104 and the 201 name the same upload");
    assert_eq!(creation["deleted"], true, "{ietf:#}");
    let head = app.tus(Method::HEAD, &probe_upload).bearer_auth(&token).send().await.unwrap();
    assert_eq!(head.status(), 410, "the test upload is gone");

    // The report for people says the same, and the settings come with their reasons.
    let run = doctor(&app.files, &["--token", &token], &[]).await;
    assert!(run.success, "{}", run.stderr);
    assert!(run.stdout.contains("  protocols     tus 1.0.0 and the IETF draft (interop 9)\n"), "{}", run.stdout);
    assert!(
        run.stdout.contains("test upload: 201, Location, Upload-Complete: ?0, 104 passed, deleted\n"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("no proxy limit below 64 MiB"), "{}", run.stdout);
    assert!(run.stdout.contains("buffering     streaming"), "{}", run.stdout);
    assert!(run.stdout.contains("    client_max_body_size 100g;\n"), "{}", run.stdout);
    assert!(run.stdout.contains("nginx.ingress.kubernetes.io/proxy-request-buffering: \"off\""), "{}", run.stdout);

    // Without the token the probe cannot be used: said plainly, not a failure of the server.
    let report = doctor_json(&app.files, &[]).await;
    assert_eq!(report["ok"], false);
    assert!(report["probe"]["problem"].as_str().unwrap().contains("--token"), "{report:#}");
    assert_eq!(report["limit"], Value::Null);
    let creation = &report["ietf"]["creation"];
    assert_eq!(creation["status"], 401, "{report:#}");
    assert!(creation["problem"].as_str().unwrap().contains("--token"), "{report:#}");
    // Each run with the token made one test upload (and deleted it); the probe made none.
    assert_eq!(app.upload_count().await, 2, "the doctor creates nothing but its test uploads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_fails_when_there_is_no_tus_server() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let not_tus = doctor(&format!("{}/healthz", app.base), &[], &[]).await;
    assert!(!not_tus.success);
    assert!(not_tus.stderr.contains("is not a tus server"), "{}", not_tus.stderr);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let unreachable = doctor(&format!("http://{closed}/files/"), &["--json"], &[]).await;
    assert!(!unreachable.success);
    assert!(unreachable.stderr.contains("cannot reach"), "{}", unreachable.stderr);
    let report: Value = serde_json::from_str(&unreachable.stdout).unwrap();
    assert_eq!(report["ok"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_says_when_the_probe_is_off() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.no_probe = true).await;
    // The path is then an upload URL like any other, which takes no POST.
    let post = app.tus(Method::POST, &probe_url(&app)).body("x").send().await.unwrap();
    assert_eq!(post.status(), 405);
    let report = doctor_json(&app.files, &[]).await;
    assert_eq!(report["ok"], false);
    assert!(report["probe"]["problem"].as_str().unwrap().contains("no probe endpoint"), "{report:#}");
    assert_eq!(report["recommendation"]["chunk_size"], MIB);
}

// ------------------------------------------------------------------------------------------------
// Through real nginx.

const WHOLE_FILE: u64 = 256 * MIB;

/// A 256 MiB file made of a few random 1 MiB blocks, each piece stamped with its index (so that
/// a misplaced piece shows), streamed without holding the file in memory.
struct BigFile {
    blocks: Arc<Vec<Vec<u8>>>,
}

impl BigFile {
    fn new() -> Self {
        Self { blocks: Arc::new((0..4).map(|seed| random_bytes(MIB as usize, seed + 40)).collect()) }
    }

    fn piece(blocks: &[Vec<u8>], index: u64) -> Bytes {
        let mut piece = blocks[index as usize % blocks.len()].clone();
        piece[..8].copy_from_slice(&index.to_le_bytes());
        Bytes::from(piece)
    }

    fn body(&self) -> reqwest::Body {
        let blocks = self.blocks.clone();
        let pieces = futures_util::stream::iter(0..WHOLE_FILE / MIB)
            .map(move |index| Ok::<_, std::io::Error>(Self::piece(&blocks, index)));
        reqwest::Body::wrap_stream(pieces)
    }
}

/// A plain creation-with-upload: the whole file in the body of the POST that creates it.
async fn post_whole_file(client: &reqwest::Client, files: &str, file: &BigFile) -> reqwest::Response {
    client
        .post(files)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", WHOLE_FILE.to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .header("Content-Length", WHOLE_FILE.to_string())
        .body(file.body())
        .send()
        .await
        .expect("an answer to the whole-file POST")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doctor_measures_the_default_chain_and_its_advice_lets_whole_files_through() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.behind_proxy = true).await;
    let upstream = app.addr.to_string();
    let mut chain = ProxyChain::start(&upstream);
    let files = format!("{}/files/", chain.url());

    let report = doctor_json(&files, &[]).await;
    let limit = &report["limit"];
    assert_eq!(limit["found"], true, "{report:#}\n{}", chain.logs());
    let passing = limit["largest_passing"].as_u64().unwrap();
    let refused = limit["smallest_refused"].as_u64().unwrap();
    assert!(passing <= MIB && passing as f64 >= MIB as f64 * 0.95, "largest passing body {passing}");
    assert!(refused > MIB && refused as f64 <= passing as f64 * 1.02, "smallest refused body {refused}");
    assert!(limit["refused_by"].as_str().unwrap().contains("413 from a proxy (nginx"), "{limit}");
    assert_eq!(report["buffering"]["verdict"], "buffered", "{report:#}");
    // The IETF draft's creation gets through nginx, its 104 does not.
    let creation = &report["ietf"]["creation"];
    assert_eq!((creation["status"].clone(), creation["deleted"].clone()), (201.into(), true.into()), "{report:#}");
    assert!(creation["location"].as_str().unwrap().starts_with(&files), "{report:#}");
    assert_eq!(creation["interim_104"], false, "{report:#}");
    let warnings = report["warnings"].as_array().unwrap();
    assert!(warnings.iter().any(|w| w.as_str().unwrap().starts_with("104 not passed by the proxies")), "{report:#}");
    let chunk = report["recommendation"]["chunk_size"].as_u64().unwrap();
    assert!(chunk < passing && chunk as f64 >= MIB as f64 * 0.9, "chunk {chunk}");
    eprintln!(
        "limit 1048576, found {passing} ({:+.2}%), refused {refused}",
        (passing as f64 / MIB as f64 - 1.0) * 100.0
    );

    // As the proxies are, a plain single-request upload of a 256 MiB file gets nginx's 413.
    let file = BigFile::new();
    let started = std::time::Instant::now();
    let refused = post_whole_file(&app.client, &files, &file).await;
    eprintln!("the 413: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(refused.status(), 413);
    assert!(refused.headers().get("tus-resumable").is_none(), "the 413 came from nginx, not ferry");

    // The doctor's advice, applied to both proxies, lets it through.
    let directives: Vec<String> = report["advice"]["nginx"]
        .as_array()
        .unwrap()
        .iter()
        .map(|setting| format!("{} {};", setting["name"].as_str().unwrap(), setting["value"].as_str().unwrap()))
        .collect();
    let directives = directives.join("\n            ");
    chain.reconfigure(&upstream, &directives, &directives);
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let created = post_whole_file(&client, &files, &file).await;
    eprintln!("256 MiB in one POST through both proxies: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(created.status(), 201, "{}", chain.logs());
    assert_eq!(header(&created, "upload-offset"), WHOLE_FILE.to_string());
    let url = header(&created, "location");
    assert!(url.starts_with(&files), "{url}");

    let head = client.head(&url).header("Tus-Resumable", "1.0.0").send().await.unwrap();
    assert_eq!(header(&head, "upload-offset"), WHOLE_FILE.to_string());
    assert!(header(&head, "repr-digest").starts_with("sha-256=:"), "the upload is complete");

    // Byte-exact: the download, piece by piece, is what was sent.
    let started = std::time::Instant::now();
    let download = client.get(&url).send().await.unwrap();
    assert_eq!(download.status(), 200);
    let mut stream = download.bytes_stream();
    let (mut pending, mut index) = (Vec::with_capacity(2 * MIB as usize), 0u64);
    while let Some(piece) = stream.next().await {
        pending.extend_from_slice(&piece.expect("download through the proxies"));
        while pending.len() >= MIB as usize {
            assert!(index < WHOLE_FILE / MIB, "the download is longer than the file");
            let expected = BigFile::piece(&file.blocks, index);
            assert!(pending[..MIB as usize] == expected[..], "MiB {index} of the download differs from the file");
            pending.drain(..MIB as usize);
            index += 1;
        }
    }
    assert!(pending.is_empty() && index == WHOLE_FILE / MIB, "the download ends after {index} MiB");
    eprintln!("downloaded and compared: {:.1} s", started.elapsed().as_secs_f64());

    // And the doctor now finds the way clear.
    let report = doctor_json(&files, &[]).await;
    assert_eq!(report["limit"]["found"], false, "{report:#}");
    assert_eq!(report["buffering"]["verdict"], "streaming", "{report:#}");
}
