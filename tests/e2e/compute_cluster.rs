//! The ComputeCluster controller against the local control plane: the
//! operator runs out of cluster with exactly the chart's RBAC; KWOK plays the
//! pool nodes the kwok provider creates (and the run pods on them); for the
//! clusterAPI provider the test plays Cluster API and its infrastructure
//! provider (it makes the Machine and Node of each replica, and removes
//! them when the replicas drop).
//!
//! ComputeClusters and nodes are cluster-scoped: each test uses its own
//! names and deletes its cluster at the end (its simulated nodes go with it
//! through their ownerReference). Pool nodes are tainted for their cluster,
//! so other tests' pods stay off them; the default sim-* nodes are not
//! touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use mlplane::api::{ComputeCluster, Experiment};
use mlplane::controllers::cached::CachedJob;
use mlplane::controllers::experiment::status::holds_resources;
use mlplane_test_support::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(120);

/// The operator shared by this binary's tests, on a Lease of its own.
fn operator() -> &'static Operator {
    static OP: OnceLock<Operator> = OnceLock::new();
    OP.get_or_init(|| {
        block_on_thread(async {
            let admin = admin_client().await?;
            let lease = format!("mlplane-cc-test-{}", random_suffix());
            Operator::start(&admin, &["--lease-name", &lease, "--resync-seconds", "30"]).await
        })
        .expect("the operator starts")
    })
}

/// A Workspace, deleted with its namespace when dropped.
struct Ws {
    name: String,
}

impl Drop for Ws {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "workspace", &self.name, "--wait=false"]);
    }
}

async fn workspace(admin: &Client, prefix: &str, spec: Value) -> Result<Ws> {
    let _ = operator();
    let name = format!("{prefix}-{}", random_suffix());
    let mut spec = spec;
    spec["deletionPolicy"] = json!("Delete");
    create_ready_workspace(admin, &name, spec).await?;
    Ok(Ws { name })
}

/// A ComputeCluster, deleted (with its simulated nodes) when dropped.
struct Cc {
    name: String,
}

impl Drop for Cc {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "computecluster", &self.name, "--wait=false"]);
    }
}

async fn compute_cluster(admin: &Client, prefix: &str, spec: Value) -> Result<Cc> {
    let _ = operator();
    let name = format!("{prefix}-{}", random_suffix());
    let cc: ComputeCluster = serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "ComputeCluster", "metadata": {"name": name}, "spec": spec,
    }))?;
    Api::<ComputeCluster>::all(admin.clone())
        .create(&PostParams::default(), &cc)
        .await?;
    Ok(Cc { name })
}

fn gpu_pool(min: i32, max: i32) -> Value {
    json!({"name": "gpu", "instanceType": "Standard_NC24ads_A100_v4",
           "capacity": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1"}, "minNodes": min, "maxNodes": max})
}

/// An Experiment on `cc`: one GPU, 3 s of simulated training, `spec` merged over.
fn experiment(name: &str, cc: &str, spec: Value) -> Result<Experiment> {
    let mut base = json!({
        "compute": cc,
        "environment": {"image": "python:3.12"},
        "command": ["python", "train.py"],
        "resources": {"cpu": "1", "memory": "1Gi", "gpu": 1},
        "podMetadata": {"annotations": {"sim.mlplane.io/duration": "3s"}},
    });
    for (k, v) in spec.as_object().context("spec is an object")? {
        base[k] = v.clone();
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name}, "spec": base,
    }))?)
}

fn status<T: serde::Serialize>(s: &Option<T>) -> Value {
    serde_json::to_value(s).unwrap_or_default()
}

fn phase(e: &Experiment) -> String {
    status(&e.status)["phase"].as_str().unwrap_or_default().to_string()
}

fn ready_reason(e: &Experiment) -> (String, String) {
    let s = status(&e.status);
    let c = condition(&s, "Ready").cloned().unwrap_or_default();
    (
        c["reason"].as_str().unwrap_or_default().to_string(),
        c["message"].as_str().unwrap_or_default().to_string(),
    )
}

async fn wait_phase(api: &Api<Experiment>, name: &str, want: &str) -> Result<Experiment> {
    wait_for(api, name, LONG, &format!("phase {want}"), |e| phase(e) == want).await
}

