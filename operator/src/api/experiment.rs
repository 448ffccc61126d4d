//! `Experiment` (namespaced, short name `exp`): a named training job and all
//! of its runs; optionally a hyperparameter sweep.
//!
//! Owns: the Experiment spec/status types and their admission rules. Must not
//! touch the API server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{
    DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, DataInput, Duration, Environment, OutputSpec, ParamValue, Params,
    PodMetadata, ResourceRequests,
};

/// A training job and its runs. Each new generation (or `mlplane.io/rerun`
/// annotation) starts a new run; earlier runs stay in the history.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "mlplane.io",
    version = "v1alpha1",
    kind = "Experiment",
    plural = "experiments",
    shortname = "exp",
    category = "mlplane",
    namespaced,
    status = "ExperimentStatus",
    doc = "A training job and all of its runs; optionally a hyperparameter sweep.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Latest","type":"string","jsonPath":".status.runs[0].name"}"#,
    printcolumn = r#"{"name":"Best","type":"string","jsonPath":".status.bestRun.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.instanceType) || has(self.compute)")
    .message("spec.instanceType requires spec.compute"))]
pub struct ExperimentSpec {
    /// ComputeCluster to run on; without it runs go to the cluster's regular
    /// nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub compute: Option<String>,
    /// Pool of `compute` to run on (a pool name); any fitting pool when
    /// omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub instance_type: Option<String>,
    /// Container image or curated environment.
    pub environment: Environment,
    /// Command and arguments; `${{params.x}}`, `${{inputs.x}}`,
    /// `${{outputs.x}}` are substituted.
    #[schemars(length(min = 1, max = 1024))]
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub env: Vec<EnvVar>,
    /// Parameters, name -> scalar (`{lr: 0.01, epochs: 10}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub params: Params,
    /// Data inputs by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub inputs: BTreeMap<String, DataInput>,
    /// Outputs by name, stored under
    /// `<workspace artifacts>/experiments/<exp>/<run>/<output>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = Rule::new(
        "self.all(k, size(k) <= 63 && k.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))"
    ).message("spec.outputs keys must be DNS labels (at most 63 of a-z, 0-9, '-')"))]
    pub outputs: BTreeMap<String, OutputSpec>,
    /// Resources of each pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequests>,
    /// Distributed training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<Distribution>,
    /// Hyperparameter sweep: each trial is a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<Sweep>,
    /// Per-run limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<RunLimits>,
    /// Labels and annotations added to every run pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_metadata: Option<PodMetadata>,
    /// `true` cancels the active runs (history is kept) and starts no new
    /// ones; back to `false` starts a new run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// Distributed training settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'None' || has(self.nodes)")
    .message("spec.distribution.nodes is required when spec.distribution.type is PyTorch or MPI"))]
pub struct Distribution {
    /// None (default), PyTorch or MPI.
    #[serde(default, rename = "type")]
    pub type_: DistributionType,
    /// Number of nodes (pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub nodes: Option<i32>,
    /// Processes per node (usually GPUs per node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub processes_per_node: Option<i32>,
}

/// Kind of distributed training.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DistributionType {
    /// One pod.
    #[default]
    None,
    /// torchrun across an Indexed Job.
    PyTorch,
    /// MPI launcher and workers.
    MPI,
}

/// A hyperparameter sweep.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(
        "self.algorithm != 'Grid' || self.searchSpace.all(k, !has(self.searchSpace[k].uniform) && !has(self.searchSpace[k].logUniform))"
    ).message("spec.sweep.searchSpace entries must be choice or randint when spec.sweep.algorithm is Grid"),
    validation = Rule::new("self.algorithm == 'Random' || !has(self.seed)")
        .message("spec.sweep.seed is only allowed when spec.sweep.algorithm is Random"),
    validation = Rule::new("self.algorithm != 'Random' || (has(self.limits) && has(self.limits.maxTrials))")
        .message("spec.sweep.limits.maxTrials is required when spec.sweep.algorithm is Random"),
)]
pub struct Sweep {
    /// Grid (every combination) or Random (seeded sampling).
    pub algorithm: SweepAlgorithm,
    /// Seed of Random sampling; the experiment's UID when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Parameter name -> distribution. Sampled values override `params`.
    #[schemars(extend("minProperties" = 1, "maxProperties" = 32))]
    pub search_space: BTreeMap<String, SearchDistribution>,
    /// The metric to optimize. Required: a sweep without one has no best run.
    pub objective: Objective,
    /// Trial limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<SweepLimits>,
    /// Stop unpromising trials early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_termination: Option<EarlyTermination>,
}

