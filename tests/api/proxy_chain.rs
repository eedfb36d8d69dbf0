//! The story ferry exists for, end to end: large uploads through two nginx in series (the host's,
//! then the ingress), left at nginx's defaults (`client_max_body_size 1m`, request buffering on,
//! 60 s timeouts), into several real `ferry serve` processes on one database and one store, whose
//! webhooks go to the example app under gunicorn.
//!
//! - Real tus clients (tuspy, tus-js-client) and `ferry upload` take their chunk size from
//!   `Upload-Limit` and get a 256 MiB file through byte for byte; the app hears
//!   `upload.completed` for each. The same file sent as one request is refused with 413, as in the
//!   old days. `ferry upload` goes on through a restart of the host nginx and of ferry.
//!   tus-js-client in its IETF draft mode gets 64 MiB through the same proxies.
//! - The shipped deployment: `deploy/nginx/ferry.conf` runs as the host nginx (after `nginx -t`),
//!   the ingress gets what the annotations of `deploy/kubernetes/ingress.yaml` say, and ferry runs
//!   with the environment of the ConfigMap and Secret.
//! - The Kubernetes manifests parse and hold together (probes, graceful shutdown, limits that fit
//!   through both proxies, variables ferry knows), and so does the Dockerfile.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use reqwest::Method;
use serde::Deserialize;
use serde_norway::Value as Yaml;
use sha2::{Digest, Sha256};

use crate::{
    backend_app::{COMPLETED, PyApp, WEBHOOK_SECRET, until},
    cli_upload::{Run as CliRun, Workspace as CliWorkspace},
    clients::{require_tusjs, require_tuspy, run_client},
    helpers::{Cluster, Storage, header, upload_id, wait_for},
    nginx::{Nginx, ProxyChain},
};

const MIB: u64 = 1 << 20;
/// The large file of the story.
const BIG: u64 = 256 * MIB;
/// What nginx lets through by default (`client_max_body_size 1m`), and so what ferry advertises
/// behind proxies at their defaults.
const NGINX_DEFAULT_BODY: u64 = MIB;

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// `text` with `from` replaced by `to`, where `from` must occur exactly once (so that an edit of
/// the file under test cannot silently leave a placeholder unfilled).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "'{from}' must occur exactly once");
    text.replacen(from, to, 1)
}

/// `deploy/nginx/ferry.conf` as it is, with its listen address left to the harness and its
/// upstream pointed at `upstream` (`host:port`): the two lines a deployment edits besides
/// server_name.
fn host_site(upstream: &str) -> String {
    let site = repo_file("deploy/nginx/ferry.conf");
    let site = replace_once(&site, "listen 80;", "listen {listen};");
    replace_once(&site, "server 127.0.0.1:30080;", &format!("server {upstream};"))
}

/// The value of a directive in an nginx file (its first occurrence outside comments).
fn nginx_directive(config: &str, name: &str) -> String {
    config
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(name).filter(|rest| rest.starts_with(' ')))
        .map(|rest| rest.trim().trim_end_matches(';').trim().to_string())
        .unwrap_or_else(|| panic!("no {name} directive in:\n{config}"))
}

// ------------------------------------------------------------------------------------------------
// A large file, quickly.

/// A file of pseudo-random bytes on disk and its SHA-256. The bytes are rotations of one block of
/// xorshift output whose length (a prime) lines up with no chunk size: each MiB of the file
/// differs from every other, so a chunk stored at the wrong offset changes the hash. Written at
/// disk speed, without holding the file in memory.
struct TestFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    len: u64,
    sha256: Vec<u8>,
}

impl TestFile {
    fn new(len: u64, seed: u64) -> Self {
        const BLOCK: usize = 1_000_003;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("upload.bin");
        let mut block = vec![0u8; BLOCK];
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for byte in block.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = (state >> 32) as u8;
        }
        let mut out = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&path).expect("create file"));
        let mut hasher = Sha256::new();
        let (mut written, mut turn) = (0u64, 0usize);
        while written < len {
            let rotation = (turn * 7919) % BLOCK;
            for part in [&block[rotation..], &block[..rotation]] {
                let take = part.len().min((len - written) as usize);
                out.write_all(&part[..take]).expect("write file");
                hasher.update(&part[..take]);
                written += take as u64;
            }
            turn += 1;
        }
        out.flush().expect("write file");
        TestFile { _dir: dir, path, len, sha256: hasher.finalize().to_vec() }
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("UTF-8 temp path")
    }

    fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn repr_digest(&self) -> String {
        format!("sha-256=:{}:", STANDARD.encode(&self.sha256))
    }
}

