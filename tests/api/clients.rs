//! Real tus clients against a real server: tuspy (Python) and tus-js-client (Node.js), run as
//! child processes by the scripts in `tests/clients/`; tus-js-client also in its two modes for the
//! IETF resumable-uploads draft (`ietf-draft-03`, `ietf-draft-05`). Each upload is checked byte
//! for byte through a download and against the SHA-256 the server reports in `Repr-Digest`.
//!
//! Set-up (done by `bash tests/run`): a virtualenv with `tests/clients/requirements.txt` whose
//! python is named by `FERRY_TEST_PYTHON` (default `python3`), and `npm ci` in `tests/clients`.
//! Without them these tests fail and say so: they never skip.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use reqwest::Response;
use tokio::process::Command;

use crate::{
    backend_tests,
    helpers::{Backend, TestApp, header, random_bytes, sha256_b64, wait_for},
};

backend_tests!(
    tuspy_uploads_in_chunks_with_checksums,
    tuspy_resumes_after_a_crash_from_its_url_storage,
    tuspy_async_uploader_resumes_a_known_url,
    tusjs_uploads_in_chunks,
    tusjs_creation_with_upload_and_method_override,
    tusjs_streams_with_a_deferred_length,
    tusjs_resumes_a_previous_upload_after_abort,
    tusjs_resumes_an_upload_cut_off_mid_request,
    tusjs_parallel_uploads_are_concatenated,
    tusjs_ietf_draft_05_uploads_64_mib_through_a_cut_off_request,
    tusjs_ietf_draft_03_uploads_64_mib_through_a_cut_off_request,
);

/// A few MiB that no chunk size below divides.
const FILE_SIZE: usize = 3 * 1024 * 1024 + 12_345;
const CHUNK: usize = 512 * 1024;
/// How long one client run may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(120);
const SETUP_HINT: &str = "run `bash tests/run` once (it sets up tests/clients), or by hand: \
    `python3 -m venv tests/clients/.venv && tests/clients/.venv/bin/pip install -r tests/clients/requirements.txt`, \
    `export FERRY_TEST_PYTHON=$PWD/tests/clients/.venv/bin/python` and `(cd tests/clients && npm ci)`";

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("clients")
}

