//! HTTP: the axum router, tus handlers, downloads, the web page, CORS and method override.

mod admit;
pub mod auth;
pub mod connection;
mod download;
pub mod error;
pub mod fields;
pub mod headers;
pub mod ietf;
pub mod probe;
pub mod tus;
mod web;

use std::time::Duration;

use futures_util::future::BoxFuture;

use axum::{
    Extension, Router,
    body::Body,
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    trace::TraceLayer,
};

use crate::uploads::Uploads;

#[derive(Clone)]
pub struct AppState {
    pub uploads: Uploads,
    pub base_path: String,
    pub download: crate::config::DownloadMode,
    /// Upload tokens, when configured: required on every tus request.
    pub tokens: Option<std::sync::Arc<auth::TokenVerifier>>,
    /// The largest request body clients are asked to send (`--max-append-size`), announced in
    /// `Upload-Limit`.
    pub max_append_size: Option<u64>,
    /// Whether `Forwarded` / `X-Forwarded-*` from the proxy in front are trusted for URLs.
    pub behind_proxy: bool,
    /// When the IETF draft's 104 interim response is sent (`--interim-responses`).
    pub interim_responses: crate::config::InterimResponses,
    /// The probe endpoint of `ferry doctor` (`POST {base_path}probe`), unless disabled.
    pub probe: Option<std::sync::Arc<probe::Probe>>,
}

/// Response headers a browser client must be able to read.
const EXPOSED_HEADERS: &[&str] = &[
    "location",
    "upload-offset",
    "upload-length",
    "upload-defer-length",
    "upload-metadata",
    "upload-expires",
    "upload-concat",
    "tus-resumable",
    "tus-version",
    "tus-extension",
    "tus-max-size",
    "tus-checksum-algorithm",
    "repr-digest",
    "content-disposition",
    "content-range",
    "content-length",
    "www-authenticate",
    "etag",
    "upload-limit",
    "upload-complete",
    "upload-draft-interop-version",
    "accept-patch",
    "retry-after",
];

/// Request headers a browser client may send.
const ALLOWED_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "upload-offset",
    "upload-length",
    "upload-defer-length",
    "upload-metadata",
    "upload-checksum",
    "upload-concat",
    "tus-resumable",
    "upload-complete",
    "upload-draft-interop-version",
    "content-digest",
    "content-disposition",
    "x-http-method-override",
    "x-requested-with",
    "range",
    "if-range",
    "if-none-match",
];

pub fn router(state: AppState, cors_origins: &[String], with_metrics: bool) -> Router {
    let base = state.base_path.clone();
    let collection = base.trim_end_matches('/').to_string();
    let tus_routes = Router::new()
        .route(&collection, post(create).options(tus::options))
        .route(&base, post(create).options(tus::options))
        .route(&format!("{base}{{id}}"), get(get_upload).head(head).patch(append).delete(delete).options(tus::options))
        .route(&format!("{base}{{id}}/link"), get(download::link))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token))
        .layer(axum::middleware::from_fn(protocol));

    let mut router = Router::new()
        .merge(tus_routes)
        .merge(web::routes(&base))
        .merge(probe::routes(&state))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if with_metrics {
        router = router.route("/metrics", get(metrics));
    }
    let router = router
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(TraceLayer::new_for_http())
        .with_state(state);

    match cors(cors_origins) {
        Some(layer) => router
            .layer(axum::middleware::map_request(restore_actual_options))
            .layer(layer)
            .layer(axum::middleware::map_request(mark_actual_options)),
        None => router,
    }
}

/// Tells the two protocols apart: a request with `Tus-Resumable` is tus; one without it that
/// carries the IETF draft's fields follows the draft (the `Interop` extension says which);
/// anything else is answered as tus (which asks for `Tus-Resumable`).
async fn protocol(mut request: Request, next: Next) -> Response {
    if !request.headers().contains_key("tus-resumable") && ietf::speaks(request.method(), request.headers()) {
        let interop = ietf::Interop::of(request.headers());
        request.extensions_mut().insert(interop);
        return next.run(request).await;
    }
    tus::tus_resumable(request, next).await
}

type Interop = Option<Extension<ietf::Interop>>;
type CallerOf = Option<Extension<auth::Caller>>;
type ConnectionOf = Option<Extension<connection::Connection>>;

async fn create(
    State(state): State<AppState>,
    interop: Interop,
    caller: CallerOf,
    connection: ConnectionOf,
    version: http::Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match interop {
        Some(Extension(interop)) => ietf::create(state, interop, caller, connection, version, headers, body).await,
        None => tus::create(State(state), caller, connection, headers, body).await.into_response(),
    }
}

async fn head(State(state): State<AppState>, interop: Interop, upload: tus::UploadRef) -> Response {
    match interop {
        Some(_) => ietf::offset(state, upload).await,
        None => tus::head(State(state), upload).await.into_response(),
    }
}

