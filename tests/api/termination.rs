//! DELETE: the upload and its bytes go; later requests get 410.

use reqwest::Method;

use crate::backend_tests;
use crate::helpers::{Backend, TestApp};

async fn terminate_removes_bytes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.create(100).await;
    assert_eq!(app.patch(&url, 0, vec![1u8; 50]).await.status(), 204);
    assert!(!app.stored_files().is_empty());

    let response = app.tus(Method::DELETE, &url).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(response.headers()["tus-resumable"], "1.0.0");
    assert!(app.stored_files().is_empty(), "bytes left behind: {:?}", app.stored_files());
    assert_eq!(app.head(&url).await.status(), 410);
    assert_eq!(app.patch(&url, 50, vec![1u8; 50]).await.status(), 410);
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 410);
    assert_eq!(app.tus(Method::DELETE, &url).send().await.unwrap().status(), 410);
}

async fn terminate_completed_upload(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = app.upload(b"all of it", 4).await;
    assert_eq!(app.tus(Method::DELETE, &url).send().await.unwrap().status(), 204);
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), 410);
    assert!(app.stored_files().is_empty());
}

backend_tests!(terminate_removes_bytes, terminate_completed_upload);
