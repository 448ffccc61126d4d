//! What a run controller (Experiment, Pipeline) knows of the cluster without
//! asking the API server: its run Jobs (by its parent label,
//! `mlplane.io/experiment` or `mlplane.io/pipeline`) and their pods, looked
//! up in the operator's one pod and run Job cache (the ComputeCluster
//! controller's, in their compact forms [`CachedJob`] and [`CachedPod`],
//! through its label indexes); its own watch caches of namespaces and
//! ComputeClusters (metadata only), DataAssets (inputs are pinned from their
//! status) and Workspaces (where outputs go); plus the controller's own
//! recent writes that a watch has not delivered yet ([`Overlay`] for Jobs;
//! statuses have the controllers' `StatusWriter`).
//!
//! Owns: its reflectors, its trigger filters and the write overlay. Must
//! not write anything.
//!
//! Why the overlay: a reconcile creates a Job (or annotates one) and the
//! next reconcile of the same Experiment may start before the watch event of
//! that write arrives. Reading the stale cache would make it start the same
//! run again (harmless, the name is deterministic, but a wasted request) or
//! record an end twice. Like the expectations of Kubernetes' own
//! controllers, every write is remembered with what it must show in the
//! cache (the Job exists; it carries an annotation); until the cache shows
//! it, the written object (the API server's answer, so at least as new)
//! stands in for the cached one. An entry is dropped once the cache has
//! caught up, or after [`OVERLAY_TTL`] (a Job deleted meanwhile).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use crate::api::{ComputeCluster, DataAsset, Workspace};
use crate::controllers::cached::{CachedJob, CachedPod};
use crate::controllers::compute_cluster::observe::Caches as ClusterCaches;
use crate::controllers::label_index::LabelIndex;
use crate::controllers::run::build::{PIPELINE_LABEL, RUN_LABEL};
use crate::controllers::watch_config;

/// How long a write stands in for a cache that has not shown it.
pub const OVERLAY_TTL: Duration = Duration::from_secs(60);

/// What a write must show in the cache before the cache is trusted again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The Job exists.
    Exists,
    /// The Job carries this annotation.
    Annotation(&'static str),
}

impl Expect {
    fn seen_in(&self, cached: &CachedJob) -> bool {
        match self {
            Expect::Exists => true,
            Expect::Annotation(key) => cached.annotations().contains_key(*key),
        }
    }
}

struct Written {
    job: CachedJob,
    expect: Expect,
    at: Instant,
}

/// The controller's own Job writes not yet seen in the cache, grouped by
/// namespace and parent label value (a reconcile looks at its own group
/// only: under a burst of new runs the overlay holds a write per run), then
/// by name.
pub struct Overlay {
    parent_label: &'static str,
    entries: Mutex<OverlayEntries>,
}

#[derive(Default)]
struct OverlayEntries {
    groups: HashMap<(String, String), HashMap<String, Written>>,
    /// When entries past [`OVERLAY_TTL`] were last dropped from every group.
    swept: Option<Instant>,
}

impl Overlay {
    /// An overlay of Jobs whose parent is named by `parent_label`.
    pub fn new(parent_label: &'static str) -> Self {
        Self {
            parent_label,
            entries: Mutex::default(),
        }
    }

    /// The group of `job`: its namespace and parent label value.
    fn group_of(&self, job: &CachedJob) -> (String, String) {
        (
            job.metadata.namespace.clone().unwrap_or_default(),
            job.labels().get(self.parent_label).cloned().unwrap_or_default(),
        )
    }

    /// Remembers a Job the API server returned for a write of ours.
    pub fn record(&self, job: &CachedJob, expect: Expect) {
        let group = self.group_of(job);
        let mut entries = self.entries.lock().expect("overlay lock");
        // A second write to the same Job: its answer includes the first.
        entries.groups.entry(group).or_default().insert(
            job.name_any(),
            Written {
                job: job.clone(),
                expect,
                at: Instant::now(),
            },
        );
    }

