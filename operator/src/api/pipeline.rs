//! `Pipeline` (namespaced, short name `pl`): a DAG of steps; a step whose
//! inputs, code and parameters are unchanged reuses its earlier outputs.
//!
//! Owns: the Pipeline spec/status types and their admission rules. Must not
//! touch the API server. References between steps (`${{steps.x.outputs.y}}`)
//! are checked by the controller (a `Ready=False` condition), not here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::experiment::PinnedInput;
use super::experiment::RunPhase;
use super::shared::{
    DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, DataInput, Environment, OutputSpec, Params, PodMetadata, ResourceRequests,
};

/// What a step input may be: `${{inputs.<name>}}` (a pipeline input),
/// `${{steps.<step>.outputs.<output>}}` (another step's output, implying the
/// dependency) or a URI.
pub const STEP_INPUT_PATTERN: &str = "^(\\$\\{\\{inputs\\.[A-Za-z0-9_-]+\\}\\}|\\$\\{\\{steps\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?\\.outputs\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?\\}\\}|[a-z][a-z0-9+.-]*://[^\\s]+)$";

/// A DAG of steps with step reuse.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "mlplane.io",
    version = "v1alpha1",
    kind = "Pipeline",
    plural = "pipelines",
    shortname = "pl",
    category = "mlplane",
    namespaced,
    status = "PipelineStatus",
    doc = "A DAG of steps; unchanged steps reuse their earlier outputs.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Latest","type":"string","jsonPath":".status.runs[0].name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.environment) || self.steps.all(s, has(s.environment))")
    .message("spec.environment is required unless every step in spec.steps sets environment"))]
pub struct PipelineSpec {
    /// Default ComputeCluster of the steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub compute: Option<String>,
    /// Default environment of the steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
    /// Pipeline inputs, referenced by steps as `${{inputs.<name>}}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub inputs: BTreeMap<String, DataInput>,
    /// The steps; order does not matter, dependencies come from inputs.
    #[schemars(length(min = 1, max = 500))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub steps: Vec<Step>,
    /// Run settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<PipelineSettings>,
    /// Labels and annotations added to every step pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_metadata: Option<PodMetadata>,
}

/// One step: a container run as a Job.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// Step name (a DNS label), unique in the pipeline.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// Command; `${{inputs.x}}`, `${{outputs.x}}`, `${{params.x}}` are
    /// substituted.
    #[schemars(length(min = 1, max = 1024))]
    pub command: Vec<String>,
    /// Arguments appended to the command (substituted likewise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub args: Vec<String>,
    /// Overrides `spec.environment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
    /// Overrides `spec.compute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub compute: Option<String>,
    /// Resources of the step's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequests>,
    /// Step inputs by name: `${{inputs.raw}}`, `${{steps.prep.outputs.clean}}`
    /// or a URI.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = {"type": "string", "maxLength": 512, "pattern": STEP_INPUT_PATTERN}))]
    pub inputs: BTreeMap<String, String>,
    /// Step outputs by name, stored under `<artifacts>/cache/<cacheKey>/<output>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = Rule::new(
        "self.all(k, size(k) <= 63 && k.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))"
    ).message("spec.steps[].outputs keys must be DNS labels (at most 63 of a-z, 0-9, '-')"))]
    pub outputs: BTreeMap<String, OutputSpec>,
    /// Parameters, name -> scalar.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub params: Params,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub env: Vec<EnvVar>,
    /// Whether the step may be reused when nothing it depends on changed.
    #[serde(default = "default_true")]
    pub deterministic: bool,
    /// Labels and annotations of this step's pod, over `spec.podMetadata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_metadata: Option<PodMetadata>,
}

