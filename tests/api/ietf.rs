//! HTTP's own resumable uploads (draft-ietf-httpbis-resumable-upload-12 and the interop versions
//! real clients send) on the same endpoint as tus, over plain HTTP requests and raw sockets.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::db_backend_tests;
use crate::helpers::{Backend, TestApp, header, random_bytes, sha256_b64, wait_for};

db_backend_tests!(
    creation_with_the_whole_file_completes_it,
    creation_then_appends_until_complete,
    a_length_learned_when_the_body_ends,
    conflicting_lengths_are_refused_and_change_nothing,
    a_wrong_offset_gets_the_right_one,
    a_completed_upload_takes_no_more,
    cancellation_ends_the_upload,
    limits_on_options_creation_and_refusals,
    malformed_fields_are_ignored_or_refused,
    content_digest_is_verified,
    repr_digest_is_checked_when_the_upload_completes,
    interop_5_and_6_as_their_clients_expect,
    interim_104_announces_the_upload_before_the_body,
    no_104_for_versions_not_served,
    no_104_through_proxies_unless_asked,
    tus_and_ietf_uploads_at_once,
    a_newer_append_ends_the_older_one,
    tokens_guard_draft_uploads_as_tus_ones,
);

const MIB: usize = 1 << 20;
const PROBLEMS: &str = "https://iana.org/assignments/http-problem-types#";

fn ietf(app: &TestApp, method: Method, url: &str) -> RequestBuilder {
    app.client.request(method, url).header("Upload-Draft-Interop-Version", "9")
}

fn append(app: &TestApp, url: &str, offset: usize, complete: bool, body: Vec<u8>) -> RequestBuilder {
    ietf(app, Method::PATCH, url)
        .header("Content-Type", "application/partial-upload")
        .header("Upload-Offset", offset.to_string())
        .header("Upload-Complete", if complete { "?1" } else { "?0" })
        .body(body)
}

async fn send(request: RequestBuilder) -> Response {
    request.send().await.unwrap()
}

/// The problem document of an error response (RFC 9457), checked for its media type and status.
async fn problem(response: Response, status: u16) -> Value {
    assert_eq!(response.status(), status, "{:?}", response.headers());
    assert_eq!(header(&response, "content-type"), "application/problem+json");
    let text = response.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("a JSON problem document ({e}): {text}"));
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
    body
}

async fn offset_of(app: &TestApp, url: &str) -> Response {
    let response = send(ietf(app, Method::HEAD, url)).await;
    assert_eq!(response.status(), 204, "HEAD {url}");
    response
}

fn offset_header(response: &Response) -> usize {
    header(response, "upload-offset").parse().expect("Upload-Offset")
}

async fn creation_with_the_whole_file_completes_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(3 * MIB + 17, 1);
    let response = send(
        ietf(&app, Method::POST, &app.files)
            .header("Upload-Complete", "?1")
            .header("Content-Type", "text/csv")
            .header("Content-Disposition", "attachment; filename=\"report.csv\"")
            .body(data.clone()),
    )
    .await;
    assert_eq!(response.status(), 201);
    assert!(response.headers().get("tus-resumable").is_none(), "an IETF answer is not a tus one");
    assert_eq!(header(&response, "upload-complete"), "?1");
    assert_eq!(offset_header(&response), data.len());
    assert_eq!(header(&response, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&data)));
    let url = header(&response, "location");
    assert!(url.starts_with(&app.files), "{url}");

    let head = offset_of(&app, &url).await;
    assert_eq!(header(&head, "upload-complete"), "?1");
    assert_eq!(header(&head, "upload-length"), data.len().to_string());
    let download = app.client.get(&url).send().await.unwrap();
    assert_eq!(header(&download, "content-type"), "text/csv");
    assert!(header(&download, "content-disposition").contains("report.csv"));
    assert_eq!(download.bytes().await.unwrap(), data);
}

