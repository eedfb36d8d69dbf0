//! The upload page (`/`) and the browser module (`/ferry-upload.js`), embedded in the binary.
//!
//! Every file has a strong `ETag` from its content's SHA-256, and `If-None-Match` gets 304. The
//! page and its script and style are revalidated on every load (`no-cache`), so a new ferry is
//! picked up at once; the module, which other origins import from a stable path, may be cached
//! for a few minutes. Everything is `nosniff`, and the page may only load from and talk to ferry
//! itself (`Content-Security-Policy`).

use std::sync::Arc;

use axum::{
    Router,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use sha2::{Digest, Sha256};

use super::AppState;

/// The page may load scripts, styles, images and connections from ferry only; nothing inline, no
/// frames, no plugins.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// Scripts and styles are no documents, but a policy that allows nothing costs nothing.
const ASSET_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";
/// Always ask ferry whether the copy is current (a 304 when it is).
const REVALIDATE: &str = "no-cache";
/// The module at its stable path: reused for ten minutes, then revalidated.
const MODULE_CACHE: &str = "public, max-age=600";
/// The page's endpoint as written in web/index.html; replaced with the configured base path.
const ENDPOINT_MARKER: &str = r#"data-endpoint="/files/""#;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const PAGE_JS: &str = include_str!("../../web/page.js");
const PAGE_CSS: &str = include_str!("../../web/page.css");
const MODULE_JS: &str = include_str!("../../web/ferry-upload.js");

/// One embedded file, ready to serve.
struct Asset {
    body: axum::body::Bytes,
    content_type: &'static str,
    cache_control: &'static str,
    policy: &'static str,
    etag: HeaderValue,
    /// Other origins may embed it (`Cross-Origin-Resource-Policy: cross-origin`).
    shared: bool,
}

impl Asset {
    fn new(body: String, content_type: &'static str, cache_control: &'static str) -> Self {
        let hex: String = Sha256::digest(body.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header value");
        let policy = if content_type.starts_with("text/html") { PAGE_POLICY } else { ASSET_POLICY };
        Self { body: body.into(), content_type, cache_control, policy, etag, shared: false }
    }

    fn serve(&self, request: &HeaderMap) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(self.cache_control));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(self.policy));
        // A `?token=` in the page's address must not travel on in a Referer.
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        headers.insert(
            HeaderName::from_static("cross-origin-resource-policy"),
            HeaderValue::from_static(if self.shared { "cross-origin" } else { "same-origin" }),
        );
        if super::headers::if_none_match(request, self.etag.to_str().expect("hex is visible ASCII")) {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        (headers, self.body.clone()).into_response()
    }
}

/// The page with the configured tus endpoint filled in.
fn index_html(base_path: &str) -> String {
    debug_assert!(INDEX_HTML.contains(ENDPOINT_MARKER), "web/index.html lost its data-endpoint");
    let escaped = base_path.replace('&', "&amp;").replace('"', "&quot;").replace('<', "&lt;").replace('>', "&gt;");
    INDEX_HTML.replacen(ENDPOINT_MARKER, &format!(r#"data-endpoint="{escaped}""#), 1)
}

/// `/`, `/page.js`, `/page.css` and `/ferry-upload.js`.
pub fn routes(base_path: &str) -> Router<AppState> {
    let mut module = Asset::new(MODULE_JS.to_string(), "text/javascript; charset=utf-8", MODULE_CACHE);
    module.shared = true;
    let assets = [
        ("/", Asset::new(index_html(base_path), "text/html; charset=utf-8", REVALIDATE)),
        ("/page.js", Asset::new(PAGE_JS.to_string(), "text/javascript; charset=utf-8", REVALIDATE)),
        ("/page.css", Asset::new(PAGE_CSS.to_string(), "text/css; charset=utf-8", REVALIDATE)),
        ("/ferry-upload.js", module),
    ];
    assets.into_iter().fold(Router::new(), |router, (path, asset)| {
        let asset = Arc::new(asset);
        router.route(path, get(move |request: HeaderMap| async move { asset.serve(&request) }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_filled_in_and_escaped() {
        let html = index_html("/up\"loads/");
        assert!(html.contains(r#"data-endpoint="/up&quot;loads/""#));
        assert!(!html.contains(ENDPOINT_MARKER));
    }
}
