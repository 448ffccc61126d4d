//! Compact Pods and Jobs for the watch caches.
//!
//! The ComputeCluster, Experiment, Pipeline and Workspace controllers cache
//! every run Job and (the first) every pod. k8s-openapi's `Pod` is 2.4 KB
//! before any field is set, its `Container` 2.1 KB and `Job` 2.6 KB, so even
//! stripped a run cost about 20 KB of cache. These types keep only what the
//! controllers read, with the same field names as k8s-openapi's (code reads
//! `pod.spec.as_ref()?.node_name` either way), and are decoded directly from
//! the watch: fields they do not have are skipped by the decoder, never
//! allocated (`managedFields` included).
//!
//! Kept of a pod: metadata (without managedFields, finalizers; annotations
//! filtered by the cache that holds it), the placement-relevant spec (node
//! name, nodeSelector, node affinity, tolerations, overhead, and each
//! container's name, resources and restart policy) and the status run status
//! reads (phase, reason, message, PodScheduled and Ready conditions, and each
//! container's name, state, last state, readiness and restarts). Of a Job:
//! metadata, the spec's counts, suspend, limits and the pod template's spec
//! as above, and the whole status.
//!
//! Owns: the types, their `Resource` impls and conversions. They are read
//! only: nothing is ever written back to the API server from them.
use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::api::core::v1::{ContainerState, NodeAffinity, Pod, PodCondition, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use serde::{Deserialize, Deserializer};

/// The part of `metadata` the caches keep: everything the controllers and
/// the reflector read (name, namespace, uid, resourceVersion, ...), not
/// managedFields, finalizers, generateName or selfLink.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Meta {
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    deletion_timestamp: Option<Time>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    name: Option<String>,
    namespace: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    resource_version: Option<String>,
    uid: Option<String>,
}

fn meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Meta::deserialize(d)?;
    Ok(ObjectMeta {
        annotations: m.annotations,
        creation_timestamp: m.creation_timestamp,
        deletion_grace_period_seconds: m.deletion_grace_period_seconds,
        deletion_timestamp: m.deletion_timestamp,
        generation: m.generation,
        labels: m.labels,
        name: m.name,
        namespace: m.namespace,
        owner_references: m.owner_references,
        resource_version: m.resource_version,
        uid: m.uid,
        ..Default::default()
    })
}

/// Keeps of `meta`'s annotations those `keep` accepts (none left: `None`).
pub fn keep_annotations(meta: &mut ObjectMeta, keep: impl Fn(&str) -> bool) {
    meta.annotations = meta.annotations.take().and_then(|a| {
        let kept: BTreeMap<String, String> = a.into_iter().filter(|(k, _)| keep(k)).collect();
        (!kept.is_empty()).then_some(kept)
    });
}

/// A container of a cached pod (spec): what placement and accounting read.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CachedContainer {
    pub name: String,
    pub resources: Option<ResourceRequirements>,
    pub restart_policy: Option<String>,
}

/// A pod's affinity: only the node affinity is read.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CachedAffinity {
    pub node_affinity: Option<NodeAffinity>,
}

/// A pod spec (of a pod or a Job's template): placement and resources.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CachedPodSpec {
    pub node_name: Option<String>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub affinity: Option<CachedAffinity>,
    pub tolerations: Option<Vec<Toleration>>,
    pub containers: Vec<CachedContainer>,
    pub init_containers: Option<Vec<CachedContainer>>,
    pub overhead: Option<BTreeMap<String, Quantity>>,
}

impl From<&k8s_openapi::api::core::v1::PodSpec> for CachedPodSpec {
    fn from(s: &k8s_openapi::api::core::v1::PodSpec) -> Self {
        let slim = |c: &k8s_openapi::api::core::v1::Container| CachedContainer {
            name: c.name.clone(),
            resources: c.resources.clone(),
            restart_policy: c.restart_policy.clone(),
        };
        Self {
            node_name: s.node_name.clone(),
            node_selector: s.node_selector.clone(),
            affinity: s.affinity.as_ref().map(|a| CachedAffinity {
                node_affinity: a.node_affinity.clone(),
            }),
            tolerations: s.tolerations.clone(),
            containers: s.containers.iter().map(slim).collect(),
            init_containers: s.init_containers.as_ref().map(|cs| cs.iter().map(slim).collect()),
            overhead: s.overhead.clone(),
        }
    }
}