async fn creation_then_appends_until_complete(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(5 * MIB, 2);
    let created = send(
        ietf(&app, Method::POST, &app.files)
            .header("Upload-Complete", "?0")
            .header("Upload-Length", data.len().to_string())
            .body(data[..MIB].to_vec()),
    )
    .await;
    assert_eq!(created.status(), 201);
    assert_eq!(header(&created, "upload-complete"), "?0");
    assert_eq!(offset_header(&created), MIB);
    let limit = header(&created, "upload-limit");
    assert!(limit.contains("max-size=") && limit.contains("max-age="), "{limit}");
    let url = header(&created, "location");

    let head = offset_of(&app, &url).await;
    assert_eq!(offset_header(&head), MIB);
    assert_eq!(header(&head, "upload-complete"), "?0");
    assert_eq!(header(&head, "upload-length"), data.len().to_string());
    assert_eq!(header(&head, "cache-control"), "no-store");
    assert!(head.headers().get("content-length").is_none(), "a 204 has no Content-Length");
    assert!(header(&head, "upload-limit").contains("max-size="));
    assert!(head.headers().get("repr-digest").is_none(), "no digest before the upload is complete");
    // GET with the draft's field is offset retrieval too, not a download.
    let by_get = send(ietf(&app, Method::GET, &url)).await;
    assert_eq!(by_get.status(), 204);
    assert_eq!(offset_header(&by_get), MIB);

    let middle = send(append(&app, &url, MIB, false, data[MIB..3 * MIB].to_vec())).await;
    assert_eq!(middle.status(), 204);
    assert_eq!(header(&middle, "upload-complete"), "?0");
    assert_eq!(offset_header(&middle), 3 * MIB);
    let last = send(append(&app, &url, 3 * MIB, true, data[3 * MIB..].to_vec())).await;
    assert_eq!(last.status(), 200);
    assert_eq!(header(&last, "upload-complete"), "?1");
    assert_eq!(offset_header(&last), data.len());
    assert_eq!(header(&last, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&data)));
    assert_eq!(app.download(&url).await, data);
}

/// `Upload-Complete: ?1` on a body without `Content-Length` (chunked): the upload's length is
/// what arrived, known once the body has ended.
async fn a_length_learned_when_the_body_ends(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // Longer than a part on object stores (8 MiB).
    let data = random_bytes(9 * MIB + 5, 3);
    let created = send(ietf(&app, Method::POST, &app.files).header("Upload-Complete", "?0")).await;
    assert_eq!(created.status(), 201);
    let url = header(&created, "location");
    let head = offset_of(&app, &url).await;
    assert!(head.headers().get("upload-length").is_none(), "no length is known yet");

    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = data.chunks(300_000).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
    let last = send(
        ietf(&app, Method::PATCH, &url)
            .header("Content-Type", "application/partial-upload")
            .header("Upload-Offset", "0")
            .header("Upload-Complete", "?1")
            .body(body),
    )
    .await;
    assert_eq!(last.status(), 200, "{:?}", last.headers());
    assert_eq!(header(&last, "upload-complete"), "?1");
    let head = offset_of(&app, &url).await;
    assert_eq!(header(&head, "upload-length"), data.len().to_string());
    assert_eq!(app.download(&url).await, data);
}

async fn conflicting_lengths_are_refused_and_change_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let inconsistent = format!("{PROBLEMS}inconsistent-upload-length");
    let before = app.upload_count().await;
    // Upload-Length against what Upload-Complete: ?1 and Content-Length say.
    let response = send(
        ietf(&app, Method::POST, &app.files)
            .header("Upload-Complete", "?1")
            .header("Upload-Length", "11")
            .body(vec![7u8; 10]),
    )
    .await;
    assert_eq!(problem(response, 400).await["type"], inconsistent);
    assert_eq!(app.upload_count().await, before, "nothing was created");

    let created =
        send(ietf(&app, Method::POST, &app.files).header("Upload-Complete", "?0").header("Upload-Length", "10")).await;
    let url = header(&created, "location");
    assert_eq!(send(append(&app, &url, 0, false, vec![1; 4])).await.status(), 204);
    // A completing body that falls short of the length.
    let short = send(append(&app, &url, 4, true, vec![2; 3])).await;
    assert_eq!(problem(short, 400).await["type"], inconsistent);
    // A body past the length.
    let long = send(append(&app, &url, 4, false, vec![2; 7])).await;
    assert_eq!(problem(long, 400).await["type"], inconsistent);
    // A length that changes.
    let changed = send(append(&app, &url, 4, false, vec![2; 1]).header("Upload-Length", "12")).await;
    assert_eq!(problem(changed, 400).await["type"], inconsistent);
    assert_eq!(offset_header(&offset_of(&app, &url).await), 4, "no refused request moved the offset");
    assert_eq!(send(append(&app, &url, 4, true, vec![2; 6])).await.status(), 200);
    assert_eq!(app.download(&url).await, [vec![1; 4], vec![2; 6]].concat());
}

