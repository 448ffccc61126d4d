//! From cached objects to one planning pass's input: the pools' node shapes
//! (capacity minus DaemonSet overhead), the pools' nodes and what runs on
//! them, the pods waiting for the cluster, the queue in arrival order, and
//! the quotas and usage of the queued runs' workspaces.
//!
//! Owns: [`validate`] and [`snapshot`], and the rules they encode. Pure
//! (callers pass cached objects, their own recent writes and `now`); must
//! not touch the API server.
//!
//! - A run Job belongs to the cluster by its label `mlplane.io/compute-cluster`
//!   (see `run/build.rs`). Suspended without `mlplane.io/cancel-reason`: it
//!   waits in the queue. Unsuspended and neither Complete nor Failed: it is
//!   admitted and holds its pods' requests; those of its pods not on a node
//!   yet (its remaining completions, up to its parallelism, minus its live
//!   bound pods) are demand, even before the Job controller creates them.
//! - Any other unbound pod whose nodeSelector names the cluster is demand.
//! - A pod's effective request is computed as the scheduler does; pod
//!   templates of workspace namespaces get the Workspace's LimitRange
//!   defaults for containers without CPU or memory requests.
//! - A node's free capacity is its allocatable minus the overhead of the
//!   DaemonSets its pool runs, minus its live non-DaemonSet pods. It is busy
//!   when such a pod is on it (a run's pod always is).
//! - A workspace's usage is what its admitted runs hold (every pod of a run,
//!   until its Job is Complete or Failed) plus its other live pods; its
//!   active runs are its run Jobs that hold resources (on any cluster or
//!   none).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::DynamicObject;
use kube::core::PartialObjectMeta;

use super::observe::{MIRROR_ANNOTATION, SCALE_DOWN_ANNOTATION};
use crate::api::{ComputeCluster, Pool, WorkspaceQuota};
use crate::autoscaler::admission::{Quota, Usage};
use crate::autoscaler::binpack::Constraints;
use crate::autoscaler::plan::{DemandInput, NodeInput, NodeState, PlanInput, PoolInput, QueueInput};
use crate::autoscaler::providers::{cluster_api, pool_labels, pool_of, pool_taints};
use crate::autoscaler::resources::{Resources, pod_requests};
use crate::controllers::cached::{CachedJob, CachedPod, CachedPodSpec};
use crate::controllers::experiment::status::{CANCEL_ANNOTATION, holds_resources};
use crate::controllers::run::build::{COMPUTE_CLUSTER_LABEL, RUN_LABEL};
use crate::controllers::run::names::label_value;
use crate::controllers::workspace::build::{DEFAULT_CPU_REQUEST, DEFAULT_MEMORY_REQUEST, WORKSPACE_LABEL};

/// A node that is not Ready counts as starting (and can take pods) this long
/// after it was created.
pub const STARTING_GRACE: Duration = Duration::from_secs(300);

/// The provider kind of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    Kwok,
    ClusterApi,
    Static,
}

impl ProviderKind {
    /// Of a spec (CEL makes exactly one set).
    pub fn of(cc: &ComputeCluster) -> Self {
        let p = &cc.spec.provider;
        if p.cluster_api.is_some() {
            ProviderKind::ClusterApi
        } else if p.static_.is_some() {
            ProviderKind::Static
        } else {
            ProviderKind::Kwok
        }
    }

    /// Its name in the API (and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Kwok => "kwok",
            ProviderKind::ClusterApi => "clusterAPI",
            ProviderKind::Static => "static",
        }
    }
}

/// A spec the controller cannot act on (what CEL cannot check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError(pub String);

/// The checked parts of a spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    /// `idleTimeBeforeScaleDown`.
    pub idle_time: Duration,
    /// Each pool's node allocatable.
    pub capacities: Vec<Resources>,
}