// ------------------------------------------------------------------------------------------------
// The world: the app, ferry instances, two nginx.

/// The example app (webhook receiver) under gunicorn, two `ferry serve` processes on one
/// PostgreSQL database and one store, and two nginx in front of them. Dropping it stops everything;
/// on failure the proxies' logs are printed (the cluster prints ferry's).
struct World {
    app: PyApp,
    cluster: Cluster,
    chain: ProxyChain,
    /// The tus endpoint as clients see it: the host nginx's `/files/`.
    files: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// What stands in front of ferry.
enum Proxies<'a> {
    /// Both nginx at their defaults; the host one sets `X-Forwarded-Proto`/`-Host` (the harness's
    /// host proxy), the ingress one leaves `Host` to nginx's default.
    Defaults,
    /// `deploy/nginx/ferry.conf` as the host nginx; `directives` inside the ingress' location.
    Shipped { ingress_directives: &'a str },
}

impl World {
    /// Starts the app, two ferry instances with `ferry_args` and `ferry_env`, and the proxies.
    async fn start(proxies: Proxies<'_>, ferry_args: &[&str], ferry_env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut app = PyApp::new(dir.path(), 2);
        app.start().await;
        let webhook_url = app.webhook_url();
        let mut args = vec!["--webhook-url", &webhook_url, "--webhook-secret", WEBHOOK_SECRET];
        args.extend(["--webhook-retry-min", "100ms"]);
        args.extend_from_slice(ferry_args);
        let mut cluster = Cluster::start_nodes(Storage::Local, &[]).await;
        for _ in 0..2 {
            cluster.add_node(&args, ferry_env).await;
        }
        let pods: Vec<String> = cluster.nodes.iter().map(|n| n.addr.to_string()).collect();
        let chain = match proxies {
            Proxies::Defaults => ProxyChain::around(Nginx::balance_with(&pods, ""), ""),
            Proxies::Shipped { ingress_directives } => {
                let ingress = Nginx::balance_with(&pods, ingress_directives);
                let host = Nginx::server(&host_site(&ingress.authority()));
                ProxyChain { host, ingress }
            }
        };
        let files = format!("{}/files/", chain.url());
        World { app, cluster, chain, files, http: reqwest::Client::new(), _dir: dir }
    }

    fn tus(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        self.http.request(method, url).header("Tus-Resumable", "1.0.0")
    }

    /// How many uploads ferry's database holds.
    async fn upload_count(&self) -> i64 {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.cluster.db_url).await.expect("ferry's database");
        sqlx::query_scalar("SELECT COUNT(*) FROM uploads").fetch_one(&mut conn).await.expect("count uploads")
    }

    /// Creates an upload through the proxies; checks that its Location is an absolute URL of the
    /// host nginx, and returns it.
    async fn create(&self, length: u64, extra: &[(&str, &str)]) -> String {
        let mut request = self.tus(Method::POST, &self.files).header("Upload-Length", length.to_string());
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("POST through the proxies");
        assert_eq!(response.status(), 201, "create through the proxies:\n{}", self.chain.logs());
        let location = header(&response, "location");
        assert!(
            location.starts_with(&self.files) && location.len() > self.files.len(),
            "Location {location} is not an upload URL of the host nginx ({})",
            self.files
        );
        location
    }

    /// Waits until ferry (asked directly) holds at least `offset` bytes of the upload at `url`.
    async fn wait_offset(&self, url: &str, offset: u64) {
        let node = &self.cluster.nodes[0];
        until(&format!("{offset} bytes to arrive"), Duration::from_secs(60), || async {
            let now = node.offset(url).await;
            if now >= offset { Ok(()) } else { Err(format!("offset {now}")) }
        })
        .await;
    }

