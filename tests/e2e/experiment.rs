//! The Experiment controller against the local control plane: the operator
//! runs out of cluster with exactly the chart's RBAC and a tracking server
//! with authentication (itself authenticating as the chart's
//! `mlplane-tracking` ServiceAccount). KWOK plays the run pods (steered by
//! `sim.mlplane.io/*` annotations through `podMetadata`); the tests play the
//! training scripts, logging metrics to the run's `MLFLOW_RUN_ID` with the
//! workspace's `mlplane-run` token.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use mlplane::api::Experiment;
use mlplane_test_support::*;
use serde_json::{Value, json};

/// The operator, its tracking server and a token of the operator (to read
/// every experiment's tracking history), shared by this binary's tests.
struct Fixture {
    tracking: TrackingServer,
    operator: Mutex<Option<Operator>>,
    operator_token: String,
}

async fn start_operator(admin: &Client, tracking_url: &str) -> Result<Operator> {
    // A lease of its own: this operator leads at once.
    let lease = format!("mlplane-exp-test-{}", random_suffix());
    Operator::start(
        admin,
        &[
            "--tracking-url",
            tracking_url,
            "--lease-name",
            &lease,
            "--resync-seconds",
            "30",
        ],
    )
    .await
}

fn fixture() -> &'static Fixture {
    static FIX: OnceLock<Fixture> = OnceLock::new();
    FIX.get_or_init(|| {
        block_on_thread(async {
            let admin = admin_client().await?;
            let tracking = authenticated_tracking_server(&admin, "exp").await?;
            let operator = start_operator(&admin, &tracking.url()).await?;
            let operator_token =
                service_account_token(&admin, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, 7200).await?;
            Ok(Fixture {
                tracking,
                operator: Mutex::new(Some(operator)),
                operator_token,
            })
        })
        .expect("the experiment test fixture starts")
    })
}

fn mlflow() -> Mlflow {
    Mlflow::new(fixture().tracking.url())
}

/// A Workspace (deleted with its namespace when dropped).
struct Ws {
    ns: String,
    run_token: String,
}

impl Drop for Ws {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "workspace", &self.ns, "--wait=false"]);
    }
}

/// A ready Workspace whose run token Secret has been filled.
async fn workspace(admin: &Client, prefix: &str) -> Result<Ws> {
    // Every test needs the operator (and the chart's RBAC) up first.
    let _ = fixture();
    let name = format!("{prefix}-{}", random_suffix());
    create_ready_workspace(admin, &name, json!({"deletionPolicy": "Delete"})).await?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &name);
    let secret = wait_for(
        &secrets,
        "mlplane-run-token",
        Duration::from_secs(30),
        "run token filled",
        |s| s.data.as_ref().is_some_and(|d| d.contains_key("token")),
    )
    .await?;
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone())?;
    Ok(Ws {
        ns: name,
        run_token: token,
    })
}

/// An Experiment: a small base spec with `spec` merged over it.
fn experiment(name: &str, spec: Value) -> Result<Experiment> {
    let mut base = json!({
        "environment": {"image": "python:3.12"},
        "command": ["python", "train.py", "--lr", "${{params.lr}}"],
        "params": {"lr": 0.1},
        "resources": {"cpu": "100m", "memory": "128Mi"},
    });
    for (k, v) in spec.as_object().context("spec is an object")? {
        base[k] = v.clone();
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "Experiment",
        "metadata": {"name": name}, "spec": base,
    }))?)
}

fn status(e: &Experiment) -> Value {
    serde_json::to_value(&e.status).unwrap_or_default()
}

fn phase(e: &Experiment) -> String {
    status(e)["phase"].as_str().unwrap_or_default().to_string()
}

fn sim(duration: &str) -> Value {
    json!({"annotations": {"sim.mlplane.io/duration": duration}})
}

