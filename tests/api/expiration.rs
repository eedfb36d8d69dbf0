//! Expiration: idle incomplete uploads are swept, bytes and all, then answer 410.

use std::time::Duration;

use reqwest::Method;

use crate::backend_tests;
use crate::helpers::{Backend, TestApp, header, wait_for};

async fn idle_uploads_expire(backend: Backend) {
    let app = TestApp::spawn_with(backend, |args| {
        args.expire_after = Duration::from_secs(1);
        args.sweep_interval = Duration::from_millis(100);
    })
    .await;
    let done = app.upload(b"finished", 8).await;
    let url = app.create(100).await;
    let response = app.patch(&url, 0, vec![1u8; 10]).await;
    let expires = httpdate::parse_http_date(&header(&response, "upload-expires")).unwrap();
    assert!(expires > std::time::SystemTime::now(), "expiry is in the future");

    wait_for("the idle upload to expire", Duration::from_secs(30), || async { app.head(&url).await.status() == 410 })
        .await;
    let id = url.rsplit('/').next().unwrap().to_string();
    wait_for("its bytes to be deleted", Duration::from_secs(30), || async {
        !app.stored_files().iter().any(|f| f.starts_with(&id))
    })
    .await;
    assert_eq!(app.patch(&url, 10, vec![1u8; 10]).await.status(), 410);
    assert!(app.head(&url).await.status() == 410);
    // Completed uploads never expire.
    assert_eq!(app.download(&done).await, b"finished");
    assert_eq!(app.tus(Method::HEAD, &done).send().await.unwrap().status(), 200);
}

backend_tests!(idle_uploads_expire);
