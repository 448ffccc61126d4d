//! Run tracking: an MLflow-compatible REST API (`/api/2.0/mlflow/...`) and
//! artifact proxy (`/api/2.0/mlflow-artifacts/artifacts`), plus mlplane's own
//! records (`/api/2.0/mlplane/...`: DataAsset versions, the Pipeline step
//! cache, see [`records`]), backed by a durable
//! SQL run history (SQLite embedded by default, PostgreSQL by URL) and an
//! object store for artifacts. Served by `mlplane run --tracking-addr` in the
//! cluster and by `mlplane tracking` standalone.
//!
//! Owns: the tracking database and artifact root. Must not touch Kubernetes
//! objects other than TokenReview/SubjectAccessReview (see [`auth`]).
pub mod artifacts;
pub mod auth;
pub mod client;
pub mod error;
pub mod handlers;
pub mod records;
pub mod search;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use self::artifacts::Artifacts;
use self::auth::{Auth, AuthMode, Identity};
use self::error::ApiError;
use self::store::Store;
use crate::runtime::metrics::Metrics;

/// How the tracking server is set up.
#[derive(Clone, Debug)]
pub struct TrackingConfig {
    /// `sqlite://<path>` (created if missing) or `postgres://...`.
    pub database_url: String,
    /// Where artifacts are stored: `file:///dir`, `s3://bucket/prefix`, ...
    pub artifact_root: String,
    pub auth: AuthMode,
}

/// State shared by the tracking handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub auth: Arc<Auth>,
    pub artifacts: Arc<Artifacts>,
    pub metrics: Metrics,
}

impl AppState {
    /// Opens the store (running migrations) and the artifact root.
    pub async fn open(config: &TrackingConfig, client: Option<kube::Client>, metrics: Metrics) -> anyhow::Result<Self> {
        Ok(Self {
            store: Store::connect(&config.database_url).await?,
            auth: Arc::new(Auth::new(config.auth.clone(), client)),
            artifacts: Arc::new(Artifacts::from_uri(&config.artifact_root)?),
            metrics,
        })
    }
}

/// The authenticated caller of a request; extracting it answers 401 when
/// authentication is on and the request has no valid bearer token.
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        state.auth.authenticate(&parts.headers).await.map(Caller)
    }
}

/// Every tracking route, plus `/health` and `/metrics`, with request metrics.
pub fn router(state: AppState) -> Router {
    let metrics = state.metrics.clone();
    handlers::routes()
        .merge(artifacts::routes())
        .merge(records::routes())
        .route("/health", get(|| async { "OK" }))
        .route("/metrics", get(render_metrics))
        .route_layer(middleware::from_fn_with_state(metrics, record_request))
        .with_state(state)
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

/// Counts requests by matched route (low cardinality) and status, and times them.
async fn record_request(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    metrics
        .tracking_duration
        .with_label_values(&[&route])
        .observe(start.elapsed().as_secs_f64());
    metrics
        .tracking_requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

/// Serves the tracking API on `addr` until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving the MLflow-compatible tracking API");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Flags of `mlplane tracking` (standalone, like `mlflow server`).
#[derive(clap::Args, Debug, Clone)]
pub struct TrackingArgs {
    /// Address to serve on.
    #[arg(long, env = "MLPLANE_TRACKING_ADDR", default_value = "127.0.0.1:5000")]
    pub addr: SocketAddr,
    /// Run history database: `sqlite://<file>` or `postgres://...`.
    #[arg(
        long,
        env = "MLPLANE_TRACKING_DATABASE_URL",
        default_value = "sqlite://mlplane-tracking.db"
    )]
    pub database_url: String,
    /// Artifact root: a directory, `file:///dir`, `s3://bucket/prefix`, `gs://...`, `az://...`.
    #[arg(long, env = "MLPLANE_TRACKING_ARTIFACT_ROOT", default_value = "./mlartifacts")]
    pub artifact_root: String,
    /// Authenticate with Kubernetes bearer tokens (TokenReview and
    /// SubjectAccessReview); `--auth=false` is for standalone local use only.
    #[arg(long, env = "MLPLANE_TRACKING_AUTH", default_value_t = false, action = clap::ArgAction::Set)]
    pub auth: bool,
    /// With --auth: the username that may do everything (the operator's).
    #[arg(
        long,
        env = "MLPLANE_TRACKING_OPERATOR_USER",
        default_value = "system:serviceaccount:mlplane-system:mlplane"
    )]
    pub operator_user: String,
}

/// `mlplane tracking`: the tracking server alone, until SIGINT/SIGTERM.
pub async fn standalone(args: TrackingArgs) -> anyhow::Result<()> {
    let (auth, client) = if args.auth {
        let client = kube::Client::try_default().await?;
        (
            AuthMode::Kubernetes {
                operator_user: args.operator_user.clone(),
            },
            Some(client),
        )
    } else {
        tracing::warn!(
            "authentication is off: anyone who can reach {} can read and write",
            args.addr
        );
        (AuthMode::Disabled, None)
    };
    let config = TrackingConfig {
        database_url: args.database_url.clone(),
        artifact_root: args.artifact_root.clone(),
        auth,
    };
    let state = AppState::open(&config, client, Metrics::new()).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        s.cancel();
    });
    serve(args.addr, state, stop.cancelled_owned()).await
}
