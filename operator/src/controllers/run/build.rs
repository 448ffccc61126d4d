//! The one builder of run Jobs, shared by Experiment runs, sweep trials and
//! Pipeline steps.
//!
//! Owns: turning a resolved [`RunSpec`] (image, substituted command, limits,
//! placement, tracking) into a batch/v1 Job and, for distributed PyTorch, the
//! headless Service its pods find each other through. Pure: no API calls, no
//! spec validation beyond what building needs (the caller resolves the
//! environment, substitutes placeholders and pins inputs first).
//!
//! What every run pod gets:
//! - ServiceAccount `mlplane-run`, `restartPolicy: Never`,
//!   `enableServiceLinks: false` (thousands of `*_SERVICE_HOST` variables
//!   help nobody and can break `torchrun`'s argument parsing).
//! - Secure defaults: `seccompProfile: RuntimeDefault`, and on every container
//!   `allowPrivilegeEscalation: false` and `capabilities.drop: [ALL]`.
//!   `runAsNonRoot` is deliberately not forced: most training images
//!   (pytorch/pytorch, tensorflow/tensorflow, NGC) run as root, and the
//!   workspace namespace enforces Pod Security `baseline`, which allows it.
//! - `terminationMessagePolicy: FallbackToLogsOnError`, so a failed run's
//!   status can quote the last lines of its log.
//! - Resources: cpu is a request; memory and `nvidia.com/gpu` are requests
//!   and limits. `shmSize` mounts an in-memory emptyDir at `/dev/shm` (it
//!   counts against the memory limit).
//! - Placement on a ComputeCluster: nodeSelector `mlplane.io/compute-cluster`
//!   (+ `mlplane.io/pool` when a pool is chosen) and the toleration
//!   `mlplane.io/compute-cluster=<cc>:NoSchedule`, and the Spot taint
//!   `kubernetes.azure.com/scalesetpriority=spot:NoSchedule` (runs may use a
//!   cluster's Spot pools); GPU runs also tolerate
//!   `nvidia.com/gpu:NoSchedule`. Cluster names go through
//!   [`label_value`], which node labelling and tainting must use too.
//! - Environment, in this order: the user's `env`; `MLPLANE_RUN`;
//!   `MLPLANE_INPUT_<NAME>` per input and `MLPLANE_OUTPUT_<NAME>` per output
//!   (`<NAME>` is the name upper-cased, every non-alphanumeric as `_`), and
//!   `MLPLANE_OUTPUTS_DIR` (the common parent of a run's outputs) when given;
//!   `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_ID`, `MLFLOW_RUN_ID` (and
//!   `MLFLOW_TRACKING_TOKEN` from a Secret key when given); for distributed
//!   runs the torch variables below. A user variable with a name mlplane sets
//!   (or any `MLPLANE_*`) is an error, as are duplicate names: server-side
//!   apply keys `env` by name.
//!
//! Job settings: `backoffLimit` = maxRetries (default 0: a training failure
//! is usually deterministic), `activeDeadlineSeconds` = timeout (the deadline
//! restarts when a suspended Job is resumed, so queueing does not count),
//! `podReplacementPolicy: Failed` (a replacement pod never overlaps the one
//! it replaces: no double-booked GPUs, no duplicate torch rank), no
//! `ttlSecondsAfterFinished` (history is kept), `suspend` as asked (a run
//! waiting for ComputeCluster admission is created suspended).
//!
//! Distributed PyTorch (`nodes` N x `processesPerNode` P): an Indexed Job
//! with completions = parallelism = N and `backoffLimit` = maxRetries x N (one
//! failed attempt usually fails every rank), plus a headless Service
//! (`clusterIP: None`, `publishNotReadyAddresses: true`, selecting the
//! `batch.kubernetes.io/job-name` label) set as each pod's `subdomain`. Every
//! pod gets `MASTER_ADDR=<job>-0.<service>`, `MASTER_PORT=29500`,
//! `WORLD_SIZE=N*P`, `NODE_RANK` from the completion-index annotation, and
//! the same for torchrun as `PET_NNODES`, `PET_NPROC_PER_NODE`,
//! `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT`, so `torchrun
//! train.py` needs no flags. MPI is not supported yet (an error naming the
//! field).
//!
//! Jobs' pod templates are immutable: the controller creates a run's Job once
//! (an AlreadyExists answer means it was found) and changes only `suspend`
//! and annotations afterwards; it must not re-apply a built Job over a live
//! one whose `suspend` the admission queue may have flipped.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Service, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::names::{label_value, service_name};
use crate::api::experiment::{Distribution, DistributionType};
use crate::api::shared::{PodMetadata, ResourceRequests};
use crate::controllers::workspace::build::{MANAGED_BY, MANAGED_BY_LABEL, RUN_SERVICE_ACCOUNT};

