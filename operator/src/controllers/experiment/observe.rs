//! What a run controller (Experiment, Pipeline) knows of the cluster without
//! asking the API server: watch caches of its run Jobs (selected by its
//! parent label, `mlplane.io/experiment` or `mlplane.io/pipeline`; without
//! their pod templates, see [`slim_job`]), their pods (status only),
//! namespaces and ComputeClusters (metadata only), DataAssets (inputs are
//! pinned from their status) and Workspaces (where outputs go), plus the
//! controller's own recent writes that a watch has not delivered yet
//! ([`Overlay`] for Jobs; statuses have the controllers' `StatusWriter`).
//!
//! Owns: the reflectors and the write overlay. Must not write anything.
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

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use crate::api::{ComputeCluster, DataAsset, Workspace};
use crate::controllers::label_index::LabelIndex;
use crate::controllers::run::build::RUN_LABEL;
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
    fn seen_in(&self, cached: &Job) -> bool {
        match self {
            Expect::Exists => true,
            Expect::Annotation(key) => cached.annotations().contains_key(*key),
        }
    }
}

struct Written {
    job: Job,
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

    /// Remembers a Job the API server returned for a write of ours.
    pub fn record(&self, job: &Job, expect: Expect) {
        let group = (
            job.metadata.namespace.clone().unwrap_or_default(),
            job.labels().get(self.parent_label).cloned().unwrap_or_default(),
        );
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
    pub fn merge(&self, ns: &str, label: &str, mut cached: Vec<Job>, belongs: impl Fn(&Job) -> bool) -> Vec<Job> {
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
    pub jobs: Store<Job>,
    /// The cached Jobs by parent label value.
    job_index: Arc<LabelIndex>,
    pub pods: Store<Pod>,
    /// The cached pods by run (Job) name.
    pod_index: Arc<LabelIndex>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub clusters: Store<PartialObjectMeta<ComputeCluster>>,
    pub data_assets: Store<DataAsset>,
    pub workspaces: Store<Workspace>,
    pub overlay: Overlay,
    ready: tokio::sync::watch::Sender<bool>,
}

type Touched<K> = std::pin::Pin<Box<dyn Stream<Item = Result<K, watcher::Error>> + Send>>;

/// The watch streams behind [`Caches`].
pub struct Streams {
    pub jobs: Touched<Job>,
    pub pods: Touched<Pod>,
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

/// Starts the reflectors (lazily: nothing is listed until a stream is
/// polled). Jobs and pods are those labelled `parent_label`.
pub fn caches(client: &Client, parent_label: &'static str) -> (Caches, Streams) {
    let labelled = watch_config().labels(parent_label);
    let (jobs, jobs_w) = reflector::store();
    let job_index = LabelIndex::new(parent_label);
    let (index, store) = (job_index.clone(), jobs.clone());
    let job_stream = watcher(Api::<Job>::all(client.clone()), labelled.clone())
        .default_backoff()
        .modify(slim_job)
        .reflect(jobs_w)
        .inspect_ok(move |ev| index.observe(ev, &store))
        .touched_objects()
        .predicate_filter(job_summary, Default::default())
        .boxed();
    // Run status reads pod status only (see [`slim_pod`]).
    let (pods, pods_w) = reflector::store();
    let pod_index = LabelIndex::new(RUN_LABEL);
    let (index, store) = (pod_index.clone(), pods.clone());
    let pod_stream = watcher(Api::<Pod>::all(client.clone()), labelled)
        .default_backoff()
        .modify(slim_pod)
        .reflect(pods_w)
        .inspect_ok(move |ev| index.observe(ev, &store))
        .touched_objects()
        .predicate_filter(pod_summary, Default::default())
        .boxed();
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
            jobs,
            job_index,
            pods,
            pod_index,
            namespaces,
            clusters,
            data_assets,
            workspaces,
            overlay: Overlay::new(parent_label),
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
        let _ = self.jobs.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.clusters.wait_until_ready().await;
        let _ = self.data_assets.wait_until_ready().await;
        let _ = self.workspaces.wait_until_ready().await;
        self.ready.send_replace(true);
    }

    /// The Jobs owned by the parent `uid` named `name` in `ns`: cache and
    /// overlay.
    pub fn jobs_of(&self, ns: &str, name: &str, uid: &str) -> Vec<Job> {
        let label = crate::controllers::run::names::label_value(name);
        let parent_label = self.parent_label;
        let belongs = |j: &Job| {
            j.metadata.namespace.as_deref() == Some(ns)
                && j.labels().get(parent_label) == Some(&label)
                && j.owner_references().iter().any(|o| o.uid == uid)
        };
        let cached: Vec<Job> = self
            .job_index
            .get(&self.jobs, ns, &label)
            .iter()
            .filter(|j| belongs(j))
            .map(|j| Job::clone(j))
            .collect();
        self.overlay.merge(ns, &label, cached, belongs)
    }

    /// Cached pods of the runs (Job names) `runs` in `ns`, by run.
    pub fn pods_of(&self, ns: &str, runs: &[String]) -> HashMap<String, Vec<Pod>> {
        runs.iter()
            .map(|run| {
                let pods = self.pod_index.get(&self.pods, ns, run);
                (run.clone(), pods.iter().map(|p| Pod::clone(p)).collect::<Vec<_>>())
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
    pub fn owner_of_pod<K: Resource<DynamicType = ()>>(&self, pod: &Pod) -> Option<ObjectRef<K>> {
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

/// Drops from a cached Job what the controller never reads: managedFields,
/// and of the pod template everything but each container's name and
/// resources (status reads memory limits; everything else of a run is on
/// the Job's own metadata and spec). Pod templates are most of a Job's size,
/// and a cluster may hold thousands of runs. Code that needs the template
/// must read the Job from the API server.
pub fn slim_job(job: &mut Job) {
    job.managed_fields_mut().clear();
    if let Some(spec) = job.spec.as_mut() {
        spec.template.metadata = None;
        if let Some(pod) = spec.template.spec.as_mut() {
            let slim = |c: &k8s_openapi::api::core::v1::Container| k8s_openapi::api::core::v1::Container {
                name: c.name.clone(),
                resources: c.resources.clone(),
                ..Default::default()
            };
            *pod = k8s_openapi::api::core::v1::PodSpec {
                containers: pod.containers.iter().map(slim).collect(),
                init_containers: pod.init_containers.as_ref().map(|cs| cs.iter().map(slim).collect()),
                ..Default::default()
            };
        }
    }
}

/// Hash of what run status reads from a Job (annotations, `suspend`,
/// conditions, start/completion time, failed pods): only a change of these
/// triggers a reconcile. The Job controller's counter updates (`active`,
/// `ready`, `terminating`, ...) do not.
pub fn job_summary(job: &Job) -> Option<u64> {
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

/// Drops from a cached pod what run status never reads: managedFields, the
/// spec, and of the status everything but phase, reason, message, the
/// scheduling and readiness conditions and each container's name, state,
/// last state, readiness and restarts (images, IPs, resources, mounts go).
pub fn slim_pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{ContainerStatus, PodStatus};
    pod.managed_fields_mut().clear();
    pod.spec = None;
    let slim = |cs: Option<Vec<ContainerStatus>>| {
        cs.map(|cs| {
            cs.into_iter()
                .map(|c| ContainerStatus {
                    name: c.name,
                    state: c.state,
                    last_state: c.last_state,
                    ready: c.ready,
                    restart_count: c.restart_count,
                    started: c.started,
                    ..Default::default()
                })
                .collect()
        })
    };
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        reason: s.reason,
        message: s.message,
        conditions: s.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| matches!(c.type_.as_str(), "PodScheduled" | "Ready"))
                .collect()
        }),
        container_statuses: slim(s.container_statuses),
        init_container_statuses: slim(s.init_container_statuses),
        ..Default::default()
    });
}

/// Hash of what run status reads from a pod (phase, deletion, scheduling and
/// readiness conditions, container states): kubelet heartbeats and other
/// status churn trigger nothing.
pub fn pod_summary(pod: &Pod) -> Option<u64> {
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
pub fn owner_of<K: Resource<DynamicType = ()>>(job: &Job) -> Option<ObjectRef<K>> {
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
    use serde_json::json;

    fn job(name: &str, annotations: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "annotations": annotations,
                         "labels": {crate::controllers::run::build::EXPERIMENT_LABEL: "e"}},
        }))
        .unwrap()
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
    fn cached_jobs_keep_what_status_reads() {
        let mut j: Job = serde_json::from_value(json!({
            "metadata": {"name": "e-1", "annotations": {"mlplane.io/params": "{}"},
                         "managedFields": [{"manager": "mlplane"}]},
            "spec": {"parallelism": 2, "suspend": true, "backoffLimit": 3, "activeDeadlineSeconds": 60,
                     "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [
                {"name": "run", "image": "x", "command": ["python"], "env": [{"name": "A", "value": "1"}],
                 "resources": {"limits": {"memory": "1Gi"}}}]}}}
        }))
        .unwrap();
        slim_job(&mut j);
        let spec = j.spec.as_ref().unwrap();
        assert_eq!(
            (spec.parallelism, spec.suspend, spec.backoff_limit),
            (Some(2), Some(true), Some(3))
        );
        let c = &spec.template.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.name, "run");
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
            "1Gi"
        );
        assert!(c.env.is_none() && c.command.is_none() && c.image.is_none());
        assert!(j.metadata.managed_fields.as_ref().is_none_or(|m| m.is_empty()));
        assert!(j.annotations().contains_key("mlplane.io/params"));
    }

    #[test]
    fn job_counter_updates_trigger_nothing_but_conditions_do() {
        let mut j: Job = serde_json::from_value(json!({
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
        let pod = |running: bool, probe: &str| -> Pod {
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
    fn a_slim_pod_keeps_what_run_status_and_its_summary_read() {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "r-0", "namespace": "ns", "labels": {RUN_LABEL: "r"},
                         "managedFields": [{"manager": "kubelet"}]},
            "spec": {"containers": [{"name": "main", "image": "trainer"}]},
            "status": {
                "phase": "Failed", "reason": "Evicted", "message": "low on memory",
                "hostIP": "10.0.0.1", "podIP": "10.1.0.1", "qosClass": "Burstable",
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no node"},
                    {"type": "Ready", "status": "False"},
                    {"type": "Initialized", "status": "True"},
                ],
                "containerStatuses": [{
                    "name": "main", "image": "trainer", "imageID": "sha256:1", "containerID": "c://1",
                    "ready": false, "restartCount": 2,
                    "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": "m"}},
                    "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
                }],
            },
        }))
        .unwrap();
        let before = pod_summary(&p);
        let state = crate::controllers::experiment::status::run_state(&Job::default(), &[p.clone()]);
        slim_pod(&mut p);
        assert_eq!(pod_summary(&p), before, "the trigger summary is unchanged");
        assert_eq!(
            crate::controllers::experiment::status::run_state(&Job::default(), &[p.clone()]),
            state,
            "run status reads the same"
        );
        assert!(p.spec.is_none() && p.metadata.managed_fields.as_ref().is_none_or(Vec::is_empty));
        let s = p.status.unwrap();
        assert_eq!(
            (s.reason.as_deref(), s.message.as_deref()),
            (Some("Evicted"), Some("low on memory"))
        );
        assert!(s.pod_ip.is_none() && s.host_ip.is_none() && s.qos_class.is_none());
        assert_eq!(s.conditions.unwrap().len(), 2);
        let c = &s.container_statuses.unwrap()[0];
        assert_eq!((c.name.as_str(), c.restart_count, c.image.as_str()), ("main", 2, ""));
        assert!(c.volume_mounts.is_none() && c.container_id.is_none());
        assert_eq!(c.state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code, 137);
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