/// Sweep algorithm.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SweepAlgorithm {
    /// Every combination of choice/randint values.
    #[default]
    Grid,
    /// Seeded random sampling.
    Random,
}

/// The distribution of one parameter: exactly one of `choice`, `uniform`,
/// `logUniform`, `randint`. "Exactly one" is enforced by min/maxProperties
/// (choice values are untyped, so CEL cannot see `choice`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
#[x_kube(
    validation = Rule::new("!has(self.uniform) || self.uniform.min < self.uniform.max")
        .message("spec.sweep.searchSpace[].uniform.min must be < max"),
    validation = Rule::new("!has(self.logUniform) || self.logUniform.min < self.logUniform.max")
        .message("spec.sweep.searchSpace[].logUniform.min must be < max"),
    validation = Rule::new("!has(self.logUniform) || self.logUniform.min > 0.0")
        .message("spec.sweep.searchSpace[].logUniform.min must be > 0"),
    validation = Rule::new("!has(self.randint) || self.randint.min < self.randint.max")
        .message("spec.sweep.searchSpace[].randint.min must be < max"),
)]
pub struct SearchDistribution {
    /// One of these values (numbers, strings or booleans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub choice: Option<Vec<ParamValue>>,
    /// Uniform in [min, max).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uniform: Option<FloatRange>,
    /// Log-uniform in [min, max), min > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_uniform: Option<FloatRange>,
    /// Integer in [min, max).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub randint: Option<IntRange>,
}

/// A range of floating-point values.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FloatRange {
    /// Lower bound.
    pub min: f64,
    /// Upper bound.
    pub max: f64,
}

/// A range of integers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IntRange {
    /// Lower bound (inclusive).
    pub min: i64,
    /// Upper bound (exclusive).
    pub max: i64,
}

/// The metric a sweep optimizes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Objective {
    /// Metric name as logged with `mlflow.log_metric`.
    #[schemars(length(min = 1, max = 250))]
    pub metric: String,
    /// Maximize or Minimize.
    pub goal: Goal,
}

/// Direction of an objective.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Goal {
    /// Higher is better.
    #[default]
    Maximize,
    /// Lower is better.
    Minimize,
}

/// Limits of a sweep.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.maxTrials) || !has(self.maxConcurrentTrials) || self.maxConcurrentTrials <= self.maxTrials"
).message("spec.sweep.limits.maxConcurrentTrials must be <= maxTrials"))]
pub struct SweepLimits {
    /// Total trials; for Grid, the grid is cut at this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_trials: Option<i32>,
    /// Trials running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent_trials: Option<i32>,
    /// Wall-clock limit of one trial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial_timeout: Option<Duration>,
}

/// Early termination of trials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.policy != 'Bandit' || has(self.slackFactor) != has(self.slackAmount)")
        .message("spec.sweep.earlyTermination: policy Bandit requires exactly one of slackFactor or slackAmount"),
    validation = Rule::new("self.policy == 'Bandit' || (!has(self.slackFactor) && !has(self.slackAmount))")
        .message("spec.sweep.earlyTermination.slackFactor and slackAmount are only allowed with policy Bandit"),
)]
pub struct EarlyTermination {
    /// MedianStopping or Bandit.
    pub policy: EarlyTerminationPolicy,
    /// Evaluate every this many metric reports.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1))]
    pub evaluation_interval: i32,
    /// Skip this many reports before the first evaluation.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub delay_evaluation: i32,
    /// Bandit: stop trials whose metric is outside this ratio of the best.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub slack_factor: Option<f64>,
    /// Bandit: stop trials whose metric is outside this distance of the best.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub slack_amount: Option<f64>,
}

