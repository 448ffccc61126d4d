//! The ComputeCluster controller's I/O driver. One pass of a cluster:
//! validate → (clusterAPI: find the Cluster API kinds) → snapshot the caches
//! → plan → admit or annotate queued runs → grow pools → take drained nodes
//! back, start and continue drains, remove drained nodes → status, events
//! and metrics, each written only when it changed.
//!
//! Owns: the writes the plan calls for: run Jobs' `spec.suspend` and queue
//! annotations (never on a Job carrying `mlplane.io/cancel-reason`: the
//! admission patch carries the Job's resourceVersion, so a Job changed
//! since it was read, e.g. just cancelled, refuses it), node cordons and
//! evictions, the providers' calls, ComputeCluster status. Must not create
//! or delete run Jobs.
//!
//! Passes that admit are serialized (one lock for every cluster), because a
//! workspace's quota spans clusters: a pass sees every admission before it,
//! through the caches or the controller's own writes not seen there yet.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::observe::{Caches, CapiCaches, SCALE_DOWN_ANNOTATION, Written, strip_job};
use super::scale_down::{Drained, cordon, evict, uncordon};
use super::snapshot::{NodeFacts, Objects, Pending, ProviderKind, QueuedJob, Snapshot, snapshot, validate};
use super::status::{self as cstatus, CLUSTER_API_NOT_INSTALLED, INVALID_SPEC, MACHINE_DEPLOYMENT_NOT_FOUND, Scaled};
use crate::api::{
    ComputeCluster, ComputeClusterPhase, ComputeClusterStatus, NewCondition, Pool, READY, Tier, set_condition,
};
use crate::autoscaler::admission::{
    ADMITTED_AT_ANNOTATION, Outcome, QUEUE_MESSAGE_ANNOTATION, QUEUE_REASON_ANNOTATION, QueueReason,
};
use crate::autoscaler::plan::{NodeState, Plan, plan};
use crate::autoscaler::providers::cluster_api::{self, ClusterApiProvider};
use crate::autoscaler::providers::kwok::KwokProvider;
use crate::autoscaler::providers::r#static::StaticProvider;
use crate::autoscaler::providers::{NodeProvider, NodeRef, pool_labels, pool_taints};
use crate::controllers::cached::CachedJob;
use crate::controllers::status_writer::{Key as StatusKey, StatusWriter};
use crate::controllers::{Context, Result};

pub(super) const KIND: &str = "ComputeCluster";
/// A cordoned node is evicted only this long after the cordon, so that any
/// pod bound just before it shows in the pod cache (and stops the drain).
pub const DRAIN_SETTLE: Duration = Duration::from_secs(2);
/// Requeue while nodes drain.
const DRAIN_POLL: Duration = Duration::from_secs(2);
/// Requeue while runs wait (quota and capacity free up through changes on
/// other clusters and namespaces too).
const QUEUE_POLL: Duration = Duration::from_secs(5);
/// Requeue while a drain is blocked by a PodDisruptionBudget.
const BLOCKED_POLL: Duration = Duration::from_secs(10);
/// Requeue while the cluster cannot be acted on.
const DEGRADED_POLL: Duration = Duration::from_secs(15);
/// How often a clusterAPI cluster looks for the Cluster API kinds again.
const CAPI_RECHECK: Duration = Duration::from_secs(10);

/// The controller's writes not seen in its caches yet.
#[derive(Default)]
pub struct Writes {
    /// Admitted Jobs (stripped), by uid.
    pub admitted: Written<Arc<CachedJob>>,
    /// Queue annotations written, by Job uid.
    pub queued: Written<(String, String)>,
    /// Nodes created: name -> (cluster, pool).
    pub created: Written<(String, String)>,
    /// Nodes whose removal was requested, by name.
    pub removed: Written<()>,
    /// Drain marks: node -> draining.
    pub drains: Written<bool>,
    /// MachineDeployment replicas written, by `cluster/pool`.
    pub replicas: Written<u32>,
}

/// A cluster's contribution to the metrics.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub provider: &'static str,
    /// Per tier: (nodes, desired nodes).
    pub nodes: HashMap<&'static str, (i64, i64)>,
    pub pending: i64,
    pub queue: HashMap<QueueReason, i64>,
}