    /// `cached` (the Jobs in `ns` whose parent label is `label`, of one
    /// parent) with this process's writes laid over; `belongs` tells whether
    /// a written Job is one of them.
    pub fn merge(
        &self,
        ns: &str,
        label: &str,
        mut cached: Vec<CachedJob>,
        belongs: impl Fn(&CachedJob) -> bool,
    ) -> Vec<CachedJob> {
        let mut entries = self.entries.lock().expect("overlay lock");
        let now = Instant::now();
        // Expired entries of groups never looked at again go too, at most
        // once per TTL.
        if entries.swept.is_none_or(|at| now.duration_since(at) >= OVERLAY_TTL) {
            entries.groups.retain(|_, g| {
                g.retain(|_, w| now.duration_since(w.at) < OVERLAY_TTL);
                !g.is_empty()
            });
            entries.swept = Some(now);
        }
        let key = (ns.to_string(), label.to_string());
        let Some(group) = entries.groups.get_mut(&key) else {
            return cached;
        };
        group.retain(|name, w| {
            if now.duration_since(w.at) >= OVERLAY_TTL {
                return false;
            }
            if !belongs(&w.job) {
                return true;
            }
            match cached.iter_mut().find(|j| j.metadata.name.as_deref() == Some(name)) {
                Some(c) if w.expect.seen_in(c) => false,
                Some(c) => {
                    *c = w.job.clone();
                    true
                }
                None => {
                    cached.push(w.job.clone());
                    true
                }
            }
        });
        if group.is_empty() {
            entries.groups.remove(&key);
        }
        cached
    }

    /// Whether `job` is exactly what one of this process's writes got back
    /// (same resourceVersion): the watch's echo of a create or patch whose
    /// result the reconcile that made it has already used. It need not
    /// trigger another reconcile.
    pub fn is_echo(&self, job: &CachedJob) -> bool {
        let Some(rv) = job.metadata.resource_version.as_deref() else {
            return false;
        };
        let group = self.group_of(job);
        let entries = self.entries.lock().expect("overlay lock");
        entries
            .groups
            .get(&group)
            .and_then(|g| g.get(&job.name_any()))
            .is_some_and(|w| w.job.metadata.resource_version.as_deref() == Some(rv))
    }