impl Default for Step {
    fn default() -> Self {
        Self {
            name: String::new(),
            command: Vec::new(),
            args: Vec::new(),
            environment: None,
            compute: None,
            resources: None,
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            params: Params::new(),
            env: Vec::new(),
            deterministic: true,
            pod_metadata: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Pipeline run settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PipelineSettings {
    /// Keep running independent steps after a step fails.
    #[serde(default)]
    pub continue_on_step_failure: bool,
    /// Run every step even if it could be reused.
    #[serde(default)]
    pub force_rerun: bool,
}

/// Observed state of a Pipeline.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    /// Phase of the latest run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Runs, newest first, bounded by the controller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<PipelineRunStatus>,
    /// The value of the annotation `mlplane.io/rerun` the latest run was
    /// started for (a change of it starts a new run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_rerun: Option<String>,
    /// Conditions, merged by type (`Ready`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// One run of a pipeline.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PipelineRunStatus {
    /// Run name.
    pub name: String,
    /// The `metadata.generation` the run was started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// Phase.
    pub phase: RunPhase,
    /// Pipeline inputs as pinned when the run started.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, PinnedInput>,
    /// Steps of this run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepStatus>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// One step of one pipeline run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    /// Step name.
    pub name: String,
    /// Phase.
    pub phase: RunPhase,
    /// Whether earlier outputs were reused instead of running.
    #[serde(default)]
    pub reused: bool,
    /// The step's cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// Name of the Job (absent when reused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// When the step started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the step finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// CamelCase reason of the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::test_support::{assert_invalid, assert_valid, set, unset};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn crd() -> CustomResourceDefinition {
        Pipeline::crd()
    }

    fn valid() -> serde_json::Value {
        json!({
            "apiVersion": "mlplane.io/v1alpha1",
            "kind": "Pipeline",
            "metadata": {"name": "sales", "namespace": "default"},
            "spec": {
                "compute": "cpu",
                "environment": {"image": "python:3.12"},
                "inputs": {"raw": {"dataAsset": "sales", "version": "latest"}},
                "steps": [
                    {
                        "name": "prep",
                        "command": ["python", "prep.py", "${{inputs.raw}}", "${{outputs.clean}}"],
                        "inputs": {"raw": "${{inputs.raw}}"},
                        "outputs": {"clean": {}}
                    },
                    {
                        "name": "train",
                        "inputs": {"data": "${{steps.prep.outputs.clean}}"},
                        "compute": "gpu",
                        "resources": {"gpu": 1},
                        "command": ["python", "train.py", "${{inputs.data}}", "${{outputs.model}}"],
                        "params": {"epochs": 3},
                        "outputs": {"model": {}},
                        "deterministic": true
                    }
                ],
                "settings": {"continueOnStepFailure": false, "forceRerun": false}
            }
        })
    }

    #[test]
    fn valid_pipeline_passes() {
        assert_valid(&crd(), &valid());
        let typed: Pipeline = serde_json::from_value(valid()).unwrap();
        assert!(typed.spec.steps[0].deterministic);
        assert_eq!(typed.spec.steps[1].inputs["data"], "${{steps.prep.outputs.clean}}");
    }

    #[test]
    fn environment_required_somewhere() {
        let pl = unset(valid(), "/spec/environment");
        assert_invalid(
            &crd(),
            &pl,
            "spec.environment is required unless every step in spec.steps sets environment",
        );
        let pl = set(pl, "/spec/steps/0/environment", json!({"image": "python:3.12"}));
        assert_invalid(&crd(), &pl, "spec.environment is required unless every step");
        let pl = set(pl, "/spec/steps/1/environment", json!({"name": "pytorch"}));
        assert_valid(&crd(), &pl);
    }

    #[test]
    fn step_environment_exactly_one() {
        let pl = set(valid(), "/spec/steps/0/environment", json!({"image": "a", "name": "b"}));
        assert_invalid(&crd(), &pl, "environment must set exactly one of image or name");
    }

    #[test]
    fn pipeline_inputs_exactly_one_source() {
        let pl = set(valid(), "/spec/inputs/raw/uri", json!("s3://x/"));
        assert_invalid(&crd(), &pl, "inputs[]: exactly one of dataAsset or uri must be set");
    }

    #[test]
    fn output_names_are_dns_labels() {
        let pl = set(valid(), "/spec/steps/0/outputs", json!({"Clean_Data": {}}));
        assert_invalid(&crd(), &pl, "spec.steps[].outputs keys must be DNS labels");
        let pl = set(valid(), "/spec/steps/0/outputs", json!({"clean-data": {}, "x": {}}));
        assert_valid(&crd(), &pl);
    }

    #[test]
    fn schema_shape() {
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["steps"]["maxItems"], json!(500));
        assert_eq!(spec["steps"]["x-kubernetes-list-type"], json!("map"));
        assert_eq!(spec["steps"]["x-kubernetes-list-map-keys"], json!(["name"]));
        let step = &spec["steps"]["items"]["properties"];
        assert_eq!(step["deterministic"]["default"], json!(true));
        assert_eq!(
            step["inputs"]["additionalProperties"]["pattern"],
            json!(STEP_INPUT_PATTERN)
        );
    }

    #[test]
    fn step_input_pattern() {
        let re = |s: &str| {
            // The pattern is an RE2 subset that Rust's regex engine also accepts.
            regex_lite_match(STEP_INPUT_PATTERN, s)
        };
        assert!(re("${{inputs.raw}}"));
        assert!(re("${{steps.prep.outputs.clean}}"));
        assert!(re("s3://bucket/path"));
        assert!(!re("${{steps.Prep.outputs.clean}}"));
        assert!(!re("${{steps.prep.outputs.Clean}}"));
        assert!(!re("steps.prep.outputs.clean"));
        assert!(!re("${{inputs.raw}} trailing"));
    }

    /// Evaluate a regex with CEL's `matches` (RE2 semantics, as the API server).
    fn regex_lite_match(pattern: &str, s: &str) -> bool {
        let schema = json!({"type": "object", "properties": {"s": {"type": "string"}},
            "x-kubernetes-validations": [{"rule": format!("self.s.matches('{}')", pattern.replace('\\', "\\\\"))}]});
        kube::core::cel::Validator::new()
            .validate(&schema, &json!({"s": s}), None)
            .is_ok()
    }
}