/// Checks what the API server could not: durations and quantities.
pub fn validate(cc: &ComputeCluster) -> Result<Validated, SpecError> {
    let idle_time = cc
        .spec
        .idle_time_before_scale_down
        .to_std()
        .map_err(|e| SpecError(format!("spec.idleTimeBeforeScaleDown: {e}")))?;
    let capacities = cc
        .spec
        .pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Resources::node_shape(&p.capacity).map_err(|e| SpecError(format!("spec.pools[{i}].capacity.{e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(Validated { idle_time, capacities })
}

/// The controller's writes the caches may not show yet.
#[derive(Clone, Debug, Default)]
pub struct Pending {
    /// Nodes created, by name -> pool name.
    pub created: HashMap<String, String>,
    /// Nodes whose removal was requested.
    pub removed: HashSet<String>,
    /// Drain marks written: node -> whether it is draining.
    pub drains: HashMap<String, bool>,
    /// MachineDeployment replicas written, by pool name.
    pub replicas: HashMap<String, u32>,
    /// Since when the controller has seen each node idle.
    pub idle_seen: HashMap<String, Timestamp>,
}

/// Cached Cluster API objects: MachineDeployments and Machines.
pub type CapiObjects<'a> = (&'a [Arc<DynamicObject>], &'a [Arc<DynamicObject>]);

/// Cached objects (Jobs with the controller's own writes laid over).
pub struct Objects<'a> {
    pub nodes: &'a [Arc<Node>],
    pub pods: &'a [Arc<CachedPod>],
    pub jobs: &'a [Arc<CachedJob>],
    pub daemonsets: &'a [Arc<DaemonSet>],
    pub pdbs: &'a [Arc<PodDisruptionBudget>],
    /// Workspace name -> its quota.
    pub quotas: HashMap<String, WorkspaceQuota>,
    pub namespaces: &'a [Arc<PartialObjectMeta<Namespace>>],
    /// MachineDeployments and Machines, for a clusterAPI cluster.
    pub capi: Option<CapiObjects<'a>>,
}

/// A node of the cluster as the controller carries the plan out.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeFacts {
    pub name: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub pool: usize,
    /// When the autoscaler started draining it.
    pub draining_since: Option<Timestamp>,
    /// Its live pods that a drain evicts (namespace, name).
    pub evict: Vec<(String, String)>,
    /// Whether it is busy (a live non-DaemonSet pod).
    pub busy: bool,
    /// Its labels and taints lack some of its pool's (clusterAPI nodes are
    /// labelled by the controller).
    pub needs_template: bool,
    /// Allocatable (before DaemonSet overhead).
    pub allocatable: Resources,
    pub ready: bool,
}

/// A run Job in the queue.
#[derive(Clone, Debug, PartialEq)]
pub struct QueuedJob {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: Option<String>,
    /// Its current queue annotations.
    pub reason: Option<String>,
    pub message: Option<String>,
}

/// Everything one pass needs: the planner's input and what carrying the
/// plan out needs.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub input: PlanInput,
    /// Aligned with `input.nodes`.
    pub nodes: Vec<NodeFacts>,
    /// Names of every node of each pool (any state), to name new ones.
    pub names: Vec<Vec<String>>,
    /// Aligned with `input.queue`.
    pub queue: Vec<QueuedJob>,
    /// Run Jobs of the cluster that hold resources.
    pub admitted: u32,
    /// Per pool: whether its MachineDeployment exists (clusterAPI; else true).
    pub deployment_found: Vec<bool>,
    /// Nodes labelled with the cluster whose pool is no longer in the spec,
    /// and idle (kwok: deleted).
    pub orphans: Vec<(String, Option<String>)>,
    /// Nodes seen idle now (to remember since when), and busy ones.
    pub idle_now: Vec<(String, bool)>,
}

fn is_live(p: &CachedPod) -> bool {
    !matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn owner_kind(p: &CachedPod) -> Option<(&str, &str)> {
    p.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.as_str(), o.uid.as_str()))
}

/// Whether a pod is a DaemonSet's or a static (mirror) pod: neither makes a
/// node busy.
pub fn is_node_pod(p: &CachedPod) -> bool {
    owner_kind(p).is_some_and(|(k, _)| k == "DaemonSet") || p.annotations().contains_key(MIRROR_ANNOTATION)
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn ts(t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> Option<Timestamp> {
    t.as_ref().map(|t| t.0)
}

/// Whether a label selector matches `labels` (a missing selector matches
/// nothing, an empty one everything).
pub fn selector_matches(sel: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else { return false };
    let by_labels = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_exprs = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let v = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => v.is_some_and(|v| values.contains(v)),
            "NotIn" => v.is_none_or(|v| !values.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            _ => false,
        }
    });
    by_labels && by_exprs
}

/// Pods still to run of an admitted Job: its remaining completions, at
/// most its parallelism.
pub fn remaining_pods(job: &CachedJob) -> u32 {
    let spec = job.spec.as_ref();
    let parallelism = spec.and_then(|s| s.parallelism).unwrap_or(1).max(0);
    let succeeded = job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0);
    let left = match spec.and_then(|s| s.completions) {
        Some(c) => (c - succeeded).max(0).min(parallelism),
        None => parallelism,
    };
    left as u32
}

fn parallelism(job: &CachedJob) -> u32 {
    job.spec.as_ref().and_then(|s| s.parallelism).unwrap_or(1).max(1) as u32
}

fn template(job: &CachedJob) -> Option<&CachedPodSpec> {
    job.spec.as_ref()?.template.spec.as_ref()
}

fn suspended(job: &CachedJob) -> bool {
    job.spec.as_ref().and_then(|s| s.suspend) == Some(true)
}

/// Whether a run Job waits in the queue: suspended, not cancelled, not
/// finished.
pub fn waiting(job: &CachedJob) -> bool {
    suspended(job) && !job.annotations().contains_key(CANCEL_ANNOTATION) && job.metadata.deletion_timestamp.is_none()
}