/// A download, or the draft's offset retrieval by GET.
async fn get_upload(
    State(state): State<AppState>,
    interop: Interop,
    upload: tus::UploadRef,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    match interop {
        Some(_) => ietf::offset(state, upload).await,
        None => download::download(State(state), upload, uri, headers).await.into_response(),
    }
}

async fn append(
    State(state): State<AppState>,
    interop: Interop,
    upload: tus::UploadRef,
    connection: ConnectionOf,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match interop {
        Some(Extension(interop)) => ietf::append(state, interop, upload, connection, headers, body).await,
        None => tus::append(State(state), upload, connection, headers, body).await.into_response(),
    }
}

async fn delete(State(state): State<AppState>, interop: Interop, upload: tus::UploadRef) -> Response {
    match interop {
        Some(_) => ietf::cancel(state, upload).await,
        None => tus::terminate(State(state), upload).await.into_response(),
    }
}

/// An OPTIONS request that is not a CORS preflight (a tus client asking what the server
/// supports), passed through the CORS layer as a GET.
#[derive(Clone, Copy)]
struct ActualOptions;

/// tower-http's CORS layer answers every OPTIONS as a preflight, so a cross-origin tus client's
/// own OPTIONS would never reach the handler and could read none of its headers. Only a request
/// with `Access-Control-Request-Method` is a preflight; others go through as regular requests.
async fn mark_actual_options(mut request: Request) -> Request {
    if request.method() == Method::OPTIONS && !request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        *request.method_mut() = Method::GET;
        request.extensions_mut().insert(ActualOptions);
    }
    request
}

async fn restore_actual_options(mut request: Request) -> Request {
    if request.extensions_mut().remove::<ActualOptions>().is_some() {
        *request.method_mut() = Method::OPTIONS;
    }
    request
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o.trim()).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::PATCH, Method::DELETE, Method::OPTIONS])
            .allow_headers(ALLOWED_HEADERS.iter().map(|h| header::HeaderName::from_static(h)).collect::<Vec<_>>())
            .expose_headers(EXPOSED_HEADERS.iter().map(|h| header::HeaderName::from_static(h)).collect::<Vec<_>>())
            .max_age(Duration::from_secs(86400)),
    )
}

/// `X-HTTP-Method-Override`: clients that can only send GET and POST name the real method here.
/// Applied before routing.
pub fn method_override<B>(mut request: http::Request<B>) -> http::Request<B> {
    if let Some(method) = request
        .headers()
        .get("x-http-method-override")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Method::from_bytes(v.trim().to_ascii_uppercase().as_bytes()).ok())
    {
        *request.method_mut() = method;
    }
    request
}

/// Liveness: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// How long `/readyz` waits for the database and the store: under the 1 s that Kubernetes
/// probes wait by default, whatever `--database-timeout` is.
const READY_WITHIN: Duration = Duration::from_millis(800);

/// Readiness: the database and the store both answer, and the store's volume is above
/// `--min-free-space`. The answer says what is wrong.
async fn readyz(State(state): State<AppState>) -> Response {
    let uploads = &state.uploads;
    let (database, store) = tokio::join!(
        within("database", Box::pin(async { uploads.repo().ping().await.map_err(|e| e.to_string()) })),
        within("store", Box::pin(async { uploads.store().ping().await.map_err(|e| e.to_string()) })),
    );
    let space = uploads.reserve().shortfall(0).map(|(space, reserve)| {
        format!("store below --min-free-space ({} MiB free, {} MiB kept free)", space.available >> 20, reserve >> 20)
    });
    let problems: Vec<String> = [database, store, space].into_iter().flatten().collect();
    if problems.is_empty() {
        "ready\n".into_response()
    } else {
        tracing::warn!(?problems, "not ready");
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("; "))).into_response()
    }
}

/// What is wrong with `what`, if its check fails or takes longer than [`READY_WITHIN`].
async fn within(what: &'static str, check: BoxFuture<'_, Result<(), String>>) -> Option<String> {
    match tokio::time::timeout(READY_WITHIN, check).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{what}: {e}")),
        Err(_) => Some(format!("{what}: no answer within {} ms", READY_WITHIN.as_millis())),
    }
}

/// Prometheus metrics of this instance.
async fn metrics(State(state): State<AppState>) -> Response {
    let (pool_connections, pool_idle) = state.uploads.repo().pool_stats();
    let budget = state.uploads.budget();
    let text = state.uploads.metrics().render(crate::telemetry::Readings {
        pool_connections,
        pool_idle,
        memory_budget: budget.total(),
        memory_in_use: budget.in_use(),
        store_space: state.uploads.reserve().reading(),
    });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// `/metrics` alone, for a listener of its own.
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}

/// Records every request's duration by route (the matched pattern, not the URL), method and status.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().clone();
    let response = next.run(request).await;
    state.uploads.metrics().observe_request(&route, method.as_str(), response.status().as_u16(), started.elapsed());
    response
}
