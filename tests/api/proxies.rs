//! What ferry tells clients and builds for them when proxies stand in front: the advertised body
//! limit (`Upload-Limit`) and absolute URLs from forwarded headers (`--behind-proxy`).

use reqwest::Method;

use crate::helpers::{Backend, TestApp, header};

#[tokio::test]
async fn the_append_limit_is_advertised_but_larger_bodies_still_land() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.max_append_size = Some(1 << 20)).await;
    let expected = "max-append-size=1048576";

    let options = app.client.request(Method::OPTIONS, &app.files).send().await.unwrap();
    assert_eq!(options.status(), 204);
    assert_eq!(header(&options, "upload-limit"), expected);

    let created =
        app.tus(Method::POST, &app.files).header("Upload-Length", (3u64 << 20).to_string()).send().await.unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(header(&created, "upload-limit"), expected);
    let url = header(&created, "location");

    // A limit for proxies, not for ferry: a 2 MiB body that reaches ferry is taken whole.
    let patched = app.patch(&url, 0, vec![1u8; 2 << 20]).await;
    assert_eq!(patched.status(), 204);
    assert_eq!(header(&patched, "upload-offset"), (2u64 << 20).to_string());

    let head = app.tus(Method::HEAD, &url).send().await.unwrap();
    assert_eq!(header(&head, "upload-limit"), expected);
}

#[tokio::test]
async fn no_limit_is_advertised_unless_configured() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let options = app.client.request(Method::OPTIONS, &app.files).send().await.unwrap();
    assert!(options.headers().get("upload-limit").is_none());
}

#[tokio::test]
async fn browsers_may_read_the_limit_across_origins() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| {
        args.max_append_size = Some(1 << 20);
        args.cors_origin = vec!["https://app.example".into()];
    })
    .await;
    let created = app
        .tus(Method::POST, &app.files)
        .header("Origin", "https://app.example")
        .header("Upload-Length", "10")
        .send()
        .await
        .unwrap();
    let exposed = header(&created, "access-control-expose-headers").to_ascii_lowercase();
    assert!(exposed.split(',').any(|h| h.trim() == "upload-limit"), "{exposed}");
}

async fn location_for(app: &TestApp, headers: &[(&str, &str)]) -> String {
    let mut request = app.tus(Method::POST, &app.files).header("Upload-Length", "10");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let created = request.send().await.unwrap();
    assert_eq!(created.status(), 201);
    header(&created, "location")
}

#[tokio::test]
async fn behind_a_proxy_locations_use_the_forwarded_scheme_and_host() {
    let app = TestApp::spawn_with(Backend::Sqlite, |args| args.behind_proxy = true).await;
    let forwarded = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "uploads.example")];
    let location = location_for(&app, &forwarded).await;
    assert!(location.starts_with("https://uploads.example/files/"), "{location}");
    let location = location_for(&app, &[("Forwarded", "for=192.0.2.7;proto=https;host=up.example:8443")]).await;
    assert!(location.starts_with("https://up.example:8443/files/"), "{location}");
    // Without forwarded headers, the Host the request came with.
    let location = location_for(&app, &[]).await;
    assert!(location.starts_with(&format!("{}/files/", app.base)), "{location}");
}

#[tokio::test]
async fn forwarded_headers_are_ignored_unless_trusted() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let forwarded = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.example")];
    let location = location_for(&app, &forwarded).await;
    assert!(location.starts_with(&format!("{}/files/", app.base)), "{location}");
}