fn env(job: &Job, name: &str) -> Option<String> {
    job.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

async fn wait_phase(api: &Api<Experiment>, name: &str, want: &str, secs: u64) -> Result<Experiment> {
    wait_for(api, name, Duration::from_secs(secs), &format!("phase {want}"), |e| {
        phase(e) == want
    })
    .await
}

async fn wait_job(api: &Api<Job>, name: &str) -> Result<Job> {
    wait_for(api, name, Duration::from_secs(60), "Job exists", |_| true).await
}

async fn tracking_run(run_id: &str) -> Result<Value> {
    let f = fixture();
    Ok(mlflow()
        .get(&f.operator_token, "runs/get", &[("run_id", run_id)])
        .await?["run"]
        .clone())
}

async fn event(admin: &Client, ns: &str, exp: &str, reason: &str) -> Result<()> {
    wait_for_event(
        admin,
        ns,
        Duration::from_secs(30),
        &format!("event {reason} on {exp}"),
        |e| e.reason.as_deref() == Some(reason) && e.involved_object.name.as_deref() == Some(exp),
    )
    .await
    .map(|_| ())
}

async fn jobs_of(api: &Api<Job>, exp: &str) -> Result<Vec<Job>> {
    Ok(api
        .list(&ListParams::default().labels(&format!("mlplane.io/experiment={exp}")))
        .await?
        .items)
}

#[tokio::test]
async fn single_run_succeeds_and_its_tracking_run_finishes_with_its_metrics() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-single").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.ns);
    let t0 = Instant::now();
    exps.create(
        &PostParams::default(),
        &experiment("train", json!({"podMetadata": sim("5s"), "params": {"lr": 0.05}}))?,
    )
    .await?;
    let job = wait_job(&jobs, "train-1").await?;
    eprintln!("Job train-1 created {:?} after the Experiment", t0.elapsed());
    let run_id = env(&job, "MLFLOW_RUN_ID").context("MLFLOW_RUN_ID")?;
    assert_eq!(
        env(&job, "MLFLOW_TRACKING_URI").as_deref(),
        Some(f.tracking.url().as_str())
    );
    let exp_id = env(&job, "MLFLOW_EXPERIMENT_ID").context("MLFLOW_EXPERIMENT_ID")?;
    let token_env = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "MLFLOW_TRACKING_TOKEN")
        .context("MLFLOW_TRACKING_TOKEN")?
        .clone();
    let sel = token_env.value_from.unwrap().secret_key_ref.unwrap();
    assert_eq!((sel.name.as_str(), sel.key.as_str()), ("mlplane-run-token", "token"));
    let c = &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
    assert_eq!(c.command.as_ref().unwrap(), &["python", "train.py", "--lr", "0.05"]);

    // The MLflow experiment is <ns>/<name>, and the run exists before the Job.
    let e = mlflow()
        .get(
            &f.operator_token,
            "experiments/get-by-name",
            &[("experiment_name", &format!("{}/train", ws.ns))],
        )
        .await?;
    assert_eq!(e["experiment"]["experiment_id"].as_str(), Some(exp_id.as_str()));
    // The "training script" logs with the workspace's run token.
    for (step, acc) in [(1, 0.5), (2, 0.7), (3, 0.91)] {
        mlflow()
            .log_metric(&ws.run_token, &run_id, "accuracy", acc, step)
            .await?;
    }
    let done = wait_phase(&exps, "train", "Succeeded", 60).await?;
    eprintln!("single run Succeeded {:?} after creation (pod runs 5 s)", t0.elapsed());
    let s = status(&done);
    assert_eq!(s["runs"].as_array().map(Vec::len), Some(1), "{s}");
    let run = &s["runs"][0];
    assert_eq!(run["name"], "train-1");
    assert_eq!(run["job"], "train-1");
    assert_eq!(run["phase"], "Succeeded");
    assert_eq!(run["trackingRunId"].as_str(), Some(run_id.as_str()));
    assert_eq!(run["metrics"]["accuracy"], 0.91);
    assert_eq!(run["params"]["lr"], 0.05);
    assert!(
        run["startTime"].is_string() && run["completionTime"].is_string(),
        "{run}"
    );
    assert_eq!(condition(&s, "Ready").unwrap()["status"], "True");
    assert_eq!(s["observedGeneration"], 1);

    let tr = tracking_run(&run_id).await?;
    assert_eq!(tr["info"]["status"], "FINISHED", "{tr}");
    assert!(tr["info"]["end_time"].as_i64().unwrap_or(0) > 0, "{tr}");
    let metrics = tr["data"]["metrics"].as_array().cloned().unwrap_or_default();
    assert!(
        metrics.iter().any(|m| m["key"] == "accuracy" && m["value"] == 0.91),
        "{tr}"
    );
    assert!(
        tr["data"]["params"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["key"] == "lr" && p["value"] == "0.05"),
        "{tr}"
    );

    for reason in ["RunStarted", "RunSucceeded"] {
        event(&admin, &ws.ns, "train", reason).await?;
    }
    // The kill test may be restarting the shared operator (its counters
    // start again): poll until the current process has counted a run.
    eventually(Duration::from_secs(60), "run metrics", || async {
        let guard = f.operator.lock().unwrap();
        let Some(op) = guard.as_ref() else { return Ok(None) };
        let runs = op.metric("mlplane_runs_total", &[("kind", "Experiment"), ("phase", "Succeeded")])?;
        let durations = op.metric("mlplane_run_duration_seconds_count", &[("kind", "Experiment")])?;
        Ok((runs >= 1.0 && durations >= 1.0).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn failing_run_retries_as_configured_and_ends_failed_with_its_exit_code() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-fail").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ws.ns);
    exps.create(
        &PostParams::default(),
        &experiment(
            "crash",
            json!({
                "podMetadata": {"annotations": {"sim.mlplane.io/duration": "1s", "sim.mlplane.io/exit-code": "3",
                                                 "sim.mlplane.io/termination-message": "CUDA error: out of luck"}},
                "limits": {"maxRetries": 2},
            }),
        )?,
    )
    .await?;
    let done = wait_phase(&exps, "crash", "Failed", 120).await?;
    let s = status(&done);
    let run = &s["runs"][0];
    assert_eq!(run["phase"], "Failed");
    assert_eq!(run["reason"], "ExitCode", "{run}");
    assert!(run["message"].as_str().unwrap_or_default().contains('3'), "{run}");
    let ready = condition(&s, "Ready").unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("ExitCode"))
    );
    let n = pods
        .list(&ListParams::default().labels("mlplane.io/run=crash-1"))
        .await?
        .items
        .len();
    assert_eq!(n, 3, "maxRetries 2 = 3 attempts");
    let tr = tracking_run(run["trackingRunId"].as_str().context("tracking id")?).await?;
    assert_eq!(tr["info"]["status"], "FAILED");
    event(&admin, &ws.ns, "crash", "RunFailed").await?;
    Ok(())
}