/// A container's status: what run status and its trigger summary read.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CachedContainerStatus {
    pub name: String,
    pub state: Option<ContainerState>,
    pub last_state: Option<ContainerState>,
    pub ready: bool,
    pub restart_count: i32,
    pub started: Option<bool>,
}

/// A pod's status: phase, reason, message, the scheduling and readiness
/// conditions (others are dropped by [`CachedPod::strip`]) and container
/// states.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CachedPodStatus {
    pub phase: Option<String>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub conditions: Option<Vec<PodCondition>>,
    pub container_statuses: Option<Vec<CachedContainerStatus>>,
    pub init_container_statuses: Option<Vec<CachedContainerStatus>>,
}

/// A cached pod (see the module docs).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CachedPod {
    #[serde(deserialize_with = "meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<CachedPodSpec>,
    pub status: Option<CachedPodStatus>,
}

impl CachedPod {
    /// Drops what the decoder kept but no cache reads: annotations other
    /// than those `keep` accepts, conditions other than PodScheduled and
    /// Ready.
    pub fn strip(&mut self, keep: impl Fn(&str) -> bool) {
        keep_annotations(&mut self.metadata, keep);
        if let Some(cs) = self.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            cs.retain(|c| matches!(c.type_.as_str(), "PodScheduled" | "Ready"));
        }
    }
}

/// A Job's pod template: its spec only.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CachedPodTemplateSpec {
    pub spec: Option<CachedPodSpec>,
}

/// A Job's spec: counts, limits, suspension and the template's placement
/// and resources.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct CachedJobSpec {
    pub parallelism: Option<i32>,
    pub completions: Option<i32>,
    pub completion_mode: Option<String>,
    pub suspend: Option<bool>,
    pub backoff_limit: Option<i32>,
    pub active_deadline_seconds: Option<i64>,
    pub template: CachedPodTemplateSpec,
}

/// A cached Job (see the module docs).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct CachedJob {
    #[serde(deserialize_with = "meta")]
    pub metadata: ObjectMeta,
    pub spec: Option<CachedJobSpec>,
    pub status: Option<JobStatus>,
}

impl CachedJob {
    /// Drops annotations other than those `keep` accepts.
    pub fn strip(&mut self, keep: impl Fn(&str) -> bool) {
        keep_annotations(&mut self.metadata, keep);
    }
}

/// Re-decodes a full object as its cached form (an object the API server
/// answered a write with, to stand in for the cache until it shows it).
fn recode<T: serde::de::DeserializeOwned + Default>(full: &impl serde::Serialize) -> T {
    serde_json::to_value(full)
        .and_then(serde_json::from_value)
        .unwrap_or_else(|e| {
            // Both sides are the same API object's JSON: this cannot fail
            // short of a bug, which must not take the operator down.
            tracing::error!(error = %e, "re-decoding an object for the cache failed");
            T::default()
        })
}

/// Creates `job` in its namespace and decodes the API server's answer
/// straight into a [`CachedJob`]: the full Job (with its managedFields) is
/// never built, and no second decode is made to cache it.
pub async fn create_job(client: &kube::Client, namespace: &str, job: &Job) -> kube::Result<CachedJob> {
    let api: kube::Api<Job> = kube::Api::namespaced(client.clone(), namespace);
    let bytes = serde_json::to_vec(job).map_err(kube::Error::SerdeError)?;
    let mut req = kube::core::Request::new(api.resource_url())
        .create(&kube::api::PostParams::default(), bytes)
        .map_err(kube::Error::BuildRequest)?;
    req.extensions_mut().insert("create");
    client.request::<CachedJob>(req).await
}

impl From<&Job> for CachedJob {
    fn from(job: &Job) -> Self {
        recode(job)
    }
}

impl From<&Pod> for CachedPod {
    fn from(pod: &Pod) -> Self {
        recode(pod)
    }
}