/// Label naming the Experiment a child belongs to.
pub const EXPERIMENT_LABEL: &str = "mlplane.io/experiment";
/// Label naming the Pipeline a child belongs to.
pub const PIPELINE_LABEL: &str = "mlplane.io/pipeline";
/// Label naming the run (= the Job name).
pub const RUN_LABEL: &str = "mlplane.io/run";
/// Node label and taint key of ComputeCluster nodes; also a run label.
pub const COMPUTE_CLUSTER_LABEL: &str = "mlplane.io/compute-cluster";
/// Node label of a ComputeCluster pool.
pub const POOL_LABEL: &str = "mlplane.io/pool";
/// Extended resource name of NVIDIA GPUs (also their usual taint key).
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Taint key (value `spot`) of Spot nodes, as AKS sets it and ComputeCluster
/// Spot pools do.
pub const SPOT_TAINT_KEY: &str = "kubernetes.azure.com/scalesetpriority";
/// Name of the run container.
pub const RUN_CONTAINER: &str = "run";
/// Name of the `/dev/shm` volume.
pub const SHM_VOLUME: &str = "dshm";
/// Rendezvous port of distributed PyTorch.
pub const MASTER_PORT: u16 = 29500;
/// Annotation the Job controller puts on each Indexed Job pod.
pub const COMPLETION_INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";
/// Label the Job controller puts on each pod of a Job.
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
/// Retries of a failed run when `limits.maxRetries` is not set.
pub const DEFAULT_MAX_RETRIES: i32 = 0;
/// Prefix of every variable mlplane reserves.
pub const ENV_PREFIX: &str = "MLPLANE_";

/// The kind of object a run belongs to (decides its `mlplane.io/<kind>` label).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ParentKind {
    /// An Experiment run or sweep trial.
    #[default]
    Experiment,
    /// A Pipeline step.
    Pipeline,
}

impl ParentKind {
    /// The label naming the parent.
    pub fn label(self) -> &'static str {
        match self {
            Self::Experiment => EXPERIMENT_LABEL,
            Self::Pipeline => PIPELINE_LABEL,
        }
    }
}

/// Where a run's pods may go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// ComputeCluster name; `None` runs on the cluster's regular nodes.
    pub compute_cluster: Option<String>,
    /// Pool of that ComputeCluster (`instanceType`); any pool when `None`.
    pub pool: Option<String>,
}

/// Tracking (MLflow) coordinates of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tracking {
    /// `MLFLOW_TRACKING_URI`, e.g. `http://mlplane-tracking.mlplane-system.svc:5000`.
    pub uri: String,
    /// `MLFLOW_EXPERIMENT_ID`.
    pub experiment_id: String,
    /// `MLFLOW_RUN_ID` (the run the operator created for this run).
    pub run_id: String,
    /// A Secret key holding a bearer token for the tracking API, exposed as
    /// `MLFLOW_TRACKING_TOKEN` (MLflow reads tokens only from that variable).
    pub token: Option<SecretKeySelector>,
}

/// Everything a run Job is built from, already resolved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSpec {
    /// Run name = Job name (from [`super::names`]).
    pub name: String,
    /// Namespace of the Job.
    pub namespace: String,
    /// Controller ownerReference (the Experiment or Pipeline).
    pub owner: OwnerReference,
    /// Experiment or Pipeline.
    pub parent_kind: ParentKind,
    /// Name of the Experiment or Pipeline.
    pub parent_name: String,
    /// More labels for the Job, Service and pods (e.g. `mlplane.io/step`).
    pub extra_labels: BTreeMap<String, String>,
    /// Annotations of the Job (e.g. `mlplane.io/generation`).
    pub annotations: BTreeMap<String, String>,
    /// Container image.
    pub image: String,
    /// Command after substitution.
    pub command: Vec<String>,
    /// Arguments after substitution.
    pub args: Vec<String>,
    /// The user's environment variables.
    pub env: Vec<EnvVar>,
    /// Resources of each pod.
    pub resources: Option<ResourceRequests>,
    /// The user's pod labels and annotations.
    pub pod_metadata: Option<PodMetadata>,
    /// Node placement.
    pub placement: Placement,
    /// Wall-clock limit (`activeDeadlineSeconds`, rounded up to seconds).
    pub timeout: Option<std::time::Duration>,
    /// Retries (`backoffLimit`); [`DEFAULT_MAX_RETRIES`] when `None`.
    pub max_retries: Option<i32>,
    /// Distributed training.
    pub distribution: Option<Distribution>,
    /// Tracking coordinates.
    pub tracking: Option<Tracking>,
    /// Input name -> location in the pod (`MLPLANE_INPUT_<NAME>`).
    pub inputs: BTreeMap<String, String>,
    /// Output name -> location in the pod (`MLPLANE_OUTPUT_<NAME>`).
    pub outputs: BTreeMap<String, String>,
    /// Common parent of the outputs (`MLPLANE_OUTPUTS_DIR`).
    pub outputs_dir: Option<String>,
    /// More volumes (artifact PVC, input mounts).
    pub volumes: Vec<Volume>,
    /// Mounts of the run container.
    pub volume_mounts: Vec<VolumeMount>,
    /// `envFrom` of the run container (artifact store credentials).
    pub env_from: Vec<EnvFromSource>,
    /// Init containers (e.g. input downloads); secure defaults are added to
    /// those without a securityContext.
    pub init_containers: Vec<Container>,
    /// Create the Job suspended (the ComputeCluster admission unsuspends it).
    pub suspend: bool,
}

/// The objects of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunObjects {
    /// The Job.
    pub job: Job,
    /// The headless Service of a distributed run.
    pub service: Option<Service>,
}