    /// The upload at `url` holds exactly the file, through the proxies (HEAD's offset and
    /// `Repr-Digest`, and the SHA-256 of a download), and the app received its `upload.completed`
    /// with the file's size and SHA-256.
    async fn assert_delivered(&self, url: &str, file: &TestFile) {
        let head = self.tus(Method::HEAD, url).send().await.expect("HEAD through the proxies");
        assert_eq!(head.status(), 200, "HEAD {url}");
        assert_eq!(header(&head, "upload-offset"), file.len.to_string(), "Upload-Offset");
        assert_eq!(header(&head, "repr-digest"), file.repr_digest(), "Repr-Digest: ferry stored other bytes");

        let mut response = self.http.get(url).send().await.expect("GET through the proxies");
        assert_eq!(response.status(), 200, "GET {url}");
        let (mut hasher, mut got) = (Sha256::new(), 0u64);
        while let Some(bytes) = response.chunk().await.expect("download body") {
            hasher.update(&bytes);
            got += bytes.len() as u64;
        }
        assert_eq!(got, file.len, "bytes downloaded through the proxies");
        assert_eq!(hasher.finalize().to_vec(), file.sha256, "SHA-256 of the download through the proxies");

        let id = upload_id(url).to_string();
        until("the app to receive upload.completed", Duration::from_secs(30), || async {
            let events = self.app.events().await?;
            if events.iter().any(|e| e.kind == COMPLETED && e.upload_id.as_deref() == Some(id.as_str())) {
                Ok(())
            } else {
                Err(format!("{:?}", events.iter().map(|e| (&e.kind, &e.upload_id)).collect::<Vec<_>>()))
            }
        })
        .await;
        let payload = self.app.completed_payload(url).await;
        assert_eq!(payload["data"]["size"], file.len, "{payload:#}");
        assert_eq!(payload["data"]["sha256"], file.sha256_hex(), "{payload:#}");
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("\n----- the proxies' logs -----\n{}", self.chain.logs());
        }
    }
}

/// Runs a tus client script on `file` with `--chunk-size auto`; returns its report and how long
/// it took.
async fn upload_with(program: &str, script: &str, endpoint: &str, file: &TestFile) -> (crate::clients::Run, Duration) {
    let args: Vec<String> = ["--endpoint", endpoint, "--file", file.path(), "--chunk-size", "auto"]
        .into_iter()
        .chain(["--filename", "big.bin"])
        .map(String::from)
        .collect();
    let started = Instant::now();
    let run = run_client(program, script, &args).await;
    (run, started.elapsed())
}

// ------------------------------------------------------------------------------------------------
// The tests.

/// Two nginx at their defaults in front of two ferry instances (`--max-append-size 1MiB`,
/// `--behind-proxy`): tuspy, tus-js-client and `ferry upload` read `Upload-Limit`, send 1 MiB
/// chunks and get 256 MiB through byte for byte, with absolute URLs of the host nginx; the app
/// hears of each. The same file as one request (a creation-with-upload POST carrying it all) gets
/// nginx's 413, the only one: no client's chunk was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_upload_256_mib_through_two_default_nginx() {
    let python = require_tuspy().await;
    let node = require_tusjs().await;
    let file = TestFile::new(BIG, 1);
    let world = World::start(Proxies::Defaults, &["--max-append-size", "1MiB", "--behind-proxy"], &[]).await;

    // The old way: the whole file in one request.
    let body = tokio::fs::File::open(file.path()).await.expect("open the file");
    let started = Instant::now();
    let whole = world
        .tus(Method::POST, &world.files)
        .header("Upload-Length", file.len.to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .header("Content-Length", file.len.to_string())
        .body(reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(body)))
        .send()
        .await
        .expect("an answer to the whole-file POST");
    assert_eq!(whole.status(), 413, "one request with 256 MiB through nginx at its defaults");
    assert!(whole.headers().get("tus-resumable").is_none(), "the 413 came from nginx, not from ferry");
    eprintln!("whole-file POST: {} after {:?}", whole.status(), started.elapsed());
    assert_eq!(world.upload_count().await, 0, "nothing reached ferry");

    // Locations through the chain: the host nginx's, built from its X-Forwarded-* headers (past
    // the ingress, Host is only `ferry_pods`).
    let probe = world.create(10, &[]).await;
    assert_eq!(world.tus(Method::DELETE, &probe).send().await.unwrap().status(), 204);

    for (program, script) in [(&python, "tuspy_upload.py"), (&node, "tusjs_upload.mjs")] {
        let (run, took) = upload_with(program, script, &world.files, &file).await;
        eprintln!("{script}: 256 MiB through two nginx in {took:?}");
        assert_eq!(run.text("complete"), "true", "{script}");
        assert_eq!(run.number("chunk_size"), NGINX_DEFAULT_BODY, "{script} took its chunk size from Upload-Limit");
        assert!(run.url.starts_with(&world.files), "{script}'s upload URL {} is not the host nginx's", run.url);
        world.assert_delivered(&run.url, &file).await;
    }

    // ferry's own client: the chunk size from Upload-Limit, the file's SHA-256 checked against
    // the server's.
    let work = CliWorkspace::new();
    let started = Instant::now();
    let done = work.upload(&world.files, &[file.path.as_path()], &[]).await;
    eprintln!("ferry upload: 256 MiB through two nginx in {:?}", started.elapsed());
    done.assert_success();
    let (url, size, sha256, _) = done.uploaded().pop().expect("a line for the file");
    assert_eq!((size, sha256), (file.len, file.sha256_hex()), "what ferry upload printed");
    assert!(url.starts_with(&world.files), "ferry upload's URL {url} is not the host nginx's");
    world.assert_delivered(&url, &file).await;

    let refused: Vec<String> =
        world.chain.host.access_log().lines().filter(|line| line.contains("\" 413 ")).map(String::from).collect();
    assert_eq!(refused.len(), 1, "only the whole-file POST was too large: {refused:#?}");
}