/// What the controller remembers between passes (lost on restart, which
/// only delays scale-down).
#[derive(Default)]
pub struct Memory {
    /// Since when each node has been seen idle.
    pub idle_seen: HashMap<String, Timestamp>,
    /// Ready nodes seen, per cluster (for the scale-up latency).
    pub ready_seen: HashMap<String, HashSet<String>>,
    /// When nodes were asked for, per (cluster, pool).
    pub scale_ups: HashMap<(String, String), VecDeque<Instant>>,
    /// Last message of reported conditions (to report each once).
    pub reported: HashMap<String, String>,
    /// Metrics per cluster.
    pub figures: HashMap<String, Figures>,
}

/// The ComputeCluster controller's context.
pub struct ClusterContext {
    pub base: Arc<Context>,
    pub caches: Arc<Caches>,
    pub clusters: Store<DeserializeGuard<ComputeCluster>>,
    /// One pass at a time plans and admits.
    pub admission: tokio::sync::Mutex<()>,
    pub writes: Writes,
    pub memory: Mutex<Memory>,
    pub trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<DeserializeGuard<ComputeCluster>>>,
    pub capi_checked: Mutex<Option<Instant>>,
    pub stop: CancellationToken,
    /// Status writes, and the last one written until the watch shows it.
    pub statuses: StatusWriter<ComputeCluster, ComputeClusterStatus>,
}

impl std::ops::Deref for ClusterContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.base
    }
}

/// The clusters whose label value is `value`.
pub fn clusters_labelled(
    store: &Store<DeserializeGuard<ComputeCluster>>,
    value: &str,
) -> Vec<ObjectRef<DeserializeGuard<ComputeCluster>>> {
    store
        .state()
        .iter()
        .map(|c| c.name_any())
        .filter(|n| crate::controllers::run::names::label_value(n) == value)
        .map(|n| ObjectRef::new(&n))
        .collect()
}

enum Provider<'a> {
    Kwok(KwokProvider<'a>),
    ClusterApi(ClusterApiProvider<'a>),
    Static(StaticProvider),
}

impl Provider<'_> {
    async fn grow(&self, pool: &Pool, existing: &[String], size: u32, add: u32) -> kube::Result<Vec<String>> {
        match self {
            Provider::Kwok(p) => p.grow(pool, existing, size, add).await,
            Provider::ClusterApi(p) => p.grow(pool, existing, size, add).await,
            Provider::Static(p) => p.grow(pool, existing, size, add).await,
        }
    }

    async fn remove(&self, pool: &Pool, size: u32, nodes: &[NodeRef]) -> kube::Result<()> {
        match self {
            Provider::Kwok(p) => p.remove(pool, size, nodes).await,
            Provider::ClusterApi(p) => p.remove(pool, size, nodes).await,
            Provider::Static(p) => p.remove(pool, size, nodes).await,
        }
    }
}

impl ClusterContext {
    /// The Cluster API caches, started the first time the kinds are found;
    /// `None` while the cluster does not serve them.
    async fn capi(&self) -> Result<Option<&CapiCaches>> {
        if let Some(c) = self.caches.capi.get() {
            c.ready().await;
            return Ok(Some(c));
        }
        {
            let mut last = self.capi_checked.lock().expect("capi lock");
            if last.is_some_and(|t| t.elapsed() < CAPI_RECHECK) {
                return Ok(None);
            }
            *last = Some(Instant::now());
        }
        let Some(resources) = cluster_api::discover(&self.client).await? else {
            return Ok(None);
        };
        let (store, tx) = (self.clusters.clone(), self.trigger.clone());
        // A MachineDeployment or Machine change reaches the clusters that
        // name its MachineDeployment.
        let on_change = move |obj: &kube::api::DynamicObject| {
            let ns = obj.metadata.namespace.as_deref().unwrap_or_default();
            let md = match obj.types.as_ref().map(|t| t.kind.as_str()) {
                Some("Machine") => obj.labels().get(cluster_api::DEPLOYMENT_NAME_LABEL).cloned(),
                _ => obj.metadata.name.clone(),
            };
            let Some(md) = md else { return };
            for c in store.state() {
                let Ok(cc) = &c.0 else { continue };
                if let Some(spec) = &cc.spec.provider.cluster_api
                    && spec.namespace == ns
                    && spec.machine_deployments.values().any(|m| *m == md)
                {
                    let _ = tx.unbounded_send(ObjectRef::new(&cc.name_any()));
                }
            }
        };
        let c = self
            .caches
            .start_capi(&self.client, resources, on_change, self.stop.clone());
        tokio::time::timeout(Duration::from_secs(30), c.ready())
            .await
            .map_err(|_| {
                crate::controllers::Error::InvalidObject("the Cluster API caches did not sync in 30 s".into())
            })?;
        Ok(Some(c))
    }

