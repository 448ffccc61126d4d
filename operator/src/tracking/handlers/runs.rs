//! `runs/*`, `metrics/*` and `artifacts/list` endpoints.
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::super::auth::Access;
use super::super::error::{ApiError, ApiResult};
use super::super::store::{Dataset, DatasetInput, KeyValue, Metric, RunStatus, ViewType};
use super::request::{Check, JsonBody, MlflowRequest, Ty, obj_double, obj_int, obj_opt_str, obj_str};
use super::{AppState, Caller, authorize_experiment, authorize_run, empty, json as body};

const KV: &[(&str, Ty)] = &[("key", Ty::Str), ("value", Ty::Str)];
const METRIC: &[(&str, Ty)] = &[
    ("key", Ty::Str),
    ("value", Ty::Double),
    ("timestamp", Ty::Int),
    ("step", Ty::Int),
    ("dataset_name", Ty::Str),
    ("dataset_digest", Ty::Str),
    ("model_id", Ty::Str),
    ("run_id", Ty::Str),
];
const DATASET: &[(&str, Ty)] = &[
    ("name", Ty::Str),
    ("digest", Ty::Str),
    ("source_type", Ty::Str),
    ("source", Ty::Str),
    ("schema", Ty::Str),
    ("profile", Ty::Str),
];
const DATASET_INPUT: &[(&str, Ty)] = &[("tags", Ty::MsgList(KV)), ("dataset", Ty::Msg(DATASET))];
const RUN_ID: &[(&str, Ty)] = &[("run_id", Ty::Str), ("run_uuid", Ty::Str)];
const RUN_ID_SCHEMA: &[(&str, &[Check])] = &[("run_id", &[Check::Required, Check::String])];

fn key_values(req: &MlflowRequest, field: &str) -> Vec<KeyValue> {
    req.objects(field)
        .iter()
        .map(|t| KeyValue::new(obj_str(t, "key"), obj_str(t, "value")))
        .collect()
}

pub async fn create(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("experiment_id", Ty::Str),
            ("user_id", Ty::Str),
            ("run_name", Ty::Str),
            ("start_time", Ty::Int),
            ("tags", Ty::MsgList(KV)),
        ],
        &[
            ("experiment_id", &[Check::String]),
            ("start_time", &[Check::IntLike]),
            ("run_name", &[Check::String]),
        ],
    )?;
    let experiment_id = req.str("experiment_id");
    let exp_for_auth = if experiment_id.is_empty() { "0" } else { &experiment_id };
    authorize_experiment(&state, &caller, exp_for_auth, Access::Write).await?;
    let run_name = req.opt_str("run_name");
    let run = state
        .store
        .create_run(
            &experiment_id,
            &req.str("user_id"),
            run_name.as_deref(),
            req.int("start_time").unwrap_or(0),
            key_values(&req, "tags"),
        )
        .await?;
    Ok(Json(json!({ "run": body::run(&run, false) })))
}

pub async fn get(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(RUN_ID, RUN_ID_SCHEMA)?;
    let run_id = req.run_id();
    authorize_run(&state, &caller, &run_id, Access::Read).await?;
    let run = state.store.get_run(&run_id).await?;
    Ok(Json(json!({ "run": body::run(&run, true) })))
}

pub async fn update(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("run_id", Ty::Str),
            ("run_uuid", Ty::Str),
            ("status", Ty::Enum),
            ("end_time", Ty::Int),
            ("run_name", Ty::Str),
        ],
        &[
            ("run_id", &[Check::Required, Check::String]),
            ("end_time", &[Check::IntLike]),
            ("status", &[Check::String]),
            ("run_name", &[Check::String]),
        ],
    )?;
    let run_id = req.run_id();
    let status = match req.opt_str("status") {
        None => None,
        Some(s) => Some(RunStatus::parse(&s).ok_or_else(|| {
            ApiError::invalid(format!(
                "Invalid value {s:?} for parameter 'status' supplied. See the API docs for more information about \
                 request parameters."
            ))
        })?),
    };
    authorize_run(&state, &caller, &run_id, Access::Write).await?;
    let run_name = req.opt_str("run_name");
    let info = state
        .store
        .update_run(&run_id, status, req.int("end_time"), run_name.as_deref())
        .await?;
    Ok(Json(json!({ "run_info": body::run_info(&info) })))
}