fn default_one() -> i32 {
    1
}

/// Early termination policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EarlyTerminationPolicy {
    /// Stop trials below the median of completed trials at the same step.
    #[default]
    MedianStopping,
    /// Stop trials outside a slack of the best trial.
    Bandit,
}

/// Limits of each run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunLimits {
    /// Wall-clock limit of a run (`activeDeadlineSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retries of a failed run (`backoffLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_retries: Option<i32>,
}

/// Observed state of an Experiment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExperimentStatus {
    /// Phase of the latest run (or sweep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Runs, newest first, bounded by the controller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<RunStatus>,
    /// The best run by the sweep objective.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_run: Option<BestRun>,
    /// Conditions, merged by type (`Ready`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Phase of a run, and of an Experiment (its latest run).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RunPhase {
    /// Created, not yet submitted.
    #[default]
    Pending,
    /// Waiting for quota or capacity.
    Queued,
    /// Pods running.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished unsuccessfully.
    Failed,
    /// Stopped by a user or by early termination.
    Cancelled,
}

impl RunPhase {
    /// Whether the run has finished.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// One run (or sweep trial).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunStatus {
    /// Run name (`<exp>-<index>`, `-t<trial>` for trials).
    pub name: String,
    /// The `metadata.generation` the run was started from.
    pub generation: i64,
    /// Trial number within a sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial: Option<i32>,
    /// Resolved parameters of this run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: Params,
    /// Inputs as pinned when the run started.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, PinnedInput>,
    /// Phase.
    pub phase: RunPhase,
    /// Name of the Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Tracking (MLflow) run id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_run_id: Option<String>,
    /// When the run's pods started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Latest value of each logged metric.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// CamelCase reason of the phase (e.g. `BackoffLimitExceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An input as resolved for one run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PinnedInput {
    /// DataAsset name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_asset: Option<String>,
    /// Pinned version (never `latest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Digest of that version's manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// URI read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
}