/// tus-js-client in its `ietf-draft-05` mode (`Upload-Draft-Interop-Version: 6`, no
/// `Tus-Resumable`) through two nginx at their defaults in front of two ferry instances: it takes
/// its chunk size from the draft's `Upload-Limit` and gets 64 MiB through byte for byte, every
/// request answered in the draft's terms, none refused by a proxy.
///
/// ferry answers a creation that names a served interop version with `104 Upload Resumption
/// Supported` first, but only over HTTP/1.1. nginx at its defaults speaks HTTP/1.0 to its upstream
/// (`proxy_http_version 1.0`), so ferry sends none behind it, and the client gets the `201`
/// alone. (An nginx with `proxy_http_version 1.1`, as in `deploy/nginx/ferry.conf`, takes the
/// `104` for its final answer and passes ferry's `201` on as that answer's body.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tusjs_in_ietf_draft_05_mode_uploads_through_two_default_nginx() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let node = require_tusjs().await;
    let file = TestFile::new(64 * MIB + 12_345, 4);
    let world = World::start(Proxies::Defaults, &["--max-append-size", "1MiB", "--behind-proxy"], &[]).await;

    // A creation as tus-js-client sends it, read byte for byte from the host nginx: whatever
    // interim responses reach the client are in there.
    let mut socket = tokio::net::TcpStream::connect(world.chain.host.authority()).await.expect("connect to nginx");
    let request = format!(
        "POST /files/ HTTP/1.1\r\nHost: {}\r\nUpload-Draft-Interop-Version: 6\r\nUpload-Complete: ?0\r\n\
         Upload-Length: 10\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        world.chain.host.authority()
    );
    socket.write_all(request.as_bytes()).await.expect("send the creation");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut answer))
        .await
        .expect("nginx answered and closed within 30 s")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 201 "), "the creation's answer through the proxies:\n{answer}");
    assert!(!answer.contains(" 104 "), "no 104 came through:\n{answer}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("\r\nupload-complete: ?0\r\n"), "{answer}");
    assert!(!lower.contains("\r\ntus-resumable:"), "answered in the draft's terms: {answer}");
    let location = head
        .lines()
        .find_map(|line| line.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("location")))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_else(|| panic!("no Location:\n{answer}"));
    assert!(location.starts_with(&world.files), "Location {location} is not the host nginx's");
    // Why: the host nginx spoke HTTP/1.0 to the ingress (nginx's default, the ingress' too). nginx
    // writes its access log line once it is done with the request, which may be after the client
    // has its answer.
    wait_for("the ingress to log the creation", Duration::from_secs(10), || async {
        world.chain.ingress.access_log().contains("\"POST /files/ HTTP/1.0\" 201 ")
    })
    .await;
    let cancel = world.http.delete(&location).header("Upload-Draft-Interop-Version", "6").send().await.unwrap();
    assert_eq!(cancel.status(), 204, "DELETE {location} through the proxies");

    let args: Vec<String> = ["--endpoint", &world.files, "--file", file.path(), "--chunk-size", "auto"]
        .into_iter()
        .chain(["--filename", "big.bin", "--protocol", "ietf-draft-05"])
        .map(String::from)
        .collect();
    let started = Instant::now();
    let run = run_client(&node, "tusjs_upload.mjs", &args).await;
    eprintln!("tusjs_upload.mjs --protocol ietf-draft-05: 64 MiB through two nginx in {:?}", started.elapsed());
    assert_eq!(run.text("complete"), "true");
    assert_eq!(run.text("protocol"), "ietf-draft-05");
    assert_eq!(run.number("chunk_size"), NGINX_DEFAULT_BODY, "the chunk size from the draft's Upload-Limit");
    let chunks = file.len.div_ceil(NGINX_DEFAULT_BODY);
    assert_eq!(run.number("patches"), chunks, "one PATCH per chunk, none refused");
    assert_eq!(run.number("retries"), 0);
    assert_eq!(run.number("tus_answers"), 0, "ferry answered every request in the draft's terms");
    let answers = run.all("answer");
    let mut expected = vec!["POST 201 ?0".to_string()];
    expected.extend((1..chunks).map(|_| "PATCH 201 ?0".to_string()));
    expected.push("PATCH 200 ?1".into());
    assert_eq!(answers, expected, "interop 6: 201 while incomplete, 200 once complete");
    assert!(run.url.starts_with(&world.files), "upload URL {} is not the host nginx's", run.url);
    world.assert_delivered(&run.url, &file).await;

    let log = world.chain.host.access_log();
    let unexpected: Vec<&str> = log
        .lines()
        .filter(|line| !line.contains("\" 201 ") && !line.contains("\" 200 ") && !line.contains("\" 204 "))
        .collect();
    assert!(unexpected.is_empty(), "requests the host nginx did not pass as 200, 201 or 204: {unexpected:#?}");

    // ferry's own client over the draft, through the same two nginx: its chunk size from the
    // draft's Upload-Limit, the file's SHA-256 checked against the server's.
    let work = CliWorkspace::new();
    let done = work.upload(&world.files, &[file.path.as_path()], &["--protocol", "ietf"]).await;
    done.assert_success();
    let (url, size, sha256, _) = done.uploaded().pop().expect("a line for the file");
    assert_eq!((size, sha256), (file.len, file.sha256_hex()), "what ferry upload --protocol ietf printed");
    world.assert_delivered(&url, &file).await;
    let log = world.chain.host.access_log();
    let refused: Vec<&str> = log.lines().filter(|line| line.contains("\" 413 ")).collect();
    assert!(refused.len() <= 1, "at most the whole-file creation was too large: {refused:#?}");
}