/// A run that cannot be built. Fields are relative to the run's spec (the
/// caller prefixes `spec.` or `spec.steps[i].`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A user variable whose name mlplane sets.
    #[error("env[{index}]: {name} is set by mlplane and cannot be overridden")]
    ReservedEnv {
        /// Position in `env`.
        index: usize,
        /// The variable.
        name: String,
    },
    /// The same name twice in `env`.
    #[error("env[{index}]: {name} is set twice")]
    DuplicateEnv {
        /// Position of the second occurrence.
        index: usize,
        /// The variable.
        name: String,
    },
    /// Two input or output names that map to the same variable.
    #[error("{field}: {a:?} and {b:?} both map to the variable {var}")]
    EnvNameCollision {
        /// `inputs` or `outputs`.
        field: &'static str,
        /// One name.
        a: String,
        /// The other.
        b: String,
        /// The variable.
        var: String,
    },
    /// A distribution type this version does not run.
    #[error("distribution.type: {0} is not supported yet (use PyTorch or None)")]
    UnsupportedDistribution(&'static str),
}

/// `<NAME>` of `MLPLANE_INPUT_<NAME>`: upper-cased, non-alphanumerics as `_`.
pub fn env_suffix(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The variable holding the location of output `name`.
pub fn output_env(name: &str) -> String {
    format!("{ENV_PREFIX}OUTPUT_{}", env_suffix(name))
}

/// The variable holding the location of input `name`.
pub fn input_env(name: &str) -> String {
    format!("{ENV_PREFIX}INPUT_{}", env_suffix(name))
}

/// Labels of a run's Job, Service and pods.
pub fn run_labels(spec: &RunSpec) -> BTreeMap<String, String> {
    let mut labels = spec.extra_labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels.insert(spec.parent_kind.label().into(), label_value(&spec.parent_name));
    labels.insert(RUN_LABEL.into(), spec.name.clone());
    if let Some(cc) = &spec.placement.compute_cluster {
        labels.insert(COMPUTE_CLUSTER_LABEL.into(), label_value(cc));
    }
    labels
}

/// Nodes and processes per node of a distributed PyTorch run; `None` for a
/// single-pod run.
pub fn pytorch_shape(d: Option<&Distribution>) -> Result<Option<(i32, i32)>, BuildError> {
    let Some(d) = d else { return Ok(None) };
    match d.type_ {
        DistributionType::None => Ok(None),
        DistributionType::MPI => Err(BuildError::UnsupportedDistribution("MPI")),
        DistributionType::PyTorch => Ok(Some((
            d.nodes.unwrap_or(1).max(1),
            d.processes_per_node.unwrap_or(1).max(1),
        ))),
    }
}

fn value_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    }
}

/// Variables mlplane sets, in order.
fn system_env(spec: &RunSpec, shape: Option<(i32, i32)>) -> Result<Vec<EnvVar>, BuildError> {
    let mut env = vec![value_env("MLPLANE_RUN", spec.name.clone())];
    for (field, map, to_var) in [
        ("inputs", &spec.inputs, input_env as fn(&str) -> String),
        ("outputs", &spec.outputs, output_env),
    ] {
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for (name, location) in map {
            let var = to_var(name);
            if let Some(other) = seen.insert(var.clone(), name) {
                return Err(BuildError::EnvNameCollision {
                    field,
                    a: other.into(),
                    b: name.clone(),
                    var,
                });
            }
            env.push(value_env(&var, location.clone()));
        }
    }
    if let Some(dir) = &spec.outputs_dir {
        env.push(value_env("MLPLANE_OUTPUTS_DIR", dir.clone()));
    }
    if let Some(t) = &spec.tracking {
        env.push(value_env("MLFLOW_TRACKING_URI", t.uri.clone()));
        env.push(value_env("MLFLOW_EXPERIMENT_ID", t.experiment_id.clone()));
        env.push(value_env("MLFLOW_RUN_ID", t.run_id.clone()));
        if let Some(token) = &t.token {
            env.push(EnvVar {
                name: "MLFLOW_TRACKING_TOKEN".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(token.clone()),
                    ..Default::default()
                }),
            });
        }
    }
    if let Some((nodes, procs)) = shape {
        let master = format!("{}-0.{}", spec.name, service_name(&spec.name));
        let rank_path = format!("metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']");
        env.extend([
            value_env("MASTER_ADDR", master.clone()),
            value_env("MASTER_PORT", MASTER_PORT.to_string()),
            value_env("WORLD_SIZE", (i64::from(nodes) * i64::from(procs)).to_string()),
            field_env("NODE_RANK", &rank_path),
            value_env("PET_NNODES", nodes.to_string()),
            value_env("PET_NPROC_PER_NODE", procs.to_string()),
            field_env("PET_NODE_RANK", &rank_path),
            value_env("PET_MASTER_ADDR", master),
            value_env("PET_MASTER_PORT", MASTER_PORT.to_string()),
        ]);
    }
    Ok(env)
}

/// The user's env followed by mlplane's, refusing overrides and duplicates.
fn container_env(spec: &RunSpec, shape: Option<(i32, i32)>) -> Result<Vec<EnvVar>, BuildError> {
    let system = system_env(spec, shape)?;
    let reserved: BTreeSet<&str> = system.iter().map(|e| e.name.as_str()).collect();
    let mut seen = BTreeSet::new();
    for (index, e) in spec.env.iter().enumerate() {
        if reserved.contains(e.name.as_str()) || e.name.starts_with(ENV_PREFIX) {
            return Err(BuildError::ReservedEnv {
                index,
                name: e.name.clone(),
            });
        }
        if !seen.insert(e.name.as_str()) {
            return Err(BuildError::DuplicateEnv {
                index,
                name: e.name.clone(),
            });
        }
    }
    Ok(spec.env.iter().cloned().chain(system).collect())
}

/// GPUs asked for (`resources.gpu`, 0 when unset or negative).
pub fn gpus(r: Option<&ResourceRequests>) -> i32 {
    r.and_then(|r| r.gpu).unwrap_or(0).max(0)
}

