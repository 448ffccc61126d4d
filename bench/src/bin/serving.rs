//! Serving benchmark on the local cluster (`make cluster` first; `make
//! bench` does): create 500 ModelDeployments and time until all 500 serving
//! Deployments exist, against the same client creating the same 500
//! Deployments directly (baseline, same concurrency; the objects come from
//! the operator's own builder). The pair is timed in 5 rounds
//! (`MLPLANE_BENCH_ROUNDS`), each half from a quiet control plane (the
//! other's namespace deleted and waited for) and each round with a fresh
//! operator; the goal is judged on the median of the rounds' ratios. The
//! same 500 Deployments by server-side apply are timed once, as the
//! operator updates them. After the last round: convergence, the operator's
//! API writes during 60 idle seconds, and the API server's own rate for
//! ModelDeployments (the same client, no operator running). Goals: at least
//! 0.8 of the direct rate, 0 writes.
//!
//! Serving Deployments are counted by one metadata-only watch, not by
//! polling lists (which cost the API server CPU the baseline does not pay).
//! It prints direct / (direct + ModelDeployments alone), and the same with
//! the Deployments applied: the ratios if the API server's costs simply
//! added, the operator costing nothing. (A minimal controller in this
//! process, one ModelDeployment watch and a create per ModelDeployment with
//! 16 or 32 in flight, was tried as a ceiling: it was slower than the
//! operator in 7 of 8 rounds, 0.63-0.84 of the direct rate, so it bounds
//! nothing and was dropped.)
//!
//! The operator runs as the chart's ServiceAccount (release build via
//! MLPLANE_BIN), on its own Lease, with the Gateway API CRDs installed (so
//! every ModelDeployment also gets its HTTPRoute). Eight extra simulated
//! nodes hold the 1,000 pods, and a ServiceCIDR the 1,000 Services (the local
//! cluster's own range is a /24); both are removed at the end.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use mlplane::api::ModelDeployment;
use mlplane::controllers::model_deployment::build::deployment::{ServingInput, build};
use mlplane::controllers::model_deployment::resolve::resolve;
use mlplane::controllers::model_deployment::runtime::RuntimeCatalog;
use mlplane_test_support::*;
use serde_json::json;

/// ModelDeployments (and direct Deployments); `MLPLANE_BENCH_N` overrides.
fn n() -> usize {
    env_or("MLPLANE_BENCH_N", 500)
}

const CONCURRENCY: usize = 16;
const BENCH_NODES: usize = 8;
const NODE_LABEL: &str = "mlplane.io/bench";
/// Room for the benchmark's Services.
const SERVICE_CIDR: &str = "172.20.0.0/16";

fn model_deployment(name: &str) -> ModelDeployment {
    serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"deployments": [{
            "name": "main",
            "model": {"uri": format!("s3://models/{name}/1/"), "format": "ONNX"},
            "scale": {"instanceCount": 1},
            "resources": {"cpu": "10m", "memory": "16Mi"},
        }]},
    }))
    .expect("model deployment")
}

/// The Deployment the operator makes for `model_deployment(name)`, built by
/// its own builder (without the ownerReference).
fn direct_deployment(name: &str) -> Deployment {
    let md = model_deployment(name);
    let d = &md.spec.deployments[0];
    let runtime = RuntimeCatalog::builtin().resolve(d, 0).expect("runtime");
    let model = resolve(&d.model, "spec.deployments[0].model", "", None, None, None)
        .pin
        .expect("a URI model");
    build(&ServingInput {
        md: &md,
        deployment: d,
        runtime: &runtime,
        model: &model,
        credentials: None,
        fetch_image: "ghcr.io/mlplane/mlplane:0.1.0",
        progress_deadline_seconds: 600,
        autoscaled: false,
    })
}

fn bench_node(i: usize) -> Node {
    let name = format!("bench-serving-{i}");
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                     "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok", NODE_LABEL: "serving"}},
        "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
                   "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"}},
    }))
    .expect("node")
}