#[tokio::test]
async fn a_run_past_its_timeout_ends_deadline_exceeded() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-timeout").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    exps.create(
        &PostParams::default(),
        &experiment("slow", json!({"podMetadata": sim("120s"), "limits": {"timeout": "3s"}}))?,
    )
    .await?;
    let done = wait_phase(&exps, "slow", "Failed", 60).await?;
    let s = status(&done);
    assert_eq!(s["runs"][0]["reason"], "DeadlineExceeded", "{s}");
    assert_eq!(condition(&s, "Ready").unwrap()["reason"], "DeadlineExceeded");
    Ok(())
}

#[tokio::test]
async fn distributed_pytorch_2_nodes_x_4_processes_gets_the_right_env_on_every_pod() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-ddp").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ws.ns);
    exps.create(
        &PostParams::default(),
        &experiment(
            "ddp",
            json!({"podMetadata": sim("5s"), "command": ["torchrun", "train.py"],
                   "distribution": {"type": "PyTorch", "nodes": 2, "processesPerNode": 4}}),
        )?,
    )
    .await?;
    let svc = wait_for(
        &Api::<Service>::namespaced(admin.clone(), &ws.ns),
        "ddp-1",
        Duration::from_secs(60),
        "headless Service",
        |_| true,
    )
    .await?;
    assert_eq!(svc.spec.as_ref().unwrap().cluster_ip.as_deref(), Some("None"));
    let all = eventually(Duration::from_secs(60), "2 pods", || async {
        let l = pods
            .list(&ListParams::default().labels("mlplane.io/run=ddp-1"))
            .await?
            .items;
        Ok((l.len() == 2).then_some(l))
    })
    .await?;
    let mut ranks = BTreeSet::new();
    for p in &all {
        let index = p.annotations()["batch.kubernetes.io/job-completion-index"].clone();
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.subdomain.as_deref(), Some("ddp-1"));
        let vars: BTreeMap<String, (Option<String>, Option<String>)> = spec.containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| {
                let field = e
                    .value_from
                    .as_ref()
                    .and_then(|v| v.field_ref.as_ref())
                    .map(|f| f.field_path.clone());
                (e.name.clone(), (e.value.clone(), field))
            })
            .collect();
        let val = |k: &str| vars.get(k).and_then(|v| v.0.clone());
        assert_eq!(val("WORLD_SIZE").as_deref(), Some("8"), "{}", p.name_any());
        assert_eq!(val("MASTER_ADDR").as_deref(), Some("ddp-1-0.ddp-1"));
        assert_eq!(val("MASTER_PORT").as_deref(), Some("29500"));
        assert_eq!(val("PET_NNODES").as_deref(), Some("2"));
        assert_eq!(val("PET_NPROC_PER_NODE").as_deref(), Some("4"));
        assert_eq!(val("PET_MASTER_ADDR").as_deref(), Some("ddp-1-0.ddp-1"));
        assert_eq!(val("PET_MASTER_PORT").as_deref(), Some("29500"));
        assert!(val("MLFLOW_RUN_ID").is_some());
        for rank_var in ["NODE_RANK", "PET_NODE_RANK"] {
            let (v, field) = vars
                .get(rank_var)
                .cloned()
                .with_context(|| format!("{rank_var} missing"))?;
            // The rank is the pod's completion index (a literal, or the annotation by fieldRef).
            let ok = v.as_deref() == Some(index.as_str())
                || field.as_deref() == Some("metadata.annotations['batch.kubernetes.io/job-completion-index']");
            assert!(ok, "{rank_var} of {}: {v:?} {field:?}", p.name_any());
        }
        ranks.insert(index);
    }
    assert_eq!(ranks, BTreeSet::from(["0".to_string(), "1".to_string()]));
    wait_phase(&exps, "ddp", "Succeeded", 60).await?;
    Ok(())
}

