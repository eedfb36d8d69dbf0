//! Two requests appending to one upload: exactly one wins per offset, bytes never interleave,
//! and a dropped request never blocks the client that resumes after it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::backend_tests;
use crate::helpers::{Backend, TestApp, header};

/// A request body fed piece by piece from the test.
fn channel_body() -> (mpsc::Sender<Bytes>, reqwest::Body) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok::<_, std::io::Error>);
    (tx, reqwest::Body::wrap_stream(stream))
}

async fn newer_append_supersedes_older(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let len = 1_000_000usize;
    let url = app.create(len as u64).await;

    // A starts and is mid-body when B arrives at the same offset.
    let (a_tx, a_body) = channel_body();
    let a = tokio::spawn({
        let request = app
            .tus(reqwest::Method::PATCH, &url)
            .header("Upload-Offset", "0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Content-Length", len.to_string())
            .body(a_body);
        async move { request.send().await.map(|r| r.status()) }
    });
    a_tx.send(Bytes::from(vec![b'A'; 400_000])).await.unwrap();
    app.wait_writing(&url).await;

    let b = app.patch(&url, 0, vec![b'B'; len]).await;
    assert_eq!(b.status(), 204, "the newer request wins");
    // A goes on sending; it must neither write nor commit any more.
    let _ = a_tx.send(Bytes::from(vec![b'A'; 300_000])).await;
    let _ = a_tx.send(Bytes::from(vec![b'A'; 300_000])).await;
    drop(a_tx);
    match a.await.unwrap() {
        Ok(status) => assert_eq!(status, StatusCode::CONFLICT, "the older request loses"),
        Err(e) => panic!("A failed without an answer: {e}"),
    }
    let stored = app.download(&url).await;
    assert_eq!(stored.len(), len);
    assert!(stored.iter().all(|b| *b == b'B'), "bytes interleaved");
}

async fn racing_appends_exactly_one_wins(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let len = 600_000usize;
    let url = app.create(len as u64).await;
    let requests = (0..8u8).map(|i| {
        let app = &app;
        let url = url.clone();
        async move { (i, app.patch(&url, 0, vec![b'a' + i; len]).await.status()) }
    });
    let results = futures_util::future::join_all(requests).await;
    let winners: Vec<u8> = results.iter().filter(|(_, s)| *s == 204).map(|(i, _)| *i).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert!(results.iter().all(|(_, s)| *s == 204 || *s == 409), "{results:?}");
    let stored = app.download(&url).await;
    assert!(stored.iter().all(|b| *b == b'a' + winners[0]), "bytes interleaved");
    assert_eq!(header(&app.head(&url).await, "upload-offset"), len.to_string());
}

/// tusd's 423 problem: a client whose connection died resumes at once, even though the server
/// has not yet noticed that the old request is dead.
async fn dead_request_does_not_block_resume(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let len = 500_000usize;
    let url = app.create(len as u64).await;
    let path = url.strip_prefix(&app.base).unwrap().to_string();
    let mut stalled = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: {len}\r\n\r\n",
        app.addr
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&vec![b'X'; 300_000]).await.unwrap();
    stalled.flush().await.unwrap();
    app.wait_writing(&url).await;

    let started = Instant::now();
    let offset = app.offset(&url).await;
    assert_eq!(offset, 0, "nothing of the stalled request is counted yet");
    let response = app.patch(&url, offset, vec![b'Y'; len]).await;
    assert_eq!(response.status(), 204);
    assert!(started.elapsed() < Duration::from_secs(2), "resume took {:?}", started.elapsed());

    drop(stalled);
    let stored = app.download(&url).await;
    assert!(stored.iter().all(|b| *b == b'Y'), "the dead request's bytes leaked in");
}

backend_tests!(newer_append_supersedes_older, racing_appends_exactly_one_wins, dead_request_does_not_block_resume);
