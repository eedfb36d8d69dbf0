//! The upload page (web/) and ferry-upload.js in a real browser: Debian's Chromium, headless, driven
//! by playwright-core from the scripts in tests/browser/. Also tus-js-client and Uppy in the same
//! browser, from an application on another origin. The scripts report what the page showed; these
//! tests check it against what ferry stored.
//!
//! Set-up (done by `bash tests/run`): `npm ci` in tests/browser, and /usr/bin/chromium (apt package
//! `chromium`, installed by .ci/run; `FERRY_TEST_CHROMIUM` names another). Without them these
//! tests fail and say so: they never skip.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::{
    backend_app::{PyApp, TOKEN_SECRET},
    helpers::{Backend, TestApp, assert_same_bytes, header, random_bytes},
    nginx::ProxyChain,
};

const MIB: usize = 1024 * 1024;
/// How long one browser script may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(150);
const SETUP_HINT: &str = "run `bash tests/run` once (it runs `npm ci` in tests/browser), or by hand \
    `(cd tests/browser && npm ci)`; Chromium comes from Debian (`apt-get install chromium`)";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("browser")
}

fn chromium() -> String {
    std::env::var("FERRY_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Fails the test (never skips it) when playwright-core or Chromium is missing.
fn require_browser() {
    let installed = browser_dir().join("node_modules").join("playwright-core").join("package.json");
    assert!(installed.is_file(), "playwright-core is not installed ({} is missing)\n{SETUP_HINT}", installed.display());
    assert!(Path::new(&chromium()).is_file(), "no Chromium at {}\n{SETUP_HINT}", chromium());
}

/// Runs a script of tests/browser with Node.js and returns the JSON object it printed last.
async fn run_script(script: &str, args: &[String]) -> Value {
    require_browser();
    let mut command = Command::new("node");
    command
        .arg(browser_dir().join(script))
        .args(args)
        .current_dir(browser_dir())
        .env("FERRY_TEST_CHROMIUM", chromium())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} did not finish within {RUN_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("cannot run node {script}: {e}; Node.js 18 or later is needed"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} {args:?} failed with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{script} printed no JSON result ({e}):\n{stdout}\n{stderr}"))
}

/// Files to upload, in a temporary folder.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("temp dir") }
    }

    /// Writes `len` pseudo-random bytes as `name`; returns them.
    fn add(&self, name: &str, len: usize, seed: u64) -> Vec<u8> {
        let data = random_bytes(len, seed);
        std::fs::write(self.path(name), &data).expect("write a file to upload");
        data
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().expect("UTF-8 temp path").to_string()
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn args(pairs: &[(&str, &str)]) -> Vec<String> {
    pairs.iter().flat_map(|(k, v)| [format!("--{k}"), v.to_string()]).collect()
}

/// The one file a page script reports.
fn only_file(result: &Value) -> &Value {
    let files = result["files"].as_array().unwrap_or_else(|| panic!("no files in {result}"));
    assert_eq!(files.len(), 1, "{result}");
    &files[0]
}

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_else(|| panic!("no '{key}' in {value}"))
}

fn number(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or_else(|| panic!("no number '{key}' in {value}"))
}

/// The page showed the upload as done with the right SHA-256, and ferry holds exactly `data`.
async fn assert_uploaded(app: &TestApp, shown: &Value, data: &[u8]) {
    assert_eq!(text(shown, "state"), "done", "{shown}");
    assert_eq!(text(shown, "sha256"), sha256_hex(data), "the SHA-256 the page shows: {shown}");
    let url = text(shown, "url");
    // The download link is the upload URL signed by ferry, opens without a token, and has none in it.
    let href = text(shown, "downloadHref");
    assert!(href.starts_with(&format!("{url}?expires=")) && href.contains("&signature="), "the link: {shown}");
    assert!(!href.contains("token"), "no token in the link: {href}");
    let plain = app.client.get(href).send().await.unwrap();
    assert_eq!(plain.status(), 200, "GET {href} without a token");
    assert_same_bytes(&format!("download of {href}"), &plain.bytes().await.unwrap(), data);
    let head = app.head(url).await;
    assert_eq!(header(&head, "upload-offset"), data.len().to_string());
    // The file's name went along as metadata (UTF-8, base64).
    let metadata = header(&head, "upload-metadata");
    let filename = metadata
        .split(',')
        .find_map(|pair| pair.trim().strip_prefix("filename "))
        .map(|value| String::from_utf8(STANDARD.decode(value).unwrap()).unwrap());
    assert_eq!(filename.as_deref(), Some(text(shown, "name")), "Upload-Metadata: {metadata}");
    assert!(metadata.split(',').any(|pair| pair.trim().starts_with("filetype ")), "Upload-Metadata: {metadata}");
    assert_same_bytes(&format!("download of {url}"), &app.download(url).await, data);
}

/// An upload token (HS256) for `sub`, valid for ten minutes.
fn token_for(sub: &str, secret: &str) -> String {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = serde_json::json!({"sub": sub, "exp": exp});
    encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

/// What a script counted of the page's requests to ferry's endpoint and upload URLs:
/// `"METHOD protocol [digest field]"` → how many (see `recordProtocols` in tests/browser/lib.mjs).
fn requests(counted: &Value) -> BTreeMap<String, u64> {
    let counted = counted.as_object().unwrap_or_else(|| panic!("no request counts: {counted}"));
    counted.iter().map(|(key, n)| (key.clone(), n.as_u64().unwrap())).collect()
}

/// How many of the counted requests have `method`.
fn count_of(requests: &BTreeMap<String, u64>, method: &str) -> u64 {
    requests.iter().filter(|(key, _)| key.split(' ').next() == Some(method)).map(|(_, n)| n).sum()
}

/// Every counted request spoke `protocol` (`tus` or `ietf` at interop version 9) and no other.
fn assert_all_spoke(requests: &BTreeMap<String, u64>, protocol: &str) {
    assert!(!requests.is_empty(), "no requests were counted");
    for key in requests.keys().filter(|key| *key != "GET link") {
        assert_eq!(key.split(' ').nth(1), Some(protocol), "a request that did not speak {protocol}: {requests:?}");
    }
}

fn throughput(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / MIB as f64 / (ms / 1000.0)
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{page}"))
}

/// Where the tests leave screenshots of the page (printed by the tests that take them).
fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

/// Page settings that make chunk counts exact: 1 MiB chunks that never grow, quick retries.
const FIXED_CHUNKS: &str = "?chunkSize=1MiB&maxChunkSize=1MiB&retryDelay=100&maxRetryDelay=1000";

/// Runs a `page.mjs` scenario with one file of `len` bytes in 1 MiB chunks, acting after `after`
/// chunks; returns the server, the file's bytes and what the script reported.
async fn page_scenario(
    scenario: &str,
    name: &str,
    len: usize,
    after: usize,
    more: &[(&str, &str)],
) -> (TestApp, Vec<u8>, Value) {
    page_scenario_at(FIXED_CHUNKS, scenario, name, len, after, more).await
}

/// [`page_scenario`] with the page's settings in `query`.
async fn page_scenario_at(
    query: &str,
    scenario: &str,
    name: &str,
    len: usize,
    after: usize,
    more: &[(&str, &str)],
) -> (TestApp, Vec<u8>, Value) {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let files = Files::new();
    let data = files.add(name, len, len as u64);
    let mut script = args(&[
        ("url", &format!("{}/{query}", app.base)),
        ("scenario", scenario),
        ("after", &after.to_string()),
        ("file", &files.path(name)),
    ]);
    script.extend(args(more));
    let result = run_script("page.mjs", &script).await;
    (app, data, result)
}

// ------------------------------------------------------------------------------------------------
// Serving the page and the module

#[tokio::test]
async fn the_page_and_module_are_served_with_validators_and_a_strict_policy() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.base_path = "/uploads/".into()).await;
    let get = |path: &str| app.client.get(format!("{}{path}", app.base));

    let page = get("/").send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&page, "cache-control"), "no-cache");
    assert_eq!(header(&page, "x-content-type-options"), "nosniff");
    let policy = header(&page, "content-security-policy");
    for directive in
        ["default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]
    {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    let etag = header(&page, "etag");
    assert!(etag.starts_with('"') && etag.len() > 10, "a strong ETag: {etag}");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"data-endpoint="/uploads/""#), "the page is told the configured --base-path");
    assert!(!html.contains("<script>") && !html.contains("style="), "nothing inline that the policy would block");

    // Revalidation: the same ETag gets 304 and no body; another gets the page.
    let again = get("/").header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(header(&again, "etag"), etag);
    assert_eq!(header(&again, "cache-control"), "no-cache");
    assert!(again.bytes().await.unwrap().is_empty());
    let other = get("/").header("If-None-Match", "\"something-else\"").send().await.unwrap();
    assert_eq!(other.status(), 200);

    let module = get("/ferry-upload.js").send().await.unwrap();
    assert_eq!(module.status(), 200);
    assert_eq!(header(&module, "content-type"), "text/javascript; charset=utf-8");
    assert_eq!(header(&module, "x-content-type-options"), "nosniff");
    assert!(header(&module, "cache-control").contains("max-age="), "the module may be cached a while");
    assert_eq!(header(&module, "cross-origin-resource-policy"), "cross-origin");
    let module_etag = header(&module, "etag");
    assert_ne!(module_etag, etag);
    assert!(module.text().await.unwrap().contains("export class FerryUploader"));
    let weak = get("/ferry-upload.js").header("If-None-Match", format!("W/{module_etag}")).send().await.unwrap();
    assert_eq!(weak.status(), 304, "If-None-Match compares weakly");

    for (path, kind) in [("/page.js", "text/javascript; charset=utf-8"), ("/page.css", "text/css; charset=utf-8")] {
        let response = get(path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(header(&response, "content-type"), kind, "{path}");
        assert_eq!(header(&response, "cache-control"), "no-cache", "{path}");
        assert_eq!(header(&response, "x-content-type-options"), "nosniff", "{path}");
    }
    let head = app.client.head(format!("{}/ferry-upload.js", app.base)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "etag"), module_etag);
}

#[tokio::test]
async fn other_origins_may_import_the_module_and_read_what_options_says() {
    let origin = "https://app.example";
    let app = TestApp::spawn_with(Backend::Sqlite, |args| {
        args.cors_origin = vec![origin.into()];
        args.max_append_size = Some(MIB as u64);
    })
    .await;
    let module = app.client.get(format!("{}/ferry-upload.js", app.base)).header("Origin", origin).send().await.unwrap();
    assert_eq!(module.status(), 200);
    assert_eq!(header(&module, "access-control-allow-origin"), origin);

    // A tus client's own OPTIONS (no Access-Control-Request-Method) reaches the handler, and the
    // browser may read its answer.
    let options = app.client.request(Method::OPTIONS, &app.files).header("Origin", origin).send().await.unwrap();
    assert_eq!(options.status(), 204);
    assert_eq!(header(&options, "access-control-allow-origin"), origin);
    assert_eq!(header(&options, "tus-version"), "1.0.0");
    assert!(header(&options, "tus-checksum-algorithm").contains("sha256"));
    let exposed = header(&options, "access-control-expose-headers");
    for name in ["tus-checksum-algorithm", "tus-max-size", "upload-limit"] {
        assert!(exposed.split(',').any(|h| h.trim() == name), "{name} exposed: {exposed}");
    }

    // A preflight is still answered as one.
    let preflight = app
        .client
        .request(Method::OPTIONS, format!("{}x", app.files))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "PATCH")
        .header("Access-Control-Request-Headers", "upload-offset,upload-checksum,authorization")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert!(header(&preflight, "access-control-allow-methods").contains("PATCH"));
    assert!(preflight.headers().get("tus-version").is_none(), "a preflight is not a tus OPTIONS");
}