/// The cluster's snapshot (see the module docs).
pub fn snapshot(
    cc: &ComputeCluster,
    checked: &Validated,
    objects: &Objects<'_>,
    pending: &Pending,
    now: Timestamp,
) -> Snapshot {
    let cluster = cc.name_any();
    let value = label_value(&cluster);
    let pools_spec: &[Pool] = &cc.spec.pools;
    let kind = ProviderKind::of(cc);

    // Namespace -> workspace, and workspace defaults for pod templates.
    let workspace_of: HashMap<&str, &str> = objects
        .namespaces
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, n.labels().get(WORKSPACE_LABEL)?.as_str())))
        .collect();
    let defaults = Resources::from_list(&BTreeMap::from([
        (
            "cpu".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity(DEFAULT_CPU_REQUEST.into()),
        ),
        (
            "memory".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity(DEFAULT_MEMORY_REQUEST.into()),
        ),
    ]));
    let template_request = |ns: &str, spec: &CachedPodSpec| {
        let d = workspace_of.contains_key(ns).then_some(&defaults);
        pod_requests(spec, d)
    };

    // Pools: labels, taints, DaemonSet overhead.
    // Each DaemonSet's placement and requests, worked out once for all pools.
    let daemons: Vec<(Constraints, Resources)> = objects
        .daemonsets
        .iter()
        .filter_map(|ds| ds.spec.as_ref()?.template.spec.as_ref())
        .map(|spec| {
            let spec = CachedPodSpec::from(spec);
            (Constraints::of(&spec), pod_requests(&spec, None))
        })
        .collect();
    let mut pools: Vec<PoolInput> = pools_spec
        .iter()
        .zip(&checked.capacities)
        .map(|(p, cap)| {
            let labels = pool_labels(&cluster, p);
            let taints = pool_taints(&cluster, p);
            let mut shape = cap.clone();
            for (constraints, requests) in &daemons {
                if constraints.mismatch(&labels, &taints).is_none() {
                    shape.sub(requests);
                }
            }
            PoolInput {
                name: p.name.clone(),
                labels,
                taints,
                shape,
                min_nodes: p.min_nodes.max(0) as u32,
                max_nodes: p.max_nodes.max(0) as u32,
                scalable: kind != ProviderKind::Static,
                size: 0,
                upcoming: 0,
            }
        })
        .collect();
    let overhead: Vec<Resources> = pools
        .iter()
        .zip(&checked.capacities)
        .map(|(p, cap)| {
            let mut o = cap.clone();
            o.sub(&p.shape);
            o
        })
        .collect();

    // Pool membership.
    let capi = match (kind, objects.capi, cc.spec.provider.cluster_api.as_ref()) {
        (ProviderKind::ClusterApi, Some((mds, machines)), Some(spec)) => {
            Some(cluster_api::membership(spec, pools_spec, mds, machines))
        }
        _ => None,
    };
    let member = |n: &Node| -> Option<(usize, bool)> {
        if let Some(m) = &capi
            && let Some(found) = m.nodes.get(&n.name_any())
        {
            return Some(*found);
        }
        if kind == ProviderKind::ClusterApi {
            return None;
        }
        pool_of(&cluster, pools_spec, n).map(|p| (p, false))
    };

    // Pods by node, and by owning Job.
    let mut on_node: HashMap<&str, Vec<&CachedPod>> = HashMap::new();
    let mut bound_by_job: HashMap<&str, u32> = HashMap::new();
    for p in objects.pods {
        if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            on_node.entry(node).or_default().push(p);
            if is_live(p)
                && let Some(("Job", uid)) = owner_kind(p)
            {
                *bound_by_job.entry(uid).or_default() += 1;
            }
        }
    }

    let mut snap = Snapshot {
        input: PlanInput {
            cluster: cluster.clone(),
            allowed: cc.spec.workspaces.clone(),
            idle_time: checked.idle_time,
            now,
            ..Default::default()
        },
        nodes: Vec::new(),
        names: vec![Vec::new(); pools.len()],
        queue: Vec::new(),
        admitted: 0,
        deployment_found: vec![true; pools.len()],
        orphans: Vec::new(),
        idle_now: Vec::new(),
    };

    // Nodes.
    let mut seen_names: HashSet<String> = HashSet::new();
    for n in objects.nodes {
        let name = n.name_any();
        let Some((pool, capi_removing)) = member(n) else {
            // A node of a pool removed from the spec.
            if kind == ProviderKind::Kwok && n.labels().get(COMPUTE_CLUSTER_LABEL) == Some(&value) {
                let busy = on_node
                    .get(name.as_str())
                    .is_some_and(|ps| ps.iter().any(|p| is_live(p) && !is_node_pod(p)));
                if !busy && n.metadata.deletion_timestamp.is_none() {
                    snap.orphans.push((name, n.uid()));
                }
            }
            continue;
        };
        seen_names.insert(name.clone());
        snap.names[pool].push(name.clone());
        let pods = on_node.get(name.as_str()).map(Vec::as_slice).unwrap_or_default();
        let live: Vec<&&CachedPod> = pods.iter().filter(|p| is_live(p)).collect();
        let busy = live.iter().any(|p| !is_node_pod(p));
        let mut used = Resources::default();
        for p in live.iter().filter(|p| !is_node_pod(p)) {
            if let Some(spec) = &p.spec {
                used.add(&pod_requests(spec, None));
            }
        }
        let allocatable = n
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .map(Resources::from_list)
            .unwrap_or_else(|| checked.capacities[pool].clone());
        let mut capacity = allocatable.clone();
        capacity.sub(&overhead[pool]);
        let mut free = capacity.clone();
        free.sub(&used);
        let ready = node_ready(n);
        let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
        let mark = n.annotations().get(SCALE_DOWN_ANNOTATION);
        let draining = pending.drains.get(&name).copied().unwrap_or(mark.is_some());
        let state = if n.metadata.deletion_timestamp.is_some() || capi_removing || pending.removed.contains(&name) {
            NodeState::Removing
        } else if draining {
            NodeState::Draining
        } else {
            NodeState::Live
        };
        let created = ts(&n.metadata.creation_timestamp);
        let starting =
            created.is_some_and(|c| Duration::try_from(now.duration_since(c)).unwrap_or_default() < STARTING_GRACE);
        let schedulable = !cordoned && (ready || starting) && state == NodeState::Live;
        let idle_since = (!busy).then(|| {
            let seen = pending.idle_seen.get(&name).copied().unwrap_or(now);
            created.map_or(seen, |c| c.max(seen))
        });
        snap.idle_now.push((name.clone(), busy));
        // What a drain would evict, and whether a PodDisruptionBudget forbids it.
        let evictable: Vec<&&CachedPod> = live
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && !p.annotations().contains_key(MIRROR_ANNOTATION))
            .copied()
            .collect();
        let blocked = evictable.iter().find_map(|p| {
            let ns = p.namespace()?;
            objects.pdbs.iter().find_map(|b| {
                let allowed = b.status.as_ref().and_then(|s| s.disruptions_allowed).unwrap_or(0);
                let matches = b.namespace().as_deref() == Some(ns.as_str())
                    && selector_matches(b.spec.as_ref().and_then(|s| s.selector.as_ref()), p.labels());
                (matches && allowed <= 0).then(|| {
                    format!(
                        "pod {ns}/{} is protected by PodDisruptionBudget {ns}/{}, which allows no disruption now",
                        p.name_any(),
                        b.name_any()
                    )
                })
            })
        });
        let (labels, taints) = (&pools[pool].labels, &pools[pool].taints);
        let node_taints = n.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default();
        let needs_template = labels.iter().any(|(k, v)| n.labels().get(k) != Some(v))
            || taints
                .iter()
                .any(|t| !node_taints.iter().any(|nt| nt.key == t.key && nt.effect == t.effect));
        snap.nodes.push(NodeFacts {
            name: name.clone(),
            uid: n.uid(),
            resource_version: n.resource_version(),
            pool,
            draining_since: mark.and_then(|m| m.parse().ok()).or(draining.then_some(now)),
            evict: evictable
                .iter()
                .filter_map(|p| Some((p.namespace()?, p.name_any())))
                .collect(),
            busy,
            needs_template,
            allocatable,
            ready,
        });
        snap.input.nodes.push(NodeInput {
            name,
            pool,
            capacity,
            free,
            ready,
            schedulable,
            state,
            busy,
            idle_since,
            blocked,
        });
    }

    // Sizes: announced nodes not seen yet.
    for (i, pool) in pools.iter_mut().enumerate() {
        let nodes_here: Vec<&NodeInput> = snap.input.nodes.iter().filter(|n| n.pool == i).collect();
        match kind {
            ProviderKind::ClusterApi => {
                let written = pending.replicas.get(&pool.name).copied();
                let replicas = capi.as_ref().and_then(|m| m.replicas[i]);
                snap.deployment_found[i] = replicas.is_some();
                let replicas = written.or(replicas).unwrap_or(0);
                let counted = nodes_here.iter().filter(|n| n.state != NodeState::Removing).count() as u32;
                pool.size = replicas;
                pool.upcoming = replicas.saturating_sub(counted);
            }
            ProviderKind::Kwok => {
                let mut created: Vec<&String> = pending
                    .created
                    .iter()
                    .filter(|(n, p)| **p == pool.name && !seen_names.contains(*n))
                    .map(|(n, _)| n)
                    .collect();
                created.sort();
                pool.upcoming = created.len() as u32;
                snap.names[i].extend(created.into_iter().cloned());
                pool.size = nodes_here.len() as u32 + pool.upcoming;
            }
            ProviderKind::Static => pool.size = nodes_here.len() as u32,
        }
    }
    snap.input.pools = pools;

    // Jobs: the queue, admitted runs' unbound pods.
    let mut admitted_jobs: HashSet<&str> = HashSet::new();
    let mut queue: Vec<&CachedJob> = Vec::new();
    for j in objects.jobs {
        if j.labels().get(COMPUTE_CLUSTER_LABEL) != Some(&value) {
            continue;
        }
        let ns = j.namespace().unwrap_or_default();
        if waiting(j) {
            queue.push(j);
            continue;
        }
        if !holds_resources(j) {
            continue;
        }
        snap.admitted += 1;
        let uid = j.metadata.uid.as_deref().unwrap_or_default();
        admitted_jobs.insert(uid);
        let bound = bound_by_job.get(uid).copied().unwrap_or(0);
        let unbound = remaining_pods(j).saturating_sub(bound);
        if unbound > 0
            && let Some(spec) = template(j)
        {
            snap.input.demand.push(DemandInput {
                request: template_request(&ns, spec),
                count: unbound,
                constraints: Constraints::of(spec),
            });
        }
    }
    for p in objects.pods {
        let Some(spec) = &p.spec else { continue };
        let unbound = spec.node_name.is_none() && p.metadata.deletion_timestamp.is_none();
        let pending_phase = matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            None | Some("Pending")
        );
        let selects = spec.node_selector.as_ref().and_then(|s| s.get(COMPUTE_CLUSTER_LABEL)) == Some(&value);
        let of_admitted = owner_kind(p).is_some_and(|(k, uid)| k == "Job" && admitted_jobs.contains(uid));
        if unbound && pending_phase && selects && !of_admitted && !is_node_pod(p) {
            snap.input.demand.push(DemandInput {
                request: pod_requests(spec, None),
                count: 1,
                constraints: Constraints::of(spec),
            });
        }
    }
    queue.sort_by(|a, b| {
        let key = |j: &CachedJob| (ts(&j.metadata.creation_timestamp), j.name_any(), j.namespace());
        key(a).cmp(&key(b))
    });
    let mut queued_ws: BTreeSet<String> = BTreeSet::new();
    for j in queue {
        let ns = j.namespace().unwrap_or_default();
        let workspace = workspace_of.get(ns.as_str()).map(|w| w.to_string());
        if let Some(w) = &workspace {
            queued_ws.insert(w.clone());
        }
        let spec = template(j).cloned().unwrap_or_default();
        snap.input.queue.push(QueueInput {
            key: format!("{ns}/{}", j.name_any()),
            namespace: ns.clone(),
            workspace,
            pod: template_request(&ns, &spec),
            pods: parallelism(j),
            constraints: Constraints::of(&spec),
        });
        let a = j.annotations();
        snap.queue.push(QueuedJob {
            namespace: ns,
            name: j.name_any(),
            uid: j.metadata.uid.clone().unwrap_or_default(),
            resource_version: j.resource_version(),
            reason: a.get(crate::autoscaler::admission::QUEUE_REASON_ANNOTATION).cloned(),
            message: a.get(crate::autoscaler::admission::QUEUE_MESSAGE_ANNOTATION).cloned(),
        });
    }

    // Quotas and usage of the queued workspaces.
    for ws in &queued_ws {
        if let Some(q) = objects.quotas.get(ws) {
            snap.input.quotas.insert(ws.clone(), Quota::of(q));
        }
    }
    if !snap.input.quotas.is_empty() {
        let ns_of_ws: HashMap<&str, &str> = workspace_of
            .iter()
            .filter(|(_, w)| snap.input.quotas.contains_key(**w))
            .map(|(n, w)| (*n, *w))
            .collect();
        let mut usage: HashMap<String, Usage> = HashMap::new();
        let mut holding: HashSet<&str> = HashSet::new();
        for j in objects.jobs {
            let ns = j.namespace().unwrap_or_default();
            let Some(ws) = ns_of_ws.get(ns.as_str()) else { continue };
            if !holds_resources(j) || !j.labels().contains_key(RUN_LABEL) {
                continue;
            }
            holding.insert(j.metadata.uid.as_deref().unwrap_or_default());
            let u = usage.entry(ws.to_string()).or_default();
            u.active_runs += 1;
            // A run keeps its whole reservation until its Job ends (as
            // Kueue keeps a workload's quota until it finishes).
            if let Some(spec) = template(j) {
                u.requests
                    .add(&template_request(&ns, spec).times(i64::from(parallelism(j))));
            }
        }
        for p in objects.pods {
            let Some(ns) = p.metadata.namespace.as_deref() else {
                continue;
            };
            let Some(ws) = ns_of_ws.get(ns) else { continue };
            let of_holding = owner_kind(p).is_some_and(|(k, uid)| k == "Job" && holding.contains(uid));
            if is_live(p)
                && !of_holding
                && let Some(spec) = &p.spec
            {
                usage
                    .entry(ws.to_string())
                    .or_default()
                    .requests
                    .add(&pod_requests(spec, None));
            }
        }
        snap.input.usage = usage;
    }
    snap
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn cc(provider: Value, pools: Value) -> ComputeCluster {
        serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "ComputeCluster",
            "metadata": {"name": "gpu", "uid": "cc-uid"},
            "spec": {"provider": provider, "pools": pools, "idleTimeBeforeScaleDown": "60s", "workspaces": ["vision"]}
        }))
        .unwrap()
    }

    fn gpu_pools() -> Value {
        json!([{"name": "a100", "capacity": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1"}, "maxNodes": 4}])
    }

    fn node(name: &str, extra: Value) -> Arc<Node> {
        let mut n = json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"), "creationTimestamp": "2026-01-01T00:00:00Z",
                         "labels": {"mlplane.io/compute-cluster": "gpu", "mlplane.io/pool": "a100"}},
            "spec": {"taints": [{"key": "mlplane.io/compute-cluster", "value": "gpu", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        });
        merge(&mut n, extra);
        Arc::new(serde_json::from_value(n).unwrap())
    }

    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn run_template() -> Value {
        json!({"spec": {
            "nodeSelector": {"mlplane.io/compute-cluster": "gpu"},
            "tolerations": [{"key": "mlplane.io/compute-cluster", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
            "containers": [{"name": "run", "resources": {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}}}]
        }})
    }

    fn job(name: &str, created: &str, suspend: bool, parallelism: i32, extra: Value) -> Arc<CachedJob> {
        let mut j = json!({
            "metadata": {"name": name, "namespace": "vision", "uid": format!("uid-{name}"), "resourceVersion": "1",
                         "creationTimestamp": created,
                         "labels": {"mlplane.io/compute-cluster": "gpu", "mlplane.io/run": name}},
            "spec": {"suspend": suspend, "parallelism": parallelism, "completions": parallelism, "template": run_template()}
        });
        merge(&mut j, extra);
        Arc::new(serde_json::from_value(j).unwrap())
    }

    fn pod(name: &str, node: Option<&str>, owner: Value, phase: &str) -> Arc<CachedPod> {
        let mut spec = run_template()["spec"].clone();
        if let Some(n) = node {
            spec["nodeName"] = json!(n);
        }
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "vision", "labels": {"app": name}, "ownerReferences": owner},
                "spec": spec, "status": {"phase": phase}
            }))
            .unwrap(),
        )
    }

    fn ns(name: &str, ws: &str) -> Arc<PartialObjectMeta<Namespace>> {
        Arc::new(
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {WORKSPACE_LABEL: ws}}}))
            .unwrap(),
        )
    }

    struct Fixture {
        nodes: Vec<Arc<Node>>,
        pods: Vec<Arc<CachedPod>>,
        jobs: Vec<Arc<CachedJob>>,
        daemonsets: Vec<Arc<DaemonSet>>,
        pdbs: Vec<Arc<PodDisruptionBudget>>,
        namespaces: Vec<Arc<PartialObjectMeta<Namespace>>>,
        quotas: HashMap<String, WorkspaceQuota>,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                nodes: vec![],
                pods: vec![],
                jobs: vec![],
                daemonsets: vec![],
                pdbs: vec![],
                namespaces: vec![ns("vision", "vision")],
                quotas: HashMap::new(),
            }
        }

        fn snap(&self, cc: &ComputeCluster, pending: &Pending) -> Snapshot {
            let objects = Objects {
                nodes: &self.nodes,
                pods: &self.pods,
                jobs: &self.jobs,
                daemonsets: &self.daemonsets,
                pdbs: &self.pdbs,
                quotas: self.quotas.clone(),
                namespaces: &self.namespaces,
                capi: None,
            };
            snapshot(
                cc,
                &validate(cc).unwrap(),
                &objects,
                pending,
                at("2026-01-01T01:00:00Z"),
            )
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn job_owner(name: &str) -> Value {
        json!([{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": format!("uid-{name}"), "controller": true}])
    }

    #[test]
    fn invalid_quantities_and_durations_name_the_field() {
        let mut c = cc(json!({"kwok": {}}), gpu_pools());
        c.spec.pools[0].capacity.insert(
            "cpu".into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("x".into()),
        );
        assert!(validate(&c).unwrap_err().0.starts_with("spec.pools[0].capacity.cpu"));
        let mut c = cc(json!({"kwok": {}}), gpu_pools());
        c.spec.idle_time_before_scale_down = crate::api::Duration::from("soon");
        assert!(validate(&c).unwrap_err().0.starts_with("spec.idleTimeBeforeScaleDown"));
    }

    #[test]
    fn the_queue_is_in_arrival_order_and_admitted_runs_are_demand() {
        let c = cc(json!({"kwok": {}}), gpu_pools());
        let mut f = Fixture::new();
        f.jobs = vec![
            job("b", "2026-01-01T00:00:02Z", true, 1, json!({})),
            job("a", "2026-01-01T00:00:02Z", true, 3, json!({})),
            job("first", "2026-01-01T00:00:01Z", true, 1, json!({})),
            // Cancelled: not queued.
            job(
                "cancelled",
                "2026-01-01T00:00:00Z",
                true,
                1,
                json!({"metadata": {"annotations": {CANCEL_ANNOTATION: "Suspended"}}}),
            ),
            // Admitted, 2 pods, one bound: one pod of demand.
            job("running", "2026-01-01T00:00:00Z", false, 2, json!({})),
            // Another cluster's.
            job(
                "other",
                "2026-01-01T00:00:00Z",
                true,
                1,
                json!({"metadata": {"labels": {"mlplane.io/compute-cluster": "cpu"}}}),
            ),
        ];
        f.nodes = vec![node("gpu-a100-0", json!({}))];
        f.pods = vec![pod("running-0", Some("gpu-a100-0"), job_owner("running"), "Running")];
        let s = f.snap(&c, &Pending::default());
        let keys: Vec<&str> = s.input.queue.iter().map(|q| q.key.as_str()).collect();
        assert_eq!(keys, ["vision/first", "vision/a", "vision/b"]);
        assert_eq!(s.input.queue[1].pods, 3);
        assert_eq!(s.input.queue[0].workspace.as_deref(), Some("vision"));
        assert_eq!(s.input.queue[0].pod.gpu, 1);
        assert_eq!(s.admitted, 1);
        assert_eq!(s.input.demand.len(), 1);
        assert_eq!(s.input.demand[0].count, 1);
        // The bound run pod makes its node busy and uses its GPU.
        assert!(s.input.nodes[0].busy);
        assert_eq!(s.input.nodes[0].free.gpu, 0);
        assert_eq!(s.input.nodes[0].idle_since, None);
    }

    #[test]
    fn daemonsets_take_their_share_of_every_pool_node_they_run_on() {
        let c = cc(json!({"kwok": {}}), gpu_pools());
        let mut f = Fixture::new();
        let ds = |tolerate: bool| -> Arc<DaemonSet> {
            let tol = if tolerate {
                json!([{"operator": "Exists"}])
            } else {
                json!([])
            };
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": "agent", "namespace": "kube-system"},
                    "spec": {"selector": {}, "template": {"spec": {"tolerations": tol,
                        "containers": [{"name": "a", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}}}
                }))
                .unwrap(),
            )
        };
        f.daemonsets = vec![ds(true), ds(false)];
        f.nodes = vec![node("gpu-a100-0", json!({}))];
        f.pods = vec![pod(
            "agent-x",
            Some("gpu-a100-0"),
            json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": "ds", "controller": true}]),
            "Running",
        )];
        let s = f.snap(&c, &Pending::default());
        // Only the tolerating DaemonSet runs on the tainted pool.
        assert_eq!(s.input.pools[0].shape.cpu, 23_000);
        assert_eq!(s.input.pools[0].shape.memory, 219 << 30);
        // Its pod does not make the node busy and is not counted twice.
        assert!(!s.input.nodes[0].busy);
        assert_eq!(s.input.nodes[0].free.cpu, 23_000);
        assert_eq!(s.nodes[0].evict, [("vision".to_string(), "agent-x".to_string())]);
        assert!(s.input.nodes[0].idle_since.is_some());
    }

    #[test]
    fn a_pdb_that_allows_no_disruption_blocks_the_drain() {
        let c = cc(json!({"kwok": {}}), gpu_pools());
        let mut f = Fixture::new();
        f.nodes = vec![node("gpu-a100-0", json!({}))];
        f.pods = vec![pod(
            "agent-x",
            Some("gpu-a100-0"),
            json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": "ds", "controller": true}]),
            "Running",
        )];
        let pdb = |allowed: i32| -> Arc<PodDisruptionBudget> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": "keep", "namespace": "vision"},
                    "spec": {"selector": {"matchLabels": {"app": "agent-x"}}, "maxUnavailable": 0},
                    "status": {"disruptionsAllowed": allowed, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}
                }))
                .unwrap(),
            )
        };
        f.pdbs = vec![pdb(0)];
        let s = f.snap(&c, &Pending::default());
        assert!(
            s.input.nodes[0]
                .blocked
                .as_ref()
                .unwrap()
                .contains("PodDisruptionBudget vision/keep")
        );
        f.pdbs = vec![pdb(1)];
        assert_eq!(f.snap(&c, &Pending::default()).input.nodes[0].blocked, None);
    }

    #[test]
    fn node_states_sizes_and_writes_not_seen_yet() {
        let c = cc(json!({"kwok": {}}), gpu_pools());
        let mut f = Fixture::new();
        f.nodes = vec![
            node("gpu-a100-0", json!({})),
            node(
                "gpu-a100-1",
                json!({"metadata": {"annotations": {SCALE_DOWN_ANNOTATION: "2026-01-01T00:59:00Z"}},
                                       "spec": {"unschedulable": true}}),
            ),
            node(
                "gpu-a100-2",
                json!({"metadata": {"labels": {"mlplane.io/pool": "gone"}}}),
            ),
        ];
        let pending = Pending {
            created: HashMap::from([("gpu-a100-3".to_string(), "a100".to_string())]),
            idle_seen: HashMap::from([("gpu-a100-0".to_string(), at("2026-01-01T00:30:00Z"))]),
            ..Default::default()
        };
        let s = f.snap(&c, &pending);
        assert_eq!(s.input.nodes.len(), 2);
        assert_eq!(s.input.nodes[0].state, NodeState::Live);
        assert_eq!(s.input.nodes[0].idle_since, Some(at("2026-01-01T00:30:00Z")));
        assert_eq!(s.input.nodes[1].state, NodeState::Draining);
        assert!(!s.input.nodes[1].schedulable);
        assert_eq!(s.nodes[1].draining_since, Some(at("2026-01-01T00:59:00Z")));
        assert_eq!((s.input.pools[0].size, s.input.pools[0].upcoming), (3, 1));
        assert_eq!(s.names[0], ["gpu-a100-0", "gpu-a100-1", "gpu-a100-3"]);
        assert_eq!(
            s.orphans,
            [("gpu-a100-2".to_string(), Some("uid-gpu-a100-2".to_string()))]
        );
        // An undrain written but not seen yet wins over the cached mark.
        let pending = Pending {
            drains: HashMap::from([("gpu-a100-1".to_string(), false)]),
            ..Default::default()
        };
        assert_eq!(f.snap(&c, &pending).input.nodes[1].state, NodeState::Live);
    }

    #[test]
    fn usage_counts_admitted_runs_and_other_pods_of_the_workspace() {
        let c = cc(json!({"kwok": {}}), gpu_pools());
        let mut f = Fixture::new();
        f.quotas.insert(
            "vision".into(),
            serde_json::from_value(json!({"gpu": 2, "maxActiveRuns": 5})).unwrap(),
        );
        let mut no_cc = (*job("plain", "2026-01-01T00:00:00Z", false, 1, json!({}))).clone();
        no_cc.metadata.labels.as_mut().unwrap().remove(COMPUTE_CLUSTER_LABEL);
        f.jobs = vec![
            job("waiting", "2026-01-01T00:00:00Z", true, 1, json!({})),
            // One of its two pods is done: the run still holds both until it ends.
            job(
                "running",
                "2026-01-01T00:00:00Z",
                false,
                2,
                json!({"status": {"succeeded": 1}}),
            ),
            Arc::new(no_cc),
            job(
                "done",
                "2026-01-01T00:00:00Z",
                false,
                1,
                json!({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}),
            ),
        ];
        f.pods = vec![
            pod("running-0", Some("n"), job_owner("running"), "Running"),
            pod("serving", Some("n"), json!([]), "Running"),
            pod("done-0", Some("n"), job_owner("done"), "Succeeded"),
        ];
        let s = f.snap(&c, &Pending::default());
        let u = &s.input.usage["vision"];
        // running: 2 pods reserved; plain: 1; the serving pod: 1.
        assert_eq!((u.active_runs, u.requests.gpu), (2, 4));
        assert_eq!(s.input.quotas["vision"].gpu, Some(2));
    }

    #[test]
    fn other_pending_pods_that_select_the_cluster_are_demand() {
        let c = cc(json!({"kwok": {}}), gpu_pools());
        let mut f = Fixture::new();
        f.pods = vec![
            pod("serve-0", None, json!([]), "Pending"),
            pod("elsewhere", None, json!([]), "Pending"),
        ];
        let mut other = (*f.pods[1]).clone();
        other.spec.as_mut().unwrap().node_selector = None;
        f.pods[1] = Arc::new(other);
        let s = f.snap(&c, &Pending::default());
        assert_eq!(s.input.demand.len(), 1);
        assert_eq!(s.input.demand[0].request.gpu, 1);
    }

    #[test]
    fn selectors() {
        let l = BTreeMap::from([("app".to_string(), "x".to_string())]);
        let sel = |v: Value| -> LabelSelector { serde_json::from_value(v).unwrap() };
        assert!(selector_matches(Some(&sel(json!({}))), &l));
        assert!(!selector_matches(None, &l));
        assert!(selector_matches(Some(&sel(json!({"matchLabels": {"app": "x"}}))), &l));
        assert!(!selector_matches(
            Some(&sel(
                json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]})
            )),
            &l
        ));
    }
}
