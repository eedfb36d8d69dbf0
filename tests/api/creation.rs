//! OPTIONS, creation, creation-with-upload, creation-defer-length, concatenation.

use std::time::Duration;

use reqwest::Method;

use crate::backend_tests;
use crate::helpers::{Backend, TestApp, header, random_bytes, sha256_b64, upload_id, wait_for};

async fn options_advertise_the_protocol(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let response = app.client.request(Method::OPTIONS, &app.files).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "tus-version"), "1.0.0");
    assert_eq!(header(&response, "tus-resumable"), "1.0.0");
    let extensions = header(&response, "tus-extension");
    for ext in [
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "checksum",
        "checksum-trailer",
        "expiration",
        "concatenation",
    ] {
        assert!(extensions.split(',').any(|e| e == ext), "{ext} missing from {extensions}");
    }
    assert_eq!(header(&response, "tus-max-size"), (100u64 << 30).to_string());
    let algorithms = header(&response, "tus-checksum-algorithm");
    for algorithm in ["sha1", "sha256", "md5"] {
        assert!(algorithms.split(',').any(|a| a == algorithm), "{algorithm} missing");
    }
}

async fn create_then_head(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Length", "1000")
        .header("Upload-Metadata", "filename d29ybGQucGRm,is_confidential")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let location = header(&response, "location");
    assert!(location.starts_with(&app.files), "{location}");
    assert_eq!(location.rsplit('/').next().unwrap().len(), 32);
    httpdate::parse_http_date(&header(&response, "upload-expires")).expect("Upload-Expires is an HTTP date");

    let head = app.head(&location).await;
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "upload-offset"), "0");
    assert_eq!(header(&head, "upload-length"), "1000");
    assert_eq!(header(&head, "upload-metadata"), "filename d29ybGQucGRm,is_confidential");
    assert_eq!(header(&head, "cache-control"), "no-store");
    assert_eq!(header(&head, "tus-resumable"), "1.0.0");
    assert!(head.headers().get("repr-digest").is_none(), "no digest before completion");
    assert_eq!(app.upload_count().await, 1);
}

async fn post_to_the_collection_without_a_slash(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let response =
        app.tus(Method::POST, app.files.trim_end_matches('/')).header("Upload-Length", "5").send().await.unwrap();
    assert_eq!(response.status(), 201);
}

async fn zero_length_completes_at_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.create(0).await;
    let head = app.head(&url).await;
    assert_eq!(header(&head, "upload-offset"), "0");
    assert_eq!(header(&head, "upload-length"), "0");
    assert_eq!(header(&head, "repr-digest"), format!("sha-256=:{}:", sha256_b64(b"")));
    assert!(app.download(&url).await.is_empty());
}

async fn creation_with_upload(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(300_000, 1);
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Length", "500000")
        .header("Content-Type", "application/offset+octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "upload-offset"), "300000");
    let url = header(&response, "location");
    assert_eq!(app.offset(&url).await, 300_000);
    assert_eq!(app.stored_bytes(&url)[..300_000], data[..]);
}

async fn creation_with_whole_upload_completes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = random_bytes(70_000, 2);
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Length", "70000")
        .header("Content-Type", "application/offset+octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let url = header(&response, "location");
    assert_eq!(header(&app.head(&url).await, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&data)));
    assert_eq!(app.download(&url).await, data);
}