/// `ferry upload` through two nginx at their defaults, slowed down so that things can happen
/// midway: the host nginx dies a quarter of the way in, both ferry instances are killed halfway;
/// each comes back (on the same address) once the client has noticed. The client retries and
/// resumes the same upload from the server's offset; the file arrives byte for byte and the app
/// hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_upload_survives_restarts_of_the_host_nginx_and_of_ferry() {
    let file = TestFile::new(64 * MIB, 3);
    let mut world = World::start(Proxies::Defaults, &["--max-append-size", "1MiB", "--behind-proxy"], &[]).await;
    let work = CliWorkspace::new();
    let args = ["--limit-rate", "8MiB", "--retry-delay", "200ms"];
    let run = work.start(&world.files, &[file.path.as_path()], &args, &[]);
    let url = until("ferry upload to remember its upload URL", Duration::from_secs(30), || async {
        work.remembered_urls().pop().ok_or_else(|| run.stderr_so_far())
    })
    .await;
    assert!(url.starts_with(&world.files), "{url}");
    let retries = |run: &CliRun| run.stderr_so_far().matches("retrying in").count();

    // The host nginx goes away, and comes back once the client has run into it.
    world.wait_offset(&url, file.len / 4).await;
    let before = retries(&run);
    world.chain.host.stop();
    wait_for("ferry upload to retry", Duration::from_secs(60), || async { retries(&run) > before }).await;
    world.chain.host.start();

    // Every ferry instance crashes, and comes back once the client has run into it.
    world.wait_offset(&url, file.len / 2).await;
    let before = retries(&run);
    for node in &mut world.cluster.nodes {
        node.sigkill().await;
    }
    wait_for("ferry upload to retry", Duration::from_secs(60), || async { retries(&run) > before }).await;
    for index in 0..world.cluster.nodes.len() {
        world.cluster.restart(index).await;
    }

    let done = run.wait_limit(Duration::from_secs(180)).await;
    done.assert_success();
    eprintln!("ferry upload's notes:\n{}", done.stderr);
    assert_eq!(done.url_of(&file.path), url, "the same upload went on");
    assert_eq!(world.upload_count().await, 1, "no upload started over");
    world.assert_delivered(&url, &file).await;
}

