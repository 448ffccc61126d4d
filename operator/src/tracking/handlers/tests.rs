//! HTTP-level tests of the handlers: the router with auth off over a
//! temporary SQLite file and artifact root.
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::super::artifacts::Artifacts;
use super::super::auth::{Auth, AuthMode};
use super::super::store::Store;
use super::super::{AppState, router};
use crate::runtime::metrics::Metrics;

struct Server {
    app: axum::Router,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    async fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("mlplane-handlers-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::connect(&format!("sqlite://{}", dir.join("t.db").display()))
            .await
            .unwrap();
        let state = AppState {
            store,
            auth: Arc::new(Auth::new(AuthMode::Disabled, None)),
            artifacts: Arc::new(Artifacts::from_uri(dir.join("art").to_str().unwrap()).unwrap()),
            metrics: Metrics::new(),
        };
        Self {
            app: router(state),
            dir,
        }
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::post(format!("/api/2.0/mlflow/{path}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        self.send(req).await
    }

    async fn get(&self, path_and_query: &str) -> (StatusCode, Value) {
        let req = Request::get(format!("/api/2.0/mlflow/{path_and_query}"))
            .body(Body::empty())
            .unwrap();
        self.send(req).await
    }
}

#[tokio::test]
async fn the_python_clients_calls_answer_mlflows_shapes() {
    let s = Server::new().await;
    let (code, body) = s
        .post(
            "experiments/create",
            json!({"name": "e", "tags": [{"key": "k", "value": "v"}]}),
        )
        .await;
    assert_eq!((code, body), (StatusCode::OK, json!({"experiment_id": "1"})));
    let (_, body) = s.get("experiments/get-by-name?experiment_name=e").await;
    let e = &body["experiment"];
    assert_eq!(e["artifact_location"], "mlflow-artifacts:/1");
    assert_eq!(e["tags"], json!([{"key": "k", "value": "v"}]));
    assert_eq!(e["workspace"], "default");
    assert!(e["creation_time"].is_i64());

    let (code, body) = s
        .post(
            "runs/create",
            json!({"experiment_id": "1", "start_time": 1000, "user_id": "u", "tags": [{"key": "t", "value": "x"}]}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let run_id = body["run"]["info"]["run_id"].as_str().unwrap().to_string();
    assert_eq!(body["run"]["info"]["run_uuid"], run_id);
    assert_eq!(body["run"]["inputs"], json!({}));
    assert!(body["run"].get("outputs").is_none());
    assert!(body["run"]["info"].get("end_time").is_none());
    let name = body["run"]["info"]["run_name"].clone();
    assert_eq!(
        body["run"]["data"]["tags"],
        json!([{"key": "t", "value": "x"}, {"key": "mlflow.runName", "value": name}])
    );

    let (code, body) = s
        .post(
            "runs/log-batch",
            json!({"run_id": run_id, "metrics": [
                {"key": "acc", "value": 0.5, "timestamp": 1, "step": 0},
                {"key": "nan", "value": "NaN", "timestamp": 1},
                {"key": "inf", "value": "Infinity", "timestamp": "1"}
            ], "params": [{"key": "lr", "value": "0.01"}]}),
        )
        .await;
    assert_eq!((code, body), (StatusCode::OK, json!({})));
    let (code, _) = s
        .post(
            "runs/log-metric",
            json!({"run_id": run_id, "key": "acc", "value": 0.7, "timestamp": 2, "step": 1}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let (_, body) = s.get(&format!("runs/get?run_id={run_id}")).await;
    assert_eq!(body["run"]["outputs"], json!({}));
    assert_eq!(
        body["run"]["data"]["metrics"],
        json!([
            {"key": "acc", "value": 0.7, "timestamp": 2, "step": 1},
            {"key": "nan", "value": "NaN", "timestamp": 1, "step": 0},
            {"key": "inf", "value": 1.7976931348623157e308, "timestamp": 1, "step": 0}
        ])
    );
    let (_, body) = s
        .get(&format!(
            "metrics/get-history?run_id={run_id}&metric_key=acc&max_results=1"
        ))
        .await;
    assert_eq!(
        body["metrics"],
        json!([{"key": "acc", "value": 0.5, "timestamp": 1, "step": 0}])
    );
    assert_eq!(body["next_page_token"], "eyJvZmZzZXQiOiAxfQ==");
    let (_, body) = s
        .get(&format!(
            "metrics/get-history-bulk-interval?run_ids={run_id}&metric_key=acc"
        ))
        .await;
    assert_eq!(body["metrics"][1]["run_id"], run_id);

    let (_, body) = s
        .post(
            "runs/search",
            json!({"experiment_ids": ["1"], "filter": "metrics.acc > 0.6", "order_by": ["params.lr DESC"]}),
        )
        .await;
    assert_eq!(body["runs"][0]["info"]["run_id"], run_id);
    let (_, body) = s
        .post(
            "runs/search",
            json!({"experiment_ids": ["1"], "filter": "metrics.acc > 1"}),
        )
        .await;
    assert_eq!(body, json!({}));
    let (code, body) = s
        .post(
            "runs/update",
            json!({"run_id": run_id, "status": "FINISHED", "end_time": 9}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["run_info"]["status"], "FINISHED");
    assert_eq!(body["run_info"]["end_time"], 9);

    let (_, body) = s.get("experiments/search?max_results=1&order_by=name").await;
    assert_eq!(body["experiments"][0]["name"], "Default");
    assert_eq!(body["next_page_token"], "eyJvZmZzZXQiOiAxfQ==");
    let req = Request::get("/ajax-api/2.0/mlflow/experiments/get?experiment_id=1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(s.send(req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn errors_are_mlflows() {
    let s = Server::new().await;
    let (code, body) = s.get("runs/get?run_id=deadbeef").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(body["error_code"], "RESOURCE_DOES_NOT_EXIST");
    assert_eq!(body["message"], "Run with id=deadbeef not found");
    let (code, body) = s.post("experiments/create", json!({})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["message"],
        "Missing value for required parameter 'name'. See the API docs for more information about request parameters."
    );
    let req = Request::post("/api/2.0/mlflow/experiments/create")
        .header("content-type", "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    let (code, body) = s.send(req).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["message"],
        "Bad Request. Content-Type must be one of ['application/json']."
    );
    let (code, body) = s.post("experiments/create", json!({"name": "Default"})).await;
    assert_eq!(
        (code, body["error_code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("RESOURCE_ALREADY_EXISTS"))
    );
    let (code, body) = s
        .post(
            "runs/search",
            json!({"experiment_ids": ["0"], "order_by": ["metrics.a", "metrics.a DESC"]}),
        )
        .await;
    assert_eq!(
        (code, body["error_code"].as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, Some("INTERNAL_ERROR"))
    );
    let (code, body) = s
        .post("runs/search", json!({"experiment_ids": ["0"], "filter": "a.b = 1"}))
        .await;
    assert_eq!(
        (code, body["error_code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_PARAMETER_VALUE"))
    );
    let (code, body) = s.get("metrics/get-history?run_id=x&metric_key=m&max_results=0").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["message"],
        "Invalid value 0 for parameter 'max_results' supplied. It must be a positive integer."
    );
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"key": format!("k{i}"), "value": 1, "timestamp": 1}))
        .collect();
    let (code, body) = s
        .post("runs/log-batch", json!({"run_id": "abc", "metrics": many}))
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("A batch logging request can contain at most 1000")
    );
}

/// A run pod's ServiceAccount of namespace `vision` (authorized without the API server).
fn vision_run_pod() -> super::super::Caller {
    super::super::Caller(super::super::auth::Identity {
        username: "system:serviceaccount:vision:mlplane-run".into(),
        groups: vec![],
        uid: String::new(),
    })
}

#[tokio::test]
async fn searches_and_reads_respect_workspaces() {
    use axum::extract::State;

    let dir = std::env::temp_dir().join(format!("mlplane-handlers-{}", uuid::Uuid::new_v4().simple()));
    let store = Store::connect(&format!("sqlite://{}", dir.join("t.db").display()))
        .await
        .unwrap();
    let state = AppState {
        store: store.clone(),
        auth: Arc::new(Auth::new(
            AuthMode::Kubernetes {
                operator_user: "system:serviceaccount:mlplane-system:mlplane".into(),
            },
            None,
        )),
        artifacts: Arc::new(Artifacts::from_uri(dir.join("art").to_str().unwrap()).unwrap()),
        metrics: Metrics::new(),
    };
    for name in ["vision/a", "nlp/b", "vision/c"] {
        store.create_experiment(name, None, &[]).await.unwrap();
    }
    let nlp_run = store.create_run("2", "", None, 1, vec![]).await.unwrap().info.run_id;
    let req = |v: Value| super::request::MlflowRequest::from_json(v.to_string().as_bytes(), false);

    // Experiments of other workspaces (and Default) are skipped, pages stay whole.
    let Json(page) = super::experiments::search(
        State(state.clone()),
        vision_run_pod(),
        req(json!({"max_results": 1, "order_by": ["name"]})),
    )
    .await
    .unwrap();
    assert_eq!(page["experiments"][0]["name"], "vision/a");
    let token = page["next_page_token"].as_str().unwrap().to_string();
    let Json(page) = super::experiments::search(
        State(state.clone()),
        vision_run_pod(),
        req(json!({"max_results": 1, "order_by": ["name"], "page_token": token})),
    )
    .await
    .unwrap();
    assert_eq!(page["experiments"][0]["name"], "vision/c");
    assert!(page.get("next_page_token").is_none());

    // runs/search over another workspace's experiment, and reading its runs, is refused.
    let err = super::runs::search(
        State(state.clone()),
        vision_run_pod(),
        req(json!({"experiment_ids": ["2"]})),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status, StatusCode::FORBIDDEN);
    let err = super::runs::get(State(state.clone()), vision_run_pod(), req(json!({"run_id": nlp_run})))
        .await
        .unwrap_err();
    assert_eq!(err.status, StatusCode::FORBIDDEN);
    let err = super::runs::log_metric(
        State(state.clone()),
        vision_run_pod(),
        req(json!({"run_id": nlp_run, "key": "m", "value": 1, "timestamp": 1})),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status, StatusCode::FORBIDDEN);
    let err = super::experiments::create(State(state.clone()), vision_run_pod(), req(json!({"name": "nlp/x"})))
        .await
        .unwrap_err();
    assert_eq!(err.status, StatusCode::FORBIDDEN);
    // Its own workspace is fine.
    let Json(runs) = super::runs::search(
        State(state.clone()),
        vision_run_pod(),
        req(json!({"experiment_ids": ["1", "3"]})),
    )
    .await
    .unwrap();
    assert_eq!(runs, json!({}));
    let Json(created) = super::experiments::create(State(state), vision_run_pod(), req(json!({"name": "vision/d"})))
        .await
        .unwrap();
    assert_eq!(created, json!({"experiment_id": "4"}));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn mlplane_records_answer_their_json() {
    let s = Server::new().await;
    let post = |path: &str, body: Value| {
        Request::post(format!("/api/2.0/mlplane/{path}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let m = crate::storage::manifest::Manifest::new(vec![crate::storage::manifest::Entry {
        key: "a.csv".into(),
        size: 4,
        tag: "\"e\"".into(),
    }]);
    let record = json!({"namespace": "ns", "data_asset": "sales", "source": "s3://b/x/",
                        "digest": m.digest(), "manifest": m.text()});
    let (code, body) = s.send(post("data-versions/record", record.clone())).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["created"], true);
    assert_eq!(body["version"]["version"], 1);
    assert_eq!(body["version"]["files"], 1);
    let (_, body) = s.send(post("data-versions/record", record)).await;
    assert_eq!(
        (body["created"].clone(), body["version"]["version"].clone()),
        (json!(false), json!(1))
    );
    let req = Request::get("/api/2.0/mlplane/data-versions/list?namespace=ns&data_asset=sales")
        .body(Body::empty())
        .unwrap();
    let (_, body) = s.send(req).await;
    assert_eq!(body["versions"].as_array().map(Vec::len), Some(1));
    let req = Request::get("/api/2.0/mlplane/data-versions/get?namespace=ns&data_asset=sales&version=1")
        .body(Body::empty())
        .unwrap();
    let (_, body) = s.send(req).await;
    assert_eq!(body["manifest"], m.text());
    let req = Request::get("/api/2.0/mlplane/data-versions/get?namespace=ns&data_asset=sales&version=7")
        .body(Body::empty())
        .unwrap();
    let (code, body) = s.send(req).await;
    assert_eq!(
        (code, body["error_code"].clone()),
        (StatusCode::NOT_FOUND, json!("RESOURCE_DOES_NOT_EXIST"))
    );

    let entry = json!({"cache_key": "k", "pipeline": "p", "run": "1", "step": "prep", "job": "p-1-prep",
                       "outputs": {"clean": "s3://a/cache/k/clean"}});
    let (code, body) = s
        .send(post("step-cache/put", json!({"namespace": "ns", "entry": entry})))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (_, body) = s
        .send(post(
            "step-cache/lookup",
            json!({"namespace": "ns", "cache_keys": ["k", "x"]}),
        ))
        .await;
    assert_eq!(body["entries"][0]["outputs"]["clean"], "s3://a/cache/k/clean");
    assert_eq!(body["entries"].as_array().map(Vec::len), Some(1));
    let (code, body) = s.send(post("step-cache/put", json!({"namespace": "ns"}))).await;
    assert_eq!(
        (code, body["error_code"].clone()),
        (StatusCode::BAD_REQUEST, json!("BAD_REQUEST"))
    );
}
