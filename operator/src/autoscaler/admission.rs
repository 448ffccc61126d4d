//! The admission queue: which waiting runs start, and why the others wait.
//!
//! Owns: the queue's reasons and annotations, the workspace checks
//! (`spec.workspaces`, `Workspace.spec.quota`) and the decision for each
//! waiting run, in arrival order. Pure; must not touch the API server.
//!
//! A run (a suspended run Job labelled with its ComputeCluster) is admitted
//! when, in this order:
//! 1. its workspace may use the cluster (`spec.workspaces` lists it, or is
//!    empty), else `NotAllowedInWorkspace`;
//! 2. every pod of it could run on the cluster at all: the pools it may use,
//!    empty and at `maxNodes`, hold all its pods; else `ExceedsPoolMaximum`
//!    (it would never start, and never half of it);
//! 3. its workspace's quota holds every pod of it on top of what the
//!    workspace already uses (CPU, memory, GPUs; `maxActiveRuns`), else
//!    `QuotaExceeded`;
//! 4. every pod fits now: free capacity of the nodes, plus the nodes the
//!    pools may still add, after everything admitted before it; else
//!    `WaitingForCapacity`.
//!
//! Arrival order is best-effort FIFO (as Kueue's default): a run that must
//! wait does not hold back later runs that fit (a smaller run may start
//! first).
use std::collections::{BTreeMap, HashMap};

use super::binpack::{Item, Packer, PoolMask, pool_bit};
use super::resources::Resources;
use crate::api::WorkspaceQuota;

/// Job annotation: why a run waits (a [`QueueReason`]).
pub const QUEUE_REASON_ANNOTATION: &str = "mlplane.io/queue-reason";
/// Job annotation: what a run waits for, in words.
pub const QUEUE_MESSAGE_ANNOTATION: &str = "mlplane.io/queue-message";
/// Job annotation: when the queue admitted the run (RFC 3339).
pub const ADMITTED_AT_ANNOTATION: &str = "mlplane.io/admitted-at";
/// Reason of a run the queue has not looked at yet.
pub const WAITING_FOR_ADMISSION: &str = "WaitingForAdmission";

/// Why a run waits in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueReason {
    /// The workspace's quota cannot hold the run now.
    QuotaExceeded,
    /// The cluster has no room now, even counting nodes it may add.
    WaitingForCapacity,
    /// The run can never fit: more pods, or bigger ones, than its pools can
    /// ever hold.
    ExceedsPoolMaximum,
    /// The workspace may not use the cluster (`spec.workspaces`).
    NotAllowedInWorkspace,
}

impl QueueReason {
    /// Every reason, for metrics.
    pub const ALL: [QueueReason; 4] = [
        QueueReason::QuotaExceeded,
        QueueReason::WaitingForCapacity,
        QueueReason::ExceedsPoolMaximum,
        QueueReason::NotAllowedInWorkspace,
    ];

    /// The CamelCase name (annotation value, condition reason).
    pub fn as_str(self) -> &'static str {
        match self {
            QueueReason::QuotaExceeded => "QuotaExceeded",
            QueueReason::WaitingForCapacity => "WaitingForCapacity",
            QueueReason::ExceedsPoolMaximum => "ExceedsPoolMaximum",
            QueueReason::NotAllowedInWorkspace => "NotAllowedInWorkspace",
        }
    }
}

/// A workspace's quota in planner units.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    /// Millicores.
    pub cpu: Option<i64>,
    /// Bytes.
    pub memory: Option<i64>,
    /// GPUs.
    pub gpu: Option<i64>,
    /// Runs active at once.
    pub max_active_runs: Option<u32>,
}