async fn wait_reason(api: &Api<Experiment>, name: &str, reason: &str) -> Result<Experiment> {
    wait_for(api, name, LONG, &format!("Ready reason {reason}"), |e| {
        ready_reason(e).0 == reason
    })
    .await
}

fn cc_status(c: &ComputeCluster) -> Value {
    status(&c.status)
}

fn cc_ready(c: &ComputeCluster) -> bool {
    condition(&cc_status(c), "Ready").is_some_and(|c| c["status"] == "True")
}

fn selector(cc: &str) -> String {
    format!("mlplane.io/compute-cluster={cc}")
}

async fn nodes_of(admin: &Client, cc: &str) -> Result<Vec<Node>> {
    list(&Api::<Node>::all(admin.clone()), Some(&selector(cc))).await
}

async fn wait_nodes(admin: &Client, cc: &str, n: usize) -> Result<Vec<Node>> {
    eventually(LONG, &format!("{n} node(s) of {cc}"), || async {
        let nodes = nodes_of(admin, cc).await?;
        let live: Vec<Node> = nodes
            .into_iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .collect();
        if live.len() == n {
            Ok(Some(live))
        } else {
            Err(anyhow!(
                "{} node(s): {:?}",
                live.len(),
                live.iter().map(|n| n.name_any()).collect::<Vec<_>>()
            ))
        }
    })
    .await
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Watches the nodes of a cluster for the whole test: the most that ever
/// existed at once, the fewest after the first reached `floor_from`, and
/// every node deleted.
struct NodeWatch {
    state: Arc<Mutex<NodeCounts>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default, Debug)]
struct NodeCounts {
    live: BTreeSet<String>,
    max: usize,
    min_since_floor: Option<usize>,
    deleted: Vec<String>,
}

impl NodeWatch {
    fn start(admin: &Client, cc: &str, floor_from: usize) -> Self {
        let state = Arc::new(Mutex::new(NodeCounts::default()));
        let s = state.clone();
        let api: Api<Node> = Api::all(admin.clone());
        let cfg = watcher::Config::default().labels(&selector(cc));
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, cfg));
            while let Some(ev) = events.next().await {
                let Ok(ev) = ev else { continue };
                let mut st = s.lock().unwrap();
                match ev {
                    watcher::Event::Apply(n) | watcher::Event::InitApply(n) => {
                        // A node being deleted no longer counts.
                        match n.metadata.deletion_timestamp {
                            None => st.live.insert(n.name_any()),
                            Some(_) => st.live.remove(&n.name_any()),
                        };
                    }
                    watcher::Event::Delete(n) => {
                        st.live.remove(&n.name_any());
                        st.deleted.push(n.name_any());
                    }
                    _ => {}
                }
                st.max = st.max.max(st.live.len());
                if st.max >= floor_from {
                    let n = st.live.len();
                    st.min_since_floor = Some(st.min_since_floor.map_or(n, |m| m.min(n)));
                }
            }
        });
        Self { state, task }
    }

    fn counts(&self) -> (usize, Option<usize>, Vec<String>) {
        let s = self.state.lock().unwrap();
        (s.max, s.min_since_floor, s.deleted.clone())
    }
}

impl Drop for NodeWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn cc_event(admin: &Client, cc: &str, reason: &str, contains: &str) -> Result<String> {
    let ev = wait_for_event(
        admin,
        "default",
        LONG,
        &format!("event {reason} on ComputeCluster {cc} containing {contains:?}"),
        |e| {
            e.involved_object.name.as_deref() == Some(cc)
                && e.reason.as_deref() == Some(reason)
                && e.message.as_deref().is_some_and(|m| m.contains(contains))
        },
    )
    .await?;
    Ok(ev.message.unwrap_or_default())
}

async fn pods_of_run(api: &Api<Pod>, run: &str) -> Result<Vec<Pod>> {
    list(api, Some(&format!("mlplane.io/run={run}"))).await
}