pub async fn delete(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(RUN_ID, RUN_ID_SCHEMA)?;
    let run_id = req.str("run_id");
    authorize_run(&state, &caller, &run_id, Access::Write).await?;
    state.store.delete_run(&run_id).await?;
    Ok(empty())
}

pub async fn restore(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(RUN_ID, RUN_ID_SCHEMA)?;
    let run_id = req.str("run_id");
    authorize_run(&state, &caller, &run_id, Access::Write).await?;
    state.store.restore_run(&run_id).await?;
    Ok(empty())
}

pub async fn search(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("experiment_ids", Ty::StrList),
            ("filter", Ty::Str),
            ("run_view_type", Ty::Enum),
            ("max_results", Ty::Int),
            ("order_by", Ty::StrList),
            ("page_token", Ty::Str),
        ],
        &[
            ("experiment_ids", &[Check::Array]),
            ("filter", &[Check::String]),
            ("max_results", &[Check::IntLike, Check::AtMost(50_000)]),
            ("order_by", &[Check::Array, Check::ItemsString]),
        ],
    )?;
    let experiment_ids = req.strings("experiment_ids");
    let view = match req.opt_str("run_view_type") {
        None => ViewType::ActiveOnly,
        Some(v) => ViewType::parse(&v).ok_or_else(|| ApiError::invalid(format!("Invalid run_view_type {v:?}")))?,
    };
    for id in &experiment_ids {
        authorize_experiment(&state, &caller, id, Access::Read).await?;
    }
    let token = req.opt_str("page_token").filter(|t| !t.is_empty());
    let page = state
        .store
        .search_runs(
            &experiment_ids,
            &req.str("filter"),
            view,
            &req.strings("order_by"),
            req.int("max_results").unwrap_or(1000),
            token.as_deref(),
        )
        .await?;
    let items = page.items.iter().map(|r| body::run(r, true)).collect();
    Ok(Json(body::page("runs", items, page.next_page_token)))
}

pub async fn log_metric(
    State(state): State<AppState>,
    caller: Caller,
    mut req: MlflowRequest,
) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("run_id", Ty::Str),
            ("run_uuid", Ty::Str),
            ("key", Ty::Str),
            ("value", Ty::Double),
            ("timestamp", Ty::Int),
            ("step", Ty::Int),
            ("model_id", Ty::Str),
            ("dataset_name", Ty::Str),
            ("dataset_digest", Ty::Str),
        ],
        &[
            ("run_id", &[Check::Required, Check::String]),
            ("key", &[Check::Required, Check::String]),
            ("value", &[Check::Required, Check::FloatLike]),
            ("timestamp", &[Check::IntLike, Check::Required]),
            ("step", &[Check::IntLike]),
            ("model_id", &[Check::String]),
            ("dataset_name", &[Check::String]),
            ("dataset_digest", &[Check::String]),
        ],
    )?;
    let run_id = req.run_id();
    authorize_run(&state, &caller, &run_id, Access::Write).await?;
    let metric = Metric {
        key: req.str("key"),
        value: req.double("value").unwrap_or(0.0),
        timestamp: req.int("timestamp").unwrap_or(0),
        step: req.int("step").unwrap_or(0),
    };
    state.store.log_metric(&run_id, metric).await?;
    Ok(empty())
}

pub async fn log_param(
    State(state): State<AppState>,
    caller: Caller,
    mut req: MlflowRequest,
) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("run_id", Ty::Str),
            ("run_uuid", Ty::Str),
            ("key", Ty::Str),
            ("value", Ty::Str),
        ],
        &[
            ("run_id", &[Check::Required, Check::String]),
            ("key", &[Check::Required, Check::String]),
            ("value", &[Check::String]),
        ],
    )?;
    let run_id = req.run_id();
    authorize_run(&state, &caller, &run_id, Access::Write).await?;
    state
        .store
        .log_param(&run_id, &req.str("key"), &req.str("value"))
        .await?;
    Ok(empty())
}