    /// Publishes `note` as `reason` on the cluster once per change of `key`'s message.
    async fn report_once(&self, cc: &ComputeCluster, key: String, reason: &str, note: String) {
        let fresh = {
            let mut m = self.memory.lock().expect("memory lock");
            m.reported.insert(key, note.clone()).as_ref() != Some(&note)
        };
        if fresh {
            self.event(cc, EventType::Warning, reason, "ScaleDown", note).await;
        }
    }

    /// Recomputes the gauges from every cluster's figures, dropping clusters
    /// that are gone.
    pub fn refresh_metrics(&self) {
        let live: HashSet<String> = self.clusters.state().iter().map(|c| c.name_any()).collect();
        let mut m = self.memory.lock().expect("memory lock");
        m.figures.retain(|k, _| live.contains(k));
        let metrics = &self.metrics;
        let mut nodes: HashMap<(&str, &str), (i64, i64)> = HashMap::new();
        let mut pending = 0;
        let mut queue: HashMap<QueueReason, i64> = HashMap::new();
        for f in m.figures.values() {
            for (tier, (n, desired)) in &f.nodes {
                let e = nodes.entry((f.provider, tier)).or_default();
                e.0 += n;
                e.1 += desired;
            }
            pending += f.pending;
            for (r, n) in &f.queue {
                *queue.entry(*r).or_default() += n;
            }
        }
        // Every (provider, tier) pair is set, 0 when no cluster has it: the
        // label set is small and fixed, and no series goes stale.
        for provider in [ProviderKind::Kwok, ProviderKind::ClusterApi, ProviderKind::Static] {
            for tier in [Tier::Dedicated, Tier::Spot] {
                let labels = [provider.as_str(), tier_label(tier)];
                let (n, d) = nodes.get(&(labels[0], labels[1])).copied().unwrap_or_default();
                metrics.compute_nodes.with_label_values(&labels).set(n);
                metrics.compute_desired_nodes.with_label_values(&labels).set(d);
            }
        }
        metrics.compute_pending_pods.set(pending);
        for r in QueueReason::ALL {
            metrics
                .compute_queue
                .with_label_values(&[r.as_str()])
                .set(queue.get(&r).copied().unwrap_or(0));
        }
    }
}

fn tier_label(t: Tier) -> &'static str {
    match t {
        Tier::Dedicated => "Dedicated",
        Tier::Spot => "Spot",
    }
}

fn is_code(e: &kube::Error, codes: &[u16]) -> bool {
    matches!(e, kube::Error::Api(s) if codes.contains(&s.code))
}

/// Marks the cluster not Ready (`reason`), once per change.
async fn degrade(cc: &ComputeCluster, ctx: &ClusterContext, reason: &str, message: String) -> Result<Action> {
    let api: Api<ComputeCluster> = Api::all(ctx.client.clone());
    // The last status written, while the cache may not show it yet: pool
    // timestamps (lastScaleUp) carry over from it.
    let current = ctx.statuses.current(&StatusKey::of(cc), cc.status.as_ref());
    let mut status = current.clone().unwrap_or_default();
    let generation = cc.metadata.generation;
    status.phase = Some(ComputeClusterPhase::Degraded);
    status.observed_generation = generation;
    let was = status
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.clone());
    set_condition(
        &mut status.conditions,
        NewCondition::new(READY, false, reason, message.clone()).observed_generation(generation),
        &Time(Timestamp::now()),
    );
    if ctx
        .statuses
        .write_now(&api, StatusKey::of(cc), current.as_ref(), &status)
        .await?
        && was.as_deref() != Some(reason)
    {
        ctx.event(cc, EventType::Warning, reason, "Reconcile", message).await;
    }
    ctx.reset_failures(&cc.uid().unwrap_or_default());
    Ok(Action::requeue(DEGRADED_POLL))
}

/// Cached run Jobs with this process's admissions laid over.
fn jobs_with_writes(ctx: &ClusterContext) -> Vec<Arc<CachedJob>> {
    let mut jobs = ctx.caches.jobs.state();
    let by_uid: HashMap<String, usize> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, j)| Some((j.metadata.uid.clone()?, i)))
        .collect();
    let admitted = ctx.writes.admitted.prune(|uid, written| {
        let Some(i) = by_uid.get(uid) else { return false };
        let want = written.annotations().get(ADMITTED_AT_ANNOTATION);
        jobs[*i].annotations().get(ADMITTED_AT_ANNOTATION) == want
    });
    for (uid, job) in admitted {
        if let Some(i) = by_uid.get(&uid) {
            jobs[*i] = job;
        }
    }
    jobs
}