fn job_active(j: &Job) -> bool {
    let suspended = j.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    let ended = j.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
        cs.iter()
            .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
    });
    !suspended && !ended
}

#[tokio::test]
async fn grid_sweep_never_exceeds_max_concurrent_trials_and_finds_the_best_trial() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-grid").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.ns);
    // Record the most Jobs active at once, from the watch.
    let watch_jobs = jobs.clone();
    let max_active = tokio::spawn(async move {
        let mut seen: BTreeMap<String, bool> = BTreeMap::new();
        let mut max = 0usize;
        let mut stream = std::pin::pin!(watcher(watch_jobs, watcher::Config::default()).applied_objects());
        while let Some(Ok(j)) = stream.next().await {
            seen.insert(j.name_any(), job_active(&j));
            max = max.max(seen.values().filter(|a| **a).count());
            if seen.len() == 4 && seen.values().all(|a| !a) {
                break;
            }
        }
        max
    });
    let accuracy = BTreeMap::from([("0.1", 0.71), ("0.2", 0.83), ("0.3", 0.95), ("0.4", 0.62)]);
    exps.create(
        &PostParams::default(),
        &experiment(
            "grid",
            json!({
                "podMetadata": sim("6s"),
                "sweep": {"algorithm": "Grid", "searchSpace": {"lr": {"choice": [0.1, 0.2, 0.3, 0.4]}},
                          "objective": {"metric": "accuracy", "goal": "Maximize"},
                          "limits": {"maxTrials": 4, "maxConcurrentTrials": 2}},
            }),
        )?,
    )
    .await?;
    // Play each trial's script: log its accuracy while it runs.
    let mut logged = BTreeSet::new();
    let t0 = Instant::now();
    while logged.len() < 4 {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("only {} trials started", logged.len());
        }
        for j in jobs_of(&jobs, "grid").await? {
            if logged.contains(&j.name_any()) {
                continue;
            }
            let lr = j.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
                .command
                .as_ref()
                .unwrap()[3]
                .clone();
            let run_id = env(&j, "MLFLOW_RUN_ID").context("run id")?;
            mlflow()
                .log_metric(&ws.run_token, &run_id, "accuracy", accuracy[lr.as_str()], 1)
                .await?;
            logged.insert(j.name_any());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let done = wait_phase(&exps, "grid", "Succeeded", 120).await?;
    let max = tokio::time::timeout(Duration::from_secs(30), max_active).await??;
    eprintln!(
        "grid sweep: 4 trials done {:?} after creation, at most {max} active",
        t0.elapsed()
    );
    assert!(max <= 2, "{max} trials were active at once");
    assert_eq!(max, 2, "trials ran two at a time");
    let s = status(&done);
    assert_eq!(s["runs"].as_array().map(Vec::len), Some(4));
    assert_eq!(s["bestRun"]["name"], "grid-1-t2", "{s}");
    assert_eq!(s["bestRun"]["metric"], "accuracy");
    assert_eq!(s["bestRun"]["value"], 0.95);
    assert_eq!(jobs_of(&jobs, "grid").await?.len(), 4);
    Ok(())
}

