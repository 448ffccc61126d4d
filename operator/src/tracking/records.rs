//! mlplane's own endpoints beside the MLflow API, under `/api/2.0/mlplane/`:
//! DataAsset versions (with their manifests) and the Pipeline step cache,
//! stored in the run history database ([`super::store::records`]).
//!
//! Authorization: only the operator writes ([`Auth::require_operator`]);
//! reads follow the workspace rules on the object the record belongs to
//! ([`Auth::authorize_in`]): a DataAsset's versions need `get` on that
//! DataAsset, step cache entries `get` on pipelines in the namespace.
//!
//! | Route | Body / query | Answer |
//! |---|---|---|
//! | `POST data-versions/record` | `{namespace, data_asset, source, digest, manifest}` | `{version, created}` |
//! | `GET data-versions/list` | `namespace, data_asset, max_results` | `{versions: [...]}` newest first |
//! | `GET data-versions/get` | `namespace, data_asset, version` | `{version, manifest}` |
//! | `POST step-cache/put` | `{namespace, entry: {cache_key, pipeline, run, step, job, outputs}}` | `{entry}` (the first entry of a key stays) |
//! | `POST step-cache/lookup` | `{namespace, cache_keys: [...]}` | `{entries: [...]}` (missing keys left out) |
//!
//! Errors are MLflow's JSON (`error_code`, `message`).
use std::collections::BTreeMap;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::Access;
use super::error::{ApiError, ApiResult};
use super::store::records::{DataVersionRecord, StepCacheEntry};
use super::{AppState, Caller};

/// Largest request body: a manifest of a few million objects.
pub const MAX_BODY: usize = 512 * 1024 * 1024;

/// A DataAsset version on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataVersionJson {
    pub namespace: String,
    pub data_asset: String,
    pub version: i64,
    pub digest: String,
    pub files: i64,
    pub bytes: i64,
    pub source: String,
    /// Milliseconds since the epoch.
    pub created_at: i64,
}

impl From<DataVersionRecord> for DataVersionJson {
    fn from(r: DataVersionRecord) -> Self {
        Self {
            namespace: r.namespace,
            data_asset: r.data_asset,
            version: r.version,
            digest: r.digest,
            files: r.files,
            bytes: r.bytes,
            source: r.source,
            created_at: r.created_at,
        }
    }
}

/// A step cache entry on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepCacheJson {
    pub cache_key: String,
    pub pipeline: String,
    pub run: String,
    pub step: String,
    pub job: String,
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    #[serde(default)]
    pub created_at: i64,
}

impl From<StepCacheEntry> for StepCacheJson {
    fn from(e: StepCacheEntry) -> Self {
        Self {
            cache_key: e.cache_key,
            pipeline: e.pipeline,
            run: e.run,
            step: e.step,
            job: e.job,
            outputs: e.outputs,
            created_at: e.created_at,
        }
    }
}

impl From<StepCacheJson> for StepCacheEntry {
    fn from(e: StepCacheJson) -> Self {
        Self {
            cache_key: e.cache_key,
            pipeline: e.pipeline,
            run: e.run,
            step: e.step,
            job: e.job,
            outputs: e.outputs,
            created_at: e.created_at,
        }
    }
}

/// A JSON body, malformed ones answered as MLflow does (BAD_REQUEST).
fn body<T>(r: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    r.map(|Json(v)| v).map_err(|e| ApiError::bad_request(e.body_text()))
}

/// Query parameters, malformed ones answered as INVALID_PARAMETER_VALUE.
fn query<T>(r: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    r.map(|Query(v)| v).map_err(|e| ApiError::invalid(e.body_text()))
}

#[derive(Deserialize)]
struct RecordVersion {
    namespace: String,
    data_asset: String,
    source: String,
    digest: String,
    manifest: String,
}

async fn record_version(
    State(state): State<AppState>,
    caller: Caller,
    req: Result<Json<RecordVersion>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let req = body(req)?;
    state.auth.require_operator(&caller.0)?;
    let (version, created) = state
        .store
        .record_data_version(&req.namespace, &req.data_asset, &req.source, &req.digest, &req.manifest)
        .await?;
    Ok(Json(
        serde_json::json!({"version": DataVersionJson::from(version), "created": created}),
    ))
}

#[derive(Deserialize)]
struct ListVersions {
    namespace: String,
    data_asset: String,
    #[serde(default = "default_max_results")]
    max_results: i64,
}

fn default_max_results() -> i64 {
    100
}

async fn list_versions(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<ListVersions>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let q = query(q)?;
    state
        .auth
        .authorize_in(&caller.0, &q.namespace, "dataassets", Some(&q.data_asset), Access::Read)
        .await?;
    let versions: Vec<DataVersionJson> = state
        .store
        .data_versions(&q.namespace, &q.data_asset, q.max_results)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(serde_json::json!({ "versions": versions })))
}

#[derive(Deserialize)]
struct GetVersion {
    namespace: String,
    data_asset: String,
    version: String,
}

async fn get_version(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<GetVersion>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let q = query(q)?;
    state
        .auth
        .authorize_in(&caller.0, &q.namespace, "dataassets", Some(&q.data_asset), Access::Read)
        .await?;
    let version: i64 = q
        .version
        .parse()
        .map_err(|_| ApiError::invalid(format!("version must be a number, got {:?}", q.version)))?;
    let (record, manifest) = state.store.data_version(&q.namespace, &q.data_asset, version).await?;
    Ok(Json(
        serde_json::json!({"version": DataVersionJson::from(record), "manifest": manifest}),
    ))
}

#[derive(Deserialize)]
struct PutStep {
    namespace: String,
    entry: StepCacheJson,
}

async fn put_step(
    State(state): State<AppState>,
    caller: Caller,
    req: Result<Json<PutStep>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let req = body(req)?;
    state.auth.require_operator(&caller.0)?;
    let stored = state.store.put_step_cache(&req.namespace, req.entry.into()).await?;
    Ok(Json(serde_json::json!({"entry": StepCacheJson::from(stored)})))
}

#[derive(Deserialize)]
struct Lookup {
    namespace: String,
    #[serde(default)]
    cache_keys: Vec<String>,
}

async fn lookup_steps(
    State(state): State<AppState>,
    caller: Caller,
    req: Result<Json<Lookup>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let req = body(req)?;
    state
        .auth
        .authorize_in(&caller.0, &req.namespace, "pipelines", None, Access::Read)
        .await?;
    let entries: Vec<StepCacheJson> = state
        .store
        .lookup_step_cache(&req.namespace, &req.cache_keys)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(serde_json::json!({ "entries": entries })))
}

/// The `/api/2.0/mlplane/` routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/2.0/mlplane/data-versions/record", post(record_version))
        .route("/api/2.0/mlplane/data-versions/list", get(list_versions))
        .route("/api/2.0/mlplane/data-versions/get", get(get_version))
        .route("/api/2.0/mlplane/step-cache/put", post(put_step))
        .route("/api/2.0/mlplane/step-cache/lookup", post(lookup_steps))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}
