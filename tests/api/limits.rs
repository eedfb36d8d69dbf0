//! Connection limits: stalled clients are cut off by a header timeout and an idle timeout
//! between body reads; a slow upload that keeps moving is never killed.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend_tests;
use crate::helpers::{Backend, TestApp, wait_for};

async fn read_answer(stream: &mut tokio::net::TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer))
        .await
        .expect("the server should have ended the connection")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

async fn slow_headers_are_cut_off(backend: Backend) {
    let app = TestApp::spawn_with(backend, |args| args.header_timeout = Duration::from_secs(1)).await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(b"POST /files/ HTTP/1.1\r\nHost: x\r\nTus-Resum").await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(app.upload_count().await, 0);
}

async fn stalled_body_is_cut_off_and_kept(backend: Backend) {
    let app = TestApp::spawn_with(backend, |args| args.idle_timeout = Duration::from_secs(1)).await;
    let url = app.create(1000).await;
    let path = url.strip_prefix(&app.base).unwrap().to_string();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: 1000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'z'; 100]).await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(app.offset(&url).await, 100, "what arrived was kept");
}

async fn slow_but_moving_upload_succeeds(backend: Backend) {
    let app = TestApp::spawn_with(backend, |args| {
        args.idle_timeout = Duration::from_millis(800);
        args.header_timeout = Duration::from_millis(800);
    })
    .await;
    let url = app.create(10 * 1024).await;
    // Ten pieces, 300 ms apart: the whole request takes far longer than either timeout.
    let stream = futures_util::stream::unfold(0u32, |i| async move {
        if i == 10 {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Some((Ok::<_, std::io::Error>(vec![b's'; 1024]), i + 1))
    });
    let started = std::time::Instant::now();
    let response = app.patch(&url, 0, reqwest::Body::wrap_stream(stream)).await;
    assert_eq!(response.status(), 204);
    assert!(started.elapsed() > Duration::from_millis(1600), "the body really was slow");
    wait_for("the upload to be complete", Duration::from_secs(5), || async { app.offset(&url).await == 10 * 1024 })
        .await;
}

/// SIGTERM (a rolling update): no new connections, but a request in flight finishes.
async fn graceful_shutdown_lets_requests_finish(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let url = app.create(600_000).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok::<_, std::io::Error>);
    let request = app
        .tus(reqwest::Method::PATCH, &url)
        .header("Upload-Offset", "0")
        .header("Content-Type", "application/offset+octet-stream")
        .header("Content-Length", "600000")
        .body(reqwest::Body::wrap_stream(body));
    let in_flight = tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    tx.send(vec![1u8; 300_000]).await.unwrap();
    app.wait_writing(&url).await;
    let addr = app.addr;
    let (stopped, answered) = tokio::join!(app.stop(), async move {
        tx.send(vec![1u8; 300_000]).await.unwrap();
        drop(tx);
        in_flight.await.unwrap()
    });
    stopped.expect("the server exits cleanly");
    assert_eq!(answered.expect("the request in flight got its answer"), 204);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no new connections after shutdown");
}

backend_tests!(
    slow_headers_are_cut_off,
    stalled_body_is_cut_off_and_kept,
    slow_but_moving_upload_succeeds,
    graceful_shutdown_lets_requests_finish,
    shutdown_saves_what_arrived,
);

/// SIGTERM with a client that keeps its request open: after the grace period the append keeps
/// what arrived, answers 503, and the server exits.
async fn shutdown_saves_what_arrived(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, |args| args.shutdown_grace = Duration::from_millis(500)).await;
    let url = app.create(10_000).await;
    let path = url.strip_prefix(&app.base).unwrap().to_string();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: 10000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'k'; 4000]).await.unwrap();
    wait_for("the append to start", Duration::from_secs(10), || async {
        app.tus(reqwest::Method::HEAD, &url).send().await.is_ok_and(|r| r.status() == 200)
            && crate::helpers::generation(&app, &url).await >= 1
    })
    .await;
    let (stopped, answer) = tokio::join!(app.stop(), read_answer(&mut stream));
    stopped.expect("the server exits cleanly");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_lowercase().contains("upload-offset") || answer.contains("resume"), "{answer}");
    // A new instance on the same database and store sees the saved bytes.
    let offset = crate::helpers::committed_offset(&app, &url).await;
    assert_eq!(offset, 4000);
}
