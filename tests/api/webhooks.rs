//! Durable signed webhooks: a real HTTP receiver (axum on port 0) records what ferry delivers.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{KeyInit, Mac};
use reqwest::Method;

use crate::db_backend_tests;
use crate::helpers::{Backend, TestApp, wait_for};

pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    pub(crate) id: String,
    timestamp: i64,
    signature: String,
    body: String,
}

impl Delivery {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }

    pub(crate) fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap().to_string()
    }
}

/// A webhook receiver that answers each request with the next scripted status (200 once the
/// script is used up) and records every request.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    script: Arc<Mutex<Vec<u16>>>,
}

impl Receiver {
    pub(crate) async fn start(script: Vec<u16>) -> (Self, String) {
        let receiver = Receiver { script: Arc::new(Mutex::new(script)), ..Default::default() };
        let app = Router::new().route("/hook", post(receive)).with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, url)
    }

    pub(crate) fn all(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    receiver.deliveries.lock().unwrap().push(Delivery {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp").parse().unwrap_or(0),
        signature: header("webhook-signature"),
        body: String::from_utf8(body.to_vec()).unwrap(),
    });
    let mut script = receiver.script.lock().unwrap();
    let status = if script.is_empty() { 200 } else { script.remove(0) };
    StatusCode::from_u16(status).unwrap()
}

/// Checks a signature the way a receiver does, independently of ferry's code.
fn verify(delivery: &Delivery) -> bool {
    let key = STANDARD.decode(SECRET.trim_start_matches("whsec_")).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", delivery.id, delivery.timestamp, delivery.body).as_bytes());
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    delivery.signature.split(' ').any(|s| s == expected)
}

async fn spawn_with_hook(backend: Backend, url: &str) -> TestApp {
    let url = url.to_string();
    TestApp::spawn_with(backend, move |args| {
        args.webhook_url = Some(url);
        args.webhook_secret = vec![ferry::hooks::Secret::parse(SECRET).unwrap()];
        args.webhook_retry_min = Duration::from_millis(100);
    })
    .await
}

async fn completed_upload_events(backend: Backend) {
    let (receiver, url) = Receiver::start(Vec::new()).await;
    let app = spawn_with_hook(backend, &url).await;
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Length", "11")
        .header("Upload-Metadata", "filename aGVsbG8udHh0")
        .send()
        .await
        .unwrap();
    let upload = crate::helpers::header(&response, "location");
    assert_eq!(app.patch(&upload, 0, "hello ").await.status(), 204);
    assert_eq!(app.patch(&upload, 6, "world").await.status(), 204);
    wait_for("two deliveries", Duration::from_secs(20), || async { receiver.all().len() >= 2 }).await;

    let deliveries = receiver.all();
    assert_eq!(deliveries.len(), 2, "exactly the expected events: {deliveries:?}");
    assert_eq!(deliveries[0].kind(), "upload.created");
    assert_eq!(deliveries[1].kind(), "upload.completed");
    for delivery in &deliveries {
        assert!(delivery.id.starts_with("evt_"));
        assert!(verify(delivery), "signature of {delivery:?}");
        assert!((delivery.timestamp - chrono_now()).abs() < 60);
    }
    let data = &deliveries[1].json()["data"];
    let id = upload.rsplit('/').next().unwrap();
    assert_eq!(data["id"], id);
    assert_eq!(data["size"], 11);
    assert_eq!(data["sha256"], "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9");
    assert_eq!(data["metadata"]["filename"], "hello.txt");
    assert!(data["url"].as_str().unwrap().ends_with(&format!("/files/{id}")));
    assert!(data["location"].as_str().unwrap().ends_with(id));
    assert!(data["completed_at"].is_string());
    // A signed link, made at delivery and valid for --download-link-ttl from then, opens it.
    let link = data["download_url"].as_str().unwrap();
    assert!(link.starts_with(&format!("{}?expires=", data["url"].as_str().unwrap())), "{link}");
    let expires_at = chrono::DateTime::parse_from_rfc3339(data["download_url_expires_at"].as_str().unwrap()).unwrap();
    assert!((expires_at.timestamp() - chrono_now() - 3600).abs() < 60, "an hour from delivery: {expires_at}");
    let opened = app.client.get(link).send().await.unwrap();
    assert_eq!(opened.status(), 200);
    assert_eq!(opened.bytes().await.unwrap(), "hello world");
    assert!(deliveries[0].json()["data"].get("download_url").is_none(), "only completed uploads get a link");
    // A tampered body no longer matches its signature.
    let mut tampered = deliveries[1].clone();
    tampered.body = tampered.body.replace("hello.txt", "evil.txt");
    assert!(!verify(&tampered));
}