/// The writes of this cluster the caches do not show yet.
fn pending_writes(
    ctx: &ClusterContext,
    cc: &str,
    nodes: &[Arc<Node>],
    capi: Option<(&[Arc<kube::api::DynamicObject>], &ComputeCluster)>,
) -> Pending {
    let names: HashMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), n.as_ref())).collect();
    let created = ctx
        .writes
        .created
        .prune(|name, _| names.contains_key(name))
        .into_iter()
        .filter(|(_, (c, _))| c == cc)
        .map(|(n, (_, p))| (n, p))
        .collect();
    let removed = ctx
        .writes
        .removed
        .prune(|name, _| !names.contains_key(name))
        .into_keys()
        .collect();
    let drains = ctx.writes.drains.prune(|name, draining| {
        names
            .get(name)
            .is_none_or(|n| n.annotations().contains_key(SCALE_DOWN_ANNOTATION) == *draining)
    });
    let prefix = format!("{cc}/");
    let replicas = ctx
        .writes
        .replicas
        .prune(|key, value| {
            let Some((mds, cc)) = capi else { return false };
            let Some(pool) = key.strip_prefix(&prefix) else {
                return false;
            };
            let Some(spec) = &cc.spec.provider.cluster_api else {
                return true;
            };
            let Some(md) = spec.machine_deployments.get(pool) else {
                return true;
            };
            mds.iter().any(|d| {
                d.metadata.namespace.as_deref() == Some(spec.namespace.as_str())
                    && d.metadata.name.as_ref() == Some(md)
                    && cluster_api::replicas(d) == Some(*value)
            })
        })
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v)))
        .collect();
    let idle_seen = ctx.memory.lock().expect("memory lock").idle_seen.clone();
    Pending {
        created,
        removed,
        drains,
        replicas,
        idle_seen,
    }
}

