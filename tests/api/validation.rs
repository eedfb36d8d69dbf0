//! Bad input: each gets a 4xx with a readable message and leaves no trace.

use reqwest::{Method, Response};

use crate::backend_tests;
use crate::helpers::{Backend, TestApp, header};

async fn expect(response: Response, status: u16, needle: &str) {
    let got = response.status().as_u16();
    assert_eq!(response.headers().get("tus-resumable").map(|v| v.to_str().unwrap()), Some("1.0.0"));
    let body = response.text().await.unwrap();
    assert_eq!(got, status, "body: {body}");
    assert!(body.to_lowercase().contains(&needle.to_lowercase()), "'{needle}' not in '{body}'");
}

async fn version_is_required(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.create(10).await;
    for (method, target) in [
        (Method::POST, app.files.clone()),
        (Method::PATCH, url.clone()),
        (Method::HEAD, url.clone()),
        (Method::DELETE, url.clone()),
    ] {
        let response = app.client.request(method.clone(), &target).header("Upload-Length", "5").send().await.unwrap();
        if method == Method::HEAD {
            // Answered without the header (like tusd), so plain `curl -I` works.
            assert_eq!(response.status(), 200);
            assert_eq!(header(&response, "upload-offset"), "0");
        } else {
            assert_eq!(response.status(), 412, "{method} without Tus-Resumable");
            assert_eq!(header(&response, "tus-version"), "1.0.0");
        }
        let response = app
            .client
            .request(method.clone(), &target)
            .header("Tus-Resumable", "0.2.2")
            .header("Upload-Length", "5")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 412, "{method} with an old version");
        assert_eq!(header(&response, "tus-version"), "1.0.0");
    }
    let response = app.client.post(&app.files).header("Upload-Length", "5").send().await.unwrap();
    expect(response, 412, "Tus-Resumable is missing").await;
    assert_eq!(app.upload_count().await, 1, "nothing was created");
    assert_eq!(app.head(&url).await.status(), 200, "nothing was deleted");
}