async fn a_wrong_offset_gets_the_right_one(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let created = send(
        ietf(&app, Method::POST, &app.files)
            .header("Upload-Complete", "?0")
            .header("Upload-Length", "100")
            .body(vec![1u8; 40]),
    )
    .await;
    let url = header(&created, "location");
    for wrong in [0, 39, 41, 100] {
        let response = send(append(&app, &url, wrong, false, vec![2; 10])).await;
        assert_eq!(header(&response, "upload-offset"), "40");
        assert_eq!(header(&response, "upload-complete"), "?0");
        let body = problem(response, 409).await;
        assert_eq!(body["type"], format!("{PROBLEMS}mismatching-upload-offset"));
        assert_eq!(body["expected-offset"], 40);
        assert_eq!(body["provided-offset"], wrong);
    }
    // The offset just reported is accepted.
    let reported = offset_header(&offset_of(&app, &url).await);
    assert_eq!(send(append(&app, &url, reported, true, vec![3; 60])).await.status(), 200);
}

async fn a_completed_upload_takes_no_more(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let created = send(ietf(&app, Method::POST, &app.files).header("Upload-Complete", "?1").body("done")).await;
    let url = header(&created, "location");
    let response = send(append(&app, &url, 4, false, b"more".to_vec())).await;
    assert_eq!(header(&response, "upload-complete"), "?1");
    assert_eq!(problem(response, 400).await["type"], format!("{PROBLEMS}completed-upload"));
    let head = offset_of(&app, &url).await;
    assert_eq!(offset_header(&head), 4);
    assert_eq!(app.download(&url).await, b"done");
}

async fn cancellation_ends_the_upload(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let created =
        send(ietf(&app, Method::POST, &app.files).header("Upload-Complete", "?0").body(vec![5u8; 1000])).await;
    let url = header(&created, "location");
    assert_eq!(send(ietf(&app, Method::DELETE, &url)).await.status(), 204);
    // ferry remembers what it cancelled: 410 rather than 404.
    let head = send(ietf(&app, Method::HEAD, &url)).await;
    assert_eq!(head.status(), 410);
    problem(send(append(&app, &url, 1000, true, vec![1])).await, 410).await;
    problem(send(ietf(&app, Method::DELETE, &url)).await, 410).await;
    let unknown = format!("{}0123456789abcdef0123456789abcdef", app.files);
    assert_eq!(send(ietf(&app, Method::HEAD, &unknown)).await.status(), 404);
    problem(send(ietf(&app, Method::GET, &unknown)).await, 404).await;
}

async fn limits_on_options_creation_and_refusals(backend: Backend) {
    let app = TestApp::spawn_with(backend, |args| {
        args.max_size = 10 * MIB as u64;
        args.max_append_size = Some(MIB as u64);
    })
    .await;
    let options = send(ietf(&app, Method::OPTIONS, &app.files)).await;
    assert_eq!(options.status(), 204);
    let limit = header(&options, "upload-limit");
    assert!(limit.contains(&format!("max-size={}", 10 * MIB)), "{limit}");
    assert!(limit.contains(&format!("max-append-size={MIB}")), "{limit}");
    assert!(limit.contains("max-age=86400"), "{limit}");
    assert_eq!(header(&options, "accept-patch"), "application/partial-upload");
    // A tus client's OPTIONS is answered as before.
    let tus = send(app.tus(Method::OPTIONS, &app.files)).await;
    assert_eq!(header(&tus, "upload-limit"), format!("max-append-size={MIB}"));

    let before = app.upload_count().await;
    let refused = send(
        ietf(&app, Method::POST, &app.files)
            .header("Upload-Complete", "?0")
            .header("Upload-Length", (10 * MIB + 1).to_string()),
    )
    .await;
    assert!(header(&refused, "upload-limit").contains("max-size="), "a refusal says the limits");
    problem(refused, 413).await;
    assert_eq!(app.upload_count().await, before);
}