/// The annotations of `deploy/kubernetes/ingress.yaml` as the nginx directives ingress-nginx
/// turns them into, plus what ingress-nginx sets on every request (it keeps `Host`, and replaces
/// X-Forwarded-Proto/-Host with its own view).
fn ingress_directives(ingress: &Yaml) -> String {
    let annotation = |name: &str| -> String {
        let key = format!("nginx.ingress.kubernetes.io/{name}");
        ingress["metadata"]["annotations"][key.as_str()]
            .as_str()
            .unwrap_or_else(|| panic!("ingress.yaml has no {key} annotation"))
            .to_string()
    };
    [
        format!("client_max_body_size {};", annotation("proxy-body-size")),
        format!("proxy_request_buffering {};", annotation("proxy-request-buffering")),
        format!("proxy_buffering {};", annotation("proxy-buffering")),
        format!("proxy_http_version {};", annotation("proxy-http-version")),
        format!("proxy_read_timeout {}s;", annotation("proxy-read-timeout")),
        format!("proxy_send_timeout {}s;", annotation("proxy-send-timeout")),
        format!("proxy_connect_timeout {}s;", annotation("proxy-connect-timeout")),
        "proxy_set_header Host $http_host;".into(),
        "proxy_set_header X-Forwarded-Proto $scheme;".into(),
        "proxy_set_header X-Forwarded-Host $http_host;".into(),
    ]
    .join("\n        ")
}

/// The deployment as shipped: `deploy/nginx/ferry.conf` (after `nginx -t`) as the host nginx,
/// the ingress as `ingress.yaml` configures it, ferry with the ConfigMap's and Secret's
/// environment (listen address, database, store and webhook target replaced by the test's).
/// tus-js-client uses the advertised 8 MiB chunks; a client's own forwarded headers do not
/// change the URLs ferry hands out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_deployment_carries_a_large_upload() {
    let node = require_tusjs().await;
    let manifests = Manifests::load();
    let mut env = manifests.env();
    // Two instances on one machine: no fixed metrics port; the test's log level.
    env.retain(|(key, _)| key != "FERRY_METRICS_LISTEN" && key != "FERRY_LOG");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let directives = ingress_directives(manifests.kind("Ingress"));
    let world = World::start(Proxies::Shipped { ingress_directives: &directives }, &[], &env).await;
    world.chain.host.check().expect("deploy/nginx/ferry.conf passes nginx -t");

    let options = world.http.request(Method::OPTIONS, &world.files).send().await.unwrap();
    let chunk = manifests.max_append_size();
    assert_eq!(header(&options, "upload-limit"), format!("max-append-size={chunk}"));

    // The host nginx replaces what a client claims about the URL it used.
    let spoofed = [("Forwarded", "proto=https;host=evil.example"), ("X-Forwarded-Host", "evil.example")];
    let probe = world.create(10, &spoofed).await;
    assert_eq!(world.tus(Method::DELETE, &probe).send().await.unwrap().status(), 204);

    let file = TestFile::new(64 * MIB + 12_345, 2);
    let (run, took) = upload_with(&node, "tusjs_upload.mjs", &world.files, &file).await;
    eprintln!("tusjs_upload.mjs: 64 MiB through the shipped proxies in {took:?}");
    assert_eq!(run.text("complete"), "true");
    assert_eq!(run.number("chunk_size"), chunk, "the ConfigMap's chunk size");
    assert_eq!(run.number("patches"), file.len.div_ceil(chunk), "one PATCH per chunk, none refused");
    assert_eq!(run.number("retries"), 0);
    world.assert_delivered(&run.url, &file).await;
}

/// `deploy/nginx/ferry.conf` passes `nginx -t` with only its listen address and upstream filled
/// in, and lets a chunk of the advertised size through.
#[test]
fn the_nginx_site_passes_nginx_t() {
    let nginx = Nginx::server(&host_site("127.0.0.1:9"));
    nginx.check().unwrap_or_else(|e| panic!("nginx -t on deploy/nginx/ferry.conf:\n{e}"));
    let site = repo_file("deploy/nginx/ferry.conf");
    for (directive, value) in [
        ("proxy_request_buffering", "off"),
        ("proxy_buffering", "off"),
        ("proxy_http_version", "1.1"),
        ("proxy_set_header X-Forwarded-Proto", "$scheme"),
        ("proxy_set_header X-Forwarded-Host", "$http_host"),
        ("proxy_set_header Host", "$http_host"),
    ] {
        assert_eq!(nginx_directive(&site, directive), value, "{directive}");
    }
    let body_limit = ferry::config::parse_size(&nginx_directive(&site, "client_max_body_size")).unwrap();
    let chunk = Manifests::load().max_append_size();
    assert!(body_limit >= chunk, "client_max_body_size {body_limit} is below the advertised chunk size {chunk}");
}

// ------------------------------------------------------------------------------------------------
// The Kubernetes manifests and the Dockerfile.

/// Every document of `deploy/kubernetes/*.yaml`, by file.
struct Manifests {
    documents: Vec<(String, Yaml)>,
}