/// A final upload is complete in its 201, but `upload.completed` waits for its whole-file
/// SHA-256 (computed in the background) and comes once, with the digest; its `location` is null
/// (its bytes are the partials' objects) and its `url` downloads the whole.
async fn a_final_upload_is_announced_once_with_its_digest(backend: Backend) {
    let (receiver, url) = Receiver::start(Vec::new()).await;
    let app = spawn_with_hook(backend, &url).await;
    let mut partials = Vec::new();
    for part in ["hello ", "world"] {
        let partial = app.create_partial(part.len() as u64).await;
        assert_eq!(app.patch(&partial, 0, part).await.status(), 204);
        partials.push(partial);
    }
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Concat", format!("final;{} {}", partials[0], partials[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let upload = crate::helpers::header(&response, "location");
    let id = upload.rsplit('/').next().unwrap().to_string();
    let of_final = |all: Vec<Delivery>| -> Vec<Delivery> {
        all.into_iter().filter(|d| d.json()["data"]["id"] == id.as_str()).collect()
    };
    wait_for("the final upload's upload.completed", Duration::from_secs(20), || async {
        of_final(receiver.all()).iter().any(|d| d.kind() == "upload.completed")
    })
    .await;
    let deliveries = of_final(receiver.all());
    let kinds: Vec<String> = deliveries.iter().map(|d| d.kind().to_string()).collect();
    assert_eq!(kinds, ["upload.created", "upload.completed"], "{deliveries:?}");
    let data = &deliveries[1].json()["data"];
    assert_eq!(data["size"], 11);
    assert_eq!(data["offset"], 11);
    assert_eq!(data["sha256"], "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9");
    assert!(data["location"].is_null(), "{data}");
    assert!(data["url"].as_str().unwrap().ends_with(&format!("/files/{id}")));
    assert_eq!(app.download(&upload).await, b"hello world");
}

/// Runs curl with `args`; returns its exit code and what it wrote to stdout.
async fn curl(args: &[&str]) -> (i32, String) {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-H", "Upload-Draft-Interop-Version: 9"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

fn field_of(headers: &str, name: &str) -> Option<String> {
    headers.lines().rev().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
    })
}