impl Quota {
    /// From `Workspace.spec.quota` (unparsable amounts: no limit; the
    /// Workspace controller reports them).
    pub fn of(q: &WorkspaceQuota) -> Self {
        let amount = |q: &Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>, name: &str| {
            q.as_ref().and_then(|q| {
                Resources::from_quantities(&BTreeMap::from([(name.to_string(), q.clone())]))
                    .ok()
                    .map(|r| if name == "cpu" { r.cpu } else { r.memory })
            })
        };
        Self {
            cpu: amount(&q.cpu, "cpu"),
            memory: amount(&q.memory, "memory"),
            gpu: q.gpu,
            max_active_runs: q.max_active_runs.map(|m| m.max(0) as u32),
        }
    }
}

/// What a workspace uses: requests of its active runs and other live pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Requests.
    pub requests: Resources,
    /// Runs holding resources.
    pub active_runs: u32,
}

/// A run waiting in the queue.
#[derive(Clone, Debug, PartialEq)]
pub struct QueuedRun {
    /// `namespace/name` of its Job (for messages).
    pub key: String,
    /// Its namespace.
    pub namespace: String,
    /// Its workspace (the namespace's `mlplane.io/workspace` label).
    pub workspace: Option<String>,
    /// The effective request of one pod.
    pub pod: Resources,
    /// Pods of the run (its Job's parallelism).
    pub pods: u32,
    /// Pools the pods may use (see [`super::plan`]).
    pub pools: PoolMask,
    /// When no pool may be used: for each pool, why (`pool a100: ...`).
    pub excluded: Vec<String>,
}

/// What the queue decided for one run.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Start it; pods per pool index.
    Admitted(BTreeMap<usize, u32>),
    /// Keep it suspended.
    Waiting(QueueReason, String),
}

/// A pool as the queue explains it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolView {
    /// Pool name.
    pub name: String,
    /// A new node's allocatable minus DaemonSet overhead.
    pub shape: Resources,
    /// `maxNodes` (for a static pool: the nodes it has).
    pub max_nodes: u32,
}

/// Whether the workspace of `namespace` may use the cluster.
pub fn workspace_allowed(
    cluster: &str,
    allowed: &[String],
    namespace: &str,
    workspace: Option<&str>,
) -> Result<(), String> {
    if allowed.is_empty() {
        return Ok(());
    }
    let list = allowed.join(", ");
    match workspace {
        Some(ws) if allowed.iter().any(|a| a == ws) => Ok(()),
        Some(ws) => Err(format!(
            "workspace {ws} may not use ComputeCluster {cluster}: its spec.workspaces admits only {list}"
        )),
        None => Err(format!(
            "namespace {namespace} is not a workspace's namespace; ComputeCluster {cluster} admits only \
             workspaces {list} (spec.workspaces)"
        )),
    }
}

/// Whether `quota` holds `run` (all pods) on top of `usage`.
pub fn quota_allows(workspace: &str, quota: &Quota, usage: &Usage, run: &Resources) -> Result<(), String> {
    if let Some(max) = quota.max_active_runs
        && usage.active_runs >= max
    {
        return Err(format!(
            "workspace {workspace} has {} active run(s), its quota maxActiveRuns is {max}",
            usage.active_runs
        ));
    }
    let dims = [
        ("cpu", quota.cpu, usage.requests.cpu, run.cpu),
        ("memory", quota.memory, usage.requests.memory, run.memory),
        ("gpu", quota.gpu, usage.requests.gpu, run.gpu),
    ];
    for (name, limit, used, want) in dims {
        let Some(limit) = limit else { continue };
        if want == 0 || used + want <= limit {
            continue;
        }
        let fmt = |v: i64| {
            let r = match name {
                "cpu" => Resources {
                    cpu: v,
                    ..Default::default()
                },
                "memory" => Resources {
                    memory: v,
                    ..Default::default()
                },
                _ => Resources {
                    gpu: v,
                    ..Default::default()
                },
            };
            r.to_quantities()
                .into_values()
                .next()
                .map(|q| q.0)
                .unwrap_or_else(|| "0".into())
        };
        if want > limit {
            return Err(format!(
                "the run requests {name} {} in all, more than workspace {workspace}'s quota of {}: it cannot \
                 start until spec.quota.{name} of the Workspace is raised",
                fmt(want),
                fmt(limit)
            ));
        }
        return Err(format!(
            "workspace {workspace} uses {name} {} of its quota {}; the run requests {} more",
            fmt(used),
            fmt(limit),
            fmt(want)
        ));
    }
    Ok(())
}