async fn malformed_fields_are_ignored_or_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // A malformed Upload-Complete is ignored: the request is a plain upload of its content.
    let plain = send(ietf(&app, Method::POST, &app.files).header("Upload-Complete", "yes").body("whole")).await;
    assert_eq!(plain.status(), 201);
    assert_eq!(header(&plain, "upload-complete"), "?1");
    assert_eq!(app.download(&header(&plain, "location")).await, b"whole");

    let created = send(ietf(&app, Method::POST, &app.files).header("Upload-Complete", "?0").body("ab")).await;
    let url = header(&created, "location");
    for bad in ["-1", "2.0", "\"2\"", "two"] {
        let response = send(
            ietf(&app, Method::PATCH, &url)
                .header("Content-Type", "application/partial-upload")
                .header("Upload-Offset", bad)
                .header("Upload-Complete", "?0")
                .body("cd"),
        )
        .await;
        problem(response, 400).await;
    }
    // A malformed Upload-Length is ignored; the upload goes on.
    let response = send(append(&app, &url, 2, false, b"cd".to_vec()).header("Upload-Length", "lots")).await;
    assert_eq!(response.status(), 204);
    assert_eq!(offset_header(&offset_of(&app, &url).await), 4);
}

async fn content_digest_is_verified(backend: Backend) {
    use sha2::Digest;
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(2 * MIB, 4);
    let created = send(
        ietf(&app, Method::POST, &app.files)
            .header("Upload-Complete", "?0")
            .header("Upload-Length", data.len().to_string()),
    )
    .await;
    let url = header(&created, "location");
    let b64 = |d: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, d);
    let first = &data[..MIB];
    let right = format!("sha-256=:{}:", b64(&sha2::Sha256::digest(first)));
    let response = send(append(&app, &url, 0, false, first.to_vec()).header("Content-Digest", right)).await;
    assert_eq!(response.status(), 204);

    let second = &data[MIB..];
    let wrong = format!("sha-512=:{}:", b64(&sha2::Sha512::digest(first)));
    let response = send(append(&app, &url, MIB, true, second.to_vec()).header("Content-Digest", wrong)).await;
    problem(response, 400).await;
    assert_eq!(offset_header(&offset_of(&app, &url).await), MIB, "a mismatching body is not kept");
    let right = format!("sha-512=:{}:, sha-256=:AAAA:", b64(&sha2::Sha512::digest(second)));
    let response = send(append(&app, &url, MIB, true, second.to_vec()).header("Content-Digest", right)).await;
    assert_eq!(response.status(), 200, "sha-512 is preferred when both are given");
    assert_eq!(app.download(&url).await, data);
}

async fn repr_digest_is_checked_when_the_upload_completes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(3 * MIB, 9);
    let announced = format!("sha-256=:{}:", sha256_b64(&data));
    let mut wrong_data = data.clone();
    wrong_data[MIB + 7] ^= 1;
    for (body, ok) in [(&data, true), (&wrong_data, false)] {
        let created = send(
            ietf(&app, Method::POST, &app.files)
                .header("Upload-Complete", "?0")
                .header("Upload-Length", data.len().to_string())
                .header("Repr-Digest", announced.clone())
                .body(body[..MIB].to_vec()),
        )
        .await;
        assert_eq!(created.status(), 201);
        let url = header(&created, "location");
        let last = send(append(&app, &url, MIB, true, body[MIB..].to_vec())).await;
        if ok {
            assert_eq!(last.status(), 200);
            assert_eq!(header(&last, "repr-digest"), announced);
            assert_eq!(app.download(&url).await, data);
        } else {
            let detail = problem(last, 400).await;
            assert!(detail["detail"].as_str().unwrap().contains("Repr-Digest"), "{detail}");
            // The upload failed: it is gone, and was never complete.
            assert_eq!(send(ietf(&app, Method::HEAD, &url)).await.status(), 410);
        }
    }
    // An empty upload (Content-Length: 0) is checked at once, before anything is created.
    let before = app.upload_count().await;
    let empty = send(
        ietf(&app, Method::POST, &app.files)
            .header("Upload-Complete", "?1")
            .header("Repr-Digest", announced.clone())
            .header("Content-Length", "0"),
    )
    .await;
    problem(empty, 400).await;
    assert_eq!(app.upload_count().await, before);
}