    /// Entries held (for tests and debugging).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .expect("overlay lock")
            .groups
            .values()
            .map(HashMap::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The caches and the streams that fill them (the controller polls the Job
/// and pod streams as its triggers; the other two are driven by [`drive`]).
pub struct Caches {
    /// The label naming the parent of the cached Jobs and pods.
    pub parent_label: &'static str,
    /// The operator's pod and run Job caches (their owner's, shared).
    cluster: Arc<ClusterCaches>,
    pub jobs: Store<CachedJob>,
    /// The cached Jobs by parent label value.
    job_index: Arc<LabelIndex>,
    pub pods: Store<CachedPod>,
    /// The cached pods by run (Job) name.
    pod_index: Arc<LabelIndex>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub clusters: Store<PartialObjectMeta<ComputeCluster>>,
    pub data_assets: Store<DataAsset>,
    pub workspaces: Store<Workspace>,
    pub overlay: Arc<Overlay>,
    ready: tokio::sync::watch::Sender<bool>,
}

pub use crate::controllers::Touched;

/// The watch streams behind [`Caches`].
pub struct Streams {
    pub jobs: Touched<CachedJob>,
    pub pods: Touched<CachedPod>,
    pub namespaces: Touched<PartialObjectMeta<Namespace>>,
    pub clusters: Touched<PartialObjectMeta<ComputeCluster>>,
    pub data_assets: Touched<DataAsset>,
    pub workspaces: Touched<Workspace>,
}

/// A reflector of every `K` with managedFields stripped.
fn reflect_all<K>(client: &Client) -> (Store<K>, Touched<K>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(Api::<K>::all(client.clone()), watch_config())
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects()
        .boxed();
    (store, stream)
}

/// The pod and run Job triggers of one run controller: the touched objects
/// of the shared watches that carry its parent label
/// ([`crate::controllers::fanout::Fanout::subscribe`]).
pub struct RunTriggers {
    pub jobs: Touched<CachedJob>,
    pub pods: Touched<CachedPod>,
}

/// Starts the reflectors (lazily: nothing is listed until a stream is
/// polled). Jobs and pods are the shared caches of `cluster`, looked up by
/// `parent_label`; `triggers` are those labelled so, of which only changes
/// of what run status reads go on.
pub fn caches(
    client: &Client,
    parent_label: &'static str,
    cluster: &Arc<ClusterCaches>,
    triggers: RunTriggers,
) -> (Caches, Streams) {
    let jobs = cluster.jobs.clone();
    let job_index = if parent_label == PIPELINE_LABEL {
        cluster.jobs_by_pipeline.clone()
    } else {
        cluster.jobs_by_experiment.clone()
    };
    let overlay = Arc::new(Overlay::new(parent_label));
    // The echo of the controller's own Job create (or patch) triggers
    // nothing: the reconcile that wrote it used the answer.
    let echo = overlay.clone();
    let job_stream = triggers
        .jobs
        .predicate_filter(job_summary, Default::default())
        .try_filter(move |job| std::future::ready(!echo.is_echo(job)))
        .boxed();
    let pods = cluster.pods.clone();
    let pod_index = cluster.pods_by_run.clone();
    let pod_stream = triggers.pods.predicate_filter(pod_summary, Default::default()).boxed();
    let (namespaces, ns_w) = reflector::store();
    let ns_stream = watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watch_config())
        .default_backoff()
        .modify(|n| n.managed_fields_mut().clear())
        .reflect(ns_w)
        .touched_objects()
        .boxed();
    let (clusters, cc_w) = reflector::store();
    let cc_stream = watcher(
        Api::<PartialObjectMeta<ComputeCluster>>::all(client.clone()),
        watch_config(),
    )
    .default_backoff()
    .modify(|c| c.managed_fields_mut().clear())
    .reflect(cc_w)
    .touched_objects()
    .boxed();
    let (data_assets, da_stream) = reflect_all::<DataAsset>(client);
    let (workspaces, ws_stream) = reflect_all::<Workspace>(client);
    (
        Caches {
            parent_label,
            cluster: cluster.clone(),
            jobs,
            job_index,
            pods,
            pod_index,
            namespaces,
            clusters,
            data_assets,
            workspaces,
            overlay,
            ready: tokio::sync::watch::Sender::new(false),
        },
        Streams {
            jobs: job_stream,
            pods: pod_stream,
            namespaces: ns_stream,
            clusters: cc_stream,
            data_assets: da_stream,
            workspaces: ws_stream,
        },
    )
}

pub use crate::controllers::drive;

impl Caches {
    /// Resolves once every cache has done its first list (before that, a
    /// missing Job could mean "not listed yet"). Any number of reconciles may
    /// wait here at once: kube's `Store::wait_until_ready` wakes only the
    /// last of several concurrent waiters, so exactly one task
    /// ([`Caches::watch_ready`]) waits on the stores and flips this flag.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Waits on every store once, then marks the caches ready.
    pub async fn watch_ready(&self) {
        // The shared pod and Job stores have other waiters: wait on their
        // owner's flag, not on the stores.
        self.cluster.ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.clusters.wait_until_ready().await;
        let _ = self.data_assets.wait_until_ready().await;
        let _ = self.workspaces.wait_until_ready().await;
        self.ready.send_replace(true);
    }

    /// The Jobs owned by the parent `uid` named `name` in `ns`: cache and
    /// overlay.
    pub fn jobs_of(&self, ns: &str, name: &str, uid: &str) -> Vec<CachedJob> {
        let label = crate::controllers::run::names::label_value(name);
        let parent_label = self.parent_label;
        let belongs = |j: &CachedJob| {
            j.metadata.namespace.as_deref() == Some(ns)
                && j.labels().get(parent_label) == Some(&label)
                && j.owner_references().iter().any(|o| o.uid == uid)
        };
        let cached: Vec<CachedJob> = self
            .job_index
            .get(&self.jobs, ns, &label)
            .iter()
            .filter(|j| belongs(j))
            .map(|j| CachedJob::clone(j))
            .collect();
        self.overlay.merge(ns, &label, cached, belongs)
    }

    /// Cached pods of the runs (Job names) `runs` in `ns`, by run.
    pub fn pods_of(&self, ns: &str, runs: &[String]) -> HashMap<String, Vec<CachedPod>> {
        runs.iter()
            .map(|run| {
                let pods = self.pod_index.get(&self.pods, ns, run);
                (
                    run.clone(),
                    pods.iter().map(|p| CachedPod::clone(p)).collect::<Vec<_>>(),
                )
            })
            .filter(|(_, pods)| !pods.is_empty())
            .collect()
    }

    /// Whether the namespace is gone or being deleted.
    pub fn namespace_terminating(&self, ns: &str) -> bool {
        self.namespaces
            .get(&ObjectRef::new(ns))
            .is_none_or(|n| n.metadata.deletion_timestamp.is_some())
    }

    /// Whether the ComputeCluster exists.
    pub fn cluster_exists(&self, name: &str) -> bool {
        self.clusters.get(&ObjectRef::new(name)).is_some()
    }

    /// The parent (of kind `K`) owning the run Job a pod belongs to (pods
    /// carry the run's Job name; parent names in labels may be shortened).
    pub fn owner_of_pod<K: Resource<DynamicType = ()>>(&self, pod: &CachedPod) -> Option<ObjectRef<K>> {
        let ns = pod.namespace()?;
        let run = pod.labels().get(RUN_LABEL)?;
        let job = self.jobs.get(&ObjectRef::new(run).within(&ns))?;
        owner_of(&job)
    }

    /// The DataAsset `name` in `ns`.
    pub fn data_asset(&self, ns: &str, name: &str) -> Option<std::sync::Arc<DataAsset>> {
        self.data_assets.get(&ObjectRef::new(name).within(ns))
    }

    /// The Workspace whose namespace is `ns`.
    pub fn workspace_of(&self, ns: &str) -> Option<std::sync::Arc<Workspace>> {
        self.workspaces.find(|w| w.target_namespace() == ns)
    }
}

/// Hash of what run status reads from a Job (annotations, `suspend`,
/// conditions, start/completion time, failed pods): only a change of these
/// triggers a reconcile. The Job controller's counter updates (`active`,
/// `ready`, `terminating`, ...) do not.
pub fn job_summary(job: &CachedJob) -> Option<u64> {
    let status = job.status.as_ref();
    let conditions: Vec<(&str, &str, Option<&str>)> = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_deref()))
        .collect();
    Some(hash((
        job.annotations(),
        job.spec.as_ref().and_then(|s| s.suspend),
        conditions,
        status.and_then(|s| s.start_time.as_ref()).map(|t| t.0.as_second()),
        status.and_then(|s| s.completion_time.as_ref()).map(|t| t.0.as_second()),
        status.and_then(|s| s.failed),
    )))
}