/// Why the pools a run may use can never hold it, or `None` if they can.
/// `ever` is a packer of those pools empty and at their maximum.
pub fn never_fits(run: &QueuedRun, pools: &[PoolView], ever: &mut Packer) -> Option<String> {
    let need = format!("{} pod(s) of {}", run.pods, run.pod.describe());
    if run.pools == 0 {
        return Some(format!("no pool can run its pods ({})", run.excluded.join("; ")));
    }
    let item = Item {
        request: run.pod.clone(),
        count: run.pods,
        pools: run.pools,
    };
    if ever.place_gang(std::slice::from_ref(&item)).is_some() {
        return None;
    }
    let mut why = vec![];
    for (i, p) in pools.iter().enumerate() {
        if run.pools & pool_bit(i) == 0 {
            continue;
        }
        let per_node = p.shape.fit_count(&run.pod);
        if per_node <= 0 {
            let detail = p
                .shape
                .shortfall(&run.pod)
                .map(|(r, want, have)| format!("a pod requests {r} {want}, a node has {have}"))
                .unwrap_or_default();
            why.push(format!("pool {}: {detail} (after DaemonSets)", p.name));
        } else {
            why.push(format!(
                "pool {} holds at most {} such pod(s): {} per node, maxNodes {}",
                p.name,
                per_node.saturating_mul(i64::from(p.max_nodes)),
                per_node,
                p.max_nodes
            ));
        }
    }
    Some(format!("the run needs {need} at once; {}", why.join("; ")))
}

/// The message of a run that fits the pools' maximum but not now. It names
/// no current sizes, so it stays the same (and is not rewritten) while the
/// pools scale.
pub fn capacity_message(run: &QueuedRun, pools: &[PoolView]) -> String {
    let sizes: Vec<String> = pools
        .iter()
        .enumerate()
        .filter(|(i, _)| run.pools & pool_bit(*i) != 0)
        .map(|(_, p)| format!("pool {} (maxNodes {})", p.name, p.max_nodes))
        .collect();
    format!(
        "the run needs {} pod(s) of {} at once; they do not fit now in {}, counting the nodes the pools may \
         still add: waiting for running work to finish",
        run.pods,
        run.pod.describe(),
        sizes.join(", ")
    )
}