#[tokio::test]
async fn median_stopping_cancels_a_trial_worse_than_the_median() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-median").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.ns);
    exps.create(
        &PostParams::default(),
        &experiment(
            "median",
            json!({
                "podMetadata": sim("90s"),
                "sweep": {"algorithm": "Grid", "searchSpace": {"lr": {"choice": [0.1, 0.2, 0.3, 0.4]}},
                          "objective": {"metric": "accuracy", "goal": "Maximize"},
                          "limits": {"maxTrials": 4, "maxConcurrentTrials": 4},
                          "earlyTermination": {"policy": "MedianStopping", "evaluationInterval": 1, "delayEvaluation": 2}},
            }),
        )?,
    )
    .await?;
    let all = eventually(Duration::from_secs(60), "4 trials", || async {
        let l = jobs_of(&jobs, "median").await?;
        Ok((l.len() == 4).then_some(l))
    })
    .await?;
    let run_of = |name: &str| {
        all.iter()
            .find(|j| j.name_any() == name)
            .and_then(|j| env(j, "MLFLOW_RUN_ID"))
            .unwrap()
    };
    let curves = [
        ("median-1-t0", [0.5, 0.6, 0.7]),
        ("median-1-t1", [0.55, 0.65, 0.75]),
        ("median-1-t2", [0.6, 0.7, 0.8]),
        // Far below the others from the start.
        ("median-1-t3", [0.1, 0.12, 0.11]),
    ];
    let t0 = Instant::now();
    for (trial, curve) in curves {
        for (i, v) in curve.iter().enumerate() {
            mlflow()
                .log_metric(&ws.run_token, &run_of(trial), "accuracy", *v, i as i64 + 1)
                .await?;
        }
    }
    let e = wait_for(&exps, "median", Duration::from_secs(60), "t3 early-terminated", |e| {
        status(e)["runs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["name"] == "median-1-t3" && r["phase"] == "Cancelled" && r["reason"] == "EarlyTerminated")
    })
    .await?;
    eprintln!(
        "median stopping: t3 stopped {:?} after its curve was logged",
        t0.elapsed()
    );
    for r in status(&e)["runs"].as_array().unwrap() {
        if r["name"] != "median-1-t3" {
            assert_ne!(r["phase"], "Cancelled", "only t3 is stopped: {r}");
        }
    }
    let t3 = jobs.get("median-1-t3").await?;
    assert_eq!(t3.spec.as_ref().unwrap().suspend, Some(true));
    let tr = tracking_run(&run_of("median-1-t3")).await?;
    assert_eq!(tr["info"]["status"], "KILLED");
    event(&admin, &ws.ns, "median", "TrialEarlyTerminated").await?;
    Ok(())
}

