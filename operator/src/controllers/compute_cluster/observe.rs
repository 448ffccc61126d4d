//! What the ComputeCluster controller knows of the cluster without asking the
//! API server: watch caches of nodes, pods, run Jobs, DaemonSets,
//! PodDisruptionBudgets, Workspaces and namespaces (and, once a clusterAPI
//! ComputeCluster needs them, MachineDeployments and Machines), each
//! stripped to the fields the autoscaler reads, plus the controller's own
//! recent writes that the watches have not delivered yet.
//!
//! Owns: those reflectors, the stripping, the label indexes of pods and run
//! Jobs, and [`Written`]. Must not write anything. The pod and run Job
//! stores are the operator's only ones: the Workspace, Experiment and
//! Pipeline controllers read them too.
//!
//! Pods are cached cluster-wide (pending pods anywhere may select a cluster;
//! pods on pool nodes use their capacity; pods of workspace namespaces count
//! against quotas), and run Jobs too, as the compact
//! [`CachedPod`] and [`CachedJob`] (placement, resources, the status run
//! status reads). Nodes lose their images, addresses and every condition but
//! Ready.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Affinity, Container, Namespace, Node, NodeCondition, NodeSpec, NodeStatus, PodSpec};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DynamicObject};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::api::Workspace;
use crate::autoscaler::providers::cluster_api;
use crate::controllers::cached::{CachedJob, CachedPod, keep_annotations};
use crate::controllers::label_index::LabelIndex;
use crate::controllers::run::build::{EXPERIMENT_LABEL, PIPELINE_LABEL, RUN_LABEL};
use crate::controllers::{Touched, watch_config};

/// Node annotation: the autoscaler cordoned the node to remove it, at this
/// time (RFC 3339).
pub const SCALE_DOWN_ANNOTATION: &str = "mlplane.io/scale-down";
/// Pod annotation of static (mirror) pods, which are never evicted.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// How long a write stands in for a cache that has not shown it.
pub const WRITTEN_TTL: Duration = Duration::from_secs(60);

fn strip_meta(meta: &mut ObjectMeta, annotations: &[&str]) {
    meta.managed_fields = None;
    meta.finalizers = None;
    meta.generate_name = None;
    keep_annotations(meta, |k| annotations.contains(&k));
}

/// Keeps of a (DaemonSet's) pod spec what placement and accounting read.
pub fn strip_pod_spec(spec: &mut PodSpec) {
    let slim = |c: &Container| Container {
        name: c.name.clone(),
        resources: c.resources.clone(),
        restart_policy: c.restart_policy.clone(),
        ..Default::default()
    };
    *spec = PodSpec {
        containers: spec.containers.iter().map(slim).collect(),
        init_containers: spec.init_containers.as_ref().map(|cs| cs.iter().map(slim).collect()),
        node_name: spec.node_name.take(),
        node_selector: spec.node_selector.take(),
        affinity: spec.affinity.take().and_then(|a| a.node_affinity).map(|n| Affinity {
            node_affinity: Some(n),
            ..Default::default()
        }),
        tolerations: spec.tolerations.take(),
        overhead: spec.overhead.take(),
        ..Default::default()
    };
}

/// Annotations of pods the caches read: static (mirror) pods, Indexed Job
/// completion indexes, the operator's own.
fn pod_annotation_kept(key: &str) -> bool {
    key == MIRROR_ANNOTATION || key.starts_with("batch.kubernetes.io/") || key.starts_with("mlplane.io/")
}

/// Annotations of Jobs the caches read: the operator's own (run
/// parameters, results, queue and cancellation).
fn job_annotation_kept(key: &str) -> bool {
    key.starts_with("mlplane.io/")
}

/// Strips a cached pod (see [`CachedPod`]).
pub fn strip_pod(p: &mut CachedPod) {
    p.strip(pod_annotation_kept);
}

/// Strips a cached run Job (see [`CachedJob`]).
pub fn strip_job(j: &mut CachedJob) {
    j.strip(job_annotation_kept);
}

