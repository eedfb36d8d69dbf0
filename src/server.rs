//! Wiring: builds the service from the configuration and serves it on a listener, with the
//! connection limits that keep stalled clients from holding resources.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{BallastSize, ServeArgs},
    hooks::{
        Dispatcher, WebhookSettings,
        precreate::{PreCreate, PreCreateSettings},
    },
    http::auth::TokenVerifier,
    http::{self, AppState, connection::ConnectionIo},
    repo::{self, Repo},
    store::{self, Instrumented, ObjectStoreOptions, Store},
    telemetry::Metrics,
    uploads::{
        Settings, Uploads,
        ballast::Ballast,
        links::{self, DownloadLinks},
    },
};

/// Largest buffer hyper keeps per connection; request headers larger than this get 431.
pub const MAX_HEADER_BUFFER: usize = 128 * 1024;

/// After the grace period, how long appends get to save what arrived and answer.
const FINAL_DRAIN: Duration = Duration::from_secs(5);

/// A built service: the domain and the router over it.
pub struct App {
    pub uploads: Uploads,
    pub router: axum::Router,
    /// `/metrics` alone, for `--metrics-listen`.
    pub metrics_router: axum::Router,
}

impl App {
    pub async fn build(args: &ServeArgs) -> anyhow::Result<Self> {
        let repo = open_database(&args.database).await?;
        let store: Arc<dyn Store> = store::open(
            &args.store_url(),
            ObjectStoreOptions {
                part_size: args.part_size,
                config: args.store_options.clone(),
                retry_budget: args.store_retry_budget,
                timeout: args.store_timeout,
            },
        )
        .context("could not open the store")?;
        if args.download == crate::config::DownloadMode::Redirect {
            check_presigning(store.as_ref()).await?;
        }
        let settings = Settings {
            max_size: args.max_size,
            expire_after: args.expire_after,
            idle_timeout: args.idle_timeout,
            sweep_interval: args.sweep_interval,
            orphan_age: args.orphan_age,
            public_url: args.public_url(),
            base_path: args.base_path.clone(),
            memory_budget: args.memory_budget,
            min_free_space: args.min_free_space,
        };
        check_budget(args, store.as_ref())?;
        let metrics = Metrics::new();
        let store: Arc<dyn Store> = Arc::new(Instrumented::new(store, metrics.clone()));
        let tokens = match (&args.token_secret, &args.token_public_key) {
            (Some(secret), _) => Some(Arc::new(TokenVerifier::hs256(secret))),
            (None, Some(path)) => {
                let pem = std::fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
                Some(Arc::new(TokenVerifier::eddsa(&pem).context("the token public key is not an Ed25519 PEM key")?))
            }
            (None, None) => None,
        };
        let precreate = match &args.pre_create_url {
            Some(url) => Some(Arc::new(PreCreate::new(PreCreateSettings {
                url: url.clone(),
                timeout: args.pre_create_timeout,
                forward_headers: args.pre_create_headers.iter().map(|h| h.trim().to_ascii_lowercase()).collect(),
                secrets: args.webhook_secret.clone(),
            })?)),
            None => None,
        };
        let key = repo
            .secret(links::KEY_NAME, &DownloadLinks::new_key(), crate::model::now_ms())
            .await
            .context("could not read the download link key from the database")?;
        if key.len() < 32 {
            anyhow::bail!("the database holds a download link key of {} bytes; 32 or more are needed", key.len());
        }
        let links = Arc::new(DownloadLinks::new(key, args.download_link_ttl));
        let ballast = (args.emergency_ballast != BallastSize::Bytes(0))
            .then(|| args.database.sqlite_folder())
            .flatten()
            .map(|folder| Ballast::in_folder(&folder, args.emergency_ballast));
        let uploads =
            Uploads::new(repo, store, settings, metrics, links).with_precreate(precreate).with_ballast(ballast);
        uploads.ensure_ballast().await;
        let state = AppState {
            uploads: uploads.clone(),
            base_path: args.base_path.clone(),
            download: args.download,
            tokens,
            max_append_size: args.max_append_size,
            behind_proxy: args.behind_proxy,
            interim_responses: args.interim_responses,
            probe: (!args.no_probe).then(|| {
                Arc::new(http::probe::Probe::new(http::probe::ProbeSettings {
                    max_size: args.probe_max_size,
                    budget_per_minute: args.probe_budget,
                }))
            }),
        };
        let metrics_inline = args.metrics_listen.is_none();
        let router = http::router(state.clone(), &args.cors_origin, metrics_inline);
        let metrics_router = http::metrics_router(state);
        Ok(Self { uploads, router, metrics_router })
    }
}