// ------------------------------------------------------------------------------------------------
// The page

/// With upload tokens, the page's download link is a signed one it asks ferry for with the
/// token: it opens with a plain GET, and the token is not in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_links_to_a_signed_download() {
    let secret = "a token secret that is long enough for HS256";
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.token_secret = Some(secret.into())).await;
    let token = token_for("alice", secret);
    let files = Files::new();
    let data = files.add("signed.bin", 3 * MIB + 5, 21);
    let script = args(&[
        ("url", &format!("{}/{FIXED_CHUNKS}#token={token}", app.base)),
        ("scenario", "upload"),
        ("file", &files.path("signed.bin")),
    ]);
    let result = run_script("page.mjs", &script).await;

    let shown = only_file(&result);
    assert_eq!(text(shown, "state"), "done", "{shown}");
    let url = text(shown, "url");
    let href = text(shown, "downloadHref");
    assert!(href.starts_with(&format!("{url}?expires=")) && href.contains("&signature="), "the link: {href}");
    assert!(!href.contains(&token), "no token in the link: {href}");
    assert_eq!(app.client.get(url).send().await.unwrap().status(), 401, "the upload URL itself needs the token");
    let plain = app.client.get(href).send().await.unwrap();
    assert_eq!(plain.status(), 200, "GET {href} without a token");
    assert_same_bytes("the signed download", &plain.bytes().await.unwrap(), &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_uploads_several_files_and_shows_their_sha256() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let files = Files::new();
    let big = files.add("big.bin", 64 * MIB + 12_345, 1);
    let small = files.add("notes ✓.txt", 300_000, 2);
    let (wide, narrow) = (screenshots().join("finished-page.png"), screenshots().join("finished-page-narrow.png"));

    let mut script = args(&[("url", &format!("{}/", app.base)), ("scenario", "upload")]);
    script.extend(args(&[("file", &files.path("big.bin")), ("file", &files.path("notes ✓.txt"))]));
    script.extend(args(&[("screenshot", wide.to_str().unwrap()), ("narrow-screenshot", narrow.to_str().unwrap())]));
    let result = run_script("page.mjs", &script).await;

    let shown = result["files"].as_array().expect("files");
    assert_eq!(shown.len(), 2);
    assert_uploaded(&app, &shown[0], &big).await;
    assert_uploaded(&app, &shown[1], &small).await;
    assert_eq!(text(&shown[0], "shownSize"), "64 MiB (67,121,209 bytes)");
    assert_eq!(app.upload_count().await, 2);
    // Each chunk carried its SHA-256, and no chunk was sent twice.
    assert_eq!(number(&shown[0]["stats"], "bytesPatched"), big.len() as u64);
    assert_eq!(number(&shown[0]["stats"], "retries"), 0);
    assert_eq!(result["narrowOverflow"].as_i64(), Some(0), "nothing sticks out sideways 380 px wide");
    assert_eq!(result["firstTab"], "files", "Tab reaches the file picker first");
    assert!(text(&result, "announced").contains("uploaded"), "screen readers hear the outcome: {result}");
    assert!(wide.is_file() && narrow.is_file());
    let ms = shown[0]["ms"].as_f64().unwrap();
    println!(
        "64 MiB through the page: {ms:.0} ms ({:.1} MiB/s, {} chunks); screenshots: {} and {}",
        throughput(big.len(), ms),
        shown[0]["stats"]["chunks"],
        wide.display(),
        narrow.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_the_page_resumes_without_sending_finished_chunks_again() {
    let after = 6;
    let (app, data, result) = page_scenario("reload", "resume.bin", 24 * MIB + 777, after, &[]).await;

    let shown = only_file(&result);
    assert_uploaded(&app, shown, &data).await;
    assert_eq!(app.upload_count().await, 1, "the reloaded page continued the same upload");
    let offered = result["offered"].as_array().expect("offered");
    assert!(
        offered.iter().any(|o| o.as_str().unwrap().contains("resume.bin")),
        "the page offered to resume: {offered:?}"
    );
    let resumed_from = number(shown, "resumedFrom");
    assert!(
        resumed_from >= (after * MIB) as u64,
        "resumed from {resumed_from}, after {after} chunks had been accepted"
    );
    assert_eq!(number(&shown["stats"], "bytesPatched"), data.len() as u64 - resumed_from);

    // What ferry received over both visits: the file, plus at most the chunk that was on its way.
    let page = app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    let received = metric(&page, "ferry_received_bytes_total");
    assert!(received >= data.len() as f64, "received {received}");
    assert!(
        received <= (data.len() + MIB) as f64,
        "received {received} for a file of {}: chunks sent twice",
        data.len()
    );
    println!("reload: resumed from {resumed_from} bytes; ferry received {received} bytes for {} bytes", data.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_recovers_by_itself_when_the_network_comes_back() {
    let after = 4;
    let (app, data, result) = page_scenario("cut", "cut.bin", 12 * MIB + 5, after, &[("failures", "5")]).await;

    assert!(number(&result, "aborted") >= 5, "{result}");
    assert_eq!(text(&result, "stateDuringCut"), "retrying", "{result}");
    assert!(text(&result, "statusDuringCut").contains("trying again"), "{result}");
    assert_eq!(number(&result, "offsetDuringCut"), (after * MIB) as u64, "the chunks before the cut were kept");
    let shown = only_file(&result);
    assert_uploaded(&app, shown, &data).await;
    assert!(number(&shown["stats"], "retries") >= 2, "{shown}");
    assert_eq!(number(&shown["stats"], "bytesPatched"), data.len() as u64, "nothing was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_the_upload_and_resume_finishes_it() {
    let after = 3;
    let shot = screenshots().join("paused-page.png");
    let (app, data, result) =
        page_scenario("pause", "pause.bin", 12 * MIB + 99, after, &[("screenshot", shot.to_str().unwrap())]).await;

    let offsets: Vec<u64> = result["offsets"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![(after * MIB) as u64; offsets.len()], "the offset stood still while paused");
    assert_eq!(number(&result, "sentWhilePaused"), (after * MIB) as u64);
    assert!(text(&result, "focusedAfterPause").contains("resume"), "focus moved to Resume: {result}");
    assert_uploaded(&app, only_file(&result), &data).await;
    assert_eq!(app.upload_count().await, 1);
    println!("paused page: {}", shot.display());
}

// ------------------------------------------------------------------------------------------------
// The module speaking the IETF resumable-uploads draft (`protocol: 'ietf'`, `'auto'`)

/// `?protocol=ietf`: every request announces interop version 9 and carries no `Tus-Resumable`,
/// each chunk its `Content-Digest`; after a reload in the middle of a PATCH, choosing the file
/// again resumes the same upload from the server's offset (HEAD), sending no finished chunk again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ietf_draft_the_page_resumes_after_a_reload() {
    let after = 6;
    let len = 24 * MIB + 777;
    let query = format!("{FIXED_CHUNKS}&protocol=ietf");
    let (app, data, result) = page_scenario_at(&query, "reload", "ietf-resume.bin", len, after, &[]).await;

    let shown = only_file(&result);
    assert_uploaded(&app, shown, &data).await;
    assert_eq!(app.upload_count().await, 1, "the reloaded page continued the same upload");
    let resumed_from = number(shown, "resumedFrom");
    assert!(resumed_from >= (after * MIB) as u64, "resumed from {resumed_from}, after {after} chunks were accepted");
    assert_eq!(number(&shown["stats"], "bytesPatched"), data.len() as u64 - resumed_from);

    let sent = requests(&result["requests"]);
    assert_all_spoke(&sent, "ietf");
    assert_eq!(sent.get("OPTIONS ietf"), Some(&2), "one OPTIONS per page load: {sent:?}");
    assert_eq!(sent.get("POST ietf"), Some(&1), "one upload was created: {sent:?}");
    let patches = count_of(&sent, "PATCH");
    assert_eq!(sent.get("PATCH ietf content-digest"), Some(&patches), "every chunk carried its digest: {sent:?}");
    // The first visit's accepted chunks and at most one the reload cut off (the reload may land
    // before or after the chunk then on its way was accepted), then from where the server stood.
    let rest = (data.len() as u64 - resumed_from).div_ceil(MIB as u64);
    let first_visit = patches.saturating_sub(rest);
    let accepted = resumed_from / MIB as u64;
    assert!(
        first_visit == accepted || first_visit == accepted + 1,
        "{first_visit} PATCHes before the reload: {sent:?}"
    );
    assert!(count_of(&sent, "HEAD") >= 2, "HEAD to resume and for the SHA-256: {sent:?}");

    // What ferry received over both visits: the file, plus at most the chunk that was on its way.
    let page = app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    let received = metric(&page, "ferry_received_bytes_total");
    assert!(received >= data.len() as f64, "received {received}");
    assert!(received <= (data.len() + MIB) as f64, "received {received} for {} bytes: chunks sent twice", data.len());
}

/// `?protocol=ietf` with files that fit in one chunk: each goes whole in its creation request
/// (`Upload-Complete: ?1`, with its `Content-Digest`), no PATCH follows; an empty file too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ietf_draft_the_page_sends_small_files_in_their_creation_request() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let files = Files::new();
    let small = files.add("small ✓.txt", 300_000, 10);
    let empty = files.add("empty.txt", 0, 11);

    let mut script = args(&[("url", &format!("{}/?protocol=ietf", app.base)), ("scenario", "upload")]);
    script.extend(args(&[("file", &files.path("small ✓.txt")), ("file", &files.path("empty.txt"))]));
    let result = run_script("page.mjs", &script).await;

    let shown = result["files"].as_array().expect("files");
    assert_uploaded(&app, &shown[0], &small).await;
    assert_uploaded(&app, &shown[1], &empty).await;
    for (row, data) in shown.iter().zip([&small, &empty]) {
        assert_eq!(number(&row["stats"], "bytesPosted"), data.len() as u64, "{row}");
        assert_eq!(number(&row["stats"], "bytesPatched"), 0, "{row}");
    }
    let sent = requests(&result["requests"]);
    assert_all_spoke(&sent, "ietf");
    assert_eq!(sent.get("POST ietf content-digest"), Some(&2), "{sent:?}");
    assert_eq!(count_of(&sent, "POST"), 2, "{sent:?}");
    assert_eq!(count_of(&sent, "PATCH"), 0, "{sent:?}");
    assert_eq!(app.upload_count().await, 2);
}

/// `protocol: 'auto'` from an application on another origin: the module asks OPTIONS in the
/// draft's terms, sees `Upload-Limit` with `max-size` and speaks the draft from then on, across
/// origins (its fields pass the CORS preflight and its answers can be read), in chunks of the
/// advertised `max-append-size`, each with its `Content-Digest`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_on_another_origin_uploads_with_the_module_in_auto_mode_over_the_ietf_draft() {
    let secret = "a token secret that is long enough for HS256";
    let app_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let limit = 4 * MIB;
    let app = TestApp::spawn_with(Backend::Sqlite, |args| {
        args.cors_origin = vec![format!("http://127.0.0.1:{app_port}")];
        args.token_secret = Some(secret.into());
        args.max_append_size = Some(limit as u64);
    })
    .await;
    let token = token_for("alice", secret);
    let files = Files::new();
    let data = files.add("auto.bin", 64 * MIB + 4321, 12);

    let script = args(&[
        ("app-port", &app_port.to_string()),
        ("endpoint", &app.files),
        ("file", &files.path("auto.bin")),
        ("token", &token),
        ("chunk-size", &(8 * MIB).to_string()),
        ("module-options", r#"{"protocol": "auto"}"#),
        ("client", "module"),
    ]);
    let result = run_script("clients.mjs", &script).await;

    let run = &result["runs"][0];
    assert_eq!(text(run, "protocol"), "ietf", "auto chose the draft: {run}");
    assert_eq!(text(run, "sha256"), sha256_hex(&data));
    let url = text(run, "url");
    let response = app.client.get(url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {url}");
    assert_same_bytes("the upload", &response.bytes().await.unwrap(), &data);
    assert_eq!(run["checksums"], true, "Content-Digest on every chunk");
    assert_eq!(number(run, "maxAppendSize"), limit as u64, "read from the draft's Upload-Limit across origins");
    let chunks = data.len().div_ceil(limit) as u64;
    assert_eq!(number(&run["stats"], "chunks"), chunks, "no chunk above max-append-size: {run}");
    assert_eq!(number(&run["stats"], "retries"), 0, "{run}");

    let sent = requests(&run["requests"]);
    assert_all_spoke(&sent, "ietf");
    assert_eq!(sent.get("OPTIONS ietf"), Some(&1), "{sent:?}");
    assert_eq!(sent.get("POST ietf"), Some(&1), "{sent:?}");
    assert_eq!(sent.get("PATCH ietf content-digest"), Some(&chunks), "{sent:?}");
    assert_eq!(app.upload_count().await, 1);
}

// ------------------------------------------------------------------------------------------------
// Clients in an application on another origin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_on_another_origin_upload_with_the_module_tus_js_client_and_uppy() {
    let secret = "a token secret that is long enough for HS256";
    // The application's page is served by the script on this port (free now; it binds it).
    let app_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let limit = 4 * MIB;
    let app = TestApp::spawn_with(Backend::Sqlite, |args| {
        args.cors_origin = vec![format!("http://127.0.0.1:{app_port}")];
        args.token_secret = Some(secret.into());
        args.max_append_size = Some(limit as u64);
    })
    .await;
    let token = token_for("alice", secret);
    let files = Files::new();
    let data = files.add("shared.bin", 64 * MIB + 321, 6);

    let mut script = args(&[
        ("app-port", &app_port.to_string()),
        ("endpoint", &app.files),
        ("file", &files.path("shared.bin")),
        ("token", &token),
        ("chunk-size", &limit.to_string()),
    ]);
    script.extend(args(&[("client", "module"), ("client", "tusjs"), ("client", "uppy")]));
    let result = run_script("clients.mjs", &script).await;

    let runs = result["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 3);
    for run in runs {
        let url = text(run, "url");
        let response = app.client.get(url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {url}");
        assert_same_bytes(&format!("{} upload", run["client"]), &response.bytes().await.unwrap(), &data);
    }
    let module = &runs[0];
    assert_eq!(text(module, "sha256"), sha256_hex(&data));
    assert_eq!(module["checksums"], true, "OPTIONS was readable across origins: sha256 per chunk");
    assert_eq!(number(module, "maxAppendSize"), limit as u64);
    assert_eq!(number(&module["stats"], "chunks"), data.len().div_ceil(limit) as u64, "no chunk above Upload-Limit");
    assert!(number(module, "progressEvents") > 0);
    assert_eq!(text(module, "protocol"), "tus", "tus unless asked otherwise");
    assert_all_spoke(&requests(&module["requests"]), "tus");
    assert_eq!(app.upload_count().await, 3);

    let speed: Vec<String> = runs
        .iter()
        .map(|r| {
            format!("{} {:.1} MiB/s", r["client"].as_str().unwrap(), throughput(data.len(), r["ms"].as_f64().unwrap()))
        })
        .collect();
    let ratio = runs[1]["ms"].as_f64().unwrap() / runs[0]["ms"].as_f64().unwrap();
    println!(
        "64 MiB in 4 MiB chunks from another origin: {}; module/tus-js-client speed ratio {ratio:.2}",
        speed.join(", ")
    );
}

// ------------------------------------------------------------------------------------------------
// Through two nginx at their defaults (client_max_body_size 1m), advertising no limit: the module
// finds it out by itself.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_the_page_shrinks_its_chunks_until_they_pass() {
    page_through_nginx("tus").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_the_page_shrinks_its_chunks_with_the_ietf_draft_too() {
    page_through_nginx("ietf").await;
}

/// The page, speaking `protocol`, through the default chain: 8 MiB chunks until they pass.
async fn page_through_nginx(protocol: &str) {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.behind_proxy = true).await;
    let chain = ProxyChain::start(&app.addr.to_string());
    let files = Files::new();
    let data = files.add("through-nginx.bin", 12 * MIB + 3, 7);

    // The page itself comes through the proxies too: one origin, so the browser sees nginx's 413.
    let query = format!("?chunkSize=8MiB&retryDelay=100&maxRetryDelay=1000&protocol={protocol}");
    let script = args(&[
        ("url", &format!("{}/{query}", chain.url())),
        ("scenario", "upload"),
        ("file", &files.path("through-nginx.bin")),
    ]);
    let result = run_script("page.mjs", &script).await;

    let shown = only_file(&result);
    assert!(text(shown, "url").starts_with(chain.url()), "uploaded through the proxies: {shown}");
    assert_eq!(text(shown, "state"), "done", "{shown}\n{}", chain.logs());
    assert_eq!(text(shown, "sha256"), sha256_hex(&data));
    let url = format!("{}{}", app.files, crate::helpers::upload_id(text(shown, "url")));
    assert_same_bytes("the upload", &app.download(&url).await, &data);
    let stats = &shown["stats"];
    assert_eq!(number(stats, "shrinks"), 3, "8 MiB, 4 MiB, 2 MiB refused; 1 MiB passes: {stats}");
    assert_eq!(number(shown, "chunkSize"), MIB as u64);
    assert_eq!(number(stats, "bytesPatched"), data.len() as u64);
    assert_all_spoke(&requests(&result["requests"]), protocol);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_from_another_origin_the_module_shrinks_on_opaque_failures() {
    module_through_nginx_from_another_origin("tus").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_from_another_origin_the_module_shrinks_with_the_ietf_draft_too() {
    module_through_nginx_from_another_origin("ietf").await;
}

/// The module on another origin, speaking `protocol`, through the default chain: 4 MiB chunks
/// that fail without an answer until they pass.
async fn module_through_nginx_from_another_origin(protocol: &str) {
    let app_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let app = TestApp::spawn_with(Backend::Sqlite, |args| {
        args.behind_proxy = true;
        args.cors_origin = vec![format!("http://127.0.0.1:{app_port}")];
    })
    .await;
    let chain = ProxyChain::start(&app.addr.to_string());
    let files = Files::new();
    let data = files.add("opaque.bin", 6 * MIB + 1, 8);

    // nginx's 413 carries no CORS headers: to the page it is a network error like any other. Small
    // requests (HEAD) get through while the large chunk keeps failing, so the module shrinks it.
    let options =
        format!(r#"{{"retryDelay": 100, "maxRetryDelay": 1000, "minChunkSize": 262144, "protocol": "{protocol}"}}"#);
    let script = args(&[
        ("app-port", &app_port.to_string()),
        ("endpoint", &format!("{}/files/", chain.url())),
        ("file", &files.path("opaque.bin")),
        ("chunk-size", &(4 * MIB).to_string()),
        ("module-options", &options),
        ("client", "module"),
    ]);
    let result = run_script("clients.mjs", &script).await;

    let run = &result["runs"][0];
    assert_eq!(text(run, "sha256"), sha256_hex(&data), "{run}\n{}", chain.logs());
    let url = format!("{}{}", app.files, crate::helpers::upload_id(text(run, "url")));
    assert_same_bytes("the upload", &app.download(&url).await, &data);
    assert_eq!(number(&run["stats"], "shrinks"), 2, "4 MiB and 2 MiB failed; 1 MiB passes: {run}");
    assert_eq!(number(run, "chunkSize"), MIB as u64);
    assert_all_spoke(&requests(&run["requests"]), protocol);
}

// ------------------------------------------------------------------------------------------------
// The example app (examples/python under gunicorn): its page imports the module from ferry and
// gets upload tokens from the app.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_apps_page_uploads_with_the_module_and_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut example = PyApp::new(dir.path(), 1);
    let app = TestApp::spawn_with(Backend::Sqlite, |args| {
        args.token_secret = Some(TOKEN_SECRET.into());
        args.cors_origin = vec![example.base().to_string()];
    })
    .await;
    example.set_ferry_url(&app.base);
    example.start().await;
    let files = Files::new();
    let data = files.add("report.pdf", 5 * MIB + 17, 9);

    let script = args(&[("app", example.base()), ("user", "alice"), ("file", &files.path("report.pdf"))]);
    let result = run_script("example_app.mjs", &script).await;

    let shown = text(&result, "text");
    assert!(shown.contains(&format!("done, SHA-256 {}", sha256_hex(&data))), "the page says: {shown}");
    // The upload is alice's: her token downloads it.
    let id: uuid::Uuid = {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&app.db_url).await.unwrap();
        sqlx::query_scalar("SELECT id FROM uploads").fetch_one(&mut conn).await.unwrap()
    };
    let token = token_for("alice", TOKEN_SECRET);
    let url = format!("{}{}", app.files, id.simple());
    let response = app.client.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {url} as alice");
    assert_same_bytes("the upload", &response.bytes().await.unwrap(), &data);
}