/// The README's walk-through, with curl alone: one POST of the whole file with
/// `Upload-Complete: ?1`, cut off by `--max-time`; the 104 gave its URL; HEAD tells the offset,
/// one PATCH sends the rest. The application hears `upload.completed` once, as for tus.
async fn curl_resumes_an_interrupted_post_and_the_app_hears_once(backend: Backend) {
    let (receiver, hook) = Receiver::start(Vec::new()).await;
    let app = spawn_with_hook(backend, &hook).await;
    let dir = tempfile::tempdir().unwrap();
    let data = crate::helpers::random_bytes(6 << 20, 77);
    let file = dir.path().join("video.mp4");
    std::fs::write(&file, &data).unwrap();
    let file = file.to_str().unwrap();

    // 1 MiB/s for 2 s: the POST is cut off a third of the way. (`-T` streams the file; the
    // endpoint without its trailing slash, or curl appends the file's name to the URL.)
    let endpoint = app.files.trim_end_matches('/');
    let (code, printed) = curl(&[
        "-i",
        "-X",
        "POST",
        "-T",
        file,
        "-H",
        "Upload-Complete: ?1",
        "--limit-rate",
        "1M",
        "--max-time",
        "2",
        endpoint,
    ])
    .await;
    assert_eq!(code, 28, "curl gave up at --max-time: {printed}");
    assert!(printed.contains("104 Upload Resumption Supported"), "curl shows the 104: {printed}");
    let url = field_of(&printed, "location").expect("the 104's Location");

    let (code, head) = curl(&["-I", &url]).await;
    assert_eq!(code, 0);
    assert_eq!(field_of(&head, "upload-complete").as_deref(), Some("?0"), "an interrupted POST is not complete");
    assert_eq!(field_of(&head, "upload-length"), Some(data.len().to_string()));
    let offset: usize = field_of(&head, "upload-offset").unwrap().parse().unwrap();
    assert!(offset > 0 && offset < data.len(), "the bytes that arrived are kept: {offset}");
    assert!(receiver.all().iter().all(|d| d.kind() != "upload.completed"), "not complete yet");

    let rest = dir.path().join("rest");
    std::fs::write(&rest, &data[offset..]).unwrap();
    let (code, finished) = curl(&[
        "-i",
        "-X",
        "PATCH",
        "-T",
        rest.to_str().unwrap(),
        "-H",
        "Content-Type: application/partial-upload",
        "-H",
        &format!("Upload-Offset: {offset}"),
        "-H",
        "Upload-Complete: ?1",
        &url,
    ])
    .await;
    assert_eq!(code, 0);
    assert!(finished.contains("HTTP/1.1 200"), "{finished}");
    assert_eq!(field_of(&finished, "upload-complete").as_deref(), Some("?1"));
    assert_eq!(app.download(&url).await, data);

    wait_for("upload.completed", Duration::from_secs(20), || async {
        receiver.all().iter().any(|d| d.kind() == "upload.completed")
    })
    .await;
    let completed: Vec<_> = receiver.all().into_iter().filter(|d| d.kind() == "upload.completed").collect();
    assert_eq!(completed.len(), 1, "one upload.completed");
    let event = completed[0].json();
    assert!(verify(&completed[0]));
    assert_eq!(event["data"]["size"], data.len());
    let sha256 = <sha2::Sha256 as sha2::Digest>::digest(&data).iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(event["data"]["sha256"], sha256);
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn failures_are_retried_in_order(backend: Backend) {
    // The receiver fails the first three requests: 500, 503, 500.
    let (receiver, url) = Receiver::start(vec![500, 503, 500]).await;
    let app = spawn_with_hook(backend, &url).await;
    let upload = app.upload(b"abc", 3).await;
    let doomed = app.create(5).await;
    assert_eq!(app.tus(Method::DELETE, &doomed).send().await.unwrap().status(), 204);
    wait_for("every event delivered", Duration::from_secs(30), || async {
        let ids: std::collections::HashSet<String> = receiver.all().iter().map(|d| d.id.clone()).collect();
        ids.len() == 4 && receiver.script.lock().unwrap().is_empty()
    })
    .await;
    // Let any in-flight redelivery land, then check: four distinct events, and per upload in order.
    let deliveries = receiver.all();
    assert!(deliveries.len() >= 7, "three failures were retried: {}", deliveries.len());
    let mut first_seen = Vec::new();
    for delivery in &deliveries {
        if !first_seen.iter().any(|d: &Delivery| d.id == delivery.id) {
            first_seen.push(delivery.clone());
        }
    }
    let of = |upload: &str| -> Vec<String> {
        let id = upload.rsplit('/').next().unwrap();
        first_seen.iter().filter(|d| d.json()["data"]["id"] == id).map(Delivery::kind).collect()
    };
    assert_eq!(of(&upload), ["upload.created", "upload.completed"]);
    assert_eq!(of(&doomed), ["upload.created", "upload.terminated"]);
    // Redeliveries of one event carry the same id and body, but for the download link, which each
    // delivery signs afresh.
    let unsigned = |delivery: &Delivery| {
        let mut body = delivery.json();
        if let Some(data) = body["data"].as_object_mut() {
            data.remove("download_url");
            data.remove("download_url_expires_at");
        }
        body
    };
    for delivery in &deliveries {
        let first = first_seen.iter().find(|d| d.id == delivery.id).unwrap();
        assert_eq!(unsigned(first), unsigned(delivery));
    }
}

async fn gone_receiver_stops_and_cli_redelivers(backend: Backend) {
    let (receiver, url) = Receiver::start(vec![410]).await;
    let app = spawn_with_hook(backend, &url).await;
    app.create(5).await;
    wait_for("the event to be refused", Duration::from_secs(20), || async { receiver.all().len() == 1 }).await;
    let list = |state: &'static str| {
        let db = app.db_url.clone();
        async move {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args(["events", "list", "--database-url", &db, "--state", state])
                .output()
                .await
                .unwrap();
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8(output.stdout).unwrap()
        }
    };
    wait_for("the event to be marked dead", Duration::from_secs(20), || async {
        list("dead").await.contains("upload.created")
    })
    .await;
    assert!(list("dead").await.contains("410"), "the reason is recorded");
    let id = receiver.all()[0].id.clone();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["events", "retry", "--database-url", &app.db_url, &id])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    wait_for("the redelivery", Duration::from_secs(20), || async { receiver.all().len() == 2 }).await;
    assert_eq!(receiver.all()[1].id, id);
    wait_for("the event to be delivered", Duration::from_secs(20), || async { list("delivered").await.contains(&id) })
        .await;
}

async fn events_are_recorded_without_a_url(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.upload(b"xyz", 3).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["events", "list", "--database-url", &app.db_url, "--state", "pending"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("upload.created") && text.contains("upload.completed"), "{text}");
}

async fn expiry_is_an_event(backend: Backend) {
    let (receiver, url) = Receiver::start(Vec::new()).await;
    let url2 = url.clone();
    let app = TestApp::spawn_with(backend, move |args| {
        args.webhook_url = Some(url2);
        args.webhook_secret = vec![ferry::hooks::Secret::parse(SECRET).unwrap()];
        args.expire_after = Duration::from_secs(1);
        args.sweep_interval = Duration::from_millis(100);
    })
    .await;
    app.create(5).await;
    wait_for("created and expired", Duration::from_secs(30), || async { receiver.all().len() >= 2 }).await;
    let kinds: Vec<String> = receiver.all().iter().map(Delivery::kind).collect();
    assert_eq!(kinds, ["upload.created", "upload.expired"]);
    let _ = url;
}

db_backend_tests!(
    completed_upload_events,
    a_final_upload_is_announced_once_with_its_digest,
    curl_resumes_an_interrupted_post_and_the_app_hears_once,
    failures_are_retried_in_order,
    gone_receiver_stops_and_cli_redelivers,
    events_are_recorded_without_a_url,
    expiry_is_an_event,
);