/// Container resources from the spec's: cpu is a request; memory and
/// `nvidia.com/gpu` are requests and limits. Shared with serving pods.
pub fn resources(r: Option<&ResourceRequests>) -> Option<ResourceRequirements> {
    let r = r?;
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpu) = &r.cpu {
        requests.insert("cpu".to_string(), cpu.clone());
    }
    if let Some(mem) = &r.memory {
        requests.insert("memory".to_string(), mem.clone());
        limits.insert("memory".to_string(), mem.clone());
    }
    if let Some(gpu) = r.gpu.filter(|g| *g > 0) {
        let q = Quantity(gpu.to_string());
        requests.insert(GPU_RESOURCE.to_string(), q.clone());
        limits.insert(GPU_RESOURCE.to_string(), q);
    }
    (!requests.is_empty()).then(|| ResourceRequirements {
        requests: Some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    })
}

/// The container securityContext every run container gets.
pub fn secure_container_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    }
}

/// Whether a pod may run on a ComputeCluster's Spot nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spot {
    /// Runs and pipeline steps: restartable batch work.
    Tolerate,
    /// Serving pods: a reclaimed node would take an endpoint's capacity.
    Avoid,
}

/// Tolerations of a pod placed by `placement` that asks for `gpus` GPUs: the
/// ComputeCluster's taint, the Spot taint when `spot` allows it, and
/// `nvidia.com/gpu:NoSchedule` for GPU pods. Shared with serving pods.
pub fn tolerations(placement: &Placement, gpus: i32, spot: Spot) -> Vec<Toleration> {
    let mut t = Vec::new();
    if let Some(cc) = &placement.compute_cluster {
        t.push(Toleration {
            key: Some(COMPUTE_CLUSTER_LABEL.into()),
            operator: Some("Equal".into()),
            value: Some(label_value(cc)),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        });
    }
    if placement.compute_cluster.is_some() && spot == Spot::Tolerate {
        t.push(Toleration {
            key: Some(SPOT_TAINT_KEY.into()),
            operator: Some("Equal".into()),
            value: Some("spot".into()),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        });
    }
    if gpus > 0 {
        t.push(Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            value: None,
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        });
    }
    t
}

/// Node selector of a pod placed by `p`: the ComputeCluster's label (and its
/// pool's). Shared with serving pods.
pub fn node_selector(p: &Placement) -> Option<BTreeMap<String, String>> {
    let cc = p.compute_cluster.as_ref()?;
    let mut sel = BTreeMap::from([(COMPUTE_CLUSTER_LABEL.to_string(), label_value(cc))]);
    if let Some(pool) = &p.pool {
        sel.insert(POOL_LABEL.to_string(), pool.clone());
    }
    Some(sel)
}

/// The in-memory `/dev/shm` volume and its mount when `shmSize` is set (it
/// counts against the memory limit). Shared with serving pods.
pub fn shm_volume(r: Option<&ResourceRequests>) -> Option<(Volume, VolumeMount)> {
    let shm = r?.shm_size.clone()?;
    Some((
        Volume {
            name: SHM_VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(shm),
            }),
            ..Default::default()
        },
        VolumeMount {
            name: SHM_VOLUME.into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        },
    ))
}

