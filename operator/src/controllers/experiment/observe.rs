//! What the Experiment controller knows of the cluster without asking the API
//! server: watch caches of run Jobs, their pods (status only), namespaces
//! and ComputeClusters (metadata only), plus the controller's own recent Job
//! writes that the Job watch has not delivered yet.
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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::api::ComputeCluster;
use crate::controllers::run::build::{EXPERIMENT_LABEL, RUN_LABEL};
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

/// The controller's own Job writes not yet seen in the cache, by namespace
/// and name.
#[derive(Default)]
pub struct Overlay {
    entries: Mutex<HashMap<(String, String), Written>>,
}

impl Overlay {
    /// Remembers a Job the API server returned for a write of ours.
    pub fn record(&self, job: &Job, expect: Expect) {
        let key = (job.namespace().unwrap_or_default(), job.name_any());
        let mut entries = self.entries.lock().expect("overlay lock");
        // A second write to the same Job: its answer includes the first.
        entries.insert(
            key,
            Written {
                job: job.clone(),
                expect,
                at: Instant::now(),
            },
        );
    }

    /// `cached` (the Jobs of one experiment in `ns`) with this process's
    /// writes laid over; `belongs` tells whether a written Job is one of them.
    pub fn merge(&self, ns: &str, mut cached: Vec<Job>, belongs: impl Fn(&Job) -> bool) -> Vec<Job> {
        let mut entries = self.entries.lock().expect("overlay lock");
        let now = Instant::now();
        entries.retain(|_, w| now.duration_since(w.at) < OVERLAY_TTL);
        entries.retain(|(wns, name), w| {
            if wns != ns || !belongs(&w.job) {
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
        cached
    }

    /// Entries held (for tests and debugging).
    pub fn len(&self) -> usize {
        self.entries.lock().expect("overlay lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The caches and the streams that fill them (the controller polls the Job
/// and pod streams as its triggers; the other two are driven by [`drive`]).
pub struct Caches {
    pub jobs: Store<Job>,
    pub pods: Store<Pod>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub clusters: Store<PartialObjectMeta<ComputeCluster>>,
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
}

/// Starts the reflectors (lazily: nothing is listed until a stream is polled).
pub fn caches(client: &Client) -> (Caches, Streams) {
    let labelled = watch_config().labels(EXPERIMENT_LABEL);
    let (jobs, jobs_w) = reflector::store();
    let job_stream = watcher(Api::<Job>::all(client.clone()), labelled.clone())
        .default_backoff()
        .modify(|j| j.managed_fields_mut().clear())
        .reflect(jobs_w)
        .touched_objects()
        .boxed();
    // Run status reads pod status only: the spec stays out of memory.
    let (pods, pods_w) = reflector::store();
    let pod_stream = watcher(Api::<Pod>::all(client.clone()), labelled)
        .default_backoff()
        .modify(|p| {
            p.managed_fields_mut().clear();
            p.spec = None;
        })
        .reflect(pods_w)
        .touched_objects()
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
    (
        Caches {
            jobs,
            pods,
            namespaces,
            clusters,
            overlay: Overlay::default(),
            ready: tokio::sync::watch::Sender::new(false),
        },
        Streams {
            jobs: job_stream,
            pods: pod_stream,
            namespaces: ns_stream,
            clusters: cc_stream,
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
        self.ready.send_replace(true);
    }

    /// The Jobs owned by the Experiment `uid` named `name` in `ns`: cache
    /// and overlay.
    pub fn jobs_of(&self, ns: &str, name: &str, uid: &str) -> Vec<Job> {
        let label = crate::controllers::run::names::label_value(name);
        let belongs = |j: &Job| {
            j.namespace().as_deref() == Some(ns)
                && j.labels().get(EXPERIMENT_LABEL) == Some(&label)
                && j.owner_references().iter().any(|o| o.uid == uid)
        };
        let cached: Vec<Job> = self
            .jobs
            .state()
            .iter()
            .filter(|j| belongs(j))
            .map(|j| Job::clone(j))
            .collect();
        self.overlay.merge(ns, cached, belongs)
    }

    /// Cached pods of the runs (Job names) `runs` in `ns`, by run.
    pub fn pods_of(&self, ns: &str, runs: &[String]) -> HashMap<String, Vec<Pod>> {
        let mut by_run: HashMap<String, Vec<Pod>> = HashMap::new();
        for p in self.pods.state() {
            if p.namespace().as_deref() != Some(ns) {
                continue;
            }
            if let Some(run) = p.labels().get(RUN_LABEL)
                && runs.contains(run)
            {
                by_run.entry(run.clone()).or_default().push(Pod::clone(&p));
            }
        }
        by_run
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

    /// The Experiment owning the run Job a pod belongs to (pods carry the
    /// run's Job name; Experiment names in labels may be shortened).
    pub fn owner_of_pod(&self, pod: &Pod) -> Option<ObjectRef<crate::api::Experiment>> {
        let ns = pod.namespace()?;
        let run = pod.labels().get(RUN_LABEL)?;
        let job = self.jobs.get(&ObjectRef::new(run).within(&ns))?;
        owner_experiment(&job)
    }
}

/// The Experiment a Job's controller ownerReference names.
pub fn owner_experiment(job: &Job) -> Option<ObjectRef<crate::api::Experiment>> {
    let ns = job.namespace()?;
    job.owner_references()
        .iter()
        .find(|o| o.kind == "Experiment" && o.controller == Some(true))
        .map(|o| ObjectRef::new(&o.name).within(&ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(name: &str, annotations: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "annotations": annotations,
                         "labels": {EXPERIMENT_LABEL: "e"}},
        }))
        .unwrap()
    }

    #[test]
    fn a_created_job_missing_from_the_cache_is_added_until_seen() {
        let overlay = Overlay::default();
        overlay.record(&job("e-1", json!({})), Expect::Exists);
        let merged = overlay.merge("ns", vec![], |_| true);
        assert_eq!(merged.len(), 1);
        assert_eq!(overlay.len(), 1);
        // The cache caught up: the entry goes.
        let merged = overlay.merge("ns", vec![job("e-1", json!({}))], |_| true);
        assert_eq!(merged.len(), 1);
        assert!(overlay.is_empty());
    }

    #[test]
    fn an_annotation_write_replaces_a_stale_cached_copy() {
        let overlay = Overlay::default();
        overlay.record(
            &job("e-1", json!({"mlplane.io/result": "{}"})),
            Expect::Annotation("mlplane.io/result"),
        );
        let merged = overlay.merge("ns", vec![job("e-1", json!({}))], |_| true);
        assert!(merged[0].annotations().contains_key("mlplane.io/result"));
        assert_eq!(overlay.len(), 1);
        let merged = overlay.merge(
            "ns",
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
    fn writes_of_other_experiments_and_namespaces_are_left_alone() {
        let overlay = Overlay::default();
        overlay.record(&job("e-1", json!({})), Expect::Exists);
        assert!(overlay.merge("other", vec![], |_| true).is_empty());
        assert!(overlay.merge("ns", vec![], |_| false).is_empty());
        assert_eq!(overlay.len(), 1);
    }
}