pub async fn set_tag(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("run_id", Ty::Str),
            ("run_uuid", Ty::Str),
            ("key", Ty::Str),
            ("value", Ty::Str),
        ],
        &[
            ("run_id", &[Check::Required, Check::String]),
            ("key", &[Check::Required, Check::String]),
            ("value", &[Check::String]),
        ],
    )?;
    let run_id = req.run_id();
    authorize_run(&state, &caller, &run_id, Access::Write).await?;
    state.store.set_tag(&run_id, &req.str("key"), &req.str("value")).await?;
    Ok(empty())
}

pub async fn delete_tag(
    State(state): State<AppState>,
    caller: Caller,
    mut req: MlflowRequest,
) -> ApiResult<Json<Value>> {
    req.validate(
        &[("run_id", Ty::Str), ("key", Ty::Str)],
        &[
            ("run_id", &[Check::Required, Check::String]),
            ("key", &[Check::Required, Check::String]),
        ],
    )?;
    let run_id = req.str("run_id");
    authorize_run(&state, &caller, &run_id, Access::Write).await?;
    state.store.delete_tag(&run_id, &req.str("key")).await?;
    Ok(empty())
}

/// The common shape of a log-batch body, read without building a JSON tree
/// (the hot path of training scripts); anything else takes the general path.
#[derive(serde::Deserialize)]
struct FastBatch<'a> {
    #[serde(borrow)]
    run_id: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    metrics: Vec<FastMetric<'a>>,
    #[serde(default, borrow)]
    params: Vec<FastKeyValue<'a>>,
    #[serde(default, borrow)]
    tags: Vec<FastKeyValue<'a>>,
}

#[derive(serde::Deserialize)]
struct FastMetric<'a> {
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    value: f64,
    timestamp: i64,
    #[serde(default)]
    step: i64,
}

#[derive(serde::Deserialize)]
struct FastKeyValue<'a> {
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    value: std::borrow::Cow<'a, str>,
}

impl FastBatch<'_> {
    /// Whether MLflow's schema checks would pass (non-empty keys and run id).
    fn plain(&self) -> bool {
        !self.run_id.is_empty()
            && self.metrics.iter().all(|m| !m.key.is_empty())
            && self.params.iter().all(|p| !p.key.is_empty())
            && self.tags.iter().all(|t| !t.key.is_empty())
    }
}

pub async fn log_batch(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    if let Ok(fast) = serde_json::from_slice::<FastBatch>(&body)
        && fast.plain()
    {
        authorize_run(&state, &caller, &fast.run_id, Access::Write).await?;
        let metrics = fast
            .metrics
            .into_iter()
            .map(|m| Metric {
                key: m.key.into_owned(),
                value: m.value,
                timestamp: m.timestamp,
                step: m.step,
            })
            .collect();
        let kv = |items: Vec<FastKeyValue>| {
            items
                .into_iter()
                .map(|t| KeyValue::new(t.key.into_owned(), t.value.into_owned()))
                .collect::<Vec<_>>()
        };
        state
            .store
            .log_batch(&fast.run_id, metrics, kv(fast.params), kv(fast.tags))
            .await?;
        return Ok(empty());
    }
    let mut req = MlflowRequest::from_json(&body, false);
    req.validate(
        &[
            ("run_id", Ty::Str),
            ("metrics", Ty::MsgList(METRIC)),
            ("params", Ty::MsgList(KV)),
            ("tags", Ty::MsgList(KV)),
        ],
        &[
            ("run_id", &[Check::String, Check::Required]),
            ("metrics", &[Check::Array, Check::MetricFields]),
            ("params", &[Check::Array, Check::KeyFields("params")]),
            ("tags", &[Check::Array, Check::KeyFields("tags")]),
        ],
    )?;
    let run_id = req.str("run_id");
    authorize_run(&state, &caller, &run_id, Access::Write).await?;
    let metrics = req
        .objects("metrics")
        .iter()
        .map(|m| Metric {
            key: obj_str(m, "key"),
            value: obj_double(m, "value").unwrap_or(0.0),
            timestamp: obj_int(m, "timestamp").unwrap_or(0),
            step: obj_int(m, "step").unwrap_or(0),
        })
        .collect();
    state
        .store
        .log_batch(&run_id, metrics, key_values(&req, "params"), key_values(&req, "tags"))
        .await?;
    Ok(empty())
}