#[tokio::test]
async fn a_waiting_gpu_run_scales_its_pool_from_zero_and_its_pod_lands_on_the_new_node() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "cc-zero", json!({})).await?;
    let cc = compute_cluster(
        &admin,
        "zero",
        json!({"provider": {"kwok": {}}, "pools": [gpu_pool(0, 2)], "workspaces": [ws.name]}),
    )
    .await?;
    let ccs: Api<ComputeCluster> = Api::all(admin.clone());
    let c = wait_for(&ccs, &cc.name, LONG, "Ready with an empty pool", |c| {
        cc_ready(c) && cc_status(c)["pools"][0]["nodes"] == 0
    })
    .await?;
    assert_eq!(cc_status(&c)["phase"], "Ready");
    assert!(
        nodes_of(&admin, &cc.name).await?.is_empty(),
        "minNodes 0: nothing before demand"
    );

    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.name);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.name);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ws.name);
    exps.create(&PostParams::default(), &experiment("train", &cc.name, json!({}))?)
        .await?;
    // Created suspended, then admitted by the queue.
    let job = wait_for(&jobs, "train-1", LONG, "admitted", |j| {
        j.annotations().contains_key("mlplane.io/admitted-at") && j.spec.as_ref().and_then(|s| s.suspend) == Some(false)
    })
    .await?;
    assert_eq!(job.labels()["mlplane.io/compute-cluster"], cc.name);
    wait_for_event(&admin, &ws.name, LONG, "the Job was created suspended", |e| {
        e.involved_object.name.as_deref() == Some("train-1") && e.reason.as_deref() == Some("Suspended")
    })
    .await?;
    wait_for_event(&admin, &ws.name, LONG, "admission event on the Job", |e| {
        e.involved_object.name.as_deref() == Some("train-1")
            && e.reason.as_deref() == Some("Admitted")
            && e.message.as_deref().is_some_and(|m| m.contains("1 pod(s) on pool gpu"))
    })
    .await?;

    // The pool scales from 0 to 1: a simulated node of the pool's shape.
    let node_name = format!("{}-gpu-0", cc.name);
    let node = wait_for(
        &Api::<Node>::all(admin.clone()),
        &node_name,
        LONG,
        "node Ready",
        node_ready,
    )
    .await?;
    let labels = node.labels();
    assert_eq!(labels["mlplane.io/compute-cluster"], cc.name);
    assert_eq!(labels["mlplane.io/pool"], "gpu");
    assert_eq!(labels["node.kubernetes.io/instance-type"], "Standard_NC24ads_A100_v4");
    assert_eq!(node.annotations()["kwok.x-k8s.io/node"], "fake");
    let taints = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    assert!(
        taints.iter().any(|t| t.key == "mlplane.io/compute-cluster"
            && t.value.as_deref() == Some(cc.name.as_str())
            && t.effect == "NoSchedule"),
        "{taints:?}"
    );
    let alloc = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.clone())
        .unwrap_or_default();
    assert_eq!(alloc["nvidia.com/gpu"].0, "1");
    assert_eq!(node.owner_references()[0].kind, "ComputeCluster");
    let msg = cc_event(&admin, &cc.name, "ScaledUp", "scaled pool gpu from 0 to 1").await?;
    assert!(msg.contains("waiting pod"), "{msg}");

    // The run's pod lands on the new node and the run succeeds.
    let pod = eventually(LONG, "the run's pod is bound", || async {
        Ok(pods_of_run(&pods, "train-1")
            .await?
            .into_iter()
            .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()))
    })
    .await?;
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some(node_name.as_str()));
    wait_phase(&exps, "train", "Succeeded").await?;
    let c = wait_for(&ccs, &cc.name, LONG, "status with one node", |c| {
        cc_status(c)["pools"][0]["readyNodes"] == 1
    })
    .await?;
    let pool = &cc_status(&c)["pools"][0];
    assert!(pool["lastScaleUp"].is_string(), "{pool}");
    assert_eq!(pool["allocatable"]["nvidia.com/gpu"], "1");
    assert!(
        operator().metric(
            "mlplane_compute_scale_up_duration_seconds_count",
            &[("provider", "kwok")]
        )? >= 1.0
    );
    assert!(operator().metric("mlplane_compute_admissions_total", &[])? >= 1.0);
    Ok(())
}

