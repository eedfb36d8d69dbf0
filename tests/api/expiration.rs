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

/// A staged object no upload points to (left by a request that crashed before it committed) is
/// deleted once it is older than `--orphan-age`; the staged bytes the upload needs stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_staged_objects_go_after_orphan_age() {
    let app = TestApp::spawn_with(Backend::S3, |args| {
        args.orphan_age = Duration::from_secs(2);
        args.sweep_interval = Duration::from_secs(1);
    })
    .await;
    let bucket = app.bucket.as_ref().expect("an S3 test has a bucket");
    let data = crate::helpers::random_bytes(3 << 20, 90);
    let url = app.create(data.len() as u64).await;
    assert_eq!(app.patch(&url, 0, data[..1 << 20].to_vec()).await.status(), 204);
    let staged: Vec<String> =
        bucket.objects().await.into_iter().map(|(key, _)| key).filter(|key| key.contains("/staging/")).collect();
    assert_eq!(staged.len(), 1, "a chunk smaller than a part is staged: {staged:?}");
    let orphan = format!("{}-orphan", staged[0]);
    bucket.put(&orphan, vec![7u8; 1000]).await;

    wait_for("the orphan to be swept", Duration::from_secs(30), || async { bucket.get(&orphan).await.is_none() }).await;
    assert!(bucket.get(&staged[0]).await.is_some(), "the staged bytes the upload needs are kept");
    assert_eq!(app.patch(&url, 1 << 20, data[1 << 20..].to_vec()).await.status(), 204);
    assert_eq!(app.download(&url).await, data);
}

/// A writer that was already sending when its upload was terminated (on another instance, say)
/// may still land bytes afterwards, on local disk by recreating the file. The sweeper deletes a
/// gone upload's bytes once more, `--orphan-age` after the first time, and only then forgets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_bytes_of_a_terminated_upload_are_deleted_again() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| {
        args.orphan_age = Duration::from_secs(2);
        args.sweep_interval = Duration::from_secs(1);
    })
    .await;
    let url = app.create(100).await;
    assert_eq!(app.patch(&url, 0, vec![1u8; 40]).await.status(), 204);
    assert_eq!(app.tus(Method::DELETE, &url).send().await.unwrap().status(), 204);
    let id = url.rsplit('/').next().unwrap().to_string();
    let file = app.store_dir.join("uploads").join(&id);
    assert!(!file.exists(), "DELETE removes the file at once");

    std::fs::write(&file, vec![2u8; 60]).expect("the late writer's file");
    wait_for("the sweeper's second deletion", Duration::from_secs(30), || async { !file.exists() }).await;
    assert_eq!(app.head(&url).await.status(), 410, "the tombstone stays");
}
