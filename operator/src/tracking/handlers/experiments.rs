//! `experiments/*` endpoints.
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::super::auth::Access;
use super::super::error::{ApiError, ApiResult};
use super::super::search;
use super::super::store::{KeyValue, ViewType, validate};
use super::request::{Check, MlflowRequest, Ty, obj_str};
use super::{AppState, Caller, authorize_experiment, empty, json as body};

const KV: &[(&str, Ty)] = &[("key", Ty::Str), ("value", Ty::Str)];
const EXPERIMENT_ID: &[(&str, Ty)] = &[("experiment_id", Ty::Str)];
const EXPERIMENT_ID_SCHEMA: &[(&str, &[Check])] = &[("experiment_id", &[Check::Required, Check::String])];

pub async fn create(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("name", Ty::Str),
            ("artifact_location", Ty::Str),
            ("tags", Ty::MsgList(KV)),
        ],
        &[
            ("name", &[Check::Required, Check::String]),
            ("artifact_location", &[Check::String]),
            ("tags", &[Check::Array]),
        ],
    )?;
    let name = req.str("name");
    let tags: Vec<KeyValue> = req
        .objects("tags")
        .iter()
        .map(|t| KeyValue::new(obj_str(t, "key"), obj_str(t, "value")))
        .collect();
    state.auth.authorize(&caller.0, &name, Access::Write).await?;
    let location = req.opt_str("artifact_location");
    let id = state.store.create_experiment(&name, location.as_deref(), &tags).await?;
    Ok(Json(json!({ "experiment_id": id })))
}

pub async fn get(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(EXPERIMENT_ID, EXPERIMENT_ID_SCHEMA)?;
    let id = req.str("experiment_id");
    authorize_experiment(&state, &caller, &id, Access::Read).await?;
    let e = state.store.get_experiment(&id).await?;
    Ok(Json(json!({ "experiment": body::experiment(&e) })))
}

pub async fn get_by_name(
    State(state): State<AppState>,
    caller: Caller,
    mut req: MlflowRequest,
) -> ApiResult<Json<Value>> {
    req.validate(
        &[("experiment_name", Ty::Str)],
        &[("experiment_name", &[Check::Required, Check::String])],
    )?;
    let name = req.str("experiment_name");
    state.auth.authorize(&caller.0, &name, Access::Read).await?;
    let e = state
        .store
        .get_experiment_by_name(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Could not find experiment with name '{name}'")))?;
    Ok(Json(json!({ "experiment": body::experiment(&e) })))
}

pub async fn search(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(
        &[
            ("max_results", Ty::Int),
            ("page_token", Ty::Str),
            ("filter", Ty::Str),
            ("order_by", Ty::StrList),
            ("view_type", Ty::Enum),
        ],
        &[
            ("view_type", &[Check::IntLike]),
            ("max_results", &[Check::IntLike]),
            ("order_by", &[Check::Array]),
            ("filter", &[Check::String]),
            ("page_token", &[Check::String]),
        ],
    )?;
    let view = match req.opt_str("view_type") {
        None => ViewType::ActiveOnly,
        Some(v) => ViewType::parse(&v).ok_or_else(|| ApiError::invalid(format!("Invalid view_type {v:?}")))?,
    };
    let max_results = req.int("max_results").unwrap_or(0);
    let filter = req.str("filter");
    let order_by = req.strings("order_by");
    let token = req.opt_str("page_token").filter(|t| !t.is_empty());
    if !state.auth.enabled() {
        let page = state
            .store
            .search_experiments(view, max_results, &filter, &order_by, token.as_deref())
            .await?;
        let items = page.items.iter().map(body::experiment).collect();
        return Ok(Json(body::page("experiments", items, page.next_page_token)));
    }
    // With auth, experiments the caller may not read are skipped; the page
    // token counts database rows, so pages stay consistent.
    let max_results = validate::max_results(max_results)?;
    let mut offset = search::parse_page_token(token.as_deref())?;
    let mut visible = vec![];
    let mut next = None;
    'scan: loop {
        let chunk = state
            .store
            .scan_experiments(view, &filter, &order_by, offset, 200)
            .await?;
        let done = chunk.len() < 200;
        for e in chunk {
            offset += 1;
            if state.auth.authorize(&caller.0, &e.name, Access::Read).await.is_err() {
                continue;
            }
            if visible.len() == max_results {
                next = Some(search::create_page_token(offset - 1));
                break 'scan;
            }
            visible.push(e);
        }
        if done {
            break;
        }
    }
    let items = visible.iter().map(body::experiment).collect();
    Ok(Json(body::page("experiments", items, next)))
}

pub async fn update(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(
        &[("experiment_id", Ty::Str), ("new_name", Ty::Str)],
        &[
            ("experiment_id", &[Check::Required, Check::String]),
            ("new_name", &[Check::String, Check::Required]),
        ],
    )?;
    let id = req.str("experiment_id");
    let new_name = req.str("new_name");
    authorize_experiment(&state, &caller, &id, Access::Write).await?;
    state.auth.authorize(&caller.0, &new_name, Access::Write).await?;
    if !new_name.is_empty() {
        state.store.rename_experiment(&id, &new_name).await?;
    }
    Ok(empty())
}

pub async fn delete(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(EXPERIMENT_ID, EXPERIMENT_ID_SCHEMA)?;
    let id = req.str("experiment_id");
    authorize_experiment(&state, &caller, &id, Access::Write).await?;
    state.store.delete_experiment(&id).await?;
    Ok(empty())
}

pub async fn restore(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(EXPERIMENT_ID, EXPERIMENT_ID_SCHEMA)?;
    let id = req.str("experiment_id");
    authorize_experiment(&state, &caller, &id, Access::Write).await?;
    state.store.restore_experiment(&id).await?;
    Ok(empty())
}

pub async fn set_tag(State(state): State<AppState>, caller: Caller, mut req: MlflowRequest) -> ApiResult<Json<Value>> {
    req.validate(
        &[("experiment_id", Ty::Str), ("key", Ty::Str), ("value", Ty::Str)],
        &[
            ("experiment_id", &[Check::Required, Check::String]),
            ("key", &[Check::Required, Check::String]),
            ("value", &[Check::String]),
        ],
    )?;
    let id = req.str("experiment_id");
    authorize_experiment(&state, &caller, &id, Access::Write).await?;
    state
        .store
        .set_experiment_tag(&id, &req.str("key"), &req.str("value"))
        .await?;
    Ok(empty())
}

pub async fn delete_tag(
    State(state): State<AppState>,
    caller: Caller,
    mut req: MlflowRequest,
) -> ApiResult<Json<Value>> {
    req.validate(
        &[("experiment_id", Ty::Str), ("key", Ty::Str)],
        &[
            ("experiment_id", &[Check::Required, Check::String]),
            ("key", &[Check::Required, Check::String]),
        ],
    )?;
    let id = req.str("experiment_id");
    authorize_experiment(&state, &caller, &id, Access::Write).await?;
    state.store.delete_experiment_tag(&id, &req.str("key")).await?;
    Ok(empty())
}