/// tus-js-client's `ietf-draft-03` (interop 5) and `ietf-draft-05` (6), and URLSession on
/// iOS 18 (6): incomplete creations and appends answer 201; interop 5 sends appends without a
/// media type and without Upload-Complete; from 6 on the media type is required.
async fn interop_5_and_6_as_their_clients_expect(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for version in ["5", "6"] {
        let created = send(
            app.client
                .post(&app.files)
                .header("Upload-Draft-Interop-Version", version)
                .header("Upload-Complete", "?0")
                .header("Upload-Length", "6"),
        )
        .await;
        assert_eq!(created.status(), 201);
        let url = header(&created, "location");
        let mut middle = app
            .client
            .patch(&url)
            .header("Upload-Draft-Interop-Version", version)
            .header("Upload-Offset", "0")
            .body("abc");
        if version == "6" {
            let untyped = send(
                app.client
                    .patch(&url)
                    .header("Upload-Draft-Interop-Version", version)
                    .header("Upload-Offset", "0")
                    .header("Upload-Complete", "?0")
                    .body("abc"),
            )
            .await;
            problem(untyped, 415).await;
            middle = middle.header("Content-Type", "application/partial-upload").header("Upload-Complete", "?0");
        }
        let middle = send(middle).await;
        assert_eq!(middle.status(), 201, "interop {version}");
        assert_eq!(offset_header(&middle), 3);
        let last = send(
            app.client
                .patch(&url)
                .header("Upload-Draft-Interop-Version", version)
                .header("Content-Type", "application/partial-upload")
                .header("Upload-Offset", "3")
                .header("Upload-Complete", "?1")
                .body("def"),
        )
        .await;
        assert_eq!(last.status(), 200);
        assert_eq!(header(&last, "upload-complete"), "?1");
        assert_eq!(app.download(&url).await, b"abcdef");
    }
}

/// Reads one response head (interim or final) from a raw connection.
async fn read_head(stream: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> String {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(pending[..end + 4].to_vec()).unwrap();
            pending.drain(..end + 4);
            return head;
        }
        let mut buffer = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buffer))
            .await
            .expect("a response within 20 s")
            .unwrap();
        assert!(read > 0, "closed without a response: {}", String::from_utf8_lossy(pending));
        pending.extend_from_slice(&buffer[..read]);
    }
}

fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// A raw client reads the 104 (with Location and Upload-Limit) before it sends any of the body,
/// then `100 Continue`; its connection is cut mid-body; it resumes from the 104's Location.
async fn interim_104_announces_the_upload_before_the_body(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(3 * MIB, 5);
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "POST /files/ HTTP/1.1\r\nHost: {}\r\nUpload-Draft-Interop-Version: 8\r\nUpload-Complete: ?1\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        app.addr,
        data.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut pending = Vec::new();
    let interim = read_head(&mut stream, &mut pending).await;
    assert!(interim.starts_with("HTTP/1.1 104 "), "{interim}");
    assert_eq!(field(&interim, "upload-draft-interop-version"), Some("8"));
    assert!(field(&interim, "upload-limit").is_some_and(|l| l.contains("max-size=")), "{interim}");
    let location = field(&interim, "location").expect("Location in the 104").to_string();
    assert!(location.starts_with(&app.files), "{location}");
    let continue_ = read_head(&mut stream, &mut pending).await;
    assert!(continue_.starts_with("HTTP/1.1 100 "), "{continue_}");

    // The upload exists before a byte of the body was sent.
    let head = offset_of(&app, &location).await;
    assert_eq!(offset_header(&head), 0);
    assert_eq!(header(&head, "upload-complete"), "?0");

    let sent = 2 * MIB + 12345;
    stream.write_all(&data[..sent]).await.unwrap();
    stream.flush().await.unwrap();
    wait_for("the bytes sent to be stored", Duration::from_secs(20), || async {
        app.stored_bytes(&location).len() >= sent
    })
    .await;
    drop(stream);
    // The cut-off creation is resumable, never complete; HEAD right after the cut has its bytes.
    let head = offset_of(&app, &location).await;
    assert_eq!(offset_header(&head), sent);
    assert_eq!(header(&head, "upload-complete"), "?0");
    assert_eq!(header(&head, "upload-length"), data.len().to_string());
    let last = send(append(&app, &location, sent, true, data[sent..].to_vec())).await;
    assert_eq!(last.status(), 200);
    assert_eq!(app.download(&location).await, data);

    // Appends get no 104 with a Location.
    let created = send(ietf(&app, Method::POST, &app.files).header("Upload-Complete", "?0")).await;
    let url = header(&created, "location");
    let path = url.strip_prefix(&app.base).unwrap();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nUpload-Draft-Interop-Version: 8\r\nUpload-Complete: ?1\r\n\
         Upload-Offset: 0\r\nContent-Type: application/partial-upload\r\nContent-Length: 3\r\n\r\nxyz",
        app.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut pending = Vec::new();
    let answer = read_head(&mut stream, &mut pending).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(field(&answer, "location").is_none());
}

