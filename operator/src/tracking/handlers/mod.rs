//! The MLflow REST API the Python client uses, under `/api/2.0/mlflow/` (and
//! `/ajax-api/2.0/mlflow/`, as MLflow's server answers both): thin wrappers
//! that read a request like MLflow does ([`request`]), check the caller's
//! access to the experiment it touches, call the [`Store`](super::store::Store)
//! and answer MLflow's JSON ([`json`]).
//!
//! Authorization: every handler resolves the experiment a request touches and
//! asks [`Auth::authorize`](super::auth::Auth::authorize) for read or write
//! access; searches drop experiments the caller may not read (experiments)
//! or refuse them (runs). With auth disabled no lookups are made.
mod experiments;
mod json;
mod request;
mod runs;

use axum::Json;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use serde_json::{Value, json};

use self::request::MlflowRequest;
use super::auth::Access;
use super::error::{ApiError, ApiResult};
use super::{AppState, Caller};

/// Checks `access` to the experiment `experiment_id` (nothing when auth is
/// off; an unknown experiment is left to the store to refuse).
async fn authorize_experiment(state: &AppState, caller: &Caller, experiment_id: &str, access: Access) -> ApiResult<()> {
    if !state.auth.enabled() {
        return Ok(());
    }
    match state.store.experiment_name(experiment_id).await? {
        Some(name) => state.auth.authorize(&caller.0, &name, access).await,
        None => Ok(()),
    }
}

/// Checks `access` to the experiment of the run `run_id`.
async fn authorize_run(state: &AppState, caller: &Caller, run_id: &str, access: Access) -> ApiResult<()> {
    if !state.auth.enabled() {
        return Ok(());
    }
    match state.store.run_experiment(run_id).await? {
        Some((_, name)) => state.auth.authorize(&caller.0, &name, access).await,
        None => Ok(()),
    }
}

/// An empty MLflow response.
fn empty() -> Json<Value> {
    Json(json!({}))
}

/// `GET /api/3.0/mlflow/server-info`: what the client probes before artifact transfers.
async fn server_info(_caller: Caller) -> Json<Value> {
    Json(json!({
        "store_type": "SqlStore",
        "workspaces_enabled": false,
        "trace_archival_enabled": false,
        "multipart_uploads_enabled": false,
        "multipart_downloads_enabled": false,
        "presigned_upload_run_id_supported": false,
        "presigned_upload_model_id_supported": false,
        "features_enabled": {"gateway": false},
    }))
}

/// `POST logged-models/search`: this server keeps no logged models (the
/// client asks while downloading a run's artifacts).
async fn search_logged_models(_caller: Caller, _req: MlflowRequest) -> ApiResult<Json<Value>> {
    Ok(empty())
}

/// The routes under one API prefix (`/api/2.0/mlflow` or `/ajax-api/2.0/mlflow`).
fn mlflow_routes() -> Router<AppState> {
    Router::new()
        .route("/experiments/create", post(experiments::create))
        .route("/experiments/get", get(experiments::get))
        .route("/experiments/get-by-name", get(experiments::get_by_name))
        .route(
            "/experiments/search",
            get(experiments::search).post(experiments::search),
        )
        .route("/experiments/update", post(experiments::update))
        .route("/experiments/delete", post(experiments::delete))
        .route("/experiments/restore", post(experiments::restore))
        .route("/experiments/set-experiment-tag", post(experiments::set_tag))
        .route("/experiments/delete-experiment-tag", post(experiments::delete_tag))
        .route("/runs/create", post(runs::create))
        .route("/runs/get", get(runs::get))
        .route("/runs/update", post(runs::update))
        .route("/runs/delete", post(runs::delete))
        .route("/runs/restore", post(runs::restore))
        .route("/runs/search", post(runs::search))
        .route("/runs/log-metric", post(runs::log_metric))
        .route("/runs/log-parameter", post(runs::log_param))
        .route("/runs/log-batch", post(runs::log_batch))
        .route("/runs/log-inputs", post(runs::log_inputs))
        .route("/runs/set-tag", post(runs::set_tag))
        .route("/runs/delete-tag", post(runs::delete_tag))
        .route("/metrics/get-history", get(runs::get_metric_history))
        .route(
            "/metrics/get-history-bulk-interval",
            get(runs::get_metric_history_bulk_interval),
        )
        .route("/artifacts/list", get(runs::list_artifacts))
        .route("/logged-models/search", post(search_logged_models))
}

/// Every MLflow tracking route (the artifact proxy is in [`super::artifacts`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .nest("/api/2.0/mlflow", mlflow_routes())
        .nest("/ajax-api/2.0/mlflow", mlflow_routes())
        .route("/api/3.0/mlflow/server-info", get(server_info))
        .route("/ajax-api/3.0/mlflow/server-info", get(server_info))
        .layer(DefaultBodyLimit::max(request::MAX_BODY))
}

#[cfg(test)]
mod tests;

/// A malformed filter, order_by or page token answers INVALID_PARAMETER_VALUE.
impl From<super::search::SearchError> for ApiError {
    fn from(e: super::search::SearchError) -> Self {
        ApiError::invalid(e.0)
    }
}
