//! Appends: chunked uploads, offsets, checksums (header and trailer), bodies cut off mid-way.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use reqwest::Method;
use sha1::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend_tests;
use crate::helpers::{Backend, TestApp, header, random_bytes, sha256_b64, wait_for};

async fn chunked_upload_round_trips(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(3 * 1024 * 1024 + 17, 10);
    let url = app.create(data.len() as u64).await;
    let mut offset = 0u64;
    for piece in data.chunks(1024 * 1024) {
        let response = app.patch(&url, offset, piece.to_vec()).await;
        assert_eq!(response.status(), 204);
        offset += piece.len() as u64;
        assert_eq!(header(&response, "upload-offset"), offset.to_string());
        assert_eq!(app.offset(&url).await, offset);
        if offset < data.len() as u64 {
            httpdate::parse_http_date(&header(&response, "upload-expires")).unwrap();
        } else {
            assert!(response.headers().get("upload-expires").is_none(), "complete uploads do not expire");
        }
    }
    assert_eq!(header(&app.head(&url).await, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&data)));
    assert_eq!(app.download(&url).await, data);
}

async fn streamed_body_without_length(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(1_000_000, 11);
    let url = app.create(data.len() as u64).await;
    let pieces: Vec<Result<Bytes, std::io::Error>> =
        data.chunks(64 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(pieces));
    let response = app.patch(&url, 0, body).await;
    assert_eq!(response.status(), 204);
    assert_eq!(app.download(&url).await, data);
}

async fn wrong_offset_is_a_conflict(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.create(100).await;
    assert_eq!(app.patch(&url, 0, vec![1u8; 40]).await.status(), 204);
    for wrong in [0u64, 39, 41, 100] {
        let response = app.patch(&url, wrong, vec![2u8; 10]).await;
        assert_eq!(response.status(), 409, "offset {wrong}");
        assert_eq!(header(&response, "upload-offset"), "40");
        assert!(response.text().await.unwrap().contains("offset 40"));
    }
    assert_eq!(app.offset(&url).await, 40);
}

fn checksum_header(algorithm: &str, data: &[u8]) -> String {
    let digest = match algorithm {
        "sha1" => sha1::Sha1::digest(data).to_vec(),
        "sha256" => sha2::Sha256::digest(data).to_vec(),
        "sha512" => sha2::Sha512::digest(data).to_vec(),
        "md5" => md5::Md5::digest(data).to_vec(),
        other => panic!("{other}"),
    };
    format!("{algorithm} {}", STANDARD.encode(digest))
}

async fn checksums_are_verified(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(400_000, 12);
    let url = app.create(data.len() as u64).await;
    let mut offset = 0u64;
    for (algorithm, piece) in ["sha1", "sha256", "sha512", "md5"].iter().zip(data.chunks(100_000)) {
        // A mismatch first: the chunk is discarded and the offset stays.
        let mut corrupt = piece.to_vec();
        corrupt[17] ^= 0xff;
        let response = app
            .tus(Method::PATCH, &url)
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Checksum", checksum_header(algorithm, piece))
            .body(corrupt)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 460, "{algorithm} mismatch");
        assert_eq!(app.offset(&url).await, offset);

        let response = app
            .tus(Method::PATCH, &url)
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Checksum", checksum_header(algorithm, piece))
            .body(piece.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204, "{algorithm}");
        offset += piece.len() as u64;
    }
    // The discarded chunks left no trace in the whole-file hash.
    assert_eq!(header(&app.head(&url).await, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&data)));
    assert_eq!(app.download(&url).await, data);
}

/// Sends a PATCH whose `Upload-Checksum` arrives as an HTTP trailer (chunked encoding).
async fn patch_with_trailer(app: &TestApp, url: &str, offset: u64, data: Vec<u8>, checksum: Option<String>) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
        data.chunks(50_000).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
    if let Some(checksum) = checksum {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("upload-checksum", checksum.parse().unwrap());
        frames.push(Ok(Frame::trailers(trailers)));
    }
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let request = http::Request::patch(url)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", offset.to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .header("Trailer", "Upload-Checksum")
        .body(body)
        .unwrap();
    let _ = app;
    client.request(request).await.unwrap().status().as_u16()
}

async fn checksum_trailer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(200_000, 13);
    let url = app.create(data.len() as u64).await;
    let (first, second) = data.split_at(120_000);
    let mut corrupt = first.to_vec();
    corrupt[0] ^= 1;
    assert_eq!(patch_with_trailer(&app, &url, 0, corrupt, Some(checksum_header("sha1", first))).await, 460);
    assert_eq!(app.offset(&url).await, 0);
    // Announced but never sent: nothing can vouch for the bytes.
    assert_eq!(patch_with_trailer(&app, &url, 0, first.to_vec(), None).await, 460);
    assert_eq!(app.offset(&url).await, 0);
    assert_eq!(patch_with_trailer(&app, &url, 0, first.to_vec(), Some(checksum_header("sha1", first))).await, 204);
    assert_eq!(
        patch_with_trailer(&app, &url, 120_000, second.to_vec(), Some(checksum_header("sha256", second))).await,
        204
    );
    assert_eq!(app.download(&url).await, data);
}

/// A client whose connection drops mid-body: what arrived is kept and the upload resumes there.
async fn cut_off_body_keeps_what_arrived(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(1_000_000, 14);
    let url = app.create(data.len() as u64).await;
    let path = url.strip_prefix(&app.base).unwrap().to_string();

    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n\
         Content-Type: application/offset+octet-stream\r\nContent-Length: {}\r\n\r\n",
        app.addr,
        data.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&data[..300_000]).await.unwrap();
    stream.flush().await.unwrap();
    drop(stream);

    wait_for("the bytes that arrived to be committed", Duration::from_secs(20), || async {
        app.offset(&url).await == 300_000
    })
    .await;
    assert_eq!(app.patch(&url, 300_000, data[300_000..].to_vec()).await.status(), 204);
    assert_eq!(app.download(&url).await, data);
    assert_eq!(header(&app.head(&url).await, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&data)));
}

async fn cut_off_body_with_checksum_is_discarded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(500_000, 15);
    let url = app.create(data.len() as u64).await;
    let path = url.strip_prefix(&app.base).unwrap().to_string();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Checksum: {}\r\nContent-Length: {}\r\n\r\n",
        app.addr,
        checksum_header("sha1", &data),
        data.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&data[..200_000]).await.unwrap();
    stream.flush().await.unwrap();
    // Half-close: the server sees the body end early and answers once it has dealt with it.
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(app.offset(&url).await, 0, "a checksum cannot vouch for part of a body");
}

backend_tests!(
    chunked_upload_round_trips,
    streamed_body_without_length,
    wrong_offset_is_a_conflict,
    checksums_are_verified,
    checksum_trailer,
    cut_off_body_keeps_what_arrived,
    cut_off_body_with_checksum_is_discarded,
);