async fn no_104_for_versions_not_served(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for (version, interim) in [("4", false), ("10", false), ("6", true)] {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let request = format!(
            "POST /files/ HTTP/1.1\r\nHost: {}\r\nUpload-Draft-Interop-Version: {version}\r\n\
             Upload-Complete: ?1\r\nContent-Length: 5\r\n\r\nhello",
            app.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut pending = Vec::new();
        let first = read_head(&mut stream, &mut pending).await;
        if interim {
            assert!(first.starts_with("HTTP/1.1 104 "), "interop {version}: {first}");
            assert_eq!(field(&first, "upload-draft-interop-version"), Some(version), "the 104 echoes the version");
            let last = read_head(&mut stream, &mut pending).await;
            assert!(last.starts_with("HTTP/1.1 201 "), "{last}");
            assert_eq!(field(&last, "location"), field(&first, "location"), "one Location for the 104 and the answer");
        } else {
            assert!(first.starts_with("HTTP/1.1 201 "), "interop {version}: no 104, the upload still works: {first}");
        }
    }
}

/// The first answer on a raw connection to a creation of 5 bytes with `extra` headers.
async fn first_answer(app: &TestApp, extra: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "POST /files/ HTTP/1.1\r\nHost: {}\r\nUpload-Draft-Interop-Version: 9\r\nUpload-Complete: ?1\r\n\
         {extra}Content-Length: 5\r\n\r\nhello",
        app.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    read_head(&mut stream, &mut Vec::new()).await
}

/// nginx 1.22 takes an upstream's 104 for its final answer: requests that came through a proxy
/// get none by default (`--interim-responses auto`); `always` sends it anyway, `never` never.
async fn no_104_through_proxies_unless_asked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    assert!(first_answer(&app, "").await.starts_with("HTTP/1.1 104 "));
    for proxied in ["X-Forwarded-For: 10.0.0.1\r\n", "Via: 1.1 edge\r\n", "X-Real-IP: 10.0.0.1\r\n"] {
        let first = first_answer(&app, proxied).await;
        assert!(first.starts_with("HTTP/1.1 201 "), "{proxied:?}: {first}");
    }
    let behind = TestApp::spawn_with(backend, |args| args.behind_proxy = true).await;
    assert!(first_answer(&behind, "").await.starts_with("HTTP/1.1 201 "));
    let always =
        TestApp::spawn_with(backend, |args| args.interim_responses = ferry::config::InterimResponses::Always).await;
    assert!(first_answer(&always, "X-Forwarded-For: 10.0.0.1\r\n").await.starts_with("HTTP/1.1 104 "));
    let never =
        TestApp::spawn_with(backend, |args| args.interim_responses = ferry::config::InterimResponses::Never).await;
    assert!(first_answer(&never, "").await.starts_with("HTTP/1.1 201 "));
}

/// Both protocols on one instance at the same time, and each sees the other's uploads.
async fn tus_and_ietf_uploads_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let tus_data = random_bytes(6 * MIB, 6);
    let ietf_data = random_bytes(6 * MIB, 7);
    let tus = async {
        let url = app.create(tus_data.len() as u64).await;
        for (i, piece) in tus_data.chunks(MIB).enumerate() {
            assert_eq!(app.patch(&url, (i * MIB) as u64, piece.to_vec()).await.status(), 204);
        }
        url
    };
    let draft = async {
        let created = send(
            ietf(&app, Method::POST, &app.files)
                .header("Upload-Complete", "?0")
                .header("Upload-Length", ietf_data.len().to_string()),
        )
        .await;
        let url = header(&created, "location");
        let pieces: Vec<&[u8]> = ietf_data.chunks(MIB).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let response = send(append(&app, &url, i * MIB, last, piece.to_vec())).await;
            assert_eq!(response.status(), if last { 200 } else { 204 });
        }
        url
    };
    let (tus_url, ietf_url) = tokio::join!(tus, draft);
    assert_eq!(app.download(&tus_url).await, tus_data);
    assert_eq!(app.download(&ietf_url).await, ietf_data);
    // The tus upload as the draft sees it, and the other way round.
    let head = offset_of(&app, &tus_url).await;
    assert_eq!(header(&head, "upload-complete"), "?1");
    assert_eq!(header(&app.head(&ietf_url).await, "upload-offset"), ietf_data.len().to_string());
}