async fn creation_inputs(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let post = |headers: &[(&'static str, &'static str)]| {
        let mut request = app.tus(Method::POST, &app.files);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    expect(post(&[]).await.unwrap(), 400, "Upload-Length or Upload-Defer-Length").await;
    expect(post(&[("Upload-Length", "-1")]).await.unwrap(), 400, "non-negative integer").await;
    expect(post(&[("Upload-Length", "ten")]).await.unwrap(), 400, "non-negative integer").await;
    expect(post(&[("Upload-Length", "1.5")]).await.unwrap(), 400, "non-negative integer").await;
    expect(post(&[("Upload-Length", "99999999999999999999999")]).await.unwrap(), 400, "too large").await;
    expect(post(&[("Upload-Length", "9223372036854775808")]).await.unwrap(), 400, "too large").await;
    expect(post(&[("Upload-Length", "107374182401")]).await.unwrap(), 413, "maximum").await;
    expect(post(&[("Upload-Defer-Length", "2")]).await.unwrap(), 400, "must be 1").await;
    expect(post(&[("Upload-Length", "5"), ("Upload-Defer-Length", "1")]).await.unwrap(), 400, "not both").await;
    expect(post(&[("Upload-Length", "5"), ("Upload-Metadata", "name !!notbase64")]).await.unwrap(), 400, "base64")
        .await;
    expect(post(&[("Upload-Length", "5"), ("Upload-Metadata", "a YQ==,a Yg==")]).await.unwrap(), 400, "more than once")
        .await;
    expect(post(&[("Upload-Length", "5"), ("Upload-Metadata", " YQ==,,")]).await.unwrap(), 400, "empty key").await;
    expect(post(&[("Upload-Length", "5"), ("Upload-Concat", "everything")]).await.unwrap(), 400, "Upload-Concat").await;
    expect(post(&[("Upload-Concat", "final;/files/../../etc")]).await.unwrap(), 400, "not an upload URL").await;
    expect(
        post(&[
            ("Upload-Length", "5"),
            ("Upload-Checksum", "crc32 AAAAAA=="),
            ("Content-Type", "application/offset+octet-stream"),
        ])
        .await
        .unwrap(),
        400,
        "not supported",
    )
    .await;
    // A creation body of the wrong type.
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Length", "5")
        .header("Content-Type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    expect(response, 415, "application/offset+octet-stream").await;
    // A creation body longer than the upload.
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Length", "3")
        .header("Content-Type", "application/offset+octet-stream")
        .body("hello")
        .send()
        .await
        .unwrap();
    expect(response, 413, "Upload-Length is 3").await;
    assert_eq!(app.upload_count().await, 0, "no bad request created anything");
    assert!(app.stored_files().is_empty(), "no bytes were stored: {:?}", app.stored_files());
}

async fn append_inputs(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.create(10).await;
    assert_eq!(app.patch(&url, 0, "abcd").await.status(), 204);
    let patch = |headers: Vec<(&'static str, String)>, body: &'static str| {
        let mut request = app.tus(Method::PATCH, &url).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };
    let typed = |offset: &str| {
        vec![("Content-Type", "application/offset+octet-stream".to_string()), ("Upload-Offset", offset.to_string())]
    };
    expect(patch(vec![("Upload-Offset", "4".into())], "ef").await.unwrap(), 415, "Content-Type must be").await;
    expect(
        patch(vec![("Upload-Offset", "4".into()), ("Content-Type", "application/octet-stream".into())], "ef")
            .await
            .unwrap(),
        415,
        "not 'application/octet-stream'",
    )
    .await;
    expect(
        patch(vec![("Content-Type", "application/offset+octet-stream".into())], "ef").await.unwrap(),
        400,
        "required",
    )
    .await;
    for bad in ["-4", "four", "4.0", "0x4", "18446744073709551616"] {
        let response = patch(typed(bad), "ef").await.unwrap();
        assert_eq!(response.status(), 400, "offset {bad}");
    }
    expect(patch(typed("4"), "this is far too long").await.unwrap(), 413, "remain").await;
    let mut checksum = typed("4");
    checksum.push(("Upload-Checksum", "whirlpool AAAA".into()));
    expect(patch(checksum, "ef").await.unwrap(), 400, "not supported").await;
    let mut checksum = typed("4");
    checksum.push(("Upload-Checksum", "sha1 ***notbase64***".into()));
    expect(patch(checksum, "ef").await.unwrap(), 400, "base64").await;
    let mut length = typed("4");
    length.push(("Upload-Length", "11".into()));
    expect(patch(length, "ef").await.unwrap(), 400, "cannot change").await;
    assert_eq!(app.offset(&url).await, 4, "no bad append moved the offset");
    assert_eq!(&app.stored_bytes(&url)[..4], b"abcd");
}

async fn streamed_body_longer_than_remaining(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.create(100_000).await;
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> = (0..5).map(|_| Ok(vec![9u8; 30_000])).collect();
    let response = app.patch(&url, 0, reqwest::Body::wrap_stream(futures_util::stream::iter(pieces))).await;
    expect(response, 413, "nothing was kept").await;
    assert_eq!(app.offset(&url).await, 0);
}

async fn upload_ids(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let unknown = format!("{}{}", app.files, uuid::Uuid::new_v4().simple());
    // HEAD answers carry no body: the status says it.
    assert_eq!(app.head(&unknown).await.status(), 404);
    expect(app.patch(&unknown, 0, "x").await, 404, "no upload").await;
    expect(app.tus(Method::DELETE, &unknown).send().await.unwrap(), 404, "no upload").await;
    for malformed in ["nothex", "0123456789ABCDEF0123456789ABCDEF", "..%2F..%2Fetc%2Fpasswd", "a.b", "%00"] {
        let url = format!("{}{malformed}", app.files);
        assert_eq!(app.head(&url).await.status(), 404, "{url}");
        expect(app.patch(&url, 0, "x").await, 404, "not an upload id").await;
    }
    // Paths that try to leave the base path never reach a handler.
    let response = app.tus(Method::HEAD, &format!("{}../../etc/passwd", app.files)).send().await.unwrap();
    assert_eq!(response.status(), 404);
}

async fn appending_to_finished_uploads(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let done = app.upload(b"hello", 5).await;
    expect(app.patch(&done, 5, "more").await, 400, "already complete").await;
    expect(app.patch(&done, 5, "").await, 400, "already complete").await;
    // A wrong offset is still answered with the right one.
    let response = app.patch(&done, 2, "llo").await;
    assert_eq!(response.status(), 409);
    assert_eq!(header(&response, "upload-offset"), "5");

    let terminated = app.create(10).await;
    assert_eq!(app.tus(Method::DELETE, &terminated).send().await.unwrap().status(), 204);
    expect(app.patch(&terminated, 0, "x").await, 410, "terminated").await;
    expect(app.head(&terminated).await, 410, "").await;
    assert_eq!(app.download(&done).await, b"hello");
}

async fn oversized_headers_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Length", "5")
        .header("X-Padding", "x".repeat(300 * 1024))
        .send()
        .await;
    match response {
        Ok(response) => assert_eq!(response.status(), 431),
        // The server may close the connection while the client is still sending.
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
    }
    assert_eq!(app.upload_count().await, 0);
}

backend_tests!(
    version_is_required,
    creation_inputs,
    append_inputs,
    streamed_body_longer_than_remaining,
    upload_ids,
    appending_to_finished_uploads,
    oversized_headers_are_refused,
);