pub async fn log_inputs(
    State(state): State<AppState>,
    caller: Caller,
    mut req: MlflowRequest,
) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("run_id", Ty::Str),
            ("datasets", Ty::MsgList(DATASET_INPUT)),
            ("models", Ty::MsgList(&[("model_id", Ty::Str)])),
        ],
        &[
            ("run_id", &[Check::Required, Check::String]),
            ("datasets", &[Check::Array]),
            ("models", &[Check::Array]),
        ],
    )?;
    let run_id = req.str("run_id");
    authorize_run(&state, &caller, &run_id, Access::Write).await?;
    let mut datasets = vec![];
    for d in req.objects("datasets") {
        let ds = d.get("dataset").and_then(Value::as_object).cloned().unwrap_or_default();
        let tags = d
            .get("tags")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_object)
                    .map(|t| KeyValue::new(obj_str(t, "key"), obj_str(t, "value")))
                    .collect()
            })
            .unwrap_or_default();
        datasets.push(DatasetInput {
            tags,
            dataset: Dataset {
                name: obj_str(&ds, "name"),
                digest: obj_str(&ds, "digest"),
                source_type: obj_str(&ds, "source_type"),
                source: obj_str(&ds, "source"),
                schema: obj_opt_str(&ds, "schema"),
                profile: obj_opt_str(&ds, "profile"),
            },
        });
    }
    // Model inputs refer to logged models, which this server does not keep:
    // accepted and ignored.
    state.store.log_inputs(&run_id, datasets).await?;
    Ok(empty())
}

pub async fn get_metric_history(
    State(state): State<AppState>,
    caller: Caller,
    mut req: MlflowRequest,
) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("run_id", Ty::Str),
            ("run_uuid", Ty::Str),
            ("metric_key", Ty::Str),
            ("page_token", Ty::Str),
            ("max_results", Ty::Int),
        ],
        &[
            ("run_id", &[Check::String, Check::Required]),
            ("metric_key", &[Check::String, Check::Required]),
            ("page_token", &[Check::String]),
        ],
    )?;
    let run_id = req.run_id();
    let max_results = match req.int("max_results") {
        None => None,
        Some(n) if n <= 0 => {
            return Err(ApiError::invalid(format!(
                "Invalid value {n} for parameter 'max_results' supplied. It must be a positive integer."
            )));
        }
        Some(n) => Some(n as usize),
    };
    authorize_run(&state, &caller, &run_id, Access::Read).await?;
    let token = req.opt_str("page_token").filter(|t| !t.is_empty());
    let page = state
        .store
        .get_metric_history(&run_id, &req.str("metric_key"), max_results, token.as_deref())
        .await?;
    let items = page.items.iter().map(body::metric).collect();
    Ok(Json(body::page("metrics", items, page.next_page_token)))
}

const MAX_RUNS_GET_METRIC_HISTORY_BULK: usize = 100;
const MAX_RESULTS_PER_RUN: i64 = 2500;

