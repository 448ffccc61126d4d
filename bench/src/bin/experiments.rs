//! Experiment benchmark on the local cluster (`make cluster` first; `make
//! bench` does): create 1,000 Experiments and time until all 1,000 run Jobs
//! exist, against the same client creating 1,000 Jobs directly (baseline, same
//! concurrency; its namespace is then deleted and waited for, so that both
//! runs start on a quiet control plane); the operator's peak RSS; its API writes during 60 idle seconds
//! after convergence; CPU time per reconcile. Goals: at least 0.8 of the
//! direct rate, under 64 MiB, 0 writes.
//!
//! Run Jobs are counted by one watch, not by polling lists: a list of 1,000
//! Jobs every 100 ms cost the API server about 5% of its CPU during the
//! burst (pprof), which the baseline does not pay.
//!
//! With no operator running it then times the same client creating 1,000
//! Experiments alone and prints direct / (direct + that): the ratio if the
//! API server's costs of the Experiments and of the Jobs simply added, the
//! operator costing nothing. (Timing the client writing both at once, two
//! streams of 16, was tried: it came out below what the operator reaches in
//! the serving benchmark, 32 requests in flight doing worse than the
//! operator's pacing, so it bounds nothing and was dropped.)
//!
//! The operator runs as the chart's ServiceAccount (release build via
//! MLPLANE_BIN), without a tracking server, on its own Lease.

use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use mlplane_test_support::*;
use serde_json::json;

const N: usize = 1_000;
const CONCURRENCY: usize = 16;

fn experiment(name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": name},
        "spec": {
            "environment": {"image": "python:3.12-slim"},
            "command": ["python", "train.py", "--lr", "${{params.lr}}"],
            "params": {"lr": 0.01},
            "resources": {"cpu": "10m", "memory": "16Mi"},
            "podMetadata": {"annotations": {"sim.mlplane.io/duration": "1h"}},
        },
    }))
    .expect("experiment")
}

fn job(name: &str) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"annotations": {"sim.mlplane.io/duration": "1h"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "python:3.12-slim",
                "command": ["python", "train.py", "--lr", "0.01"],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}}},
    }))
    .expect("job")
}

