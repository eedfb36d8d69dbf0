//! Readiness, liveness and metrics.

use std::time::Duration;

use reqwest::Method;

use crate::db_backend_tests;
use crate::helpers::{Backend, TestApp};

/// The value of one sample line (`name{labels} value`) in a Prometheus text page.
fn sample(page: &str, prefix: &str) -> Option<f64> {
    page.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

async fn readiness_follows_the_store(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let ready = app.client.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // The store's folder disappears: not ready, and the message says why; still alive.
    std::fs::remove_dir_all(&app.store_dir).unwrap();
    let ready = app.client.get(format!("{}/readyz", app.base)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("store"));
    assert_eq!(app.client.get(format!("{}/healthz", app.base)).send().await.unwrap().status(), 200);
}

async fn metrics_count_what_happened(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let done = app.upload(&[7u8; 3000], 1000).await;
    let doomed = app.create(10).await;
    assert_eq!(app.tus(Method::DELETE, &doomed).send().await.unwrap().status(), 204);
    let page = app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert_eq!(sample(&page, "ferry_uploads_created_total "), Some(2.0), "{page}");
    assert_eq!(sample(&page, "ferry_uploads_completed_total "), Some(1.0));
    assert_eq!(sample(&page, "ferry_uploads_terminated_total "), Some(1.0));
    assert_eq!(sample(&page, "ferry_received_bytes_total "), Some(3000.0));
    let patches = "ferry_http_request_duration_seconds_count{route=\"/files/{id}\",method=\"PATCH\",status=\"204\"}";
    assert_eq!(sample(&page, patches), Some(3.0), "{page}");
    assert!(page.contains("ferry_store_operation_duration_seconds_count{operation=\"append_finish\",outcome=\"ok\"}"));
    assert!(sample(&page, "ferry_db_pool_connections ").is_some_and(|n| n >= 1.0));
    assert_eq!(app.download(&done).await.len(), 3000);
}

async fn metrics_on_their_own_listener(backend: Backend) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let app = TestApp::spawn_with(backend, |args| args.metrics_listen = Some(address)).await;
    assert_eq!(app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().status(), 404);
    let url = format!("http://{address}/metrics");
    crate::helpers::wait_for("the metrics listener", Duration::from_secs(10), || async {
        matches!(app.client.get(&url).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    let page = app.client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("ferry_uploads_created_total 0"), "{page}");
}

db_backend_tests!(readiness_follows_the_store, metrics_count_what_happened, metrics_on_their_own_listener);