pub async fn get_metric_history_bulk_interval(
    State(state): State<AppState>,
    caller: Caller,
    mut req: MlflowRequest,
) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("run_ids", Ty::StrList),
            ("metric_key", Ty::Str),
            ("start_step", Ty::Int),
            ("end_step", Ty::Int),
            ("max_results", Ty::Int),
        ],
        &[
            ("run_ids", &[Check::Required, Check::Array, Check::ItemsString]),
            ("metric_key", &[Check::Required, Check::String]),
            ("start_step", &[Check::IntLike]),
            ("end_step", &[Check::IntLike]),
            ("max_results", &[Check::IntLike]),
        ],
    )?;
    let run_ids = req.strings("run_ids");
    if run_ids.len() > MAX_RUNS_GET_METRIC_HISTORY_BULK {
        return Err(ApiError::invalid(format!(
            "GetMetricHistoryBulkInterval request must specify at most {MAX_RUNS_GET_METRIC_HISTORY_BULK} run_ids. \
             Received {} run_ids. See the API docs for more information about request parameters.",
            run_ids.len()
        )));
    }
    let max_results = req.int("max_results").unwrap_or(MAX_RESULTS_PER_RUN);
    if !(1..=MAX_RESULTS_PER_RUN).contains(&max_results) {
        return Err(ApiError::invalid(format!(
            "max_results must be between 1 and {MAX_RESULTS_PER_RUN}. See the API docs for more information about \
             request parameters."
        )));
    }
    let steps = match (req.int("start_step"), req.int("end_step")) {
        (Some(start), Some(end)) if start > end => {
            return Err(ApiError::invalid(format!(
                "end_step must be greater than start_step. Found start_step={start} and end_step={end}."
            )));
        }
        (Some(start), Some(end)) => Some((start, end)),
        (None, None) => None,
        _ => {
            return Err(ApiError::invalid(
                "If either start step or end step are specified, both must be specified.",
            ));
        }
    };
    for id in &run_ids {
        authorize_run(&state, &caller, id, Access::Read).await?;
    }
    let metrics = state
        .store
        .get_metric_history_bulk_interval(&run_ids, &req.str("metric_key"), max_results as usize, steps)
        .await?;
    let items = metrics.iter().map(body::run_metric).collect();
    Ok(Json(body::page("metrics", items, None)))
}

/// `artifacts/list`: a run's artifacts (runs whose artifacts are served by
/// this server's proxy, `mlflow-artifacts:/...`).
pub async fn list_artifacts(
    State(state): State<AppState>,
    caller: Caller,
    mut req: MlflowRequest,
) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("run_id", Ty::Str),
            ("run_uuid", Ty::Str),
            ("path", Ty::Str),
            ("page_token", Ty::Str),
        ],
        &[
            ("run_id", &[Check::String, Check::Required]),
            ("path", &[Check::String]),
            ("page_token", &[Check::String]),
        ],
    )?;
    let run_id = req.run_id();
    let path = req.opt_str("path");
    if let Some(p) = &path
        && (p.contains('#') || p.contains('\\') || p.starts_with('/') || p.split('/').any(|s| s == ".."))
    {
        return Err(ApiError::invalid("Invalid path"));
    }
    authorize_run(&state, &caller, &run_id, Access::Read).await?;
    let run = state.store.get_run(&run_id).await?;
    let root = run.info.artifact_uri.clone();
    let mut out = serde_json::Map::new();
    out.insert("root_uri".into(), json!(root));
    if let Some(rest) = root.strip_prefix("mlflow-artifacts:") {
        let rel = path.clone().unwrap_or_default();
        let dir = format!("{}/{}", rest.trim_matches('/'), rel.trim_matches('/'));
        let files: Vec<Value> = state
            .artifacts
            .list(&dir)
            .await?
            .into_iter()
            .map(|(name, is_dir, size)| {
                let p = match &path {
                    Some(r) if !r.is_empty() => format!("{}/{name}", r.trim_end_matches('/')),
                    _ => name,
                };
                match size {
                    Some(s) if !is_dir => json!({"path": p, "is_dir": false, "file_size": s}),
                    _ => json!({"path": p, "is_dir": true}),
                }
            })
            .collect();
        if !files.is_empty() {
            out.insert("files".into(), Value::Array(files));
        }
    }
    Ok(Json(Value::Object(out)))
}