#[tokio::main]
async fn main() -> Result<()> {
    let admin = bench_cluster().await?;
    println!("experiment benchmark: {N} Experiments vs {N} Jobs created directly, {CONCURRENCY} requests in flight");

    // Baseline: the same client creates the Jobs itself.
    let direct = TestNamespace::create(&admin, "bench-direct").await?;
    let jobs: Api<Job> = direct.api();
    let direct_secs = create_all(&jobs, N, CONCURRENCY, |i| job(&format!("direct-{i}"))).await?;
    // Their pods are still being made and run: both runs start from a
    // control plane that is done with the other's objects.
    let settle_secs = direct.delete_and_wait(&admin, Duration::from_secs(600)).await?;

    // The operator, then the Experiments.
    let lease = format!("bench-{}", random_suffix());
    let op = Operator::start(&admin, &["--lease-name", &lease]).await?;
    let pid = op.child.id();
    let ws = format!("bench-exp-{}", random_suffix());
    let wsapi: Api<mlplane::api::Workspace> = Api::all(admin.clone());
    wsapi
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "mlplane.io/v1alpha1", "kind": "Workspace", "metadata": {"name": ws}, "spec": {}}),
            )?,
        )
        .await?;
    wait_for(&wsapi, &ws, Duration::from_secs(60), "Workspace Ready", |w| {
        w.status.as_ref().is_some_and(|s| mlplane::api::is_ready(&s.conditions))
    })
    .await?;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("mlplane.io", "v1alpha1", "Experiment"),
        "experiments",
    );
    let exps: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ws, &ar);
    let run_jobs: Api<Job> = Api::namespaced(admin.clone(), &ws);
    let labels = "app.kubernetes.io/managed-by=mlplane";
    let (seen, job_watch) = watch_names(run_jobs.clone(), labels);
    // The watch's initial (empty) list is done before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu0, _) = proc_stat(pid);
    let rec0 = op.metric("mlplane_reconcile_total", &[])?;
    let start = Instant::now();
    create_all(&exps, N, CONCURRENCY, |i| experiment(&format!("exp-{i}"))).await?;
    let created_secs = start.elapsed().as_secs_f64();
    loop {
        let n = seen.lock().expect("names").len();
        if n >= N {
            break;
        }
        if start.elapsed() > Duration::from_secs(900) {
            anyhow::bail!("only {n} of {N} Jobs after 900 s; operator log:\n{}", op.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exp_secs = start.elapsed().as_secs_f64();
    job_watch.abort();
    let metrics = op.get("/metrics")?;
    let mean = |name: &str, labels: &[(&str, &str)]| {
        let sum = sum_metric(&metrics, &format!("{name}_sum"), labels);
        let count = sum_metric(&metrics, &format!("{name}_count"), labels);
        if count > 0.0 { sum / count * 1000.0 } else { 0.0 }
    };
    let mean_create_ms = mean("mlplane_kube_api_request_duration_seconds", &[("verb", "create")]);
    let mean_patch_ms = mean("mlplane_kube_api_request_duration_seconds", &[("verb", "patch")]);
    let mean_reconcile_ms = mean("mlplane_reconcile_duration_seconds", &[("kind", "Experiment")]);
    let burst_requests = op.requests_by_resource(12)?;

    // Convergence: the scheduler has looked at every run pod (bound, or
    // marked unschedulable: the benchmark's pods outnumber the nodes), so
    // no status change is still coming; then the operator's writes stop
    // changing for 10 s.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), &ws);
    loop {
        let list = pods.list(&ListParams::default().labels(labels)).await?.items;
        let looked_at = list
            .iter()
            .filter(|p| {
                p.spec.as_ref().is_some_and(|s| s.node_name.is_some())
                    || p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "PodScheduled" && c.status == "False"))
            })
            .count();
        if looked_at >= N || start.elapsed() > Duration::from_secs(900) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut last = op.writes_excluding_leases()?;
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let w = op.writes_excluding_leases()?;
        if w != last {
            last = w;
            stable_since = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(1200) {
            break;
        }
    }
    let (cpu1, _) = proc_stat(pid);
    let rec1 = op.metric("mlplane_reconcile_total", &[])?;
    let idle_w0 = op.writes_excluding_leases()?;
    let idle_r0 = op.metric("mlplane_reconcile_total", &[])?;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let idle_writes = op.writes_excluding_leases()? - idle_w0;
    let idle_reconciles = op.metric("mlplane_reconcile_total", &[])? - idle_r0;
    let (_, hwm_kib) = proc_stat(pid);

    let direct_rate = N as f64 / direct_secs;
    let exp_rate = N as f64 / exp_secs;
    let ratio = exp_rate / direct_rate;
    let cpu_per_reconcile_ms = (cpu1 - cpu0) * 1000.0 / (rec1 - rec0).max(1.0);
    println!("{:<44} {:>10}", "measure", "value");
    println!("{:<44} {:>10.2}", "direct: seconds for 1000 Jobs", direct_secs);
    println!("{:<44} {:>10.1}", "direct: Jobs/s", direct_rate);
    println!("{:<44} {:>10.1}", "  (then its namespace gone, seconds)", settle_secs);
    println!(
        "{:<44} {:>10.2}",
        "mlplane: seconds to create 1000 Experiments", created_secs
    );
    println!(
        "{:<44} {:>10.2}",
        "mlplane: seconds until all 1000 Jobs exist", exp_secs
    );
    println!("{:<44} {:>10.1}", "mlplane: Jobs/s", exp_rate);
    println!("{:<44} {:>10.0}", "reconciles while creating", rec1 - rec0);
    println!("{:<44} {:>10.1}", "  mean reconcile duration (ms)", mean_reconcile_ms);
    println!("{:<44} {:>10.1}", "  mean API create latency (ms)", mean_create_ms);
    println!("{:<44} {:>10.1}", "  mean API patch latency (ms)", mean_patch_ms);
    println!("  requests until then: {burst_requests}");
    println!("{:<44} {:>10.3}", "CPU ms per reconcile", cpu_per_reconcile_ms);
    println!("{:<44} {:>10.1}", "operator peak RSS (MiB)", hwm_kib as f64 / 1024.0);
    println!(
        "{:<44} {:>10.0}",
        "writes in 60 idle s (Lease renewals aside)", idle_writes
    );
    println!("{:<44} {:>10.0}", "reconciles in those 60 idle s", idle_reconciles);
    println!(
        "rate mlplane/direct = {ratio:.2} (goal >= 0.8: {}); peak RSS {:.1} MiB (goal < 64: {}); idle writes {idle_writes} (goal 0: {})",
        if ratio >= 0.8 { "met" } else { "NOT met" },
        hwm_kib as f64 / 1024.0,
        if hwm_kib < 64 * 1024 { "met" } else { "NOT met" },
        if idle_writes == 0.0 { "met" } else { "NOT met" },
    );

    // The rest runs with no operator, each part from a quiet control plane:
    // the Experiments' namespace (1,000 Jobs and pods) goes first.
    drop(op);
    let _ = wsapi.delete(&ws, &DeleteParams::default()).await;
    let nsapi = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone());
    let _ = nsapi.delete(&ws, &DeleteParams::default()).await;
    wait_deleted(&nsapi, &ws, Duration::from_secs(600)).await?;

    // The API server's own rate for Experiments: the same client creating
    // 1,000 of them (what the CRD's validation and storage cost).
    let floor_ns = TestNamespace::create(&admin, "bench-exp-floor").await?;
    let floor: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &floor_ns.name, &ar);
    let floor_secs = create_all(&floor, N, CONCURRENCY, |i| experiment(&format!("exp-{i}"))).await?;
    floor_ns.delete_and_wait(&admin, Duration::from_secs(600)).await?;

    println!(
        "{:<44} {:>10.2}",
        "no operator: seconds to create 1000 Experiments", floor_secs
    );
    println!(
        "if the API server's costs added: direct / (direct + Experiments alone) = {:.2}; mlplane reached {:.2} of it",
        direct_secs / (direct_secs + floor_secs),
        ratio / (direct_secs / (direct_secs + floor_secs))
    );
    Ok(())
}