#[tokio::test]
async fn demand_above_max_nodes_makes_only_max_nodes_and_the_rest_waits_queued_in_arrival_order() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "cc-max", json!({})).await?;
    let cc = compute_cluster(
        &admin,
        "max",
        json!({"provider": {"kwok": {}}, "pools": [gpu_pool(0, 2)], "idleTimeBeforeScaleDown": "1h"}),
    )
    .await?;
    let watch = NodeWatch::start(&admin, &cc.name, usize::MAX);
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.name);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.name);
    let long = json!({"podMetadata": {"annotations": {"sim.mlplane.io/duration": "1h"}}});
    for name in ["e0", "e1"] {
        exps.create(&PostParams::default(), &experiment(name, &cc.name, long.clone())?)
            .await?;
    }
    for name in ["e0", "e1"] {
        wait_phase(&exps, name, "Running").await?;
    }
    // Two more: the pool is at maxNodes, they wait, e2 before e3.
    exps.create(&PostParams::default(), &experiment("e2", &cc.name, long.clone())?)
        .await?;
    let e2 = wait_reason(&exps, "e2", "WaitingForCapacity").await?;
    assert_eq!(phase(&e2), "Queued");
    assert!(
        ready_reason(&e2).1.contains("pool gpu (maxNodes 2)"),
        "{:?}",
        ready_reason(&e2)
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    exps.create(&PostParams::default(), &experiment("e3", &cc.name, long.clone())?)
        .await?;
    wait_reason(&exps, "e3", "WaitingForCapacity").await?;
    let j3 = jobs.get("e3-1").await?;
    assert_eq!(j3.spec.as_ref().unwrap().suspend, Some(true));
    assert_eq!(j3.annotations()["mlplane.io/queue-reason"], "WaitingForCapacity");
    let ccs: Api<ComputeCluster> = Api::all(admin.clone());
    let c = wait_for(&ccs, &cc.name, LONG, "queue 2 admitted, 2 waiting", |c| {
        let s = cc_status(c);
        s["queue"]["admitted"] == 2 && s["queue"]["waiting"] == 2 && s["pools"][0]["nodes"] == 2
    })
    .await?;
    assert_eq!(cc_status(&c)["pools"][0]["desiredNodes"], 2);
    cc_event(&admin, &cc.name, "Queued", "WaitingForCapacity").await?;

    // Cancelling a running run frees a node: the earlier waiting run starts.
    exps.patch(
        "e0",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": true}})),
    )
    .await?;
    wait_phase(&exps, "e2", "Running").await?;
    let e3 = exps.get("e3").await?;
    assert_eq!(ready_reason(&e3).0, "WaitingForCapacity");
    let (max, _, _) = watch.counts();
    assert!(max <= 2, "{max} nodes existed at once; maxNodes is 2");
    assert_eq!(nodes_of(&admin, &cc.name).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_distributed_run_larger_than_its_pool_can_grow_never_starts_and_exceeds_pool_maximum() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "cc-gang", json!({})).await?;
    let cc = compute_cluster(
        &admin,
        "gang",
        json!({"provider": {"kwok": {}}, "pools": [gpu_pool(0, 2)]}),
    )
    .await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.name);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.name);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ws.name);
    exps.create(
        &PostParams::default(),
        &experiment(
            "dist",
            &cc.name,
            json!({"distribution": {"type": "PyTorch", "nodes": 3, "processesPerNode": 1}}),
        )?,
    )
    .await?;
    let e = wait_reason(&exps, "dist", "ExceedsPoolMaximum").await?;
    assert_eq!(phase(&e), "Queued");
    let (_, message) = ready_reason(&e);
    assert!(
        message.contains("3 pod(s)") && message.contains("maxNodes 2"),
        "{message}"
    );
    let job = jobs.get("dist-1").await?;
    assert_eq!(job.spec.as_ref().unwrap().suspend, Some(true));
    assert_eq!(job.annotations()["mlplane.io/queue-reason"], "ExceedsPoolMaximum");
    wait_for_event(&admin, &ws.name, LONG, "a Queued warning on the Job", |e| {
        e.involved_object.name.as_deref() == Some("dist-1")
            && e.reason.as_deref() == Some("Queued")
            && e.type_.as_deref() == Some("Warning")
    })
    .await?;
    // Never started, not partially either: no pod, no node.
    let ccs: Api<ComputeCluster> = Api::all(admin.clone());
    wait_for(&ccs, &cc.name, LONG, "one run waiting", |c| {
        cc_status(c)["queue"]["waiting"] == 1
    })
    .await?;
    assert!(pods_of_run(&pods, "dist-1").await?.is_empty());
    assert!(nodes_of(&admin, &cc.name).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn idle_nodes_scale_down_never_below_min_nodes_never_with_a_run_pod_and_only_as_pdbs_allow() -> Result<()> {
    let admin = admin_client().await?;
    let ws = workspace(&admin, "cc-down", json!({})).await?;
    let agents = TestNamespace::create(&admin, "cc-agents").await?;
    let cc = compute_cluster(
        &admin,
        "down",
        json!({"provider": {"kwok": {}}, "idleTimeBeforeScaleDown": "2s",
               "pools": [{"name": "cpu", "capacity": {"cpu": "2", "memory": "8Gi"}, "minNodes": 1, "maxNodes": 3}]}),
    )
    .await?;
    let watch = NodeWatch::start(&admin, &cc.name, 1);
    // minNodes: one node without any demand.
    wait_nodes(&admin, &cc.name, 1).await?;
    cc_event(&admin, &cc.name, "ScaledUp", "to minNodes 1").await?;

    // A node agent on every pool node, protected by a PDB that allows no disruption.
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": {
            "metadata": {"labels": {"app": "agent"}},
            "spec": {"nodeSelector": {"mlplane.io/compute-cluster": cc.name},
                     "tolerations": [{"key": "mlplane.io/compute-cluster", "operator": "Exists"}],
                     "containers": [{"name": "agent", "image": "agent:1",
                                     "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}}}
    }))?;
    agents.api::<DaemonSet>().create(&PostParams::default(), &ds).await?;
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "agent"},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "agent"}}}
    }))?;
    let pdbs = agents.api::<PodDisruptionBudget>();
    pdbs.create(&PostParams::default(), &pdb).await?;

    // One long run, two short ones: 1.5 CPUs each, one per node.
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.name);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ws.name);
    let spec = |d: &str| {
        json!({"resources": {"cpu": "1500m", "memory": "1Gi"},
               "podMetadata": {"annotations": {"sim.mlplane.io/duration": d}}})
    };
    exps.create(&PostParams::default(), &experiment("long", &cc.name, spec("1h"))?)
        .await?;
    wait_phase(&exps, "long", "Running").await?;
    for name in ["short-a", "short-b"] {
        exps.create(&PostParams::default(), &experiment(name, &cc.name, spec("6s"))?)
            .await?;
    }
    // The agent runs on all three nodes before the short runs end.
    let agent_pods = agents.api::<Pod>();
    eventually(LONG, "an agent on each of the 3 nodes", || async {
        let on: BTreeSet<String> = list(&agent_pods, Some("app=agent"))
            .await?
            .into_iter()
            .filter_map(|p| p.spec?.node_name)
            .collect();
        Ok((on.len() == 3).then_some(()))
    })
    .await?;
    for name in ["short-a", "short-b"] {
        wait_phase(&exps, name, "Succeeded").await?;
    }
    let long_node = pods_of_run(&pods, "long-1")
        .await?
        .into_iter()
        .find_map(|p| p.spec?.node_name)
        .context("the long run's pod is bound")?;
    // Two nodes are idle, but their agents may not be evicted.
    let blocked = cc_event(&admin, &cc.name, "ScaleDownBlocked", "PodDisruptionBudget").await?;
    assert!(blocked.contains(&format!("{}/agent", agents.name)), "{blocked}");
    assert_eq!(wait_nodes(&admin, &cc.name, 3).await?.len(), 3);

    // The PDB goes: the idle nodes are drained and removed, down to the one
    // that runs the long run's pod.
    pdbs.delete("agent", &DeleteParams::default()).await?;
    let left = wait_nodes(&admin, &cc.name, 1).await?;
    assert_eq!(left[0].name_any(), long_node);
    cc_event(&admin, &cc.name, "ScaledDown", "removed idle node").await?;
    assert!(
        operator().metric(
            "mlplane_kube_api_requests_total",
            &[("verb", "create"), ("resource", "pods/eviction")]
        )? >= 1.0,
        "agents were evicted through the Eviction API"
    );

    // The long run ends: its node is idle, but minNodes is 1.
    exps.patch(
        "long",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": true}})),
    )
    .await?;
    eventually(LONG, "the long run's pod is gone", || async {
        Ok(pods_of_run(&pods, "long-1").await?.is_empty().then_some(()))
    })
    .await?;
    // Several idle times, with the operator reconciling (pod and node events).
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(wait_nodes(&admin, &cc.name, 1).await?[0].name_any(), long_node);
    let (max, min, deleted) = watch.counts();
    assert_eq!(max, 3);
    assert_eq!(min, Some(1), "never below minNodes");
    assert!(
        !deleted.contains(&long_node),
        "the node of a running run was removed: {deleted:?}"
    );
    Ok(())
}