#[tokio::test]
async fn rerun_by_annotation_and_by_spec_change_keeps_history() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-rerun").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.ns);
    exps.create(
        &PostParams::default(),
        &experiment("again", json!({"podMetadata": sim("1s")}))?,
    )
    .await?;
    wait_for(&exps, "again", Duration::from_secs(60), "run 1 Succeeded", |e| {
        status(e)["runs"][0]["name"] == "again-1" && phase(e) == "Succeeded"
    })
    .await?;
    exps.patch(
        "again",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"mlplane.io/rerun": "1"}}})),
    )
    .await?;
    wait_for(&exps, "again", Duration::from_secs(60), "run 2 Succeeded", |e| {
        status(e)["runs"][0]["name"] == "again-2" && phase(e) == "Succeeded"
    })
    .await?;
    exps.patch(
        "again",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"params": {"lr": 0.3}}})),
    )
    .await?;
    let e = wait_for(&exps, "again", Duration::from_secs(60), "run 3 Succeeded", |e| {
        status(e)["runs"][0]["name"] == "again-3" && phase(e) == "Succeeded"
    })
    .await?;
    let s = status(&e);
    let names: Vec<&str> = s["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["again-3", "again-2", "again-1"]);
    assert_eq!(s["runs"][0]["generation"], 2);
    assert_eq!(s["runs"][0]["params"]["lr"], 0.3);
    assert_eq!(s["runs"][1]["generation"], 1);
    assert_eq!(s["observedGeneration"], 2);
    // Converged: no further run appears.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(jobs_of(&jobs, "again").await?.len(), 3);
    Ok(())
}

#[tokio::test]
async fn suspend_cancels_the_active_run_and_keeps_history() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-suspend").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.ns);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ws.ns);
    exps.create(
        &PostParams::default(),
        &experiment("pause", json!({"podMetadata": sim("120s")}))?,
    )
    .await?;
    wait_phase(&exps, "pause", "Running", 60).await?;
    exps.patch(
        "pause",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": true}})),
    )
    .await?;
    let e = wait_phase(&exps, "pause", "Cancelled", 60).await?;
    let s = status(&e);
    assert_eq!(s["runs"][0]["reason"], "Suspended", "{s}");
    assert_eq!(condition(&s, "Ready").unwrap()["reason"], "Suspended");
    let job = jobs.get("pause-1").await?;
    assert_eq!(job.spec.as_ref().unwrap().suspend, Some(true));
    eventually(Duration::from_secs(60), "run pods gone", || async {
        let l = pods
            .list(&ListParams::default().labels("mlplane.io/run=pause-1"))
            .await?
            .items;
        Ok(l.iter()
            .all(|p| {
                p.metadata.deletion_timestamp.is_some()
                    || p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running")
            })
            .then_some(()))
    })
    .await?;
    let tr = tracking_run(s["runs"][0]["trackingRunId"].as_str().unwrap()).await?;
    assert_eq!(tr["info"]["status"], "KILLED");
    // Resuming starts a new run; the cancelled one stays in history.
    exps.patch(
        "pause",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": false}})),
    )
    .await?;
    let e = wait_for(&exps, "pause", Duration::from_secs(60), "run 2 running", |e| {
        status(e)["runs"][0]["name"] == "pause-2" && phase(e) == "Running"
    })
    .await?;
    assert_eq!(status(&e)["runs"][1]["phase"], "Cancelled");
    Ok(())
}