/// Hash of what run status reads from a pod (phase, deletion, scheduling and
/// readiness conditions, container states): kubelet heartbeats and other
/// status churn trigger nothing.
pub fn pod_summary(pod: &CachedPod) -> Option<u64> {
    let status = pod.status.as_ref();
    let conditions: Vec<(&str, &str, Option<&str>)> = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|c| matches!(c.type_.as_str(), "PodScheduled" | "Ready"))
        .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_deref()))
        .collect();
    let containers: Vec<(&str, Option<&str>, bool, Option<i32>)> = status
        .and_then(|s| s.init_container_statuses.as_deref())
        .unwrap_or_default()
        .iter()
        .chain(status.and_then(|s| s.container_statuses.as_deref()).unwrap_or_default())
        .map(|c| {
            let state = c.state.as_ref();
            (
                c.name.as_str(),
                state.and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref()),
                state.is_some_and(|s| s.running.is_some()),
                state.and_then(|s| s.terminated.as_ref()).map(|t| t.exit_code),
            )
        })
        .collect();
    Some(hash((
        status.and_then(|s| s.phase.as_deref()),
        pod.metadata.deletion_timestamp.is_some(),
        conditions,
        containers,
    )))
}

fn hash(value: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(value)
}

/// The parent (of kind `K`) a Job's controller ownerReference names.
pub fn owner_of<K: Resource<DynamicType = ()>>(job: &CachedJob) -> Option<ObjectRef<K>> {
    let ns = job.namespace()?;
    let kind = K::kind(&());
    job.owner_references()
        .iter()
        .find(|o| o.kind == kind && o.controller == Some(true))
        .map(|o| ObjectRef::new(&o.name).within(&ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::compute_cluster::observe::strip_pod;
    use serde_json::json;

    fn job(name: &str, annotations: serde_json::Value) -> CachedJob {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "annotations": annotations,
                         "labels": {crate::controllers::run::build::EXPERIMENT_LABEL: "e"}},
        }))
        .unwrap()
    }

    #[test]
    fn the_watch_echo_of_a_write_is_told_from_later_changes() {
        let overlay = Overlay::new(crate::controllers::run::build::EXPERIMENT_LABEL);
        let at = |rv: &str| {
            let mut j = job("e-1", json!({}));
            j.metadata.resource_version = Some(rv.into());
            j
        };
        assert!(!overlay.is_echo(&at("7")), "nothing written");
        overlay.record(&at("7"), Expect::Exists);
        assert!(overlay.is_echo(&at("7")));
        assert!(!overlay.is_echo(&at("8")), "a change after the write");
        assert!(!overlay.is_echo(&job("e-1", json!({}))), "no resourceVersion");
        let mut other = at("7");
        other.metadata.name = Some("e-2".into());
        assert!(!overlay.is_echo(&other));
    }

    #[test]
    fn a_created_job_missing_from_the_cache_is_added_until_seen() {
        let overlay = Overlay::new(crate::controllers::run::build::EXPERIMENT_LABEL);
        overlay.record(&job("e-1", json!({})), Expect::Exists);
        let merged = overlay.merge("ns", "e", vec![], |_| true);
        assert_eq!(merged.len(), 1);
        assert_eq!(overlay.len(), 1);
        // The cache caught up: the entry goes.
        let merged = overlay.merge("ns", "e", vec![job("e-1", json!({}))], |_| true);
        assert_eq!(merged.len(), 1);
        assert!(overlay.is_empty());
    }

    #[test]
    fn an_annotation_write_replaces_a_stale_cached_copy() {
        let overlay = Overlay::new(crate::controllers::run::build::EXPERIMENT_LABEL);
        overlay.record(
            &job("e-1", json!({"mlplane.io/result": "{}"})),
            Expect::Annotation("mlplane.io/result"),
        );
        let merged = overlay.merge("ns", "e", vec![job("e-1", json!({}))], |_| true);
        assert!(merged[0].annotations().contains_key("mlplane.io/result"));
        assert_eq!(overlay.len(), 1);
        let merged = overlay.merge(
            "ns",
            "e",
            vec![job("e-1", json!({"mlplane.io/result": "{}", "x": "y"}))],
            |_| true,
        );
        assert!(
            merged[0].annotations().contains_key("x"),
            "the newer cached copy wins once it shows the write"
        );
        assert!(overlay.is_empty());
    }

    #[test]
    fn job_counter_updates_trigger_nothing_but_conditions_do() {
        let mut j: CachedJob = serde_json::from_value(json!({
            "metadata": {"name": "e-1"},
            "spec": {"template": {}},
            "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}
        }))
        .unwrap();
        let before = job_summary(&j);
        j.status.as_mut().unwrap().ready = Some(1);
        j.status.as_mut().unwrap().active = Some(2);
        assert_eq!(job_summary(&j), before);
        j.status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(json!({"type": "Complete", "status": "True"})).unwrap(),
        ]);
        assert_ne!(job_summary(&j), before);
    }

    #[test]
    fn pod_heartbeats_trigger_nothing_but_state_changes_do() {
        let pod = |running: bool, probe: &str| -> CachedPod {
            serde_json::from_value(json!({
                "metadata": {"name": "p"},
                "status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "lastProbeTime": probe}],
                  "containerStatuses": [{"name": "run", "image": "x", "imageID": "", "ready": true,
                    "restartCount": 0, "state": if running { json!({"running": {}}) }
                      else { json!({"terminated": {"exitCode": 3}}) }}]}
            }))
            .unwrap()
        };
        assert_eq!(
            pod_summary(&pod(true, "2026-01-01T00:00:00Z")),
            pod_summary(&pod(true, "2026-01-01T00:00:09Z"))
        );
        let t = "2026-01-01T00:00:00Z";
        assert_ne!(pod_summary(&pod(true, t)), pod_summary(&pod(false, t)));
    }

    #[test]
    fn stripping_a_cached_pod_keeps_what_run_status_and_its_summary_read() {
        let mut p: CachedPod = serde_json::from_value(json!({
            "metadata": {"name": "r-0", "namespace": "ns", "labels": {RUN_LABEL: "r"},
                         "annotations": {"note": "x"}},
            "status": {
                "phase": "Failed", "reason": "Evicted", "message": "low on memory",
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no node"},
                    {"type": "Ready", "status": "False"},
                    {"type": "Initialized", "status": "True"},
                ],
                "containerStatuses": [{
                    "name": "main", "ready": false, "restartCount": 2,
                    "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": "m"}},
                }],
            },
        }))
        .unwrap();
        let before = pod_summary(&p);
        let run_state = crate::controllers::experiment::status::run_state;
        let state = run_state(&CachedJob::default(), std::slice::from_ref(&p));
        strip_pod(&mut p);
        assert_eq!(pod_summary(&p), before, "the trigger summary is unchanged");
        assert_eq!(
            run_state(&CachedJob::default(), std::slice::from_ref(&p)),
            state,
            "run status reads the same"
        );
        assert!(p.metadata.annotations.is_none());
        assert_eq!(p.status.unwrap().conditions.unwrap().len(), 2);
    }

    #[test]
    fn writes_of_other_experiments_and_namespaces_are_left_alone() {
        let overlay = Overlay::new(crate::controllers::run::build::EXPERIMENT_LABEL);
        overlay.record(&job("e-1", json!({})), Expect::Exists);
        assert!(overlay.merge("other", "e", vec![], |_| true).is_empty());
        assert!(overlay.merge("ns", "e", vec![], |_| false).is_empty());
        assert!(
            overlay.merge("ns", "f", vec![], |_| true).is_empty(),
            "another parent's group"
        );
        assert_eq!(overlay.len(), 1);
    }
}