fn python() -> String {
    std::env::var("FERRY_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn chunks_of(bytes: usize) -> u64 {
    bytes.div_ceil(CHUNK) as u64
}

/// Fails the test (never skips it) when tuspy cannot be imported.
pub(crate) async fn require_tuspy() -> String {
    let python = python();
    let checked = Command::new(&python)
        .args(["-c", "import tusclient, tusclient.storage.filestorage"])
        .stdin(Stdio::null())
        .output()
        .await;
    match checked {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "tuspy is not installed for {python} (FERRY_TEST_PYTHON): {}\n{SETUP_HINT}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("cannot run {python} (FERRY_TEST_PYTHON): {e}\n{SETUP_HINT}"),
    }
}

/// Fails the test (never skips it) when Node.js or tests/clients/node_modules is missing.
pub(crate) async fn require_tusjs() -> String {
    let installed = clients_dir().join("node_modules").join("tus-js-client").join("package.json");
    assert!(installed.is_file(), "tus-js-client is not installed ({} is missing)\n{SETUP_HINT}", installed.display());
    match Command::new("node").arg("--version").stdin(Stdio::null()).output().await {
        Ok(out) if out.status.success() => "node".into(),
        Ok(out) => panic!("node --version failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("cannot run node: {e}; Node.js 18 or later is needed for the tus-js-client tests"),
    }
}

/// What one client run printed: `key=value` lines, then the upload URL as the last line.
#[derive(Debug)]
pub(crate) struct Run {
    fields: HashMap<String, Vec<String>>,
    pub(crate) url: String,
    stderr: String,
}

impl Run {
    pub(crate) fn text(&self, key: &str) -> &str {
        match self.fields.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("expected one '{key}=' line from the client, got {other:?}; stderr:\n{}", self.stderr),
        }
    }

    pub(crate) fn number(&self, key: &str) -> u64 {
        let value = self.text(key);
        value.parse().unwrap_or_else(|_| panic!("'{key}={value}' is not a number"))
    }

    pub(crate) fn all(&self, key: &str) -> Vec<String> {
        self.fields.get(key).cloned().unwrap_or_default()
    }
}

/// Runs a client script in tests/clients and returns what it reported; fails on a non-zero exit.
pub(crate) async fn run_client(program: &str, script: &str, args: &[String]) -> Run {
    let mut command = Command::new(program);
    command
        .arg(clients_dir().join(script))
        .args(args)
        .current_dir(clients_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} did not finish within {RUN_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("cannot start {program} {script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "{script} {args:?} failed with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    let (url, rest) = lines.split_last().unwrap_or_else(|| panic!("{script} printed nothing; stderr:\n{stderr}"));
    let mut fields: HashMap<String, Vec<String>> = HashMap::new();
    for line in rest {
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unexpected line from {script}: '{line}'\n--- stdout\n{stdout}"));
        fields.entry(key.to_string()).or_default().push(value.to_string());
    }
    Run { fields, url: url.trim().to_string(), stderr }
}

/// A folder with the file to upload.
struct Workspace {
    dir: tempfile::TempDir,
    data: Vec<u8>,
}

impl Workspace {
    fn new(len: usize, seed: u64) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = random_bytes(len, seed);
        std::fs::write(dir.path().join("upload.bin"), &data).expect("write the file to upload");
        Self { dir, data }
    }

    fn file(&self) -> String {
        self.path("upload.bin")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().expect("UTF-8 temp path").to_string()
    }

    /// The arguments every run takes.
    fn args(&self, app: &TestApp, chunk: usize, filename: &str) -> Vec<String> {
        let mut args = vec!["--endpoint".to_string(), app.files.clone(), "--file".into(), self.file()];
        args.extend(["--chunk-size".into(), chunk.to_string(), "--filename".into(), filename.into()]);
        args
    }
}

fn with(mut args: Vec<String>, more: &[&str]) -> Vec<String> {
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

fn metadata_of(response: &Response) -> HashMap<String, String> {
    let value = header(response, "upload-metadata");
    value
        .split(',')
        .map(|pair| {
            let mut parts = pair.trim().splitn(2, ' ');
            let key = parts.next().unwrap_or_default().to_string();
            let decoded = STANDARD.decode(parts.next().unwrap_or_default()).expect("metadata value is base64");
            (key, String::from_utf8(decoded).expect("metadata value is UTF-8"))
        })
        .collect()
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ASCII");
            out.push(u8::from_str_radix(hex, 16).expect("percent escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8 file name")
}

/// The upload at `url` is complete, holds exactly `data` (by download and by `Repr-Digest`), and
/// kept the client's file name.
async fn assert_stored(app: &TestApp, url: &str, data: &[u8], filename: &str) {
    assert!(url.starts_with(&app.files), "upload URL {url} is not under {}", app.files);
    let head = app.head(url).await;
    assert_eq!(head.status(), 200, "HEAD {url}");
    assert_eq!(header(&head, "upload-length"), data.len().to_string(), "Upload-Length");
    assert_eq!(header(&head, "upload-offset"), data.len().to_string(), "Upload-Offset of a finished upload");
    assert_eq!(header(&head, "repr-digest"), format!("sha-256=:{}:", sha256_b64(data)), "Repr-Digest");
    assert_eq!(metadata_of(&head).get("filename").map(String::as_str), Some(filename), "filename metadata");

    let got = app.download(url).await;
    if got != data {
        let first = got.iter().zip(data).position(|(a, b)| a != b).unwrap_or(got.len().min(data.len()));
        panic!(
            "download differs from the file: {} bytes vs {}, first difference at byte {first}",
            got.len(),
            data.len()
        );
    }
    let response = app.client.get(url).send().await.unwrap();
    let disposition = header(&response, "content-disposition");
    let encoded = disposition
        .split("filename*=UTF-8''")
        .nth(1)
        .unwrap_or_else(|| panic!("no UTF-8 file name in Content-Disposition: {disposition}"));
    assert_eq!(percent_decode(encoded.trim()), filename, "Content-Disposition: {disposition}");
}

/// The server's offset for an upload that must not be complete yet.
async fn incomplete_offset(app: &TestApp, url: &str, len: usize) -> u64 {
    let head = app.head(url).await;
    assert_eq!(head.status(), 200, "HEAD {url}");
    let offset: u64 = header(&head, "upload-offset").parse().unwrap();
    assert!(offset > 0 && offset < len as u64, "offset {offset} after an interrupted run of {len} bytes");
    assert!(head.headers().get("repr-digest").is_none(), "an unfinished upload has no Repr-Digest");
    offset
}

// ---------------------------------------------------------------- tuspy

async fn tuspy_uploads_in_chunks_with_checksums(backend: Backend) {
    let python = require_tuspy().await;
    let app = TestApp::spawn(backend).await;
    let ws = Workspace::new(FILE_SIZE, 101);
    let name = "tuspy résumé ☃.bin";

    let run = run_client(&python, "tuspy_upload.py", &with(ws.args(&app, CHUNK, name), &["--checksum"])).await;

    assert_eq!(run.text("complete"), "true");
    assert_eq!(run.number("start_offset"), 0);
    assert_eq!(run.number("chunks"), chunks_of(FILE_SIZE), "one PATCH per chunk");
    assert_eq!(run.number("sent"), FILE_SIZE as u64);
    assert_eq!(run.number("offset"), FILE_SIZE as u64);
    assert_stored(&app, &run.url, &ws.data, name).await;
    assert_eq!(app.upload_count().await, 1);
}

async fn tuspy_resumes_after_a_crash_from_its_url_storage(backend: Backend) {
    let python = require_tuspy().await;
    let app = TestApp::spawn(backend).await;
    let ws = Workspace::new(FILE_SIZE, 102);
    let name = "crash-test.bin";
    let storage = ws.path("tuspy-urls.json");

    // The first run dies after three chunks, leaving only its URL storage behind.
    let args = with(ws.args(&app, CHUNK, name), &["--storage", &storage]);
    let first = run_client(&python, "tuspy_upload.py", &with(args.clone(), &["--stop-after-chunks", "3"])).await;
    assert_eq!(first.text("complete"), "false");
    assert_eq!(first.number("chunks"), 3);
    assert_eq!(first.number("offset"), 3 * CHUNK as u64);
    let before = incomplete_offset(&app, &first.url, FILE_SIZE).await;
    assert_eq!(before, 3 * CHUNK as u64, "the server kept every accepted chunk");

    // The second run finds the URL by the file's fingerprint, asks for the offset and goes on.
    let second = run_client(&python, "tuspy_upload.py", &args).await;
    assert_eq!(second.url, first.url, "the same upload was resumed");
    assert_eq!(second.number("start_offset"), before);
    let rest = FILE_SIZE - before as usize;
    assert_eq!(second.number("sent"), rest as u64);
    assert!(second.number("sent") < FILE_SIZE as u64);
    assert_eq!(second.number("chunks"), chunks_of(rest));
    assert_eq!(second.text("complete"), "true");
    assert_stored(&app, &second.url, &ws.data, name).await;
    assert_eq!(app.upload_count().await, 1, "resuming created no second upload");
}

async fn tuspy_async_uploader_resumes_a_known_url(backend: Backend) {
    let python = require_tuspy().await;
    let app = TestApp::spawn(backend).await;
    let ws = Workspace::new(FILE_SIZE, 103);
    let name = "async.bin";
    let args = ws.args(&app, CHUNK, name);

    let first = run_client(&python, "tuspy_upload.py", &with(args.clone(), &["--stop-after-chunks", "2"])).await;
    let before = incomplete_offset(&app, &first.url, FILE_SIZE).await;
    assert_eq!(before, 2 * CHUNK as u64);

    let second = run_client(&python, "tuspy_upload.py", &with(args, &["--async", "--url", &first.url])).await;
    assert_eq!(second.url, first.url);
    assert_eq!(second.number("start_offset"), before);
    assert_eq!(second.number("sent"), FILE_SIZE as u64 - before);
    assert_eq!(second.text("complete"), "true");
    assert_stored(&app, &first.url, &ws.data, name).await;
    assert_eq!(app.upload_count().await, 1);
}

// ---------------------------------------------------------------- tus-js-client

async fn tusjs_uploads_in_chunks(backend: Backend) {
    let node = require_tusjs().await;
    let app = TestApp::spawn(backend).await;
    let ws = Workspace::new(FILE_SIZE, 201);
    let name = "tus-js 名前.bin";

    let run = run_client(&node, "tusjs_upload.mjs", &ws.args(&app, CHUNK, name)).await;

    assert_eq!(run.text("complete"), "true");
    assert_eq!(run.number("posts"), 1);
    assert_eq!(run.number("heads"), 0);
    assert_eq!(run.number("patches"), chunks_of(FILE_SIZE), "one PATCH per chunk");
    assert_eq!(run.number("sent"), FILE_SIZE as u64);
    assert_eq!(run.number("retries"), 0, "no request failed");
    assert_stored(&app, &run.url, &ws.data, name).await;
    assert_eq!(app.upload_count().await, 1);
}

async fn tusjs_creation_with_upload_and_method_override(backend: Backend) {
    let node = require_tusjs().await;
    let app = TestApp::spawn(backend).await;
    let ws = Workspace::new(FILE_SIZE, 202);
    let name = "creation-with-upload.bin";
    let args = with(ws.args(&app, CHUNK, name), &["--data-during-creation", "--override-patch"]);

    let run = run_client(&node, "tusjs_upload.mjs", &args).await;

    assert_eq!(run.text("complete"), "true");
    assert_eq!(run.number("post_offset"), CHUNK as u64, "the POST carried the first chunk");
    assert_eq!(run.number("patches"), chunks_of(FILE_SIZE) - 1, "PATCHes (as POST + X-HTTP-Method-Override)");
    assert_eq!(run.number("sent"), FILE_SIZE as u64);
    assert_eq!(run.number("retries"), 0);
    assert_stored(&app, &run.url, &ws.data, name).await;
    assert_eq!(app.upload_count().await, 1);
}

async fn tusjs_streams_with_a_deferred_length(backend: Backend) {
    let node = require_tusjs().await;
    let app = TestApp::spawn(backend).await;
    // Not a whole number of chunks: tus-js-client 4.3.1 stalls on a deferred-length stream whose
    // size is a multiple of chunkSize (tus/tus-js-client#779), a client bug the script reports as
    // a failure.
    let len = FILE_SIZE;
    let ws = Workspace::new(len, 203);
    let name = "stream.bin";

    let run = run_client(&node, "tusjs_upload.mjs", &with(ws.args(&app, CHUNK, name), &["--stream"])).await;

    assert_eq!(run.text("complete"), "true");
    assert_eq!(run.number("patches"), chunks_of(len), "the last PATCH declares the length");
    assert_eq!(run.number("sent"), len as u64);
    assert_eq!(run.number("retries"), 0);
    let head = app.head(&run.url).await;
    assert!(head.headers().get("upload-defer-length").is_none(), "the length was declared: {:?}", head.headers());
    assert_stored(&app, &run.url, &ws.data, name).await;
}

async fn tusjs_resumes_a_previous_upload_after_abort(backend: Backend) {
    let node = require_tusjs().await;
    let app = TestApp::spawn(backend).await;
    let ws = Workspace::new(FILE_SIZE, 204);
    let name = "resume-me.bin";
    let storage = ws.path("tusjs-urls.json");
    let args = with(ws.args(&app, CHUNK, name), &["--storage", &storage]);

    let first = run_client(&node, "tusjs_upload.mjs", &with(args.clone(), &["--abort-after-chunks", "2"])).await;
    assert_eq!(first.text("aborted"), "true");
    assert_eq!(first.text("complete"), "false");
    assert!(!first.fields.contains_key("resumed_from"), "nothing to resume on the first run");
    let before = incomplete_offset(&app, &first.url, FILE_SIZE).await;
    assert_eq!(before, 2 * CHUNK as u64);

    // A new Upload of the same file finds the first one with findPreviousUploads().
    let second = run_client(&node, "tusjs_upload.mjs", &args).await;
    assert_eq!(second.text("resumed_from"), first.url);
    assert_eq!(second.url, first.url);
    assert_eq!(second.number("posts"), 0, "no new upload was created");
    assert_eq!(second.number("heads"), 1);
    assert_eq!(second.number("start_offset"), before);
    assert_eq!(second.number("sent"), FILE_SIZE as u64 - before);
    assert_eq!(second.number("patches"), chunks_of(FILE_SIZE - before as usize));
    assert_eq!(second.text("complete"), "true");
    assert_stored(&app, &second.url, &ws.data, name).await;
    assert_eq!(app.upload_count().await, 1);
}

async fn tusjs_resumes_an_upload_cut_off_mid_request(backend: Backend) {
    let node = require_tusjs().await;
    let app = TestApp::spawn(backend).await;
    let ws = Workspace::new(FILE_SIZE, 205);
    let name = "cut-off.bin";
    let args = ws.args(&app, CHUNK, name);

    // abort() while the second PATCH's body is on its way: the connection is cut mid-body.
    let first =
        run_client(&node, "tusjs_upload.mjs", &with(args.clone(), &["--abort-mid-request", &CHUNK.to_string()])).await;
    assert_eq!(first.text("aborted"), "true");
    assert_eq!(first.number("patches"), 2);
    assert_eq!(first.number("sent"), CHUNK as u64, "only the first PATCH was answered");
    let before = incomplete_offset(&app, &first.url, FILE_SIZE).await;
    assert!(before >= CHUNK as u64, "the first chunk was accepted before the cut: offset {before}");

    // The server keeps what arrived of the cut body, so the offset need not be a chunk boundary;
    // the client must resume from whatever HEAD says. Retries are allowed: the server may still
    // be finishing the cut-off request when the client comes back.
    let second =
        run_client(&node, "tusjs_upload.mjs", &with(args, &["--url", &first.url, "--retry-delays", "0,200,1000"]))
            .await;
    assert_eq!(second.url, first.url);
    assert_eq!(second.number("posts"), 0);
    let resumed_at = second.number("start_offset");
    assert!(resumed_at >= before, "resumed at {resumed_at}, below the {before} the server reported");
    assert_eq!(second.number("sent"), FILE_SIZE as u64 - resumed_at);
    assert_eq!(second.text("complete"), "true");
    assert_stored(&app, &first.url, &ws.data, name).await;
    assert_eq!(app.upload_count().await, 1);
}

async fn tusjs_parallel_uploads_are_concatenated(backend: Backend) {
    let node = require_tusjs().await;
    let app = TestApp::spawn(backend).await;
    // 64 MiB in four partial uploads, as tus-js-client sends the largest files.
    const PARALLEL_SIZE: usize = 64 * 1024 * 1024 + 4097;
    let ws = Workspace::new(PARALLEL_SIZE, 206);
    let name = "parallel.bin";

    let run = run_client(&node, "tusjs_upload.mjs", &with(ws.args(&app, CHUNK, name), &["--parallel", "4"])).await;

    assert_eq!(run.text("complete"), "true");
    assert_eq!(run.number("retries"), 0);
    assert_eq!(run.number("posts"), 5, "four partial uploads and the final one");
    assert_eq!(run.number("sent"), PARALLEL_SIZE as u64);
    let partials = run.all("partial");
    assert_eq!(partials.len(), 4, "{partials:?}");

    let mut total = 0;
    for partial in &partials {
        let head = app.head(partial).await;
        assert_eq!(head.status(), 200, "HEAD {partial}");
        assert_eq!(header(&head, "upload-concat"), "partial");
        let length: u64 = header(&head, "upload-length").parse().unwrap();
        assert_eq!(header(&head, "upload-offset"), length.to_string(), "partial {partial} is complete");
        total += length;
    }
    assert_eq!(total, PARALLEL_SIZE as u64, "the partial uploads split the file");

    let sent_concat = run.text("final_concat");
    let asked: Vec<&str> = sent_concat.strip_prefix("final;").unwrap().split_whitespace().collect();
    let mut created = partials.clone();
    created.sort();
    let mut named_by_client: Vec<String> = asked.iter().map(|s| s.to_string()).collect();
    named_by_client.sort();
    assert_eq!(named_by_client, created, "the final upload is made of the partial uploads");

    // HEAD on the final upload echoes its parts, in the client's order, as paths.
    let head = app.head(&run.url).await;
    let concat = header(&head, "upload-concat");
    let echoed: Vec<&str> = concat
        .strip_prefix("final;")
        .unwrap_or_else(|| panic!("Upload-Concat of the final upload: {concat}"))
        .split_whitespace()
        .collect();
    let expected: Vec<&str> = asked.iter().map(|url| url.strip_prefix(app.base.as_str()).unwrap()).collect();
    assert_eq!(echoed, expected, "Upload-Concat of the final upload");

    // Complete as soon as it is created (read from the partials, nothing copied); a range
    // across the first partial's end is byte-exact at once.
    let head = app.head(&run.url).await;
    assert_eq!(header(&head, "upload-offset"), PARALLEL_SIZE.to_string(), "never a short offset");
    let first: u64 = header(&app.head(&partials[0]).await, "upload-length").parse().unwrap();
    let (from, to) = (first as usize - 100, first as usize + 100);
    let across = app.client.get(&run.url).header("Range", format!("bytes={from}-{}", to - 1)).send().await.unwrap();
    assert_eq!(across.status(), 206);
    assert!(across.bytes().await.unwrap().as_ref() == &ws.data[from..to], "bytes across the first partial's end");
    // The whole-file SHA-256 is computed in the background.
    wait_for("the final upload's SHA-256", Duration::from_secs(60), || async {
        app.head(&run.url).await.headers().contains_key("repr-digest")
    })
    .await;
    assert_stored(&app, &run.url, &ws.data, name).await;
    assert_eq!(app.upload_count().await, 5);
}

// ---------------------------------------------------------------- tus-js-client, IETF draft

/// A large file that no chunk size below divides, in chunks large enough that the cut-off
/// request below carries megabytes.
const IETF_FILE_SIZE: usize = 64 * 1024 * 1024 + 12_345;
const IETF_CHUNK: usize = 4 * 1024 * 1024;

async fn tusjs_ietf_draft_05_uploads_64_mib_through_a_cut_off_request(backend: Backend) {
    tusjs_ietf_upload(backend, "ietf-draft-05", 301).await;
}

async fn tusjs_ietf_draft_03_uploads_64_mib_through_a_cut_off_request(backend: Backend) {
    tusjs_ietf_upload(backend, "ietf-draft-03", 302).await;
}

/// tus-js-client with `protocol` (one of its IETF modes; its requests carry
/// `Upload-Draft-Interop-Version` 5 or 6 and no `Tus-Resumable`): the POST carries the first
/// chunk, the run is cut off in the middle of a PATCH, and a second run finds the upload in its
/// URL storage, asks HEAD where it stands and finishes it. ferry answers each request as the
/// draft of that interop version says: no `Tus-Resumable`, 201 with `Upload-Complete: ?0` for a
/// creation or append that leaves the upload incomplete, 200 with `?1` for the last one.
async fn tusjs_ietf_upload(backend: Backend, protocol: &str, seed: u64) {
    let node = require_tusjs().await;
    let app = TestApp::spawn(backend).await;
    let ws = Workspace::new(IETF_FILE_SIZE, seed);
    let name = format!("{protocol} ✓.bin");
    let storage = ws.path("tusjs-urls.json");
    let args = with(ws.args(&app, IETF_CHUNK, &name), &["--protocol", protocol, "--storage", &storage]);

    // The first progress event of a request comes once its first 64 KiB are on their way (later
    // ones are throttled), so a limit on a chunk boundary cuts off the request that starts there:
    // the third PATCH, after the POST and two PATCHes.
    let cut_at = (3 * IETF_CHUNK).to_string();
    let first = run_client(
        &node,
        "tusjs_upload.mjs",
        &with(args.clone(), &["--data-during-creation", "--abort-mid-request", &cut_at]),
    )
    .await;
    assert_eq!(first.text("protocol"), protocol);
    assert_eq!(first.text("aborted"), "true");
    assert_eq!(first.text("complete"), "false");
    assert_eq!(first.number("posts"), 1);
    assert_eq!(first.number("post_offset"), IETF_CHUNK as u64, "the POST carried the first chunk");
    assert_eq!(first.number("patches"), 3, "two PATCHes answered, the third cut off");
    assert_eq!(first.number("sent"), 3 * IETF_CHUNK as u64);
    assert_eq!(first.all("answer"), ["POST 201 ?0", "PATCH 201 ?0", "PATCH 201 ?0"], "answers to the first run");
    assert_eq!(first.number("tus_answers"), 0, "ferry answered every request in the draft's terms");
    let before = incomplete_offset(&app, &first.url, IETF_FILE_SIZE).await;
    assert!(before >= 3 * IETF_CHUNK as u64, "the answered chunks were kept: offset {before}");

    // The server keeps what arrived of the cut body, and may still be finishing that request when
    // the client comes back: retries are allowed, and the client goes on from whatever HEAD says.
    let second = run_client(&node, "tusjs_upload.mjs", &with(args, &["--retry-delays", "0,200,1000"])).await;
    assert_eq!(second.text("resumed_from"), first.url, "the URL storage named the first run's upload");
    assert_eq!(second.url, first.url);
    assert_eq!(second.number("posts"), 0, "no new upload was created");
    let resumed_at = second.number("start_offset");
    assert!(resumed_at >= before, "resumed at {resumed_at}, below the {before} the server reported");
    assert_eq!(second.number("sent"), IETF_FILE_SIZE as u64 - resumed_at);
    assert_eq!(second.text("complete"), "true");
    assert_eq!(second.number("tus_answers"), 0);
    let answers = second.all("answer");
    assert_eq!(answers.first().map(String::as_str), Some("HEAD 204 ?0"), "offset retrieval: {answers:?}");
    let last: Vec<&String> = answers.iter().filter(|a| a.ends_with("?1")).collect();
    assert_eq!(last, [answers.last().unwrap()], "only the last answer says the upload is complete: {answers:?}");
    assert_eq!(answers.last().map(String::as_str), Some("PATCH 200 ?1"), "{answers:?}");
    assert_stored(&app, &first.url, &ws.data, &name).await;
    assert_eq!(app.upload_count().await, 1);
}

/// tus-js-client's parallel uploads on Azure Blob Storage (Azurite): the final upload reads the
/// partials' blobs, as on local disk and S3.
mod azure {
    use crate::helpers::Backend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tusjs_parallel_uploads_are_concatenated() {
        super::tusjs_parallel_uploads_are_concatenated(Backend::Azure).await
    }
}