#[tokio::test]
async fn kill_9_during_20_running_experiments_loses_and_duplicates_nothing() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-crash").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.ns);
    let names: Vec<String> = (0..20).map(|i| format!("e{i:02}")).collect();
    for n in &names {
        exps.create(
            &PostParams::default(),
            &experiment(n, json!({"podMetadata": sim("8s")}))?,
        )
        .await?;
    }
    // Kill in the middle: some Jobs made, not all.
    let made = eventually(Duration::from_secs(60), "some Jobs", || async {
        let n = jobs.list(&ListParams::default()).await?.items.len();
        Ok((n >= 5).then_some(n))
    })
    .await?;
    let t_kill = Instant::now();
    {
        let mut op = f.operator.lock().unwrap();
        op.as_mut().unwrap().kill();
        *op = None;
    }
    eprintln!("killed the operator (-9) with {made} of 20 Jobs made");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let op = start_operator(&admin, &f.tracking.url()).await?;
    *f.operator.lock().unwrap() = Some(op);
    for n in &names {
        wait_phase(&exps, n, "Succeeded", 120).await?;
    }
    eprintln!("all 20 Succeeded {:?} after the kill", t_kill.elapsed());
    let all = jobs.list(&ListParams::default()).await?.items;
    assert_eq!(all.len(), 20, "exactly one Job per experiment");
    for n in &names {
        let e = exps.get(n).await?;
        let s = status(&e);
        assert_eq!(s["runs"].as_array().map(Vec::len), Some(1), "{n}: {s}");
        let exp_id = mlflow()
            .get(
                &f.operator_token,
                "experiments/get-by-name",
                &[("experiment_name", &format!("{}/{n}", ws.ns))],
            )
            .await?["experiment"]["experiment_id"]
            .as_str()
            .unwrap()
            .to_string();
        let runs = mlflow()
            .post(
                &f.operator_token,
                "runs/search",
                json!({"experiment_ids": [exp_id], "max_results": 100}),
            )
            .await?;
        let runs = runs["runs"].as_array().cloned().unwrap_or_default();
        assert_eq!(runs.len(), 1, "one tracking run for {n}");
        assert_eq!(runs[0]["info"]["status"], "FINISHED");
    }
    Ok(())
}

#[tokio::test]
async fn deleting_an_experiment_removes_its_jobs_and_keeps_its_tracking_history() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-delete").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.ns);
    exps.create(
        &PostParams::default(),
        &experiment("gone", json!({"podMetadata": sim("1s")}))?,
    )
    .await?;
    let e = wait_phase(&exps, "gone", "Succeeded", 60).await?;
    let run_id = status(&e)["runs"][0]["trackingRunId"].as_str().unwrap().to_string();
    exps.delete("gone", &DeleteParams::foreground()).await?;
    wait_deleted(&exps, "gone", Duration::from_secs(60)).await?;
    eventually(Duration::from_secs(60), "Jobs garbage-collected", || async {
        Ok(jobs_of(&jobs, "gone").await?.is_empty().then_some(()))
    })
    .await?;
    let tr = tracking_run(&run_id).await?;
    assert_eq!(tr["info"]["status"], "FINISHED");
    let e = mlflow()
        .get(
            &f.operator_token,
            "experiments/get-by-name",
            &[("experiment_name", &format!("{}/gone", ws.ns))],
        )
        .await?;
    assert_eq!(e["experiment"]["lifecycle_stage"], "active");
    Ok(())
}

#[tokio::test]
async fn a_missing_compute_cluster_is_ready_false_and_starts_nothing() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "exp-nocc").await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.ns);
    exps.create(
        &PostParams::default(),
        &experiment("nocc", json!({"compute": "no-such-cluster"}))?,
    )
    .await?;
    let e = wait_for(&exps, "nocc", Duration::from_secs(60), "Ready=False", |e| {
        condition(&status(e), "Ready").is_some_and(|c| c["reason"] == "ComputeClusterNotFound")
    })
    .await?;
    assert!(
        condition(&status(&e), "Ready").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("spec.compute")
    );
    assert!(jobs_of(&jobs, "nocc").await?.is_empty());
    Ok(())
}