impl Manifests {
    fn load() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
            .collect();
        files.sort();
        let mut documents = Vec::new();
        for path in files {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            for document in serde_norway::Deserializer::from_str(&text) {
                let value = Yaml::deserialize(document).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
                documents.push((name.clone(), value));
            }
        }
        Manifests { documents }
    }

    /// The one object of this kind.
    fn kind(&self, kind: &str) -> &Yaml {
        let found: Vec<&Yaml> = self.documents.iter().map(|(_, d)| d).filter(|d| d["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} in deploy/kubernetes/");
        found[0]
    }

    /// The variables of the ConfigMap and the Secret, as the pod gets them.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = BTreeMap::new();
        for (kind, field) in [("ConfigMap", "data"), ("Secret", "stringData")] {
            let map = self.kind(kind)[field].as_mapping().unwrap_or_else(|| panic!("{kind} has {field}"));
            for (key, value) in map {
                let key = key.as_str().expect("a variable name").to_string();
                let value = value.as_str().unwrap_or_else(|| panic!("{kind} {key} is a string")).to_string();
                assert!(env.insert(key.clone(), value).is_none(), "{key} set twice");
            }
        }
        env.into_iter().collect()
    }

    fn var(&self, name: &str) -> String {
        self.env().into_iter().find(|(k, _)| k == name).map(|(_, v)| v).unwrap_or_else(|| panic!("no {name}"))
    }

    fn max_append_size(&self) -> u64 {
        ferry::config::parse_size(&self.var("FERRY_MAX_APPEND_SIZE")).expect("FERRY_MAX_APPEND_SIZE is a size")
    }
}

fn strings(value: &Yaml) -> Vec<&str> {
    value.as_sequence().map(|items| items.iter().filter_map(Yaml::as_str).collect()).unwrap_or_default()
}

