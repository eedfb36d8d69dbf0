//! Who may upload: upload tokens (JWT) and the application's pre-create hook (a stub app here;
//! tests/api/backend_app.rs runs the real example app under gunicorn).

use std::time::Duration;

use axum::{Json, Router, http::StatusCode, routing::post};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::Method;

use crate::db_backend_tests;
use crate::helpers::{Backend, TestApp, header};

pub const TOKEN_SECRET: &str = "token secret shared with the app";

pub fn token(secret: &str, sub: &str, exp_in: i64, max_size: Option<u64>) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut claims = serde_json::json!({"sub": sub, "exp": now + exp_in});
    if let Some(max) = max_size {
        claims["max_size"] = max.into();
    }
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

async fn tokens_guard_every_request(backend: Backend) {
    let app = TestApp::spawn_with(backend, |args| args.token_secret = Some(TOKEN_SECRET.into())).await;
    let post = |auth: Option<String>, length: u64| {
        let mut request = app.tus(Method::POST, &app.files).header("Upload-Length", length.to_string());
        if let Some(token) = auth {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        request.send()
    };
    let missing = post(None, 10).await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(header(&missing, "www-authenticate"), "Bearer");
    assert_eq!(post(Some(token("wrong secret", "alice", 60, None)), 10).await.unwrap().status(), 401);
    let expired = post(Some(token(TOKEN_SECRET, "alice", -60, None)), 10).await.unwrap();
    assert_eq!(expired.status(), 401);
    assert!(expired.text().await.unwrap().contains("expired"));
    assert_eq!(post(Some(token(TOKEN_SECRET, "alice", 60, Some(5))), 10).await.unwrap().status(), 413);
    assert_eq!(app.upload_count().await, 0, "refused requests created nothing");

    let alice = token(TOKEN_SECRET, "alice", 60, Some(100));
    let created = post(Some(alice.clone()), 10).await.unwrap();
    assert_eq!(created.status(), 201);
    let url = header(&created, "location");
    let bob = token(TOKEN_SECRET, "bob", 60, None);
    let as_user =
        |method: Method, token: &str| app.tus(method, &url).header("Authorization", format!("Bearer {token}"));
    assert_eq!(as_user(Method::HEAD, &bob).send().await.unwrap().status(), 404, "another owner's upload is unknown");
    let patch = |token: &str| {
        as_user(Method::PATCH, token)
            .header("Upload-Offset", "0")
            .header("Content-Type", "application/offset+octet-stream")
            .body("0123456789")
            .send()
    };
    assert_eq!(patch(&bob).await.unwrap().status(), 404);
    assert_eq!(as_user(Method::DELETE, &bob).send().await.unwrap().status(), 404);
    assert_eq!(app.tus(Method::HEAD, &url).send().await.unwrap().status(), 401);
    assert_eq!(patch(&alice).await.unwrap().status(), 204);
    assert_eq!(as_user(Method::GET, &alice).send().await.unwrap().bytes().await.unwrap(), "0123456789");
    // A token is never taken from the URL, where proxies log it: plain links are signed ones.
    let in_query = app.client.get(format!("{url}?token={alice}")).send().await.unwrap();
    assert_eq!(in_query.status(), 401);
    assert!(in_query.text().await.unwrap().contains("not taken from the URL"));
}

/// A signed link from `GET <upload>/link` (or a webhook): opens the completed upload with a plain
/// GET until it expires; a changed id, expiry or signature, or an expired link, gets 403. Links are
/// verified by the database's key, so they outlive the instance that made them.
async fn signed_download_links(backend: Backend) {
    let app = TestApp::spawn_with(backend, |args| args.token_secret = Some(TOKEN_SECRET.into())).await;
    let alice = token(TOKEN_SECRET, "alice", 600, None);
    let bob = token(TOKEN_SECRET, "bob", 600, None);
    let create = |length: u64| {
        app.tus(Method::POST, &app.files).header("Upload-Length", length.to_string()).bearer_auth(&alice).send()
    };
    let url = header(&create(10).await.unwrap(), "location");
    let link_of = |url: &str, token: Option<&str>| {
        let request = app.client.get(format!("{url}/link"));
        match token {
            Some(token) => request.bearer_auth(token).send(),
            None => request.send(),
        }
    };
    let early = link_of(&url, Some(&alice)).await.unwrap();
    assert_eq!(early.status(), 409, "no link before the upload is complete");
    let patch = app
        .tus(Method::PATCH, &url)
        .bearer_auth(&alice)
        .header("Upload-Offset", "0")
        .header("Content-Type", "application/offset+octet-stream")
        .body("0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), 204);

    assert_eq!(link_of(&url, None).await.unwrap().status(), 401, "a link needs a token");
    assert_eq!(link_of(&url, Some(&bob)).await.unwrap().status(), 404, "another owner's upload is unknown");
    let answer = link_of(&url, Some(&alice)).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(header(&answer, "cache-control"), "no-store");
    let body: serde_json::Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    let link = body["url"].as_str().unwrap().to_string();
    assert!(link.starts_with(&format!("{url}?expires=")) && link.contains("&signature="), "{link}");
    assert!(!link.contains("token") && !link.contains(&alice), "no token in {link}");
    let expires_at = chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    let left = expires_at.timestamp() - chrono::Utc::now().timestamp();
    assert!((3500..=3601).contains(&left), "valid for --download-link-ttl (1h): {left} s left");
    assert_eq!(body["expires_in"], 3600);

    let get = |link: String| app.client.get(link).send();
    let opened = get(link.clone()).await.unwrap();
    assert_eq!(opened.status(), 200, "a plain GET of {link}");
    assert_eq!(opened.bytes().await.unwrap(), "0123456789");
    let ranged = app.client.get(&link).header("Range", "bytes=2-4").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap(), "234");

    // Altered: the signature, the expiry, the upload it names.
    let (_, query) = link.split_once('?').unwrap();
    let params: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let (expires, signature) = (params["expires"].clone(), params["signature"].clone());
    let flipped = format!("{}{}", &signature[..signature.len() - 1], if signature.ends_with('A') { 'B' } else { 'A' });
    let later = expires.parse::<u64>().unwrap() + 86_400;
    let other = header(&create(3).await.unwrap(), "location");
    for (what, altered) in [
        ("signature", format!("{url}?expires={expires}&signature={flipped}")),
        ("expiry", format!("{url}?expires={later}&signature={signature}")),
        ("upload", format!("{other}?expires={expires}&signature={signature}")),
        ("no signature", format!("{url}?expires={expires}")),
    ] {
        let refused = get(altered.clone()).await.unwrap();
        assert_eq!(refused.status(), 403, "altered {what}: {altered}");
        assert!(refused.text().await.unwrap().contains("download link"), "altered {what} says why");
    }
    // Expired: signed with the real key, an hour and a half ago.
    let key = app.link_key().await;
    let links = ferry::uploads::links::DownloadLinks::new(key, Duration::from_secs(3600));
    let id: ferry::uploads::types::UploadId = url.rsplit('/').next().unwrap().parse().unwrap();
    let (expired, _) = links.sign(&url, id, ferry::uploads::now_ms() - 90 * 60 * 1000);
    let refused = get(expired.clone()).await.unwrap();
    assert_eq!(refused.status(), 403, "{expired}");
    assert!(refused.text().await.unwrap().contains("expired"));
    // The same key signs links that open: the test's signer is ferry's.
    let (fresh, _) = links.sign(&url, id, ferry::uploads::now_ms());
    assert_eq!(get(fresh).await.unwrap().status(), 200);
    // A link opens a download, nothing else: the draft's offset GET still needs a token.
    let ietf = app.client.get(&link).header("upload-draft-interop-version", "8").send().await.unwrap();
    assert_eq!(ietf.status(), 401, "the IETF draft's GET with a link's query");
}

/// A stub application whose pre-create hook answers with `status` and `body` after `delay`.
async fn stub_app(status: u16, body: serde_json::Value, delay: Duration) -> String {
    let hook = post(move || {
        let body = body.clone();
        async move {
            tokio::time::sleep(delay).await;
            (StatusCode::from_u16(status).unwrap(), Json(body))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/pre-create", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, Router::new().route("/hooks/pre-create", hook)).await.unwrap() });
    url
}

async fn pre_create_hook_decides(backend: Backend) {
    let allow = stub_app(
        200,
        serde_json::json!({"owner": "u-7", "metadata": {"uploaded_by": "ann"}, "max_size": 50, "key_prefix": "ann/2026/"}),
        Duration::ZERO,
    )
    .await;
    let app = TestApp::spawn_with(backend, move |args| args.pre_create_url = Some(allow)).await;
    let created = app
        .tus(Method::POST, &app.files)
        .header("Upload-Length", "10")
        .header("Upload-Metadata", "filename YS50eHQ=")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let head = app.head(&header(&created, "location")).await;
    let metadata = header(&head, "upload-metadata");
    assert!(metadata.contains("filename YS50eHQ=") && metadata.contains("uploaded_by YW5u"), "{metadata}");
    let too_big = app.tus(Method::POST, &app.files).header("Upload-Length", "51").send().await.unwrap();
    assert_eq!(too_big.status(), 413, "the hook's smaller limit applies");
    // The hook's key prefix places the object.
    let url = header(&created, "location");
    assert_eq!(app.patch(&url, 0, "0123456789").await.status(), 204);
    let id = url.rsplit('/').next().unwrap();
    assert_eq!(std::fs::read(app.store_dir.join("uploads/ann/2026").join(id)).unwrap(), b"0123456789");
    assert_eq!(app.download(&url).await, b"0123456789");
    assert_eq!(app.tus(Method::DELETE, &url).send().await.unwrap().status(), 204);
    assert!(!app.store_dir.join("uploads/ann/2026").join(id).exists());

    let escape = stub_app(200, serde_json::json!({"key_prefix": "../../etc/"}), Duration::ZERO).await;
    let app = TestApp::spawn_with(backend, move |args| args.pre_create_url = Some(escape)).await;
    let refused = app.tus(Method::POST, &app.files).header("Upload-Length", "10").send().await.unwrap();
    assert_eq!(refused.status(), 503, "a key prefix that leaves the store is never used");
    assert_eq!(app.upload_count().await, 0);

    let deny = stub_app(403, serde_json::json!({"message": "uploads are closed for today"}), Duration::ZERO).await;
    let app = TestApp::spawn_with(backend, move |args| args.pre_create_url = Some(deny)).await;
    let refused = app.tus(Method::POST, &app.files).header("Upload-Length", "10").send().await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.text().await.unwrap(), "uploads are closed for today\n");
    assert_eq!(app.upload_count().await, 0);

    let slow = stub_app(200, serde_json::json!({}), Duration::from_secs(5)).await;
    let app = TestApp::spawn_with(backend, move |args| {
        args.pre_create_url = Some(slow);
        args.pre_create_timeout = Duration::from_millis(300);
    })
    .await;
    let unavailable = app.tus(Method::POST, &app.files).header("Upload-Length", "10").send().await.unwrap();
    assert_eq!(unavailable.status(), 503);
    assert!(unavailable.text().await.unwrap().contains("nothing was created"));
    assert_eq!(app.upload_count().await, 0);

    let app = TestApp::spawn_with(backend, |args| args.pre_create_url = Some("http://127.0.0.1:9/hooks".into())).await;
    let down = app.tus(Method::POST, &app.files).header("Upload-Length", "10").send().await.unwrap();
    assert_eq!(down.status(), 503);
    assert_eq!(app.upload_count().await, 0);
}

db_backend_tests!(tokens_guard_every_request, signed_download_links, pre_create_hook_decides);

/// With a webhook secret, the pre-create call is signed like a webhook, so the application can
/// refuse calls that do not come from ferry.
#[tokio::test]
async fn pre_create_calls_are_signed() {
    use crate::backend_app::{WEBHOOK_SECRET, sign};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(http::HeaderMap, String)>();
    let hook = post(move |headers: http::HeaderMap, body: String| {
        let tx = tx.clone();
        async move {
            tx.send((headers, body)).unwrap();
            StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/pre-create", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, Router::new().route("/hooks/pre-create", hook)).await.unwrap() });
    let app = TestApp::spawn_with(Backend::Sqlite, move |args| {
        args.pre_create_url = Some(url);
        args.webhook_secret = vec![ferry::hooks::Secret::parse(WEBHOOK_SECRET).unwrap()];
    })
    .await;
    let created = app.tus(Method::POST, &app.files).header("Upload-Length", "10").send().await.unwrap();
    assert_eq!(created.status(), 201);
    let (headers, body) = rx.recv().await.unwrap();
    let text = |name: &str| headers.get(name).unwrap_or_else(|| panic!("no {name}")).to_str().unwrap().to_string();
    let id = text("webhook-id");
    assert!(id.starts_with("pre_"), "{id}");
    let timestamp: i64 = text("webhook-timestamp").parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - timestamp).abs() < 60);
    assert_eq!(text("webhook-signature"), sign(WEBHOOK_SECRET, &id, timestamp, &body));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["length"], 10);
}