/// The memory budget must let an append go on whatever the others do: more than the largest
/// frame the HTTP layer hands over, and on object stores two of the largest parts (one filling
/// while one uploads).
fn check_budget(args: &ServeArgs, store: &dyn Store) -> anyhow::Result<()> {
    let minimum = crate::uploads::pipeline::MIN_BUDGET;
    if args.memory_budget < minimum {
        anyhow::bail!("--memory-budget must be at least {minimum} bytes (1 MiB), not {}", args.memory_budget);
    }
    if let Some(part) = store.largest_part(args.max_size)
        && args.memory_budget < 2 * part
    {
        anyhow::bail!(
            "--memory-budget {} is too small for this object store: uploads of up to --max-size {} use parts of \
             {part} bytes, and an append needs room for two; raise --memory-budget to at least {} or lower \
             --max-size or --part-size",
            args.memory_budget,
            args.max_size,
            2 * part
        );
    }
    Ok(())
}

/// `--download redirect` answers with presigned URLs: make sure at start that the store can make
/// them with its credentials (an Azure SAS token cannot sign, for one), rather than failing
/// every download.
async fn check_presigning(store: &dyn Store) -> anyhow::Result<()> {
    let probe = crate::uploads::types::UploadId::new();
    store.presign(probe, &Default::default(), crate::uploads::PRESIGNED_URL_TTL).await.map(|_| ()).map_err(|e| {
        anyhow::anyhow!(
            "--download redirect needs presigned URLs, and the store cannot make them with the credentials \
             it has ({e}); give it credentials that can sign (S3: an access key; GCS: a service account; \
             Azure: an account key, or an Entra ID identity allowed to get a user delegation key), or use \
             --download stream"
        )
    })
}

/// Connects to the configured database (creating the data folder for the SQLite default) and
/// applies the migrations.
pub async fn open_database(args: &crate::config::DatabaseArgs) -> anyhow::Result<Arc<dyn Repo>> {
    let url = args.url();
    if args.database_url.is_none() {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("could not create the data folder {}", args.data_dir.display()))?;
    }
    let repo = repo::connect(&url, args.database_timeout).await.context("could not connect to the database")?;
    repo.migrate().await.context("could not apply database migrations")?;
    Ok(repo)
}

/// Serves ferry on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn launch(
    mut args: ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Without --public-url, the URLs in events name the address actually listened on (which
    // differs from --listen when its port is 0).
    if args.public_url.is_none()
        && let Ok(address) = listener.local_addr()
    {
        args.public_url = Some(format!("http://{address}"));
    }
    let app = App::build(&args).await?;
    let background = CancellationToken::new();
    let mut workers = crate::uploads::spawn_background(app.uploads.clone(), background.clone());
    let webhooks = WebhookSettings {
        url: args.webhook_url.clone(),
        secrets: args.webhook_secret.clone(),
        timeout: args.webhook_timeout,
        retry_budget: args.webhook_retry_budget,
        retry_min: args.webhook_retry_min,
        links: Some(app.uploads.links().clone()),
    };
    if webhooks.url.is_some() && webhooks.secrets.is_empty() {
        tracing::warn!("webhooks are sent unsigned: set --webhook-secret so the receiver can verify them");
    }
    workers.extend(Dispatcher::new(app.uploads.repo().clone(), webhooks)?.spawn(background.clone()));

    if let Some(address) = args.metrics_listen {
        let listener = TcpListener::bind(address).await.with_context(|| format!("could not listen on {address}"))?;
        let router = app.metrics_router.clone();
        let stop = background.clone();
        tracing::info!(%address, "metrics are served on their own listener");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
    }
    let service = tower::ServiceBuilder::new().map_request(http::method_override).service(app.router.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Some(args.header_timeout))
        .max_buf_size(MAX_HEADER_BUFFER)
        .keep_alive(true);

    tracing::info!(address = %listener.local_addr()?, "ferry is listening");
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (io, handle) = ConnectionIo::new(stream);
                let service = tower::ServiceBuilder::new()
                    .map_request(move |mut request: ::http::Request<hyper::body::Incoming>| {
                        request.extensions_mut().insert(handle.clone());
                        request
                    })
                    .service(service.clone());
                let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; waiting for requests in flight");
    background.cancel();
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => {}
        () = tokio::time::sleep(args.shutdown_grace) => {
            tracing::info!("grace period over: appends still running keep what arrived and end");
            app.uploads.stop_appends();
            tokio::select! {
                () = &mut drained => {}
                () = tokio::time::sleep(FINAL_DRAIN) => {
                    let (receiving, committing) = app.uploads.appends_running();
                    tracing::warn!(?receiving, ?committing, "connections still open were closed");
                }
            }
        }
    }
    for worker in workers {
        let _ = worker.await;
    }
    Ok(())
}