/// Like `create_all`, by server-side apply with the operator's field manager
/// (how the operator updates a child; it creates new ones by POST).
async fn apply_all<K, F>(api: &Api<K>, make: F) -> Result<f64>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
    F: Fn(usize) -> K,
{
    let start = Instant::now();
    let pp = PatchParams::apply("mlplane").force();
    let results: Vec<Result<K, kube::Error>> = stream::iter((0..n()).map(make))
        .map(|obj| {
            let (api, pp) = (api.clone(), pp.clone());
            async move {
                let name = obj.meta().name.clone().unwrap_or_default();
                api.patch(&name, &pp, &Patch::Apply(&obj)).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Rounds of the timed pair (direct, then through the operator); the
/// goal is judged on the median ratio. `MLPLANE_BENCH_ROUNDS` overrides.
fn rounds() -> usize {
    const ROUNDS: usize = 5;
    match env_or("MLPLANE_BENCH_ROUNDS", ROUNDS) {
        0 => ROUNDS,
        r => r,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The baseline of a round: the client creates the Deployments itself.
/// Returns the seconds for the creates and for their namespace to go (their
/// ReplicaSets and pods are still being made: the operator's half of the
/// round starts from a control plane done with them).
async fn direct_round(admin: &kube::Client) -> Result<(f64, f64)> {
    let direct = TestNamespace::create(admin, "bench-serving-direct").await?;
    let secs = create_all(&direct.api::<Deployment>(), n(), CONCURRENCY, |i| {
        direct_deployment(&format!("md-{i}"))
    })
    .await?;
    let settle_secs = direct.delete_and_wait(admin, Duration::from_secs(600)).await?;
    Ok((secs, settle_secs))
}

/// The operator's half of a round, until every Deployment exists.
struct MlplaneRound {
    op: Operator,
    ns: TestNamespace,
    /// Seconds the client took to create the ModelDeployments.
    created_secs: f64,
    /// Seconds until every Deployment existed.
    secs: f64,
    /// Deployments that existed when the last ModelDeployment was created.
    existing_when_created: usize,
    /// The operator's CPU seconds until every Deployment existed.
    cpu_secs: f64,
    /// What competed with the Deployment creates at the API server.
    requests: String,
}

/// A fresh operator (its own Lease), then the ModelDeployments; serving
/// Deployments are counted by one watch.
async fn mlplane_round(admin: &kube::Client) -> Result<MlplaneRound> {
    let big_n = n();
    let lease = format!("bench-{}", random_suffix());
    let op = Operator::start(admin, &["--lease-name", &lease]).await?;
    let ns = TestNamespace::create(admin, "bench-serving").await?;
    let mds: Api<ModelDeployment> = ns.api();
    let (seen, deployment_watch) = watch_names(
        ns.api::<PartialObjectMeta<Deployment>>(),
        "app.kubernetes.io/managed-by=mlplane",
    );
    // The watch's initial (empty) list is done before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu0, _) = proc_stat(op.child.id());
    let start = Instant::now();
    let created_secs = create_all(&mds, big_n, CONCURRENCY, |i| model_deployment(&format!("md-{i}"))).await?;
    let existing_when_created = seen.lock().expect("names").len();
    loop {
        let n = seen.lock().expect("names").len();
        if n >= big_n {
            break;
        }
        if start.elapsed() > Duration::from_secs(900) {
            anyhow::bail!(
                "only {n} of {big_n} Deployments after 900 s; operator log:\n{}",
                op.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let (cpu1, _) = proc_stat(op.child.id());
    deployment_watch.abort();
    let requests = op.requests_by_resource(12)?;
    Ok(MlplaneRound {
        op,
        ns,
        created_secs,
        secs,
        existing_when_created,
        cpu_secs: cpu1 - cpu0,
        requests,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let admin = bench_cluster().await?;
    install_gateway_api_crds()?;
    let idle_secs: u64 = env_or("MLPLANE_BENCH_IDLE_SECONDS", 60);
    let big_n = n();
    let rounds = rounds();
    println!(
        "serving benchmark: {big_n} ModelDeployments vs {big_n} Deployments created directly, {CONCURRENCY} requests in flight, {rounds} rounds"
    );
    let nodes: Api<Node> = Api::all(admin.clone());
    for i in 0..BENCH_NODES {
        let _ = nodes.create(&PostParams::default(), &bench_node(i)).await;
    }
    let cidrs: Api<ServiceCIDR> = Api::all(admin.clone());
    let cidr: ServiceCIDR = serde_json::from_value(json!({
        "metadata": {"name": "bench-serving"}, "spec": {"cidrs": [SERVICE_CIDR]},
    }))?;
    let _ = cidrs.create(&PostParams::default(), &cidr).await;

    // The Deployments by server-side apply: what the API server's share of
    // the operator's Deployment writes costs.
    let applied = TestNamespace::create(&admin, "bench-serving-apply").await?;
    let apply_secs = apply_all(&applied.api::<Deployment>(), |i| direct_deployment(&format!("md-{i}"))).await?;
    applied.delete_and_wait(&admin, Duration::from_secs(600)).await?;

    // Rounds of the pair, each half from a quiet control plane. The
    // machine's speed drifts between minutes (the baseline alone moved
    // between 4.9 and 6.7 s in a day), so each ratio compares neighbours
    // and the goal is judged on their median. Every round but the last is
    // torn down with its operator stopped; the last goes on to convergence.
    let mut pairs = Vec::new();
    let mut last = None;
    for round in 1..=rounds {
        let (direct_secs, settle_secs) = direct_round(&admin).await?;
        let m = mlplane_round(&admin).await?;
        println!(
            "round {round}: direct {direct_secs:.2} s (namespace gone after {settle_secs:.1} s); mlplane {:.2} s (ModelDeployments created in {:.2} s, {} Deployments existing then; operator CPU {:.2} s): ratio {:.2}",
            m.secs,
            m.created_secs,
            m.existing_when_created,
            m.cpu_secs,
            direct_secs / m.secs
        );
        println!("  requests until all Deployments existed: {}", m.requests);
        pairs.push((direct_secs, m.secs));
        if round < rounds {
            let MlplaneRound { op, ns, .. } = m;
            drop(op);
            ns.delete_and_wait(&admin, Duration::from_secs(600)).await?;
        } else {
            last = Some(m);
        }
    }
    let MlplaneRound { op, ns, .. } = last.expect("at least one round");
    let mds: Api<ModelDeployment> = ns.api();
    let rec0 = op.metric("mlplane_reconcile_total", &[("kind", "ModelDeployment")])?;

    // Convergence: the operator's writes stop changing for 10 s.
    let start = Instant::now();
    let converged = op
        .wait_writes_settle(Duration::from_secs(10), Duration::from_secs(1200))
        .await?;
    let converged_secs = start.elapsed().as_secs_f64();
    let writes_to_converge = op.writes_excluding_leases()?;
    let rec1 = op.metric("mlplane_reconcile_total", &[("kind", "ModelDeployment")])?;
    let ready = mds
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|m| m.status.as_ref().is_some_and(|s| mlplane::api::is_ready(&s.conditions)))
        .count();
    let idle_w0 = op.writes_excluding_leases()?;
    let idle_r0 = op.metric("mlplane_reconcile_total", &[("kind", "ModelDeployment")])?;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_writes = op.writes_excluding_leases()? - idle_w0;
    let idle_reconciles = op.metric("mlplane_reconcile_total", &[("kind", "ModelDeployment")])? - idle_r0;

    let direct_secs = median(pairs.iter().map(|p| p.0).collect());
    let md_secs = median(pairs.iter().map(|p| p.1).collect());
    let ratios: Vec<f64> = pairs.iter().map(|(d, m)| d / m).collect();
    let ratio = median(ratios.clone());
    println!("{:<52} {:>10}", "measure (median of the rounds)", "value");
    println!(
        "{:<52} {:>10.2}",
        format!("direct: seconds for {big_n} Deployments"),
        direct_secs
    );
    println!("{:<52} {:>10.1}", "direct: Deployments/s", big_n as f64 / direct_secs);
    println!(
        "{:<52} {:>10.2}",
        format!("direct by server-side apply: seconds for {big_n}"),
        apply_secs
    );
    println!(
        "{:<52} {:>10.2}",
        format!("mlplane: seconds until all {big_n} Deployments exist"),
        md_secs
    );
    println!("{:<52} {:>10.1}", "mlplane: Deployments/s", big_n as f64 / md_secs);
    println!(
        "{:<52} {:>10.1}{}",
        "then seconds until converged (writes stop)",
        converged_secs,
        if converged { "" } else { " (did not settle)" }
    );
    println!("{:<52} {:>10.0}", "operator writes until converged", writes_to_converge);
    println!(
        "{:<52} {:>10.0}",
        "reconciles after all Deployments existed",
        rec1 - rec0
    );
    println!("{:<52} {:>10}", "ModelDeployments Ready when converged", ready);
    println!(
        "{:<52} {:>10.0}",
        format!("writes in {idle_secs} idle s (Lease renewals aside)"),
        idle_writes
    );
    println!(
        "{:<52} {:>10.0}",
        format!("reconciles in those {idle_secs} idle s"),
        idle_reconciles
    );
    println!("requests until converged: {}", op.requests_by_resource(12)?);
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "rate mlplane/direct = {ratio:.2}, median of {} rounds ({}) (goal >= 0.8: {}); idle writes {idle_writes} (goal 0: {})",
        ratios.len(),
        each.join(", "),
        if ratio >= 0.8 { "met" } else { "NOT met" },
        if idle_writes == 0.0 { "met" } else { "NOT met" },
    );

    // The rest runs with no operator, each part from a quiet control plane:
    // the ModelDeployments' namespace goes first.
    drop(op);
    let teardown_secs = ns.delete_and_wait(&admin, Duration::from_secs(600)).await?;
    println!(
        "{:<52} {:>10.1}",
        "  (the ModelDeployments' namespace gone, seconds)", teardown_secs
    );

    // The API server's own rate for ModelDeployments: the same client
    // creating them (what the CRD's validation and storage cost).
    let floor_ns = TestNamespace::create(&admin, "bench-serving-floor").await?;
    let floor_secs = create_all(&floor_ns.api::<ModelDeployment>(), n(), CONCURRENCY, |i| {
        model_deployment(&format!("md-{i}"))
    })
    .await?;
    floor_ns.delete_and_wait(&admin, Duration::from_secs(600)).await?;
    println!(
        "{:<52} {:>10.2}",
        format!("no operator: seconds to create {big_n} ModelDeployments"),
        floor_secs
    );
    println!(
        "if the API server's costs added: direct / (direct + ModelDeployments alone) = {:.2}; with the Deployments applied, direct / (applied + ModelDeployments alone) = {:.2}",
        direct_secs / (direct_secs + floor_secs),
        direct_secs / (apply_secs + floor_secs)
    );
    // Removed once its Services are gone (the API server's finalizer).
    let _ = cidrs.delete("bench-serving", &DeleteParams::default()).await;
    let _ = nodes
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{NODE_LABEL}=serving")),
        )
        .await;
    Ok(())
}