/// A Job reference good enough for events.
fn job_ref(q: &QueuedJob) -> Job {
    Job {
        metadata: ObjectMeta {
            name: Some(q.name.clone()),
            namespace: Some(q.namespace.clone()),
            uid: Some(q.uid.clone()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn placement(placed: &BTreeMap<usize, u32>, pools: &[Pool]) -> String {
    placed
        .iter()
        .map(|(p, n)| {
            format!(
                "{n} pod(s) on pool {}",
                pools.get(*p).map(|p| p.name.as_str()).unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Admits or annotates the queued runs; returns whether some write was
/// refused (to retry soon).
async fn apply_queue(cc: &ComputeCluster, ctx: &ClusterContext, snap: &Snapshot, plan: &Plan) -> Result<bool> {
    let name = cc.name_any();
    let mut conflicts = false;
    let written = ctx.writes.queued.prune(|uid, (r, m)| {
        snap.queue
            .iter()
            .find(|q| q.uid == uid)
            .is_none_or(|q| q.reason.as_deref() == Some(r.as_str()) && q.message.as_deref() == Some(m.as_str()))
    });
    for (q, outcome) in snap.queue.iter().zip(&plan.outcomes) {
        // The answer decodes as the cache holds Jobs: it stands in for the
        // cached Job until the watch shows the admission.
        let jobs: Api<CachedJob> = Api::namespaced(ctx.client.clone(), &q.namespace);
        match outcome {
            Outcome::Admitted(placed) => {
                let patch = json!({
                    "metadata": {
                        "resourceVersion": q.resource_version,
                        "annotations": {
                            ADMITTED_AT_ANNOTATION: Timestamp::now().to_string(),
                            QUEUE_REASON_ANNOTATION: null,
                            QUEUE_MESSAGE_ANNOTATION: null,
                        },
                    },
                    "spec": {"suspend": false},
                });
                match jobs
                    .patch(&q.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(mut job) => {
                        strip_job(&mut job);
                        ctx.writes.admitted.put(q.uid.clone(), Arc::new(job));
                        ctx.metrics.compute_admissions.inc();
                        let at = placement(placed, &cc.spec.pools);
                        ctx.event(
                            &job_ref(q),
                            EventType::Normal,
                            "Admitted",
                            "Admit",
                            format!("admitted by ComputeCluster {name}: {at}"),
                        )
                        .await;
                        ctx.event(
                            cc,
                            EventType::Normal,
                            "Admitted",
                            "Admit",
                            format!("admitted run {}/{}: {at}", q.namespace, q.name),
                        )
                        .await;
                    }
                    // Changed since it was read (cancelled, say) or gone: next pass.
                    Err(e) if is_code(&e, &[404, 409]) => conflicts = true,
                    Err(e) => return Err(e.into()),
                }
            }
            Outcome::Waiting(reason, message) => {
                let current = written
                    .get(&q.uid)
                    .map(|(r, m)| (Some(r.as_str()), Some(m.as_str())))
                    .unwrap_or((q.reason.as_deref(), q.message.as_deref()));
                if current == (Some(reason.as_str()), Some(message.as_str())) {
                    continue;
                }
                let patch = json!({"metadata": {"annotations": {
                    QUEUE_REASON_ANNOTATION: reason.as_str(),
                    QUEUE_MESSAGE_ANNOTATION: message,
                }}});
                match jobs
                    .patch(&q.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        ctx.writes
                            .queued
                            .put(q.uid.clone(), (reason.as_str().to_string(), message.clone()));
                    }
                    Err(e) if is_code(&e, &[404]) => continue,
                    Err(e) => return Err(e.into()),
                }
                let type_ = match reason {
                    QueueReason::ExceedsPoolMaximum | QueueReason::NotAllowedInWorkspace => EventType::Warning,
                    _ => EventType::Normal,
                };
                ctx.event(
                    &job_ref(q),
                    type_,
                    "Queued",
                    "Queue",
                    format!(
                        "waiting in the queue of ComputeCluster {name}: {}: {message}",
                        reason.as_str()
                    ),
                )
                .await;
                ctx.event(
                    cc,
                    type_,
                    "Queued",
                    "Queue",
                    format!("run {}/{} waits: {}: {message}", q.namespace, q.name, reason.as_str()),
                )
                .await;
            }
        }
    }
    Ok(conflicts)
}

/// Labels and taints a clusterAPI node lacks of its pool's.
async fn label_node(ctx: &ClusterContext, cluster: &str, pool: &Pool, node: &Node) -> Result<()> {
    let mut taints: Vec<Taint> = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    for t in pool_taints(cluster, pool) {
        if !taints.iter().any(|x| x.key == t.key && x.effect == t.effect) {
            taints.push(t);
        }
    }
    let patch = json!({
        "metadata": {"resourceVersion": node.resource_version(), "labels": pool_labels(cluster, pool)},
        "spec": {"taints": taints},
    });
    match Api::<Node>::all(ctx.client.clone())
        .patch(&node.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_code(&e, &[404, 409]) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// One pass of a ComputeCluster (see the module docs).
pub async fn reconcile(cc: &ComputeCluster, ctx: &ClusterContext) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let name = cc.name_any();
    if cc.metadata.deletion_timestamp.is_some() {
        // Simulated nodes go with the ownerReference cascade.
        return Ok(Action::await_change());
    }
    ctx.caches.ready().await;
    let kind = ProviderKind::of(cc);
    let checked = match validate(cc) {
        Ok(v) => v,
        Err(e) => return degrade(cc, ctx, INVALID_SPEC, e.0).await,
    };
    let capi = if kind == ProviderKind::ClusterApi {
        match ctx.capi().await? {
            Some(c) => Some(c),
            None => {
                return degrade(
                    cc,
                    ctx,
                    CLUSTER_API_NOT_INSTALLED,
                    "spec.provider.clusterAPI: the cluster does not serve the Cluster API kinds MachineDeployment \
                     and Machine (cluster.x-k8s.io): install Cluster API, or use the kwok or static provider"
                        .into(),
                )
                .await;
            }
        }
    } else {
        None
    };

    // Observe and plan; admissions of every cluster one at a time.
    let guard = ctx.admission.lock().await;
    let now = Timestamp::now();
    let nodes = ctx.caches.nodes.state();
    let pods = ctx.caches.pods.state();
    let jobs = jobs_with_writes(ctx);
    let daemonsets = ctx.caches.daemonsets.state();
    let pdbs = ctx.caches.pdbs.state();
    let namespaces = ctx.caches.namespaces.state();
    let capi_state = capi.map(|c| (c.deployments.state(), c.machines.state()));
    let quotas = ctx
        .caches
        .workspaces
        .state()
        .iter()
        .filter_map(|w| {
            let ws = w.0.as_ref().ok()?;
            Some((ws.name_any(), ws.spec.quota.clone()?))
        })
        .collect();
    let pending = pending_writes(ctx, &name, &nodes, capi_state.as_ref().map(|(d, _)| (d.as_slice(), cc)));
    let objects = Objects {
        nodes: &nodes,
        pods: &pods,
        jobs: &jobs,
        daemonsets: &daemonsets,
        pdbs: &pdbs,
        quotas,
        namespaces: &namespaces,
        capi: capi_state.as_ref().map(|(d, m)| (d.as_slice(), m.as_slice())),
    };
    let snap = snapshot(cc, &checked, &objects, &pending, now);
    {
        let mut m = ctx.memory.lock().expect("memory lock");
        let cached: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
        m.idle_seen.retain(|n, _| cached.contains(n));
        for (node, busy) in &snap.idle_now {
            if *busy {
                m.idle_seen.remove(node);
            } else {
                m.idle_seen.entry(node.clone()).or_insert(now);
            }
        }
    }
    let missing: Vec<String> = cc
        .spec
        .pools
        .iter()
        .zip(&snap.deployment_found)
        .filter(|(_, found)| !**found)
        .map(|(p, _)| {
            let md = cc
                .spec
                .provider
                .cluster_api
                .as_ref()
                .and_then(|s| s.machine_deployments.get(&p.name))
                .cloned()
                .unwrap_or_default();
            format!("pool {}: MachineDeployment {md}", p.name)
        })
        .collect();
    if !missing.is_empty() {
        drop(guard);
        let ns = cc
            .spec
            .provider
            .cluster_api
            .as_ref()
            .map(|s| s.namespace.clone())
            .unwrap_or_default();
        return degrade(
            cc,
            ctx,
            MACHINE_DEPLOYMENT_NOT_FOUND,
            format!(
                "spec.provider.clusterAPI.machineDeployments: not found in namespace {ns}: {}",
                missing.join(", ")
            ),
        )
        .await;
    }
    let plan = plan(&snap.input);
    let conflicts = apply_queue(cc, ctx, &snap, &plan).await?;
    drop(guard);

    // Carry out the sizes.
    let provider = match (kind, capi, &cc.spec.provider.cluster_api) {
        (ProviderKind::ClusterApi, Some(c), Some(spec)) => Provider::ClusterApi(ClusterApiProvider {
            client: ctx.client.clone(),
            resources: &c.resources,
            spec,
            machines: capi_state.as_ref().map(|(_, m)| m.as_slice()).unwrap_or_default(),
        }),
        (ProviderKind::Static, _, _) => Provider::Static(StaticProvider),
        _ => Provider::Kwok(KwokProvider {
            client: ctx.client.clone(),
            cc,
        }),
    };
    let pools = &cc.spec.pools;
    let mut scaled = Scaled {
        up: vec![false; pools.len()],
        down: vec![false; pools.len()],
    };
    let mut requeue = ctx.settings.resync;
    let mut blocked_now: HashSet<String> = HashSet::new();
    let facts: HashMap<&str, (&NodeFacts, NodeState)> = snap
        .nodes
        .iter()
        .zip(&snap.input.nodes)
        .map(|(f, n)| (f.name.as_str(), (f, n.state)))
        .collect();
    for (i, (pool, pp)) in pools.iter().zip(&plan.pools).enumerate() {
        let size = snap.input.pools[i].size;
        for node in &pp.undrain {
            uncordon(&ctx.client, node).await?;
            ctx.writes.drains.put(node.clone(), false);
            ctx.event(
                cc,
                EventType::Normal,
                "DrainCancelled",
                "ScaleDown",
                format!("node {node} of pool {} is needed again: uncordoned", pool.name),
            )
            .await;
        }
        if pp.add > 0 {
            let made = provider.grow(pool, &snap.names[i], size, pp.add).await?;
            for n in &made {
                ctx.writes.created.put(n.clone(), (name.clone(), pool.name.clone()));
            }
            if kind == ProviderKind::ClusterApi {
                ctx.writes.replicas.put(format!("{name}/{}", pool.name), size + pp.add);
            }
            {
                let mut m = ctx.memory.lock().expect("memory lock");
                let q = m.scale_ups.entry((name.clone(), pool.name.clone())).or_default();
                q.extend(std::iter::repeat_n(Instant::now(), pp.add as usize));
            }
            scaled.up[i] = true;
            let why = if pp.pending_pods > 0 {
                format!("for {} waiting pod(s)", pp.pending_pods)
            } else {
                format!("to minNodes {}", pool.min_nodes)
            };
            ctx.event(
                cc,
                EventType::Normal,
                "ScaledUp",
                "ScaleUp",
                format!("scaled pool {} from {size} to {} {why}", pool.name, size + pp.add),
            )
            .await;
        }
        for (node, why) in &pp.blocked {
            requeue = requeue.min(BLOCKED_POLL);
            blocked_now.insert(format!("{name}/{node}"));
            ctx.report_once(
                cc,
                format!("{name}/{node}"),
                "ScaleDownBlocked",
                format!("idle node {node} of pool {} is not drained: {why}", pool.name),
            )
            .await;
        }
        for node in &pp.drain {
            cordon(&ctx.client, node, now).await?;
            ctx.writes.drains.put(node.clone(), true);
            requeue = requeue.min(DRAIN_POLL);
            let idle = snap
                .input
                .nodes
                .iter()
                .find(|n| &n.name == node)
                .and_then(|n| n.idle_since)
                .map(|s| fmt_duration(Duration::try_from(now.duration_since(s)).unwrap_or_default()))
                .unwrap_or_default();
            ctx.event(
                cc,
                EventType::Normal,
                "Draining",
                "ScaleDown",
                format!(
                    "draining node {node} of pool {} to remove it: idle for {idle}",
                    pool.name
                ),
            )
            .await;
        }
        // Continue drains: evict, then remove.
        let mut remove = Vec::new();
        for f in snap.nodes.iter().filter(|f| f.pool == i) {
            let Some((_, NodeState::Draining)) = facts.get(f.name.as_str()) else {
                continue;
            };
            if f.busy || pp.undrain.contains(&f.name) || !snap.input.pools[i].scalable {
                continue;
            }
            requeue = requeue.min(DRAIN_POLL);
            let since = f.draining_since.unwrap_or(now);
            if Duration::try_from(now.duration_since(since)).unwrap_or_default() < DRAIN_SETTLE {
                continue;
            }
            match evict(&ctx.client, &f.evict).await? {
                Drained::Done => remove.push(NodeRef {
                    name: f.name.clone(),
                    uid: f.uid.clone(),
                }),
                Drained::Blocked(why) => {
                    requeue = requeue.min(BLOCKED_POLL);
                    blocked_now.insert(format!("{name}/{}", f.name));
                    ctx.report_once(
                        cc,
                        format!("{name}/{}", f.name),
                        "ScaleDownBlocked",
                        format!("draining node {} of pool {} waits: {why}", f.name, pool.name),
                    )
                    .await;
                }
            }
        }
        if !remove.is_empty() {
            provider.remove(pool, size, &remove).await?;
            let names: Vec<&str> = remove.iter().map(|r| r.name.as_str()).collect();
            for r in &remove {
                ctx.writes.removed.put(r.name.clone(), ());
            }
            if kind == ProviderKind::ClusterApi {
                ctx.writes.replicas.put(
                    format!("{name}/{}", pool.name),
                    size.saturating_sub(remove.len() as u32),
                );
            }
            scaled.down[i] = true;
            ctx.event(
                cc,
                EventType::Normal,
                "ScaledDown",
                "ScaleDown",
                format!(
                    "scaled pool {} from {size} to {}: removed idle node(s) {}",
                    pool.name,
                    size.saturating_sub(remove.len() as u32),
                    names.join(", ")
                ),
            )
            .await;
        }
    }
    // A node blocked again later is reported again.
    {
        let prefix = format!("{name}/");
        let mut m = ctx.memory.lock().expect("memory lock");
        m.reported
            .retain(|k, _| !k.starts_with(&prefix) || blocked_now.contains(k));
    }
    // Nodes of pools removed from the spec (kwok), once idle.
    if kind == ProviderKind::Kwok && !snap.orphans.is_empty() {
        let refs: Vec<NodeRef> = snap
            .orphans
            .iter()
            .map(|(n, uid)| NodeRef {
                name: n.clone(),
                uid: uid.clone(),
            })
            .collect();
        if let Some(pool) = pools.first() {
            provider.remove(pool, 0, &refs).await?;
        }
        for r in &refs {
            ctx.writes.removed.put(r.name.clone(), ());
        }
        ctx.event(
            cc,
            EventType::Normal,
            "ScaledDown",
            "ScaleDown",
            format!(
                "removed idle node(s) {} of pools no longer in spec.pools",
                refs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )
        .await;
    }
    // Cluster API nodes get their pool's labels and taints.
    if kind == ProviderKind::ClusterApi {
        for f in snap.nodes.iter().filter(|f| f.needs_template) {
            if let Some(node) = nodes.iter().find(|n| n.name_any() == f.name) {
                label_node(ctx, &name, &pools[f.pool], node).await?;
            }
        }
    }

    // Scale-up latency: nodes Ready for the first time answer the oldest request.
    {
        let mut m = ctx.memory.lock().expect("memory lock");
        let ready_now: HashSet<String> = snap.nodes.iter().filter(|f| f.ready).map(|f| f.name.clone()).collect();
        let seen = m.ready_seen.remove(&name);
        let fresh: Vec<&NodeFacts> = snap
            .nodes
            .iter()
            .filter(|f| f.ready && seen.as_ref().is_none_or(|s| !s.contains(&f.name)))
            .collect();
        for f in fresh {
            let key = (name.clone(), pools[f.pool].name.clone());
            if let Some(at) = m.scale_ups.get_mut(&key).and_then(|q| q.pop_front()) {
                ctx.metrics
                    .compute_scale_up_duration
                    .with_label_values(&[kind.as_str()])
                    .observe(at.elapsed().as_secs_f64());
            }
        }
        m.ready_seen.insert(name.clone(), ready_now);
        // Requests older than an hour were not answered: forget them.
        for q in m.scale_ups.values_mut() {
            q.retain(|t| t.elapsed() < Duration::from_secs(3600));
        }
    }

    // Status.
    let api: Api<ComputeCluster> = Api::all(ctx.client.clone());
    // The last status written, while the cache may not show it yet: pool
    // timestamps (lastScaleUp) carry over from it.
    let current = ctx.statuses.current(&StatusKey::of(cc), cc.status.as_ref());
    let mut status = current.clone().unwrap_or_default();
    let generation = cc.metadata.generation;
    let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
    let time = Time(now);
    status.pools = cstatus::pools(&names, &status.pools, &snap, &plan, &scaled, &time);
    status.queue = Some(cstatus::queue(&snap));
    let (phase, reason, message) = cstatus::phase(&status.pools, &snap);
    status.phase = Some(phase);
    status.observed_generation = generation;
    set_condition(
        &mut status.conditions,
        NewCondition::new(READY, true, reason, message).observed_generation(generation),
        &time,
    );
    ctx.statuses
        .write_now(&api, StatusKey::of(cc), current.as_ref(), &status)
        .await?;

    // Metrics.
    {
        let mut f = Figures {
            provider: kind.as_str(),
            pending: i64::from(plan.pending_pods),
            ..Default::default()
        };
        for (pool, ps) in pools.iter().zip(&status.pools) {
            let e = f.nodes.entry(tier_label(pool.tier)).or_default();
            e.0 += i64::from(ps.nodes);
            e.1 += i64::from(ps.desired_nodes);
        }
        for o in &plan.outcomes {
            if let Outcome::Waiting(r, _) = o {
                *f.queue.entry(*r).or_default() += 1;
            }
        }
        ctx.memory.lock().expect("memory lock").figures.insert(name.clone(), f);
    }
    ctx.refresh_metrics();

    ctx.reset_failures(&cc.uid().unwrap_or_default());
    if let Some(w) = plan.wake_in {
        requeue = requeue.min(w + Duration::from_millis(100));
    }
    if !snap.queue.is_empty() {
        requeue = requeue.min(QUEUE_POLL);
    }
    if conflicts {
        requeue = requeue.min(Duration::from_secs(1));
    }
    Ok(Action::requeue(requeue))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(fmt_duration(Duration::from_secs(42)), "42s");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m5s");
    }

    #[test]
    fn placements_name_their_pools() {
        let pools: Vec<Pool> = serde_json::from_value(json!([
            {"name": "a100", "capacity": {"cpu": "1", "memory": "1Gi"}, "maxNodes": 1},
            {"name": "spot", "capacity": {"cpu": "1", "memory": "1Gi"}, "maxNodes": 1}
        ]))
        .unwrap();
        assert_eq!(
            placement(&BTreeMap::from([(0, 2), (1, 1)]), &pools),
            "2 pod(s) on pool a100, 1 pod(s) on pool spot"
        );
    }
}