/// The manifests parse, name every object kustomize needs, and hold together: probes on ferry's
/// health endpoints, a grace period that outlasts preStop plus ferry's shutdown grace, a non-root
/// pod, settings from the ConfigMap and Secret (only variables ferry knows), the migration before
/// the server, a Service and Ingress that reach the pods, and body limits that let the advertised
/// chunk through.
#[test]
fn the_kubernetes_manifests_hold_together() {
    let manifests = Manifests::load();
    let kinds: Vec<&str> = manifests.documents.iter().filter_map(|(_, d)| d["kind"].as_str()).collect();
    for kind in ["Deployment", "Service", "Ingress", "ConfigMap", "Secret"] {
        assert!(kinds.contains(&kind), "no {kind} among {kinds:?}");
    }
    let kustomization = manifests.kind("Kustomization");
    let listed = strings(&kustomization["resources"]);
    for (file, document) in &manifests.documents {
        assert!(document["kind"] == "Kustomization" || listed.contains(&file.as_str()), "{file} not in resources");
    }

    // The pod.
    let deployment = manifests.kind("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels, "the selector matches the pod's labels");
    let containers = pod["containers"].as_sequence().expect("containers");
    let ferry = containers.iter().find(|c| c["name"] == "ferry").expect("a container named ferry");
    assert_eq!(strings(&ferry["args"]), ["serve"]);
    let port = ferry["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == "http").expect("port http");
    let listen = manifests.var("FERRY_LISTEN");
    assert_eq!(listen, "0.0.0.0:8080");
    assert_eq!(port["containerPort"].as_u64().map(|p| p.to_string()), listen.rsplit(':').next().map(String::from));
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(ferry[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(ferry[probe]["httpGet"]["port"], "http", "{probe}");
    }
    let pre_stop = strings(&ferry["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(pre_stop.first(), Some(&"sleep"), "preStop sleeps while the endpoints update: {pre_stop:?}");
    let sleep: u64 = pre_stop[1].parse().expect("seconds of sleep");
    let grace = ferry::config::parse_duration(&manifests.var("FERRY_SHUTDOWN_GRACE")).unwrap().as_secs();
    let termination = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(
        termination > sleep + grace,
        "terminationGracePeriodSeconds {termination} must exceed preStop {sleep} s + FERRY_SHUTDOWN_GRACE {grace} s"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let uid = pod["securityContext"]["runAsUser"].as_u64().expect("runAsUser");
    assert_ne!(uid, 0);
    for key in ["requests", "limits"] {
        assert!(ferry["resources"][key]["memory"].is_string(), "resources.{key}.memory");
    }
    let env_from = |container: &Yaml| -> Vec<String> {
        container["envFrom"]
            .as_sequence()
            .map(|sources| {
                sources
                    .iter()
                    .flat_map(|s| {
                        [("configMapRef", "ConfigMap"), ("secretRef", "Secret")]
                            .into_iter()
                            .filter_map(|(r, kind)| s[r]["name"].as_str().map(|name| format!("{kind}/{name}")))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let config = format!("ConfigMap/{}", manifests.kind("ConfigMap")["metadata"]["name"].as_str().unwrap());
    let secret = format!("Secret/{}", manifests.kind("Secret")["metadata"]["name"].as_str().unwrap());
    assert_eq!(env_from(ferry), [config.clone(), secret.clone()], "the server's settings");
    let init = pod["initContainers"].as_sequence().expect("initContainers");
    let migrate = init.iter().find(|c| strings(&c["args"]) == ["migrate"]).expect("an init container running migrate");
    assert_eq!(env_from(migrate), [config, secret], "the migration's settings");
    assert_eq!(migrate["image"], ferry["image"], "the migration runs the same image");

    // The settings: what the brief of a deployment needs, and nothing ferry would ignore.
    let env = manifests.env();
    for key in
        ["FERRY_DATABASE_URL", "FERRY_STORE", "FERRY_WEBHOOK_SECRET", "FERRY_WEBHOOK_URL", "FERRY_MAX_APPEND_SIZE"]
    {
        assert!(env.iter().any(|(k, _)| k == key), "{key} is set");
    }
    assert_eq!(manifests.var("FERRY_BEHIND_PROXY"), "true");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_ferry")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for (key, _) in env.iter().filter(|(k, _)| k.starts_with("FERRY_") && k != "FERRY_LOG") {
        assert!(help.contains(&format!("[env: {key}")), "{key} is not a variable of `ferry serve`");
    }
    ferry::hooks::Secret::parse(&manifests.var("FERRY_WEBHOOK_SECRET")).expect("the placeholder secret's format");

    // Service and Ingress reach the pods' http port.
    let service = manifests.kind("Service");
    assert_eq!(&service["spec"]["selector"], labels, "the Service selects the pods");
    let service_port = service["spec"]["ports"].as_sequence().unwrap().iter().find(|p| p["targetPort"] == "http");
    let service_port = service_port.expect("a Service port to the container's http port");
    let ingress = manifests.kind("Ingress");
    let path = &ingress["spec"]["rules"][0]["http"]["paths"][0];
    assert_eq!(path["path"], "/files/", "the tus endpoint, and only it");
    assert_eq!(path["backend"]["service"]["name"], service["metadata"]["name"]);
    assert_eq!(path["backend"]["service"]["port"]["name"], service_port["name"]);

    // Body limits on both proxies let the advertised chunk through; requests stream.
    let annotations = &ingress["metadata"]["annotations"];
    let annotation = |name: &str| annotations[format!("nginx.ingress.kubernetes.io/{name}").as_str()].as_str();
    let body = ferry::config::parse_size(annotation("proxy-body-size").expect("proxy-body-size")).unwrap();
    assert!(body >= manifests.max_append_size(), "proxy-body-size {body} below FERRY_MAX_APPEND_SIZE");
    assert_eq!(annotation("proxy-request-buffering"), Some("off"));
    for timeout in ["proxy-read-timeout", "proxy-send-timeout"] {
        let seconds: u64 = annotation(timeout).unwrap_or_else(|| panic!("{timeout}")).parse().expect("seconds");
        assert!(seconds >= 30, "{timeout} {seconds} s leaves too little for one chunk");
    }

    // The image: the same unprivileged user and data folder as the pod.
    let dockerfile = repo_file("deploy/Dockerfile");
    assert!(dockerfile.contains("cargo build --release --locked"), "a locked release build");
    assert!(dockerfile.contains(&format!("USER {uid}:")), "the image runs as the pod's runAsUser {uid}");
    let data_dir = dockerfile
        .lines()
        .find_map(|line| line.trim().trim_start_matches("ENV ").strip_prefix("FERRY_DATA_DIR="))
        .expect("FERRY_DATA_DIR in the Dockerfile");
    let mounts = ferry["volumeMounts"].as_sequence().expect("volumeMounts");
    assert!(mounts.iter().any(|m| m["mountPath"] == data_dir.trim()), "the data folder {data_dir} is writable");
    assert_eq!(ferry["securityContext"]["readOnlyRootFilesystem"], true);
    let ignore = repo_file(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "**/target"), ".dockerignore keeps build output out of the context");
}