macro_rules! resource {
    ($cached:ty, $full:ty) => {
        impl Resource for $cached {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                <$full as Resource>::kind(&())
            }
            fn group(_: &()) -> Cow<'_, str> {
                <$full as Resource>::group(&())
            }
            fn version(_: &()) -> Cow<'_, str> {
                <$full as Resource>::version(&())
            }
            fn plural(_: &()) -> Cow<'_, str> {
                <$full as Resource>::plural(&())
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource!(CachedPod, Pod);
resource!(CachedJob, Job);

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;
    use serde_json::json;

    fn full_pod() -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "r-0", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                         "labels": {"mlplane.io/run": "r"},
                         "annotations": {"kubernetes.io/config.mirror": "x", "other": "y"},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "r",
                                              "uid": "j1", "controller": true}],
                         "finalizers": ["f"],
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]},
            "spec": {"nodeName": "n1", "nodeSelector": {"pool": "gpu"},
                     "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                         "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Exists"}]}]}},
                                  "podAntiAffinity": {}},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                     "containers": [{"name": "main", "image": "trainer", "command": ["python"],
                                     "env": [{"name": "A", "value": "1"}],
                                     "resources": {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}}],
                     "initContainers": [{"name": "fetch", "image": "x", "restartPolicy": "Always"}],
                     "overhead": {"cpu": "10m"}},
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
        })
    }

    #[test]
    fn a_pod_decodes_to_what_the_caches_read() {
        let mut p: CachedPod = serde_json::from_value(full_pod()).unwrap();
        p.strip(|k| k == "kubernetes.io/config.mirror");
        assert_eq!(
            (p.name_any(), p.namespace(), p.uid(), p.resource_version()),
            ("r-0".into(), Some("ns".into()), Some("u1".into()), Some("7".into()))
        );
        assert!(p.metadata.managed_fields.is_none() && p.metadata.finalizers.is_none());
        assert_eq!(
            p.annotations().keys().collect::<Vec<_>>(),
            ["kubernetes.io/config.mirror"]
        );
        assert_eq!(p.owner_references()[0].uid, "j1");
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "gpu");
        assert!(spec.affinity.as_ref().unwrap().node_affinity.is_some());
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("nvidia.com/gpu")
        );
        assert_eq!(spec.containers[0].name, "main");
        assert_eq!(
            spec.containers[0].resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
            "1Gi"
        );
        assert_eq!(
            spec.init_containers.as_ref().unwrap()[0].restart_policy.as_deref(),
            Some("Always")
        );
        assert_eq!(spec.overhead.as_ref().unwrap()["cpu"].0, "10m");
        let s = p.status.as_ref().unwrap();
        assert_eq!(
            (s.phase.as_deref(), s.reason.as_deref(), s.message.as_deref()),
            (Some("Failed"), Some("Evicted"), Some("low on memory"))
        );
        let types: Vec<&str> = s.conditions.iter().flatten().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["PodScheduled", "Ready"]);
        let c = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!((c.name.as_str(), c.restart_count, c.ready), ("main", 2, false));
        assert_eq!(c.state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code, 137);
    }

    #[test]
    fn a_full_object_converts_to_the_same_cached_form_as_its_json() {
        let full: Pod = serde_json::from_value(full_pod()).unwrap();
        let direct: CachedPod = serde_json::from_value(full_pod()).unwrap();
        assert_eq!(CachedPod::from(&full), direct);
        let job = json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "r", "namespace": "ns", "annotations": {"mlplane.io/params": "{}"}},
            "spec": {"parallelism": 2, "completions": 2, "completionMode": "Indexed", "suspend": true,
                     "backoffLimit": 3, "activeDeadlineSeconds": 60,
                     "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [
                         {"name": "run", "image": "x", "resources": {"limits": {"memory": "1Gi"}}}]}}},
            "status": {"active": 1, "conditions": [{"type": "Failed", "status": "True",
                        "reason": "BackoffLimitExceeded", "message": "m"}]}
        });
        let cached: CachedJob = serde_json::from_value(job.clone()).unwrap();
        let full: Job = serde_json::from_value(job).unwrap();
        assert_eq!(CachedJob::from(&full), cached);
        let spec = cached.spec.as_ref().unwrap();
        assert_eq!(
            (
                spec.parallelism,
                spec.completions,
                spec.suspend,
                spec.backoff_limit,
                spec.active_deadline_seconds
            ),
            (Some(2), Some(2), Some(true), Some(3), Some(60))
        );
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!(spec.template.spec.as_ref().unwrap().containers[0].name, "run");
        let cond = &cached.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
        assert_eq!(cond.message.as_deref(), Some("m"));
    }

    #[test]
    fn the_cached_kinds_address_the_real_resources() {
        assert_eq!(CachedPod::url_path(&(), Some("ns")), "/api/v1/namespaces/ns/pods");
        assert_eq!(CachedJob::url_path(&(), None), "/apis/batch/v1/jobs");
        assert_eq!(CachedJob::kind(&()), "Job");
    }
}