/// Runs of each namespace admitted and not finished, from Job events.
#[derive(Default)]
struct Active {
    jobs: HashMap<String, BTreeMap<String, bool>>,
    max: HashMap<String, usize>,
}

#[tokio::test]
async fn two_workspaces_with_quotas_sharing_one_cluster_never_exceed_their_quota() -> Result<()> {
    let admin = admin_client().await?;
    let a = workspace(&admin, "cc-qa", json!({"quota": {"gpu": 2}})).await?;
    let b = workspace(&admin, "cc-qb", json!({"quota": {"gpu": 1}})).await?;
    let cc = compute_cluster(
        &admin,
        "quota",
        json!({"provider": {"kwok": {}}, "pools": [gpu_pool(0, 6)], "workspaces": [a.name, b.name]}),
    )
    .await?;
    let active = Arc::new(Mutex::new(Active::default()));
    let mut watchers = vec![];
    for ns in [&a.name, &b.name] {
        let api: Api<CachedJob> = Api::namespaced(admin.clone(), ns);
        let (active, ns) = (active.clone(), ns.clone());
        watchers.push(tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
            while let Some(ev) = events.next().await {
                let (Ok(watcher::Event::Apply(j)) | Ok(watcher::Event::InitApply(j))) = ev else {
                    continue;
                };
                let mut st = active.lock().unwrap();
                let jobs = st.jobs.entry(ns.clone()).or_default();
                jobs.insert(j.name_any(), holds_resources(&j));
                let n = jobs.values().filter(|h| **h).count();
                let m = st.max.entry(ns.clone()).or_default();
                *m = (*m).max(n);
            }
        }));
    }
    // Every reason each namespace's Experiments reported.
    let reasons = Arc::new(Mutex::new(BTreeSet::<(String, String)>::new()));
    for ns in [&a.name, &b.name] {
        let api: Api<Experiment> = Api::namespaced(admin.clone(), ns);
        let (reasons, ns) = (reasons.clone(), ns.clone());
        watchers.push(tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
            while let Some(ev) = events.next().await {
                let (Ok(watcher::Event::Apply(e)) | Ok(watcher::Event::InitApply(e))) = ev else {
                    continue;
                };
                reasons.lock().unwrap().insert((ns.clone(), ready_reason(&e).0));
            }
        }));
    }
    let names = |ws: &Ws, n: usize| (0..n).map(|i| (ws.name.clone(), format!("r{i}"))).collect::<Vec<_>>();
    let runs: Vec<(String, String)> = names(&a, 4).into_iter().chain(names(&b, 3)).collect();
    for (ns, name) in &runs {
        let exps: Api<Experiment> = Api::namespaced(admin.clone(), ns);
        exps.create(&PostParams::default(), &experiment(name, &cc.name, json!({}))?)
            .await?;
    }
    // Every run ends up succeeding, one quota's worth at a time.
    for (ns, name) in &runs {
        let exps: Api<Experiment> = Api::namespaced(admin.clone(), ns);
        wait_for(&exps, name, Duration::from_secs(180), "Succeeded", |e| {
            phase(e) == "Succeeded"
        })
        .await?;
    }
    for w in watchers {
        w.abort();
    }
    let st = active.lock().unwrap();
    let (max_a, max_b) = (st.max[&a.name], st.max[&b.name]);
    assert!(max_a <= 2, "workspace {} had {max_a} runs at once; quota gpu 2", a.name);
    assert!(max_b <= 1, "workspace {} had {max_b} runs at once; quota gpu 1", b.name);
    // The runs that waited said why.
    let reasons = reasons.lock().unwrap();
    for ws in [&a.name, &b.name] {
        assert!(
            reasons.contains(&(ws.clone(), "QuotaExceeded".to_string())),
            "no run of {ws} waited with QuotaExceeded: {reasons:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_workspace_not_listed_in_spec_workspaces_is_refused_with_a_clear_reason() -> Result<()> {
    let admin = admin_client().await?;
    let allowed = workspace(&admin, "cc-in", json!({})).await?;
    let other = workspace(&admin, "cc-out", json!({})).await?;
    let cc = compute_cluster(
        &admin,
        "only",
        json!({"provider": {"kwok": {}}, "pools": [gpu_pool(0, 2)], "workspaces": [allowed.name]}),
    )
    .await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &other.name);
    exps.create(&PostParams::default(), &experiment("denied", &cc.name, json!({}))?)
        .await?;
    let e = wait_reason(&exps, "denied", "NotAllowedInWorkspace").await?;
    assert_eq!(phase(&e), "Queued");
    let (_, message) = ready_reason(&e);
    assert!(
        message.contains(&format!(
            "workspace {} may not use ComputeCluster {}",
            other.name, cc.name
        )) && message.contains("spec.workspaces admits only")
            && message.contains(&allowed.name),
        "{message}"
    );
    let job = Api::<Job>::namespaced(admin.clone(), &other.name)
        .get("denied-1")
        .await?;
    assert_eq!(job.spec.as_ref().unwrap().suspend, Some(true));
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &other.name);
    assert!(pods_of_run(&pods, "denied-1").await?.is_empty());
    cc_event(&admin, &cc.name, "Queued", "NotAllowedInWorkspace").await?;
    assert!(nodes_of(&admin, &cc.name).await?.is_empty());
    Ok(())
}