/// The best run of a sweep.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BestRun {
    /// Run name.
    pub name: String,
    /// Objective metric name.
    pub metric: String,
    /// Its value.
    pub value: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::test_support::{assert_invalid, assert_valid, set, unset};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn crd() -> CustomResourceDefinition {
        Experiment::crd()
    }

    fn valid() -> serde_json::Value {
        json!({
            "apiVersion": "mlplane.io/v1alpha1",
            "kind": "Experiment",
            "metadata": {"name": "resnet", "namespace": "vision"},
            "spec": {
                "compute": "gpu",
                "instanceType": "a100",
                "environment": {"image": "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"},
                "command": ["python", "train.py", "--lr", "${{params.lr}}", "--data", "${{inputs.train}}", "--out", "${{outputs.model}}"],
                "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                "params": {"lr": 0.01, "epochs": 10, "optimizer": "adam"},
                "inputs": {"train": {"dataAsset": "imagenet-mini", "version": "3"}, "extra": {"uri": "s3://bucket/extra/", "mode": "Download"}},
                "outputs": {"model": {}},
                "resources": {"cpu": "8", "memory": "32Gi", "gpu": 1, "shmSize": "2Gi"},
                "distribution": {"type": "PyTorch", "nodes": 2, "processesPerNode": 1},
                "sweep": {
                    "algorithm": "Grid",
                    "searchSpace": {"lr": {"choice": [0.1, 0.01]}, "bs": {"randint": {"min": 16, "max": 64}}},
                    "objective": {"metric": "val_accuracy", "goal": "Maximize"},
                    "limits": {"maxTrials": 20, "maxConcurrentTrials": 4, "trialTimeout": "1h"},
                    "earlyTermination": {"policy": "MedianStopping", "evaluationInterval": 1, "delayEvaluation": 5}
                },
                "limits": {"timeout": "2h", "maxRetries": 2},
                "podMetadata": {"labels": {"team": "vision"}}
            }
        })
    }

    fn random() -> serde_json::Value {
        let exp = set(valid(), "/spec/sweep/algorithm", json!("Random"));
        set(
            exp,
            "/spec/sweep/searchSpace",
            json!({
                "lr": {"logUniform": {"min": 0.0001, "max": 0.1}},
                "wd": {"uniform": {"min": 0, "max": 0.1}},
                "opt": {"choice": ["adam", "sgd"]}
            }),
        )
    }

    #[test]
    fn valid_experiments_pass() {
        assert_valid(&crd(), &valid());
        assert_valid(&crd(), &random());
        assert_valid(&crd(), &set(random(), "/spec/sweep/seed", json!(42)));
        // Minimal experiment.
        assert_valid(
            &crd(),
            &json!({
                "apiVersion": "mlplane.io/v1alpha1", "kind": "Experiment",
                "metadata": {"name": "tiny", "namespace": "default"},
                "spec": {"environment": {"name": "sklearn"}, "command": ["python", "fit.py"]}
            }),
        );
        let typed: Experiment = serde_json::from_value(valid()).unwrap();
        assert_eq!(typed.spec.params["lr"].render(), "0.01");
        assert_eq!(typed.spec.distribution.unwrap().type_, DistributionType::PyTorch);
        let sweep = typed.spec.sweep.unwrap();
        assert_eq!(sweep.search_space["bs"].randint, Some(IntRange { min: 16, max: 64 }));
        assert_eq!(sweep.early_termination.unwrap().evaluation_interval, 1);
        // Round trip stays minimal.
        let back = serde_json::to_value(serde_json::from_value::<Experiment>(valid()).unwrap()).unwrap();
        assert_eq!(back["spec"], valid()["spec"]);
    }

    #[test]
    fn output_names_are_dns_labels() {
        let exp = set(valid(), "/spec/outputs", json!({"best_model": {}}));
        assert_invalid(&crd(), &exp, "spec.outputs keys must be DNS labels");
    }

    #[test]
    fn instance_type_requires_compute() {
        let exp = unset(valid(), "/spec/compute");
        assert_invalid(&crd(), &exp, "spec.instanceType requires spec.compute");
    }

    #[test]
    fn environment_exactly_one() {
        let exp = set(valid(), "/spec/environment/name", json!("pytorch"));
        assert_invalid(&crd(), &exp, "environment must set exactly one of image or name");
        let exp = set(valid(), "/spec/environment", json!({}));
        assert_invalid(&crd(), &exp, "environment must set exactly one of image or name");
    }

    #[test]
    fn inputs_exactly_one_source() {
        let exp = set(valid(), "/spec/inputs/train/uri", json!("s3://x/y"));
        assert_invalid(&crd(), &exp, "inputs[]: exactly one of dataAsset or uri must be set");
        let exp = set(valid(), "/spec/inputs/train", json!({"mode": "Mount"}));
        assert_invalid(&crd(), &exp, "inputs[]: exactly one of dataAsset or uri must be set");
        let exp = set(valid(), "/spec/inputs/extra/version", json!("3"));
        assert_invalid(&crd(), &exp, "inputs[].version is only allowed with dataAsset");
    }

    #[test]
    fn distributed_needs_nodes() {
        let exp = unset(valid(), "/spec/distribution/nodes");
        assert_invalid(
            &crd(),
            &exp,
            "spec.distribution.nodes is required when spec.distribution.type is PyTorch or MPI",
        );
        let exp = set(exp, "/spec/distribution/type", json!("MPI"));
        assert_invalid(&crd(), &exp, "spec.distribution.nodes is required");
        // type defaults to None, which needs no nodes.
        assert_valid(&crd(), &set(valid(), "/spec/distribution", json!({})));
    }

    #[test]
    fn grid_needs_discrete_space() {
        let exp = set(
            valid(),
            "/spec/sweep/searchSpace/wd",
            json!({"uniform": {"min": 0.0, "max": 0.1}}),
        );
        assert_invalid(
            &crd(),
            &exp,
            "spec.sweep.searchSpace entries must be choice or randint when spec.sweep.algorithm is Grid",
        );
    }

    #[test]
    fn seed_only_for_random() {
        let exp = set(valid(), "/spec/sweep/seed", json!(7));
        assert_invalid(
            &crd(),
            &exp,
            "spec.sweep.seed is only allowed when spec.sweep.algorithm is Random",
        );
    }

    #[test]
    fn random_needs_max_trials() {
        let exp = unset(random(), "/spec/sweep/limits");
        assert_invalid(
            &crd(),
            &exp,
            "spec.sweep.limits.maxTrials is required when spec.sweep.algorithm is Random",
        );
        let exp = unset(random(), "/spec/sweep/limits/maxTrials");
        // maxConcurrentTrials alone is fine for the limits rule.
        assert_invalid(&crd(), &exp, "spec.sweep.limits.maxTrials is required");
    }

    #[test]
    fn ranges_are_ordered() {
        let exp = set(random(), "/spec/sweep/searchSpace/wd/uniform/min", json!(0.2));
        assert_invalid(&crd(), &exp, "spec.sweep.searchSpace[].uniform.min must be < max");
        let exp = set(random(), "/spec/sweep/searchSpace/lr/logUniform/min", json!(1));
        assert_invalid(&crd(), &exp, "spec.sweep.searchSpace[].logUniform.min must be < max");
        let exp = set(
            valid(),
            "/spec/sweep/searchSpace/bs/randint",
            json!({"min": 64, "max": 64}),
        );
        assert_invalid(&crd(), &exp, "spec.sweep.searchSpace[].randint.min must be < max");
    }

    #[test]
    fn log_uniform_positive() {
        let exp = set(random(), "/spec/sweep/searchSpace/lr/logUniform/min", json!(0));
        assert_invalid(&crd(), &exp, "spec.sweep.searchSpace[].logUniform.min must be > 0");
        let exp = set(random(), "/spec/sweep/searchSpace/lr/logUniform/min", json!(-1.0));
        assert_invalid(&crd(), &exp, "spec.sweep.searchSpace[].logUniform.min must be > 0");
    }

    #[test]
    fn concurrency_within_trials() {
        let exp = set(valid(), "/spec/sweep/limits/maxConcurrentTrials", json!(21));
        assert_invalid(
            &crd(),
            &exp,
            "spec.sweep.limits.maxConcurrentTrials must be <= maxTrials",
        );
        assert_valid(
            &crd(),
            &set(valid(), "/spec/sweep/limits/maxConcurrentTrials", json!(20)),
        );
    }

    #[test]
    fn bandit_slack() {
        let bandit = set(valid(), "/spec/sweep/earlyTermination/policy", json!("Bandit"));
        assert_invalid(
            &crd(),
            &bandit,
            "policy Bandit requires exactly one of slackFactor or slackAmount",
        );
        let ok = set(bandit.clone(), "/spec/sweep/earlyTermination/slackFactor", json!(0.1));
        assert_valid(&crd(), &ok);
        let both = set(ok, "/spec/sweep/earlyTermination/slackAmount", json!(0.2));
        assert_invalid(
            &crd(),
            &both,
            "policy Bandit requires exactly one of slackFactor or slackAmount",
        );
        let median = set(valid(), "/spec/sweep/earlyTermination/slackAmount", json!(0.2));
        assert_invalid(
            &crd(),
            &median,
            "slackFactor and slackAmount are only allowed with policy Bandit",
        );
    }

    #[test]
    fn schema_shape() {
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let props = &spec["properties"];
        assert!(spec["required"].as_array().unwrap().contains(&json!("command")));
        assert_eq!(
            props["params"]["additionalProperties"]["x-kubernetes-preserve-unknown-fields"],
            json!(true)
        );
        let sweep = &props["sweep"];
        assert!(sweep["required"].as_array().unwrap().contains(&json!("objective")));
        let dist = &sweep["properties"]["searchSpace"]["additionalProperties"];
        assert_eq!(dist["maxProperties"], json!(1));
        assert_eq!(dist["minProperties"], json!(1));
        assert_eq!(props["limits"]["properties"]["maxRetries"]["minimum"], json!(0.0));
        assert_eq!(props["distribution"]["properties"]["type"]["default"], json!("None"));
        assert_eq!(
            props["limits"]["properties"]["timeout"]["pattern"],
            json!(crate::api::DURATION_PATTERN)
        );
    }
}
