//! GET of a completed upload: bytes, ranges, validators and safe headers.

use reqwest::Method;

use crate::backend_tests;
use crate::helpers::{Backend, TestApp, header, random_bytes};

async fn upload_with_metadata(app: &TestApp, data: &[u8], metadata: &str) -> String {
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Length", data.len().to_string())
        .header("Upload-Metadata", metadata)
        .header("Content-Type", "application/offset+octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    header(&response, "location")
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

async fn ranges_and_validators(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(100_000, 20);
    let url = upload_with_metadata(&app, &data, "").await;

    let response = app.client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "accept-ranges"), "bytes");
    assert_eq!(header(&response, "content-length"), "100000");
    let etag = header(&response, "etag");
    assert_eq!(response.bytes().await.unwrap(), data);

    let response = app.client.get(&url).header("Range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(header(&response, "content-range"), "bytes 1000-1999/100000");
    assert_eq!(response.bytes().await.unwrap(), data[1000..2000]);

    let response = app.client.get(&url).header("Range", "bytes=-10").send().await.unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(response.bytes().await.unwrap(), data[99_990..]);

    let response = app.client.get(&url).header("Range", "bytes=200000-").send().await.unwrap();
    assert_eq!(response.status(), 416);
    assert_eq!(header(&response, "content-range"), "bytes */100000");

    let response = app.client.get(&url).header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(response.status(), 304);
    assert_eq!(header(&response, "cache-control"), "private, max-age=0, must-revalidate");
    let weak = format!("W/{etag}");
    assert_eq!(app.client.get(&url).header("If-None-Match", weak).send().await.unwrap().status(), 304);

    // No range of an empty file can be satisfied.
    let empty = app.create(0).await;
    let response = app.client.get(&empty).header("Range", "bytes=-5").send().await.unwrap();
    assert_eq!(response.status(), 416);
    assert_eq!(header(&response, "content-range"), "bytes */0");

    // A stale If-Range gets the whole content.
    let response =
        app.client.get(&url).header("Range", "bytes=0-9").header("If-Range", "\"stale\"").send().await.unwrap();
    assert_eq!(response.status(), 200);
}

async fn dangerous_types_are_attachments(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let html = format!("filename {},filetype {}", b64("../../x.html"), b64("text/html"));
    let url = upload_with_metadata(&app, b"<script>alert(1)</script>", &html).await;
    let response = app.client.get(&url).send().await.unwrap();
    assert_eq!(header(&response, "content-type"), "text/html");
    assert_eq!(header(&response, "content-disposition"), "attachment; filename=\"x.html\"; filename*=UTF-8''x.html");
    assert_eq!(header(&response, "x-content-type-options"), "nosniff");
    assert!(header(&response, "content-security-policy").contains("sandbox"));

    let png = format!("filename {},filetype {}", b64("cat.png"), b64("image/png"));
    let url = upload_with_metadata(&app, b"\x89PNG", &png).await;
    let response = app.client.get(&url).send().await.unwrap();
    assert_eq!(header(&response, "content-type"), "image/png");
    assert!(header(&response, "content-disposition").starts_with("inline;"));

    let url = upload_with_metadata(&app, b"?", &format!("filetype {}", b64("not a type"))).await;
    let response = app.client.get(&url).send().await.unwrap();
    assert_eq!(header(&response, "content-type"), "application/octet-stream");
    assert_eq!(header(&response, "content-disposition"), "attachment");
}

async fn incomplete_uploads_are_not_served(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.create(10).await;
    assert_eq!(app.patch(&url, 0, "abc").await.status(), 204);
    let response = app.client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 409);
    assert!(response.text().await.unwrap().contains("3 of 10"));
    // Conditions do not turn an unfinished upload into a 304.
    let response = app.client.get(&url).header("If-None-Match", "*").send().await.unwrap();
    assert_eq!(response.status(), 409);
}

async fn service_pages(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let response = app.client.get(format!("{}/healthz", app.base)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let response = app.client.get(format!("{}/", app.base)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/html"));
    assert!(response.text().await.unwrap().contains("ferry"));
}

backend_tests!(
    ranges_and_validators,
    dangerous_types_are_attachments,
    incomplete_uploads_are_not_served,
    service_pages
);