fn capi(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("cluster.x-k8s.io", "v1beta2", kind), plural)
}

async fn crds_gone(admin: &Client) -> Result<()> {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(admin.clone());
    for name in ["machinedeployments.cluster.x-k8s.io", "machines.cluster.x-k8s.io"] {
        if crds.get_opt(name).await?.is_some() {
            let _ = crds.delete(name, &DeleteParams::default()).await;
            wait_deleted(&crds, name, LONG).await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_cluster_api_provider_scales_a_real_machine_deployment_up_and_back_down() -> Result<()> {
    let admin = admin_client().await?;
    // Without the Cluster API CRDs a clusterAPI cluster says so.
    crds_gone(&admin).await?;
    let ws = workspace(&admin, "cc-capi", json!({})).await?;
    let infra = TestNamespace::create(&admin, "capi").await?;
    let cc = compute_cluster(
        &admin,
        "capi",
        json!({"provider": {"clusterAPI": {"namespace": infra.name, "machineDeployments": {"gpu": "md-gpu"}}},
               "pools": [gpu_pool(0, 2)], "idleTimeBeforeScaleDown": "2s"}),
    )
    .await?;
    let ccs: Api<ComputeCluster> = Api::all(admin.clone());
    let c = wait_for(&ccs, &cc.name, LONG, "Ready=False ClusterAPINotInstalled", |c| {
        condition(&cc_status(c), "Ready")
            .is_some_and(|r| r["status"] == "False" && r["reason"] == "ClusterAPINotInstalled")
    })
    .await?;
    assert_eq!(cc_status(&c)["phase"], "Degraded");
    assert!(
        condition(&cc_status(&c), "Ready").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("spec.provider.clusterAPI")
    );

    // The CRDs from the published module, and a MachineDeployment at 0.
    apply_crds(&cluster_api_crds()?)?;
    let mds: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        &infra.name,
        &capi("MachineDeployment", "machinedeployments"),
    );
    let machines: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &infra.name, &capi("Machine", "machines"));
    let template = json!({"clusterName": "test", "bootstrap": {"dataSecretName": "none"},
                          "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "DockerMachineTemplate", "name": "t"}});
    let md: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "MachineDeployment",
        "metadata": {"name": "md-gpu"},
        "spec": {"clusterName": "test", "replicas": 0,
                 "selector": {"matchLabels": {"cluster.x-k8s.io/deployment-name": "md-gpu"}},
                 "template": {"metadata": {"labels": {"cluster.x-k8s.io/deployment-name": "md-gpu"}}, "spec": template}}
    }))?;
    mds.create(&PostParams::default(), &md).await?;
    wait_for(&ccs, &cc.name, LONG, "Ready once Cluster API is there", cc_ready).await?;

    // Play Cluster API and the infrastructure provider: a Machine and a Node
    // per replica; the marked Machine (and its Node) goes when replicas drop.
    let nodes: Api<Node> = Api::all(admin.clone());
    let node_name = format!("{}-capi-node-0", cc.name);
    let history = Arc::new(Mutex::new(Vec::<u64>::new()));
    let infra_task = {
        let (mds, machines, nodes, history, node_name) = (
            mds.clone(),
            machines.clone(),
            nodes.clone(),
            history.clone(),
            node_name.clone(),
        );
        tokio::spawn(async move {
            let mut made = false;
            let mut events = std::pin::pin!(watcher::watch_object(mds, "md-gpu"));
            while let Some(Ok(Some(md))) = events.next().await {
                let replicas = md.data["spec"]["replicas"].as_u64().unwrap_or(0);
                {
                    let mut h = history.lock().unwrap();
                    if h.last() != Some(&replicas) {
                        h.push(replicas);
                    }
                }
                if replicas >= 1 && !made {
                    made = true;
                    let m: DynamicObject = serde_json::from_value(json!({
                        "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine",
                        "metadata": {"name": "md-gpu-0", "labels": {"cluster.x-k8s.io/deployment-name": "md-gpu"}},
                        "spec": {"clusterName": "test", "bootstrap": {"dataSecretName": "none"},
                                 "infrastructureRef": {"apiGroup": "infrastructure.cluster.x-k8s.io", "kind": "DockerMachine", "name": "m0"}}
                    }))
                    .unwrap();
                    let _ = machines.create(&PostParams::default(), &m).await;
                    let node: Node = serde_json::from_value(json!({
                        "metadata": {"name": node_name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                                     "labels": {"kubernetes.io/hostname": node_name, "type": "kwok"}},
                        "status": {"allocatable": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1", "pods": "110"},
                                   "capacity": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1", "pods": "110"}}
                    }))
                    .unwrap();
                    let _ = nodes.create(&PostParams::default(), &node).await;
                    let _ = machines
                        .patch_status(
                            "md-gpu-0",
                            &PatchParams::default(),
                            &Patch::Merge(json!({"status": {"nodeRef": {"name": node_name}}})),
                        )
                        .await;
                }
                if replicas == 0 && made {
                    if let Ok(m) = machines.get("md-gpu-0").await
                        && m.annotations().contains_key("cluster.x-k8s.io/delete-machine")
                    {
                        let _ = machines.delete("md-gpu-0", &DeleteParams::default()).await;
                        let _ = nodes.delete(&node_name, &DeleteParams::default()).await;
                    }
                    return;
                }
            }
        })
    };

    // The watch has seen the MachineDeployment at 0 before anything can scale it.
    let seen_start = tokio::time::Instant::now();
    while history.lock().unwrap().is_empty() {
        anyhow::ensure!(seen_start.elapsed() < LONG, "the MachineDeployment watch never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws.name);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ws.name);
    exps.create(&PostParams::default(), &experiment("capi", &cc.name, json!({}))?)
        .await?;
    // The node of the new replica gets the pool's labels and taint, and the run's pod.
    let node = wait_for(&nodes, &node_name, LONG, "labelled into the pool", |n| {
        n.labels().get("mlplane.io/pool").map(String::as_str) == Some("gpu")
    })
    .await?;
    assert_eq!(node.labels()["mlplane.io/compute-cluster"], cc.name);
    assert!(
        node.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| t.key == "mlplane.io/compute-cluster"))
    );
    wait_phase(&exps, "capi", "Succeeded").await?;
    let pod = pods_of_run(&pods, "capi-1").await?.pop().context("the run's pod")?;
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some(node_name.as_str()));
    cc_event(&admin, &cc.name, "ScaledUp", "scaled pool gpu from 0 to 1").await?;

    // Idle: the node is drained, its Machine marked, the replicas go back to 0.
    wait_deleted(&nodes, &node_name, LONG).await?;
    tokio::time::timeout(LONG, infra_task).await.map_err(|_| {
        anyhow!(
            "the MachineDeployment never went back to 0: {:?}",
            history.lock().unwrap()
        )
    })??;
    assert_eq!(*history.lock().unwrap(), vec![0, 1, 0]);
    cc_event(&admin, &cc.name, "ScaledDown", "scaled pool gpu from 1 to 0").await?;
    let md = mds.get("md-gpu").await?;
    assert_eq!(md.data["spec"]["replicas"], 0);
    if kubectl(&["get", "computecluster", &cc.name]).is_err() {
        bail!("the ComputeCluster disappeared");
    }
    Ok(())
}