/// Builds the Job (and Service) of a run.
pub fn build_run(spec: &RunSpec) -> Result<RunObjects, BuildError> {
    let shape = pytorch_shape(spec.distribution.as_ref())?;
    let env = container_env(spec, shape)?;
    let labels = run_labels(spec);

    let mut volumes = spec.volumes.clone();
    let mut mounts = spec.volume_mounts.clone();
    if let Some((volume, mount)) = shm_volume(spec.resources.as_ref()) {
        volumes.push(volume);
        mounts.push(mount);
    }

    let container = Container {
        name: RUN_CONTAINER.into(),
        image: Some(spec.image.clone()),
        command: (!spec.command.is_empty()).then(|| spec.command.clone()),
        args: (!spec.args.is_empty()).then(|| spec.args.clone()),
        env: (!env.is_empty()).then_some(env),
        env_from: (!spec.env_from.is_empty()).then(|| spec.env_from.clone()),
        resources: resources(spec.resources.as_ref()),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        security_context: Some(secure_container_context()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let init_containers: Vec<Container> = spec
        .init_containers
        .iter()
        .cloned()
        .map(|mut c| {
            c.security_context.get_or_insert_with(secure_container_context);
            c
        })
        .collect();

    // User pod labels first, so they cannot override mlplane's.
    let pod_md = spec.pod_metadata.clone().unwrap_or_default();
    let mut pod_labels = pod_md.labels;
    pod_labels.extend(labels.clone());
    let mut pod_annotations = pod_md.annotations;
    pod_annotations.insert("kubectl.kubernetes.io/default-container".into(), RUN_CONTAINER.into());

    let service = shape.map(|_| Service {
        metadata: ObjectMeta {
            name: Some(service_name(&spec.name)),
            namespace: Some(spec.namespace.clone()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![spec.owner.clone()]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(JOB_NAME_LABEL.to_string(), spec.name.clone())])),
            ..Default::default()
        }),
        ..Default::default()
    });

    let tolerations = tolerations(&spec.placement, gpus(spec.resources.as_ref()), Spot::Tolerate);
    let pod = PodSpec {
        containers: vec![container],
        init_containers: (!init_containers.is_empty()).then_some(init_containers),
        restart_policy: Some("Never".into()),
        service_account_name: Some(RUN_SERVICE_ACCOUNT.into()),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        node_selector: node_selector(&spec.placement),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        volumes: (!volumes.is_empty()).then_some(volumes),
        subdomain: service.as_ref().and_then(|s| s.metadata.name.clone()),
        ..Default::default()
    };

    let nodes = shape.map_or(1, |(n, _)| n);
    let retries = spec.max_retries.unwrap_or(DEFAULT_MAX_RETRIES).max(0);
    let job = Job {
        metadata: ObjectMeta {
            name: Some(spec.name.clone()),
            namespace: Some(spec.namespace.clone()),
            labels: Some(labels),
            annotations: (!spec.annotations.is_empty()).then(|| spec.annotations.clone()),
            owner_references: Some(vec![spec.owner.clone()]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            completions: Some(nodes),
            parallelism: Some(nodes),
            completion_mode: Some(if shape.is_some() { "Indexed" } else { "NonIndexed" }.into()),
            backoff_limit: Some(retries.saturating_mul(nodes)),
            active_deadline_seconds: spec
                .timeout
                .map(|t| (t.as_secs() + u64::from(t.subsec_nanos() > 0)).max(1) as i64),
            pod_replacement_policy: Some("Failed".into()),
            suspend: Some(spec.suspend),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    };
    Ok(RunObjects { job, service })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::run::names::{MAX_DNS_LABEL_LEN, is_dns_label, run_name, trial_name};
    use serde_json::json;

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "mlplane.io/v1alpha1".into(),
            kind: "Experiment".into(),
            name: "resnet".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn spec() -> RunSpec {
        RunSpec {
            name: run_name("resnet", 3),
            namespace: "vision".into(),
            owner: owner(),
            parent_kind: ParentKind::Experiment,
            parent_name: "resnet".into(),
            image: "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime".into(),
            command: vec!["python".into(), "train.py".into(), "--lr".into(), "0.01".into()],
            env: vec![EnvVar {
                name: "NCCL_DEBUG".into(),
                value: Some("INFO".into()),
                value_from: None,
            }],
            tracking: Some(Tracking {
                uri: "http://mlplane-tracking.mlplane-system.svc:5000".into(),
                experiment_id: "7".into(),
                run_id: "abc123".into(),
                token: None,
            }),
            outputs: BTreeMap::from([(
                "model".into(),
                "/mnt/artifacts/experiments/resnet/resnet-3/model".into(),
            )]),
            outputs_dir: Some("/mnt/artifacts/experiments/resnet/resnet-3".into()),
            ..Default::default()
        }
    }

    fn gpu_spec() -> RunSpec {
        RunSpec {
            resources: Some(ResourceRequests {
                cpu: Some(Quantity("8".into())),
                memory: Some(Quantity("32Gi".into())),
                gpu: Some(4),
                shm_size: Some(Quantity("2Gi".into())),
            }),
            placement: Placement {
                compute_cluster: Some("gpu".into()),
                pool: Some("a100".into()),
            },
            ..spec()
        }
    }

    fn pod_spec(job: &Job) -> &PodSpec {
        job.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn env_map(c: &Container) -> BTreeMap<String, serde_json::Value> {
        c.env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| {
                let v = match (&e.value, &e.value_from) {
                    (Some(v), _) => json!(v),
                    (None, Some(from)) => serde_json::to_value(from).unwrap(),
                    _ => json!(null),
                };
                (e.name.clone(), v)
            })
            .collect()
    }

    /// What a pod of the Job gets once the Job controller stamps its index:
    /// the env with downward-API references to the index resolved.
    fn resolved_env(job: &Job, index: i32) -> BTreeMap<String, String> {
        let c = &pod_spec(job).containers[0];
        c.env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| {
                let v = match (&e.value, &e.value_from) {
                    (Some(v), _) => v.clone(),
                    (None, Some(from)) => {
                        let path = &from.field_ref.as_ref().unwrap().field_path;
                        assert_eq!(path, &format!("metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"));
                        index.to_string()
                    }
                    _ => panic!("{} has no value", e.name),
                };
                (e.name.clone(), v)
            })
            .collect()
    }

    #[test]
    fn single_run_job_shape() {
        let RunObjects { job, service } = build_run(&spec()).unwrap();
        assert!(service.is_none());
        assert_eq!(job.metadata.name.as_deref(), Some("resnet-3"));
        assert_eq!(job.metadata.namespace.as_deref(), Some("vision"));
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], "mlplane");
        assert_eq!(labels[EXPERIMENT_LABEL], "resnet");
        assert_eq!(labels[RUN_LABEL], "resnet-3");
        assert!(!labels.contains_key(COMPUTE_CLUSTER_LABEL));
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("Experiment", Some(true)));

        let js = job.spec.as_ref().unwrap();
        assert_eq!(js.completions, Some(1));
        assert_eq!(js.parallelism, Some(1));
        assert_eq!(js.completion_mode.as_deref(), Some("NonIndexed"));
        assert_eq!(js.backoff_limit, Some(0));
        assert_eq!(js.active_deadline_seconds, None);
        assert_eq!(js.ttl_seconds_after_finished, None);
        assert_eq!(js.pod_failure_policy, None);
        assert_eq!(js.pod_replacement_policy.as_deref(), Some("Failed"));
        assert_eq!(js.suspend, Some(false));

        let pod = pod_spec(&job);
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.service_account_name.as_deref(), Some("mlplane-run"));
        assert_eq!(pod.enable_service_links, Some(false));
        assert_eq!(pod.subdomain, None);
        assert_eq!(pod.node_selector, None);
        assert_eq!(pod.tolerations, None);
        assert_eq!(pod.volumes, None);
        assert_eq!(
            pod.security_context
                .as_ref()
                .unwrap()
                .seccomp_profile
                .as_ref()
                .unwrap()
                .type_,
            "RuntimeDefault"
        );
        assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, None);
        let c = &pod.containers[0];
        assert_eq!(c.name, RUN_CONTAINER);
        assert_eq!(
            c.image.as_deref(),
            Some("pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime")
        );
        assert_eq!(c.command.as_ref().unwrap()[3], "0.01");
        assert_eq!(c.args, None);
        assert_eq!(c.resources, None);
        assert_eq!(c.termination_message_policy.as_deref(), Some("FallbackToLogsOnError"));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );

        let env = env_map(c);
        let names: Vec<_> = c.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "NCCL_DEBUG",
                "MLPLANE_RUN",
                "MLPLANE_OUTPUT_MODEL",
                "MLPLANE_OUTPUTS_DIR",
                "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_RUN_ID"
            ]
        );
        assert_eq!(env["MLFLOW_RUN_ID"], "abc123");
        assert_eq!(env["MLFLOW_EXPERIMENT_ID"], "7");
        assert_eq!(
            env["MLPLANE_OUTPUT_MODEL"],
            "/mnt/artifacts/experiments/resnet/resnet-3/model"
        );
        assert!(!env.contains_key("MASTER_ADDR"));

        let tmpl = job.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
        assert_eq!(tmpl.labels.as_ref().unwrap()[RUN_LABEL], "resnet-3");
        assert_eq!(
            tmpl.annotations.as_ref().unwrap()["kubectl.kubernetes.io/default-container"],
            RUN_CONTAINER
        );
    }

    #[test]
    fn gpu_run_resources_shm_and_placement() {
        let RunObjects { job, .. } = build_run(&gpu_spec()).unwrap();
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[COMPUTE_CLUSTER_LABEL], "gpu");
        let pod = pod_spec(&job);
        let res = pod.containers[0].resources.as_ref().unwrap();
        let req = res.requests.as_ref().unwrap();
        let lim = res.limits.as_ref().unwrap();
        assert_eq!(req["cpu"].0, "8");
        assert_eq!(req["memory"].0, "32Gi");
        assert_eq!(req[GPU_RESOURCE].0, "4");
        assert_eq!(lim[GPU_RESOURCE].0, "4");
        assert_eq!(lim["memory"].0, "32Gi");
        assert!(!lim.contains_key("cpu"), "cpu is a request only");

        let vols = pod.volumes.as_ref().unwrap();
        assert_eq!(vols.len(), 1);
        let ed = vols[0].empty_dir.as_ref().unwrap();
        assert_eq!(
            (vols[0].name.as_str(), ed.medium.as_deref()),
            (SHM_VOLUME, Some("Memory"))
        );
        assert_eq!(ed.size_limit.as_ref().unwrap().0, "2Gi");
        let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
        assert_eq!(
            (mounts[0].name.as_str(), mounts[0].mount_path.as_str()),
            (SHM_VOLUME, "/dev/shm")
        );

        let sel = pod.node_selector.as_ref().unwrap();
        assert_eq!(sel.len(), 2);
        assert_eq!(sel[COMPUTE_CLUSTER_LABEL], "gpu");
        assert_eq!(sel[POOL_LABEL], "a100");
        let tol = serde_json::to_value(pod.tolerations.as_ref().unwrap()).unwrap();
        assert_eq!(
            tol,
            json!([
                {"key": "mlplane.io/compute-cluster", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
                {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot", "effect": "NoSchedule"},
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ])
        );
    }

    #[test]
    fn placement_without_pool_and_gpu_without_cluster() {
        let mut s = gpu_spec();
        s.placement.pool = None;
        let RunObjects { job, .. } = build_run(&s).unwrap();
        let sel = pod_spec(&job).node_selector.clone().unwrap();
        assert_eq!(sel.keys().collect::<Vec<_>>(), [COMPUTE_CLUSTER_LABEL]);

        s.placement.compute_cluster = None;
        let RunObjects { job, .. } = build_run(&s).unwrap();
        let pod = pod_spec(&job);
        assert_eq!(pod.node_selector, None);
        let tol = pod.tolerations.as_ref().unwrap();
        assert_eq!(tol.len(), 1);
        assert_eq!(tol[0].key.as_deref(), Some(GPU_RESOURCE));

        // gpu: 0 asks for nothing and tolerates nothing.
        s.resources.as_mut().unwrap().gpu = Some(0);
        let RunObjects { job, .. } = build_run(&s).unwrap();
        let pod = pod_spec(&job);
        assert_eq!(pod.tolerations, None);
        assert!(
            !pod.containers[0]
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()
                .contains_key(GPU_RESOURCE)
        );
    }

    #[test]
    fn limits_become_deadline_and_backoff() {
        let s = RunSpec {
            timeout: Some(std::time::Duration::from_secs(7200)),
            max_retries: Some(2),
            suspend: true,
            ..spec()
        };
        let js = build_run(&s).unwrap().job.spec.unwrap();
        assert_eq!(js.active_deadline_seconds, Some(7200));
        assert_eq!(js.backoff_limit, Some(2));
        assert_eq!(js.suspend, Some(true));
        let s = RunSpec {
            timeout: Some(std::time::Duration::from_millis(1500)),
            ..spec()
        };
        assert_eq!(
            build_run(&s).unwrap().job.spec.unwrap().active_deadline_seconds,
            Some(2)
        );
        let s = RunSpec {
            timeout: Some(std::time::Duration::from_millis(10)),
            ..spec()
        };
        assert_eq!(
            build_run(&s).unwrap().job.spec.unwrap().active_deadline_seconds,
            Some(1)
        );
    }

    #[test]
    fn distributed_pytorch_two_nodes_four_processes() {
        let s = RunSpec {
            distribution: Some(Distribution {
                type_: DistributionType::PyTorch,
                nodes: Some(2),
                processes_per_node: Some(4),
            }),
            max_retries: Some(1),
            ..gpu_spec()
        };
        let RunObjects { job, service } = build_run(&s).unwrap();
        let js = job.spec.as_ref().unwrap();
        assert_eq!(js.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((js.completions, js.parallelism), (Some(2), Some(2)));
        assert_eq!(js.backoff_limit, Some(2), "one retry of both ranks");

        let svc = service.expect("headless service");
        assert_eq!(svc.metadata.name.as_deref(), Some("resnet-3"));
        assert_eq!(svc.metadata.labels.as_ref().unwrap()[RUN_LABEL], "resnet-3");
        assert_eq!(svc.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-1");
        let ss = svc.spec.as_ref().unwrap();
        assert_eq!(ss.cluster_ip.as_deref(), Some("None"));
        assert_eq!(ss.publish_not_ready_addresses, Some(true));
        assert_eq!(
            ss.selector.as_ref().unwrap(),
            &BTreeMap::from([(JOB_NAME_LABEL.to_string(), "resnet-3".to_string())])
        );
        assert_eq!(pod_spec(&job).subdomain.as_deref(), Some("resnet-3"));

        // The env of each of the 2 pods (4 processes each).
        for index in 0..2 {
            let env = resolved_env(&job, index);
            let expect = |k: &str, v: &str| assert_eq!(env.get(k).map(String::as_str), Some(v), "pod {index}: {k}");
            expect("MASTER_ADDR", "resnet-3-0.resnet-3");
            expect("MASTER_PORT", "29500");
            expect("WORLD_SIZE", "8");
            expect("NODE_RANK", &index.to_string());
            expect("PET_NNODES", "2");
            expect("PET_NPROC_PER_NODE", "4");
            expect("PET_NODE_RANK", &index.to_string());
            expect("PET_MASTER_ADDR", "resnet-3-0.resnet-3");
            expect("PET_MASTER_PORT", "29500");
            expect("MLFLOW_RUN_ID", "abc123");
            expect("NCCL_DEBUG", "INFO");
        }
        // The pod that MASTER_ADDR names is a valid hostname.
        assert!(is_dns_label("resnet-3-0"));
    }

    #[test]
    fn distributed_names_fit_for_long_experiments() {
        let exp = "x".repeat(200);
        let s = RunSpec {
            name: trial_name(&exp, 12, 345),
            parent_name: exp.clone(),
            distribution: Some(Distribution {
                type_: DistributionType::PyTorch,
                nodes: Some(1024),
                processes_per_node: Some(8),
            }),
            ..spec()
        };
        let RunObjects { job, service } = build_run(&s).unwrap();
        let job_name = job.metadata.name.clone().unwrap();
        let svc_name = service.unwrap().metadata.name.unwrap();
        assert!(is_dns_label(&format!("{job_name}-1023")));
        assert!(svc_name.len() <= MAX_DNS_LABEL_LEN && is_dns_label(&svc_name));
        for v in job.metadata.labels.as_ref().unwrap().values() {
            assert!(v.len() <= 63, "{v}");
        }
        let env = resolved_env(&job, 0);
        assert_eq!(env["MASTER_ADDR"], format!("{job_name}-0.{svc_name}"));
        assert_eq!(env["WORLD_SIZE"], "8192");
    }

    #[test]
    fn single_node_pytorch_still_indexed_with_defaults() {
        let s = RunSpec {
            name: "1exp-1".into(),
            distribution: Some(Distribution {
                type_: DistributionType::PyTorch,
                nodes: None,
                processes_per_node: None,
            }),
            ..spec()
        };
        let RunObjects { job, service } = build_run(&s).unwrap();
        assert_eq!(service.unwrap().metadata.name.as_deref(), Some("r1exp-1"));
        let env = resolved_env(&job, 0);
        assert_eq!(env["MASTER_ADDR"], "1exp-1-0.r1exp-1");
        assert_eq!(env["WORLD_SIZE"], "1");
        // type None is a plain run.
        let s = RunSpec {
            distribution: Some(Distribution::default()),
            ..spec()
        };
        assert!(build_run(&s).unwrap().service.is_none());
    }

    #[test]
    fn mpi_is_refused_naming_the_field() {
        let s = RunSpec {
            distribution: Some(Distribution {
                type_: DistributionType::MPI,
                nodes: Some(2),
                processes_per_node: None,
            }),
            ..spec()
        };
        let e = build_run(&s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "distribution.type: MPI is not supported yet (use PyTorch or None)"
        );
    }

    #[test]
    fn user_env_cannot_override_or_repeat() {
        let mut s = spec();
        s.env.push(EnvVar {
            name: "MLFLOW_RUN_ID".into(),
            value: Some("mine".into()),
            value_from: None,
        });
        assert_eq!(
            build_run(&s).unwrap_err(),
            BuildError::ReservedEnv {
                index: 1,
                name: "MLFLOW_RUN_ID".into()
            }
        );
        let mut s = spec();
        s.env.push(EnvVar {
            name: "MLPLANE_ANYTHING".into(),
            ..Default::default()
        });
        assert!(matches!(build_run(&s), Err(BuildError::ReservedEnv { .. })));
        let mut s = spec();
        s.env.push(s.env[0].clone());
        assert_eq!(
            build_run(&s).unwrap_err().to_string(),
            "env[1]: NCCL_DEBUG is set twice"
        );
        // MASTER_PORT is the user's own when the run is not distributed.
        let mut s = spec();
        s.env.push(EnvVar {
            name: "MASTER_PORT".into(),
            value: Some("1234".into()),
            value_from: None,
        });
        assert!(build_run(&s).is_ok());
        s.distribution = Some(Distribution {
            type_: DistributionType::PyTorch,
            nodes: Some(2),
            processes_per_node: None,
        });
        assert!(matches!(build_run(&s), Err(BuildError::ReservedEnv { index: 1, .. })));
    }

    #[test]
    fn inputs_outputs_and_token_env() {
        let mut s = spec();
        s.inputs = BTreeMap::from([
            ("train".into(), "/mnt/inputs/train".into()),
            ("val-set".into(), "s3://b/val/".into()),
        ]);
        s.tracking.as_mut().unwrap().token = Some(SecretKeySelector {
            name: "mlplane-run-token".into(),
            key: "token".into(),
            optional: None,
        });
        let job = build_run(&s).unwrap().job;
        let env = env_map(&pod_spec(&job).containers[0]);
        assert_eq!(env["MLPLANE_INPUT_TRAIN"], "/mnt/inputs/train");
        assert_eq!(env["MLPLANE_INPUT_VAL_SET"], "s3://b/val/");
        assert_eq!(
            env["MLFLOW_TRACKING_TOKEN"],
            json!({"secretKeyRef": {"name": "mlplane-run-token", "key": "token"}})
        );
        s.inputs.insert("val_set".into(), "x".into());
        assert_eq!(
            build_run(&s).unwrap_err().to_string(),
            "inputs: \"val-set\" and \"val_set\" both map to the variable MLPLANE_INPUT_VAL_SET"
        );
    }

    #[test]
    fn pod_metadata_cannot_override_mlplane_labels() {
        let s = RunSpec {
            pod_metadata: Some(PodMetadata {
                labels: BTreeMap::from([("team".into(), "vision".into()), (RUN_LABEL.into(), "spoofed".into())]),
                annotations: BTreeMap::from([("sidecar.istio.io/inject".into(), "false".into())]),
            }),
            extra_labels: BTreeMap::from([("mlplane.io/trial".into(), "4".into())]),
            ..spec()
        };
        let job = build_run(&s).unwrap().job;
        let tmpl = job.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
        let labels = tmpl.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "vision");
        assert_eq!(labels[RUN_LABEL], "resnet-3");
        assert_eq!(labels["mlplane.io/trial"], "4");
        assert_eq!(tmpl.annotations.as_ref().unwrap()["sidecar.istio.io/inject"], "false");
        // User pod labels stay off the Job itself; extra labels are on it.
        let jl = job.metadata.labels.as_ref().unwrap();
        assert!(!jl.contains_key("team"));
        assert_eq!(jl["mlplane.io/trial"], "4");
    }

    #[test]
    fn pipeline_steps_and_init_containers() {
        let s = RunSpec {
            parent_kind: ParentKind::Pipeline,
            parent_name: "sales".into(),
            name: "sales-1-prep".into(),
            init_containers: vec![Container {
                name: "fetch-raw".into(),
                image: Some("mlplane:dev".into()),
                ..Default::default()
            }],
            volumes: vec![Volume {
                name: "artifacts".into(),
                ..Default::default()
            }],
            volume_mounts: vec![VolumeMount {
                name: "artifacts".into(),
                mount_path: "/mnt/artifacts".into(),
                ..Default::default()
            }],
            ..spec()
        };
        let job = build_run(&s).unwrap().job;
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[PIPELINE_LABEL], "sales");
        assert!(!labels.contains_key(EXPERIMENT_LABEL));
        let pod = pod_spec(&job);
        let init = &pod.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.security_context, Some(secure_container_context()));
        assert_eq!(pod.volumes.as_ref().unwrap()[0].name, "artifacts");
        assert_eq!(
            pod.containers[0].volume_mounts.as_ref().unwrap()[0].mount_path,
            "/mnt/artifacts"
        );
    }

    #[test]
    fn long_cluster_names_are_label_safe_everywhere() {
        let cc = format!("{}.example", "c".repeat(100));
        let s = RunSpec {
            placement: Placement {
                compute_cluster: Some(cc.clone()),
                pool: None,
            },
            ..spec()
        };
        let job = build_run(&s).unwrap().job;
        let v = label_value(&cc);
        assert!(v.len() <= 63);
        assert_eq!(job.metadata.labels.as_ref().unwrap()[COMPUTE_CLUSTER_LABEL], v);
        let pod = pod_spec(&job);
        assert_eq!(pod.node_selector.as_ref().unwrap()[COMPUTE_CLUSTER_LABEL], v);
        assert_eq!(pod.tolerations.as_ref().unwrap()[0].value.as_deref(), Some(v.as_str()));
    }
}