async fn deferred_length(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let response = app.tus(Method::POST, &app.files).header("Upload-Defer-Length", "1").send().await.unwrap();
    assert_eq!(response.status(), 201);
    let url = header(&response, "location");
    let head = app.head(&url).await;
    assert_eq!(header(&head, "upload-defer-length"), "1");
    assert!(head.headers().get("upload-length").is_none());

    let data = random_bytes(150_000, 3);
    assert_eq!(app.patch(&url, 0, data[..100_000].to_vec()).await.status(), 204);
    // The length arrives with a later PATCH and completes the upload.
    let response = app
        .tus(Method::PATCH, &url)
        .header("Upload-Offset", "100000")
        .header("Upload-Length", "150000")
        .header("Content-Type", "application/offset+octet-stream")
        .body(data[100_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let head = app.head(&url).await;
    assert_eq!(header(&head, "upload-length"), "150000");
    assert!(head.headers().get("upload-defer-length").is_none());
    assert_eq!(app.download(&url).await, data);
}

async fn deferred_length_cannot_change(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let response = app.tus(Method::POST, &app.files).header("Upload-Defer-Length", "1").send().await.unwrap();
    let url = header(&response, "location");
    let set = |length: &'static str, offset: &'static str| {
        app.tus(Method::PATCH, &url)
            .header("Upload-Offset", offset)
            .header("Upload-Length", length)
            .header("Content-Type", "application/offset+octet-stream")
            .body(vec![7u8; 10])
            .send()
    };
    assert_eq!(set("100", "0").await.unwrap().status(), 204);
    let response = set("200", "10").await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("cannot change"));
    assert_eq!(header(&app.head(&url).await, "upload-length"), "100");
    assert_eq!(app.offset(&url).await, 10);
}

async fn concatenation(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let first = random_bytes(200_000, 4);
    let second = random_bytes(123_457, 5);
    let mut partials = Vec::new();
    for data in [&first, &second] {
        let url = app.create_partial(data.len() as u64).await;
        assert_eq!(app.patch(&url, 0, data.to_vec()).await.status(), 204);
        assert_eq!(header(&app.head(&url).await, "upload-concat"), "partial");
        partials.push(url);
    }
    // One absolute URL and one path, as clients send either.
    let path = partials[1].strip_prefix(&app.base).unwrap();
    let response = app
        .tus(Method::POST, &app.files)
        .header("Upload-Concat", format!("final;{} {}", partials[0], path))
        .header("Upload-Metadata", "filename Ym90aC5iaW4=")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    let url = header(&response, "location");
    let whole: Vec<u8> = [first, second].concat();
    // Right after the 201 the final upload is complete: it is read from its partials' objects,
    // nothing is copied. HEAD shows offset == length, GET and a Range across the boundary work.
    let head = app.head(&url).await;
    assert_eq!(header(&head, "upload-offset"), whole.len().to_string(), "a final upload's offset");
    assert_eq!(header(&head, "upload-length"), whole.len().to_string());
    assert!(header(&head, "upload-concat").starts_with("final;"));
    assert_eq!(app.download(&url).await, whole);
    let across = app.client.get(&url).header("Range", "bytes=199990-200009").send().await.unwrap();
    assert_eq!(across.status(), 206);
    assert_eq!(across.bytes().await.unwrap().as_ref(), &whole[199_990..200_010]);

    // The whole-file SHA-256 comes from a background job.
    wait_for("the final upload's SHA-256", Duration::from_secs(30), || async {
        app.head(&url).await.headers().contains_key("repr-digest")
    })
    .await;
    assert_eq!(header(&app.head(&url).await, "repr-digest"), format!("sha-256=:{}:", sha256_b64(&whole)));

    // A final upload cannot be appended to.
    let response = app.patch(&url, whole.len() as u64, vec![1u8]).await;
    assert_eq!(response.status(), 403);

    // Terminating a partial upload does not break the final upload that reads it.
    assert_eq!(app.tus(Method::DELETE, &partials[0]).send().await.unwrap().status(), 204);
    assert_eq!(app.head(&partials[0]).await.status(), 410);
    assert_eq!(app.download(&url).await, whole);

    // Deleting the final upload frees what only it used: the terminated partial's bytes, not
    // the other partial's, which is still an upload of its own.
    let stored = |partial: &str| app.store_dir.join("uploads").join(upload_id(partial));
    let local = app.backend != Backend::S3;
    if local {
        assert!(stored(&partials[0]).exists(), "the terminated partial's bytes stay while the final upload reads them");
    }
    assert_eq!(app.tus(Method::DELETE, &url).send().await.unwrap().status(), 204);
    if local {
        assert!(!stored(&partials[0]).exists(), "the terminated partial's bytes are freed with the final upload");
        assert!(stored(&partials[1]).exists(), "a live partial upload keeps its bytes");
    }
    assert_eq!(app.download(&partials[1]).await.len(), 123_457);
}

async fn concatenation_refuses_unfinished_partials(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let partial = app.create_partial(10).await;
    let plain = app.create(10).await;
    let before = app.upload_count().await;
    for (list, needle) in [(partial.clone(), "not complete"), (plain, "not a partial")] {
        let response =
            app.tus(Method::POST, &app.files).header("Upload-Concat", format!("final;{list}")).send().await.unwrap();
        assert_eq!(response.status(), 400);
        assert!(response.text().await.unwrap().contains(needle));
    }
    assert_eq!(app.upload_count().await, before, "nothing was created");
}

async fn method_override(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.create(4).await;
    let response = app
        .tus(Method::POST, &url)
        .header("X-HTTP-Method-Override", "PATCH")
        .header("Upload-Offset", "0")
        .header("Content-Type", "application/offset+octet-stream")
        .body("abcd")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "upload-offset"), "4");
    let response = app.tus(Method::POST, &url).header("X-HTTP-Method-Override", "DELETE").send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(app.head(&url).await.status(), 410);
}

backend_tests!(
    options_advertise_the_protocol,
    create_then_head,
    post_to_the_collection_without_a_slash,
    zero_length_completes_at_once,
    creation_with_upload,
    creation_with_whole_upload_completes,
    deferred_length,
    deferred_length_cannot_change,
    concatenation,
    concatenation_refuses_unfinished_partials,
    method_override,
);
