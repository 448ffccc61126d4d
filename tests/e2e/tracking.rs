//! Run tracking: MLflow conformance against the reference `mlflow server`
//! (the real Python client drives both), authentication and authorization
//! with real ServiceAccount tokens, and durability across `kill -9`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, DeleteParams, PostParams};
use mlplane::api::Workspace;
use mlplane_test_support::*;
use serde_json::{Value, json};

fn temp_dir(prefix: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mlplane-{prefix}-{}", random_suffix()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// POST a JSON body to the tracking API with an optional bearer token.
async fn post(http: &reqwest::Client, url: &str, token: Option<&str>, body: Value) -> Result<(u16, Value)> {
    let mut req = http.post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let code = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((code, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> Result<(u16, Value)> {
    let mut req = http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await?;
    let code = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((code, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// Runs tests/tracking/run_conformance.sh: the same script, using the real
/// mlflow client, against a fresh `mlflow server` (SQLite) and a fresh
/// `mlplane tracking` on `database_url` (None: SQLite); normalised responses
/// must match (tests/tracking/README.md).
fn conformance(database_url: Option<&str>) -> Result<()> {
    let bin = operator_binary();
    if !bin.exists() {
        bail!("{} not found: run `cargo build -p mlplane`", bin.display());
    }
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(repo_root().join("tests/tracking/run_conformance.sh"))
        .env("MLPLANE_BIN", &bin);
    if let Some(url) = database_url {
        cmd.env("MLPLANE_CONFORMANCE_DATABASE_URL", url);
    }
    let out = cmd.output().context("running tests/tracking/run_conformance.sh")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "conformance differs from the reference:\n{stdout}\n{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn conformance_with_the_reference_mlflow_server() -> Result<()> {
    conformance(None)
}

/// A throwaway PostgreSQL server (hack/postgres.sh), stopped when dropped.
struct Postgres {
    dir: PathBuf,
    url: String,
}

impl Postgres {
    fn start() -> Result<Self> {
        let dir = temp_dir("pg");
        let out = run_cmd(
            std::process::Command::new(repo_root().join("hack/postgres.sh"))
                .arg("start")
                .arg(&dir),
        )?;
        Ok(Self {
            dir,
            url: out.trim().to_string(),
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_root().join("hack/postgres.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

#[tokio::test]
async fn conformance_on_postgresql() -> Result<()> {
    // The same schema and queries on PostgreSQL give the same answers.
    let pg = Postgres::start()?;
    conformance(Some(&pg.url))
}

#[tokio::test]
async fn tokens_confine_run_pods_to_their_workspace_and_users_to_rbac() -> Result<()> {
    let admin = admin_client().await?;
    let _op = shared_operator();
    let (wa, wb, tools) = (
        format!("trk-a-{}", random_suffix()),
        format!("trk-b-{}", random_suffix()),
        format!("trk-tools-{}", random_suffix()),
    );
    // An analyst ServiceAccount outside both workspaces, Reader of workspace A.
    let tools_ns = TestNamespace::create(&admin, &tools).await?;
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), &tools_ns.name)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "analyst"}}))?,
        )
        .await?;
    create_ready_workspace(
        &admin,
        &wa,
        json!({"members": [{"kind": "ServiceAccount", "name": "analyst", "namespace": tools_ns.name, "role": "Reader"}]}),
    )
    .await?;
    create_ready_workspace(&admin, &wb, json!({})).await?;

    // The tracking server authenticates as the chart's tracking ServiceAccount,
    // so it has exactly the chart's RBAC (TokenReview, SubjectAccessReview).
    let tracking_kc = service_account_kubeconfig(&admin, OPERATOR_NAMESPACE, "mlplane-tracking").await?;
    let dir = temp_dir("auth");
    let server = TrackingServer::start(
        &format!("sqlite://{}", dir.join("t.db").display()),
        &dir.join("artifacts"),
        Some(&tracking_kc),
    )
    .await?;
    let api = format!("{}/api/2.0/mlflow", server.url());
    let http = reqwest::Client::new();

    let operator = service_account_token(&admin, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, 3600).await?;
    let run_a = service_account_token(&admin, &wa, "mlplane-run", 3600).await?;
    let run_b = service_account_token(&admin, &wb, "mlplane-run", 3600).await?;
    let analyst = service_account_token(&admin, &tools_ns.name, "analyst", 3600).await?;

    // No token: 401. A forged token: 401.
    let (code, body) = post(
        &http,
        &format!("{api}/experiments/create"),
        None,
        json!({"name": format!("{wa}/x")}),
    )
    .await?;
    assert_eq!(
        (code, body["error_code"].as_str()),
        (401, Some("UNAUTHENTICATED")),
        "{body}"
    );
    let (code, _) = get(
        &http,
        &format!("{api}/experiments/get?experiment_id=0"),
        Some("not-a-token"),
    )
    .await?;
    assert_eq!(code, 401);

    // The operator creates the experiment and a run, as it does for Experiments.
    let (code, body) = post(
        &http,
        &format!("{api}/experiments/create"),
        Some(&operator),
        json!({"name": format!("{wa}/resnet")}),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let exp_id = body["experiment_id"].as_str().context("experiment_id")?.to_string();
    let (code, body) = post(
        &http,
        &format!("{api}/runs/create"),
        Some(&operator),
        json!({"experiment_id": exp_id, "run_name": "resnet-1", "start_time": 1}),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let run_id = body["run"]["info"]["run_id"].as_str().context("run_id")?.to_string();

    // The run pod of workspace A logs to its run.
    let metric = json!({"run_id": run_id, "key": "loss", "value": 0.5, "timestamp": 1, "step": 0});
    let (code, body) = post(&http, &format!("{api}/runs/log-metric"), Some(&run_a), metric.clone()).await?;
    assert_eq!(code, 200, "{body}");
    // A run pod of workspace B may not, nor create experiments in A.
    let (code, body) = post(&http, &format!("{api}/runs/log-metric"), Some(&run_b), metric.clone()).await?;
    assert_eq!(
        (code, body["error_code"].as_str()),
        (403, Some("PERMISSION_DENIED")),
        "{body}"
    );
    let (code, _) = post(
        &http,
        &format!("{api}/experiments/create"),
        Some(&run_b),
        json!({"name": format!("{wa}/evil")}),
    )
    .await?;
    assert_eq!(code, 403);
    let (code, body) = post(
        &http,
        &format!("{api}/experiments/create"),
        Some(&run_b),
        json!({"name": format!("{wb}/own")}),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let (code, _) = get(&http, &format!("{api}/runs/get?run_id={run_id}"), Some(&run_b)).await?;
    assert_eq!(code, 403, "workspace B may not read workspace A's runs");
    // Experiments outside any workspace are the operator's alone.
    let (code, _) = get(&http, &format!("{api}/experiments/get?experiment_id=0"), Some(&run_a)).await?;
    assert_eq!(code, 403);

    // The Reader reads A's run (SubjectAccessReview on the Experiment) but cannot write.
    let (code, body) = get(&http, &format!("{api}/runs/get?run_id={run_id}"), Some(&analyst)).await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["run"]["data"]["metrics"][0]["key"], "loss");
    let (code, _) = post(&http, &format!("{api}/runs/log-metric"), Some(&analyst), metric).await?;
    assert_eq!(code, 403);
    let (code, _) = get(&http, &format!("{api}/runs/get?run_id={run_id}"), Some(&run_b)).await?;
    assert_eq!(code, 403);

    // Searches show only what the caller may read.
    let (code, body) = post(
        &http,
        &format!("{api}/experiments/search"),
        Some(&run_b),
        json!({"max_results": 100}),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let names: Vec<&str> = body["experiments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names, [format!("{wb}/own").as_str()], "{body}");

    for ws in [&wa, &wb] {
        let _ = Api::<Workspace>::all(admin.clone())
            .delete(ws, &DeleteParams::default())
            .await;
        let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
            .delete(ws, &DeleteParams::default())
            .await;
    }
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() -> Result<()> {
    let dir = temp_dir("durable");
    let db = format!("sqlite://{}", dir.join("t.db").display());
    let mut server = TrackingServer::start(&db, &dir.join("artifacts"), None).await?;
    let api = format!("{}/api/2.0/mlflow", server.url());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let (_, body) = post(
        &http,
        &format!("{api}/experiments/create"),
        None,
        json!({"name": "durability"}),
    )
    .await?;
    let exp_id = body["experiment_id"].as_str().context("experiment_id")?.to_string();
    let (_, body) = post(
        &http,
        &format!("{api}/runs/create"),
        None,
        json!({"experiment_id": exp_id}),
    )
    .await?;
    let run_id = body["run"]["info"]["run_id"].as_str().context("run_id")?.to_string();

    // Four writers log single metrics and batches; the server is killed while
    // they run. Every acknowledged step must be there after a restart.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, i64)>();
    let mut writers = vec![];
    for w in 0..4 {
        let (http, api, run_id, tx) = (http.clone(), api.clone(), run_id.clone(), tx.clone());
        writers.push(tokio::spawn(async move {
            for step in 0..100_000i64 {
                let ok = if w % 2 == 0 {
                    let m = json!({"run_id": run_id, "key": format!("m{w}"), "value": step as f64, "timestamp": step, "step": step});
                    matches!(post(&http, &format!("{api}/runs/log-metric"), None, m).await, Ok((200, _)))
                } else {
                    let metrics: Vec<Value> = (0..10)
                        .map(|i| json!({"key": format!("m{w}"), "value": 1.0, "timestamp": step, "step": step * 10 + i}))
                        .collect();
                    let b = json!({"run_id": run_id, "metrics": metrics});
                    matches!(post(&http, &format!("{api}/runs/log-batch"), None, b).await, Ok((200, _)))
                };
                if !ok {
                    return;
                }
                let _ = tx.send((format!("m{w}"), step));
            }
        }));
    }
    drop(tx);
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.kill();
    for w in writers {
        let _ = w.await;
    }
    let mut acked: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    while let Ok((k, step)) = rx.try_recv() {
        acked.entry(k).or_default().push(step);
    }
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(
        total > 50,
        "the writers got going before the kill ({total} acknowledged)"
    );

    let server = TrackingServer::start(&db, &dir.join("artifacts"), None).await?;
    let api = format!("{}/api/2.0/mlflow", server.url());
    let mut missing = 0;
    for (key, steps) in &acked {
        let (code, body) = get(
            &http,
            &format!("{api}/metrics/get-history?run_id={run_id}&metric_key={key}&max_results=1000000"),
            None,
        )
        .await?;
        assert_eq!(code, 200, "{body}");
        let stored: std::collections::HashSet<i64> = body["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                m["step"]
                    .as_i64()
                    .or_else(|| m["step"].as_str().and_then(|s| s.parse().ok()))
            })
            .collect();
        let batch = key == "m1" || key == "m3";
        for s in steps {
            let expect: Vec<i64> = if batch {
                (0..10).map(|i| s * 10 + i).collect()
            } else {
                vec![*s]
            };
            missing += expect.iter().filter(|e| !stored.contains(e)).count();
        }
    }
    eprintln!("{total} acknowledged requests before kill -9; {missing} acknowledged metrics missing after restart");
    assert_eq!(missing, 0, "acknowledged writes were lost");
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