/// Decides every run of `queue` (in arrival order) against `packer` (the
/// cluster after the pods already admitted are placed), the workspaces'
/// quotas and usage (updated as runs are admitted), and `ever` (the pools
/// empty at their maximum).
#[allow(clippy::too_many_arguments)]
pub fn decide(
    cluster: &str,
    allowed: &[String],
    queue: &[QueuedRun],
    pools: &[PoolView],
    packer: &mut Packer,
    ever: &Packer,
    quotas: &HashMap<String, Quota>,
    usage: &mut HashMap<String, Usage>,
) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(queue.len());
    // The "ever fits" answer depends only on the shape of the run.
    let mut ever_cache: HashMap<(Resources, u32, PoolMask), Option<String>> = HashMap::new();
    for run in queue {
        if let Err(msg) = workspace_allowed(cluster, allowed, &run.namespace, run.workspace.as_deref()) {
            out.push(Outcome::Waiting(QueueReason::NotAllowedInWorkspace, msg));
            continue;
        }
        let never = ever_cache
            .entry((run.pod.clone(), run.pods, run.pools))
            .or_insert_with(|| never_fits(run, pools, &mut ever.clone()))
            .clone();
        if let Some(msg) = never {
            out.push(Outcome::Waiting(QueueReason::ExceedsPoolMaximum, msg));
            continue;
        }
        let total = run.pod.times(i64::from(run.pods));
        if let Some(ws) = &run.workspace
            && let Some(q) = quotas.get(ws)
            && let Err(msg) = quota_allows(ws, q, usage.get(ws).unwrap_or(&Usage::default()), &total)
        {
            out.push(Outcome::Waiting(QueueReason::QuotaExceeded, msg));
            continue;
        }
        let item = Item {
            request: run.pod.clone(),
            count: run.pods,
            pools: run.pools,
        };
        match packer.place_gang(std::slice::from_ref(&item)) {
            Some(placed) => {
                if let Some(ws) = &run.workspace {
                    let u = usage.entry(ws.clone()).or_default();
                    u.requests.add(&total);
                    u.active_runs += 1;
                }
                out.push(Outcome::Admitted(placed));
            }
            None => out.push(Outcome::Waiting(
                QueueReason::WaitingForCapacity,
                capacity_message(run, pools),
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscaler::fixtures::{gpu_node as node, gpu_pod};

    fn run(key: &str, ws: &str, pods: u32) -> QueuedRun {
        QueuedRun {
            key: key.into(),
            namespace: ws.into(),
            workspace: Some(ws.into()),
            pod: gpu_pod(),
            pods,
            pools: pool_bit(0),
            excluded: vec![],
        }
    }

    fn pools(max: u32) -> Vec<PoolView> {
        vec![PoolView {
            name: "a100".into(),
            shape: node(),
            max_nodes: max,
        }]
    }

    fn decide_all(
        queue: &[QueuedRun],
        max: u32,
        allowed: &[&str],
        quotas: &[(&str, Quota)],
    ) -> (Vec<Outcome>, HashMap<String, Usage>) {
        let mut packer = Packer::new([(node(), max)]);
        let ever = Packer::new([(node(), max)]);
        let quotas = quotas.iter().map(|(k, q)| (k.to_string(), q.clone())).collect();
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        let mut usage = HashMap::new();
        let out = decide(
            "gpu",
            &allowed,
            queue,
            &pools(max),
            &mut packer,
            &ever,
            &quotas,
            &mut usage,
        );
        (out, usage)
    }

    fn reasons(out: &[Outcome]) -> Vec<&'static str> {
        out.iter()
            .map(|o| match o {
                Outcome::Admitted(_) => "Admitted",
                Outcome::Waiting(r, _) => r.as_str(),
            })
            .collect()
    }

    #[test]
    fn demand_above_max_nodes_waits_for_capacity() {
        let queue: Vec<QueuedRun> = (0..4).map(|i| run(&format!("v/r{i}"), "v", 1)).collect();
        let (out, usage) = decide_all(&queue, 2, &[], &[]);
        assert_eq!(
            reasons(&out),
            ["Admitted", "Admitted", "WaitingForCapacity", "WaitingForCapacity"]
        );
        assert_eq!(out[0], Outcome::Admitted(BTreeMap::from([(0, 1)])));
        let Outcome::Waiting(_, msg) = &out[2] else {
            unreachable!()
        };
        assert!(msg.contains("do not fit now in pool a100 (maxNodes 2)"), "{msg}");
        assert_eq!(usage["v"].active_runs, 2);
    }

    #[test]
    fn a_gang_larger_than_the_pool_can_ever_be_exceeds_its_maximum_and_blocks_nobody() {
        let queue = vec![run("v/big", "v", 3), run("v/small", "v", 1)];
        let (out, _) = decide_all(&queue, 2, &[], &[]);
        assert_eq!(reasons(&out), ["ExceedsPoolMaximum", "Admitted"]);
        let Outcome::Waiting(_, msg) = &out[0] else {
            unreachable!()
        };
        assert!(msg.contains("3 pod(s)") && msg.contains("maxNodes 2"), "{msg}");
        // A pod bigger than a node.
        let mut huge = run("v/huge", "v", 1);
        huge.pod.gpu = 2;
        let (out, _) = decide_all(&[huge], 8, &[], &[]);
        let Outcome::Waiting(QueueReason::ExceedsPoolMaximum, msg) = &out[0] else {
            panic!("{out:?}")
        };
        assert!(msg.contains("a pod requests nvidia.com/gpu 2, a node has 1"), "{msg}");
        // No pool allowed at all.
        let mut nowhere = run("v/x", "v", 1);
        nowhere.pools = 0;
        nowhere.excluded = vec!["pool a100: the taint a=b:NoSchedule is not tolerated".into()];
        let views = pools(2);
        let mut packer = Packer::new([(node(), 2)]);
        let out = decide(
            "gpu",
            &[],
            &[nowhere],
            &views,
            &mut packer,
            &Packer::new([(node(), 2)]),
            &HashMap::new(),
            &mut HashMap::new(),
        );
        let Outcome::Waiting(QueueReason::ExceedsPoolMaximum, msg) = &out[0] else {
            panic!("{out:?}")
        };
        assert!(msg.contains("pool a100: the taint a=b:NoSchedule"), "{msg}");
    }

    #[test]
    fn quotas_hold_per_workspace() {
        let quota = |gpu| Quota {
            gpu: Some(gpu),
            ..Default::default()
        };
        let queue = vec![
            run("a/1", "a", 1),
            run("b/1", "b", 1),
            run("a/2", "a", 1),
            run("a/3", "a", 1),
            run("b/2", "b", 1),
        ];
        let (out, usage) = decide_all(&queue, 8, &[], &[("a", quota(2)), ("b", quota(1))]);
        assert_eq!(
            reasons(&out),
            ["Admitted", "Admitted", "Admitted", "QuotaExceeded", "QuotaExceeded"]
        );
        assert_eq!((usage["a"].requests.gpu, usage["b"].requests.gpu), (2, 1));
        let Outcome::Waiting(_, msg) = &out[3] else {
            unreachable!()
        };
        assert_eq!(msg, "workspace a uses gpu 2 of its quota 2; the run requests 1 more");
        // A run bigger than the whole quota says so.
        let (out, _) = decide_all(&[run("a/big", "a", 3)], 8, &[], &[("a", quota(2))]);
        let Outcome::Waiting(QueueReason::QuotaExceeded, msg) = &out[0] else {
            panic!()
        };
        assert!(msg.contains("more than workspace a's quota of 2"), "{msg}");
        // maxActiveRuns.
        let runs = Quota {
            max_active_runs: Some(1),
            ..Default::default()
        };
        let (out, _) = decide_all(&[run("a/1", "a", 1), run("a/2", "a", 1)], 8, &[], &[("a", runs)]);
        assert_eq!(reasons(&out), ["Admitted", "QuotaExceeded"]);
    }

    #[test]
    fn workspaces_not_listed_are_refused() {
        let queue = vec![run("a/1", "a", 1), run("c/1", "c", 1)];
        let (out, _) = decide_all(&queue, 8, &["a", "b"], &[]);
        assert_eq!(reasons(&out), ["Admitted", "NotAllowedInWorkspace"]);
        let Outcome::Waiting(_, msg) = &out[1] else {
            unreachable!()
        };
        assert_eq!(
            msg,
            "workspace c may not use ComputeCluster gpu: its spec.workspaces admits only a, b"
        );
        let mut loose = run("default/1", "default", 1);
        loose.workspace = None;
        let (out, _) = decide_all(&[loose.clone()], 8, &["a"], &[]);
        assert_eq!(reasons(&out), ["NotAllowedInWorkspace"]);
        // An empty list admits every namespace.
        let (out, _) = decide_all(&[loose], 8, &[], &[]);
        assert_eq!(reasons(&out), ["Admitted"]);
    }

    #[test]
    fn quota_from_the_workspace_spec() {
        let q: WorkspaceQuota =
            serde_json::from_value(serde_json::json!({"cpu": "64", "memory": "256Gi", "gpu": 8, "maxActiveRuns": 20}))
                .unwrap();
        assert_eq!(
            Quota::of(&q),
            Quota {
                cpu: Some(64_000),
                memory: Some(256 << 30),
                gpu: Some(8),
                max_active_runs: Some(20)
            }
        );
    }
}