/// A client that lost its connection resumes while its old append still runs: the offset HEAD
/// reports is accepted, and the older request is ended.
async fn a_newer_append_ends_the_older_one(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(4 * MIB, 8);
    let created = send(
        ietf(&app, Method::POST, &app.files)
            .header("Upload-Complete", "?0")
            .header("Upload-Length", data.len().to_string()),
    )
    .await;
    let url = header(&created, "location");
    let path = url.strip_prefix(&app.base).unwrap().to_string();
    let mut older = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nUpload-Draft-Interop-Version: 9\r\nUpload-Complete: ?1\r\n\
         Upload-Offset: 0\r\nContent-Type: application/partial-upload\r\nContent-Length: {}\r\n\r\n",
        app.addr,
        data.len()
    );
    older.write_all(request.as_bytes()).await.unwrap();
    older.write_all(&data[..MIB]).await.unwrap();
    app.wait_writing(&url).await;

    let reported = offset_header(&offset_of(&app, &url).await);
    let newer = send(append(&app, &url, reported, true, data[reported..].to_vec())).await;
    assert_eq!(newer.status(), 200, "the offset HEAD reported is accepted");
    // The older request hears that it lost (or its connection is ended).
    let _ = older.write_all(&data[MIB..2 * MIB]).await;
    let mut pending = Vec::new();
    let mut buffer = [0u8; 4096];
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(20), older.read(&mut buffer)).await {
        pending.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&pending);
        assert!(n == 0 || !text.starts_with("HTTP/1.1 2"), "the older request must not succeed: {text}");
    }
    assert_eq!(app.download(&url).await, data);
}

/// The same uploads on an object store (S3): the draft shares every store with tus.
mod s3 {
    use crate::helpers::Backend;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creation_with_the_whole_file_completes_it() {
        super::creation_with_the_whole_file_completes_it(Backend::S3).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creation_then_appends_until_complete() {
        super::creation_then_appends_until_complete(Backend::S3).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_length_learned_when_the_body_ends() {
        super::a_length_learned_when_the_body_ends(Backend::S3).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tus_and_ietf_uploads_at_once() {
        super::tus_and_ietf_uploads_at_once(Backend::S3).await
    }
}

/// Upload tokens guard the draft's requests as they guard tus's: no token is a 401 problem, and
/// another subject's upload does not exist for the caller.
async fn tokens_guard_draft_uploads_as_tus_ones(backend: Backend) {
    use crate::access::{TOKEN_SECRET, token};
    let app = TestApp::spawn_with(backend, |args| args.token_secret = Some(TOKEN_SECRET.into())).await;
    let refused = send(ietf(&app, Method::POST, &app.files).header("Upload-Complete", "?1").body("x")).await;
    assert_eq!(header(&refused, "www-authenticate"), "Bearer");
    problem(refused, 401).await;

    let alice = token(TOKEN_SECRET, "alice", 600, Some(1000));
    let bob = token(TOKEN_SECRET, "bob", 600, None);
    let created = send(
        ietf(&app, Method::POST, &app.files).bearer_auth(&alice).header("Upload-Complete", "?0").body(vec![1u8; 10]),
    )
    .await;
    assert_eq!(created.status(), 201);
    let url = header(&created, "location");
    assert!(header(&created, "upload-limit").contains("max-size=1000"), "the token's limit is the upload's");
    assert_eq!(send(ietf(&app, Method::HEAD, &url).bearer_auth(&bob)).await.status(), 404);
    problem(send(append(&app, &url, 10, true, vec![2; 5]).bearer_auth(&bob)).await, 404).await;
    let too_long =
        send(append(&app, &url, 10, false, vec![2; 5]).bearer_auth(&alice).header("Upload-Length", "1001")).await;
    problem(too_long, 413).await;
    assert_eq!(send(append(&app, &url, 10, true, vec![2; 5]).bearer_auth(&alice)).await.status(), 200);
    // The tus side sees the same upload for the same caller.
    let tus = send(app.tus(Method::HEAD, &url).bearer_auth(&alice)).await;
    assert_eq!(header(&tus, "upload-offset"), "15");
}