/// Strips a cached node (see the module docs).
pub fn strip_node(n: &mut Node) {
    strip_meta(&mut n.metadata, &[SCALE_DOWN_ANNOTATION]);
    n.spec = n.spec.take().map(|s| NodeSpec {
        unschedulable: s.unschedulable,
        taints: s.taints,
        provider_id: s.provider_id,
        ..Default::default()
    });
    n.status = n.status.take().map(|s| NodeStatus {
        allocatable: s.allocatable,
        conditions: s.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| NodeCondition {
                    type_: c.type_,
                    status: c.status,
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    });
}

/// Strips a cached DaemonSet to its pod template's placement and resources.
pub fn strip_daemonset(d: &mut DaemonSet) {
    strip_meta(&mut d.metadata, &[]);
    d.metadata.labels = None;
    if let Some(spec) = d.spec.as_mut() {
        spec.template.metadata = None;
        if let Some(pod) = spec.template.spec.as_mut() {
            strip_pod_spec(pod);
        }
    }
    d.status = None;
}

/// The controller's writes not seen in a cache yet, by key, each with what
/// it wrote; an entry goes once the cache shows it (see [`Written::prune`])
/// or after [`WRITTEN_TTL`].
pub struct Written<V> {
    entries: Mutex<HashMap<String, (V, Instant)>>,
}

impl<V> Default for Written<V> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

impl<V: Clone> Written<V> {
    /// Remembers a write.
    pub fn put(&self, key: impl Into<String>, value: V) {
        self.entries
            .lock()
            .expect("written lock")
            .insert(key.into(), (value, Instant::now()));
    }

    /// Drops expired entries and those `seen` says the cache shows; returns
    /// the others.
    pub fn prune(&self, mut seen: impl FnMut(&str, &V) -> bool) -> HashMap<String, V> {
        let mut entries = self.entries.lock().expect("written lock");
        let now = Instant::now();
        entries.retain(|k, (v, at)| now.duration_since(*at) < WRITTEN_TTL && !seen(k, v));
        entries.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("written lock").len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Cluster API caches, started when a clusterAPI ComputeCluster first needs
/// them and the cluster serves the kinds.
pub struct CapiCaches {
    /// The served resources.
    pub resources: cluster_api::Resources,
    /// MachineDeployments (all namespaces).
    pub deployments: Store<DynamicObject>,
    /// Machines (all namespaces).
    pub machines: Store<DynamicObject>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl CapiCaches {
    /// Resolves once both stores have listed.
    pub async fn ready(&self) {
        let _ = self.ready.subscribe().wait_for(|r| *r).await;
    }
}

/// The caches (the controller polls the node, pod, Job and Workspace
/// streams as its triggers; the others are driven by
/// [`crate::controllers::experiment::observe::drive`]).
///
/// The pod and run Job stores are the operator's only ones: the Experiment
/// and Pipeline controllers read them too, through the label indexes here,
/// and get their triggers from the same watches
/// ([`crate::controllers::fanout`]).
pub struct Caches {
    pub nodes: Store<Node>,
    pub pods: Store<CachedPod>,
    pub jobs: Store<CachedJob>,
    /// Pods by run (Job name, `mlplane.io/run`).
    pub pods_by_run: Arc<LabelIndex>,
    /// Run Jobs by Experiment (`mlplane.io/experiment`).
    pub jobs_by_experiment: Arc<LabelIndex>,
    /// Run Jobs by Pipeline (`mlplane.io/pipeline`).
    pub jobs_by_pipeline: Arc<LabelIndex>,
    pub daemonsets: Store<DaemonSet>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub workspaces: Store<DeserializeGuard<Workspace>>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub capi: std::sync::OnceLock<CapiCaches>,
    ready: tokio::sync::watch::Sender<bool>,
}

/// The watch streams behind [`Caches`] (pods and Jobs: the sources that
/// [`crate::controllers::fanout::Fanout`]s hand on).
pub struct Streams {
    pub nodes: Touched<Node>,
    pub pods: Touched<CachedPod>,
    pub jobs: Touched<CachedJob>,
    pub daemonsets: Touched<DaemonSet>,
    pub pdbs: Touched<PodDisruptionBudget>,
    pub workspaces: Touched<DeserializeGuard<Workspace>>,
    pub namespaces: Touched<PartialObjectMeta<Namespace>>,
}

fn stream<K>(api: Api<K>, cfg: watcher::Config, strip: fn(&mut K)) -> (Store<K>, Touched<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let s = watcher(api, cfg)
        .default_backoff()
        .modify(strip)
        .reflect(writer)
        .touched_objects()
        .boxed();
    (store, s)
}

/// A reflector whose events also feed `indexes`.
fn indexed_stream<K>(
    api: Api<K>,
    cfg: watcher::Config,
    strip: fn(&mut K),
    indexes: Vec<Arc<LabelIndex>>,
) -> (Store<K>, Touched<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let reader = store.clone();
    let s = watcher(api, cfg)
        .default_backoff()
        .modify(strip)
        .reflect(writer)
        .inspect_ok(move |ev| indexes.iter().for_each(|i| i.observe(ev, &reader)))
        .touched_objects()
        .boxed();
    (store, s)
}

/// Starts the reflectors (lazily: nothing is listed until a stream is polled).
pub fn caches(client: &Client) -> (Caches, Streams) {
    let (nodes, node_s) = stream(Api::<Node>::all(client.clone()), watch_config(), strip_node);
    let pods_by_run = LabelIndex::new(RUN_LABEL);
    let (pods, pod_s) = indexed_stream(
        Api::<CachedPod>::all(client.clone()),
        watch_config(),
        strip_pod,
        vec![pods_by_run.clone()],
    );
    let jobs_by_experiment = LabelIndex::new(EXPERIMENT_LABEL);
    let jobs_by_pipeline = LabelIndex::new(PIPELINE_LABEL);
    let (jobs, job_s) = indexed_stream(
        Api::<CachedJob>::all(client.clone()),
        watch_config().labels(RUN_LABEL),
        strip_job,
        vec![jobs_by_experiment.clone(), jobs_by_pipeline.clone()],
    );
    let (daemonsets, ds_s) = stream(Api::<DaemonSet>::all(client.clone()), watch_config(), strip_daemonset);
    let (pdbs, pdb_s) = stream(Api::<PodDisruptionBudget>::all(client.clone()), watch_config(), |p| {
        strip_meta(&mut p.metadata, &[])
    });
    let (workspaces, ws_s) =
        crate::controllers::guarded_watch(Api::<DeserializeGuard<Workspace>>::all(client.clone()), watch_config());
    let (namespaces, ns_s) = stream(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watch_config(),
        |n| n.managed_fields_mut().clear(),
    );
    (
        Caches {
            nodes,
            pods,
            jobs,
            pods_by_run,
            jobs_by_experiment,
            jobs_by_pipeline,
            daemonsets,
            pdbs,
            workspaces,
            namespaces,
            capi: std::sync::OnceLock::new(),
            ready: tokio::sync::watch::Sender::new(false),
        },
        Streams {
            nodes: node_s,
            pods: pod_s,
            jobs: job_s,
            daemonsets: ds_s,
            pdbs: pdb_s,
            workspaces: ws_s.boxed(),
            namespaces: ns_s,
        },
    )
}

impl Caches {
    /// Resolves once every cache has listed (before that, a missing node
    /// could mean "not listed yet" and be made twice). One task
    /// ([`Caches::watch_ready`]) waits on the stores: kube's
    /// `Store::wait_until_ready` wakes only the last of concurrent waiters.
    pub async fn ready(&self) {
        let _ = self.ready.subscribe().wait_for(|r| *r).await;
    }

    /// Waits on every store once, then marks the caches ready.
    pub async fn watch_ready(&self) {
        let _ = self.nodes.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.jobs.wait_until_ready().await;
        let _ = self.daemonsets.wait_until_ready().await;
        let _ = self.pdbs.wait_until_ready().await;
        let _ = self.workspaces.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        self.ready.send_replace(true);
    }

    /// Starts the Cluster API caches (once); `on_change` is called with
    /// every MachineDeployment or Machine that changes. Returns them.
    pub fn start_capi(
        &self,
        client: &Client,
        resources: cluster_api::Resources,
        on_change: impl Fn(&DynamicObject) + Send + Sync + Clone + 'static,
        stop: tokio_util::sync::CancellationToken,
    ) -> &CapiCaches {
        self.capi.get_or_init(|| {
            let mut stores = vec![];
            for ar in [&resources.machine_deployments, &resources.machines] {
                let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
                stores.push(writer.as_reader());
                let api = Api::<DynamicObject>::all_with(client.clone(), ar);
                let mut s = watcher(api, watch_config())
                    .default_backoff()
                    .modify(cluster_api::strip)
                    .reflect(writer)
                    .touched_objects()
                    .boxed();
                let on_change = on_change.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            item = s.next() => match item {
                                None => return,
                                Some(Err(e)) => tracing::debug!(error = %e, "cluster api watch error"),
                                Some(Ok(obj)) => on_change(&obj),
                            },
                        }
                    }
                });
            }
            let machines = stores.pop().expect("two stores");
            let deployments = stores.pop().expect("two stores");
            let ready = tokio::sync::watch::Sender::new(false);
            let (d, m, r) = (deployments.clone(), machines.clone(), ready.clone());
            tokio::spawn(async move {
                let _ = d.wait_until_ready().await;
                let _ = m.wait_until_ready().await;
                r.send_replace(true);
            });
            CapiCaches {
                resources,
                deployments,
                machines,
                ready,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pods_and_jobs_keep_the_annotations_the_controllers_read() {
        let mut p: CachedPod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns",
                         "annotations": {"big": "x", MIRROR_ANNOTATION: "m",
                                         "batch.kubernetes.io/job-completion-index": "1"}},
            "spec": {"nodeName": "n", "volumes": [{"name": "v", "emptyDir": {}}]},
        }))
        .unwrap();
        strip_pod(&mut p);
        assert_eq!(
            p.annotations().keys().collect::<Vec<_>>(),
            ["batch.kubernetes.io/job-completion-index", MIRROR_ANNOTATION]
        );
        let mut j: CachedJob = serde_json::from_value(json!({
            "metadata": {"name": "j", "namespace": "ns", "resourceVersion": "7",
                         "annotations": {"mlplane.io/cancel-reason": "Suspended", "mlplane.io/params": "{}",
                                         "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        }))
        .unwrap();
        strip_job(&mut j);
        assert_eq!(
            j.annotations().keys().collect::<Vec<_>>(),
            ["mlplane.io/cancel-reason", "mlplane.io/params"]
        );
        assert_eq!(j.resource_version().as_deref(), Some("7"));
    }

    #[test]
    fn nodes_keep_what_the_planner_reads() {
        let mut n: Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "annotations": {SCALE_DOWN_ANNOTATION: "t", "other": "x"}},
            "spec": {"unschedulable": true, "podCIDR": "10.0.0.0/24"},
            "status": {"allocatable": {"cpu": "8"}, "images": [{"names": ["a"], "sizeBytes": 1}],
                       "conditions": [{"type": "Ready", "status": "True", "message": "ok"},
                                      {"type": "MemoryPressure", "status": "False"}]}
        }))
        .unwrap();
        strip_node(&mut n);
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["metadata"]["annotations"], json!({SCALE_DOWN_ANNOTATION: "t"}));
        assert_eq!(v["spec"], json!({"unschedulable": true}));
        assert_eq!(
            v["status"],
            json!({"allocatable": {"cpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]})
        );
    }

    #[test]
    fn writes_stand_in_until_seen_or_expired() {
        let w: Written<u32> = Written::default();
        w.put("a", 1);
        w.put("b", 2);
        let left = w.prune(|k, _| k == "a");
        assert_eq!(left, HashMap::from([("b".to_string(), 2)]));
        assert_eq!(w.len(), 1);
    }
}
