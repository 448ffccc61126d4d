//! `ModelDeployment` (namespaced, short name `md`): an endpoint with named
//! deployments of a model and a traffic split (plus an optional mirror).
//!
//! Owns: the ModelDeployment spec/status types and their admission rules.
//! Must not touch the API server.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::shared::{
    DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, Duration, PodMetadata, ResourceRequests, URI_MAX_LENGTH, URI_PATTERN,
};

/// An endpoint serving one or more deployments of a model.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "mlplane.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "md",
    category = "mlplane",
    namespaced,
    status = "ModelDeploymentStatus",
    doc = "An endpoint with named deployments of a model and a traffic split between them.",
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new(
        "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    ).message("metadata.name names the endpoint Service and must be a DNS-1035 label (at most 63 of a-z, 0-9, '-', starting with a letter)"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.traffic) || self.traffic.all(k, self.deployments.exists(d, d.name == k))")
        .message("spec.traffic keys must be names of spec.deployments"),
    validation = Rule::new("!has(self.mirrorTraffic) || self.mirrorTraffic.all(k, self.deployments.exists(d, d.name == k))")
        .message("spec.mirrorTraffic keys must be names of spec.deployments"),
    validation = Rule::new("!has(self.mirrorTraffic) || self.mirrorTraffic.all(k, !has(self.traffic) || !(k in self.traffic) || self.traffic[k] == 0)")
        .message("spec.mirrorTraffic must target a deployment with no live traffic (spec.traffic absent or 0)"),
)]
pub struct ModelDeploymentSpec {
    /// The deployments (1 to 16), each an apps/v1 Deployment and Service.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(
        validation = Rule::new("self.all(a, self.exists_one(b, b.name == a.name))")
            .message("spec.deployments[].name must be unique"),
        merge_strategy = ListMerge::Map(vec!["name".into()])
    )]
    pub deployments: Vec<ServingDeployment>,
    /// Percent of live traffic per deployment; values sum to 0 or 100.
    /// Omitted: a single deployment gets all traffic.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "traffic_schema")]
    #[x_kube(validation = Rule::new("self.map(k, self[k]).sum() in [0, 100]")
        .message("spec.traffic values must sum to 0 or 100"))]
    pub traffic: BTreeMap<String, i32>,
    /// Percent of live traffic copied to one deployment (responses dropped).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "mirror_traffic_schema")]
    pub mirror_traffic: BTreeMap<String, i32>,
}

fn traffic_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Percent of live traffic per deployment (0-100); keys are deployment names; values sum to 0 or 100.",
        "type": "object",
        "maxProperties": 16,
        "additionalProperties": {"type": "integer", "format": "int32", "minimum": 0, "maximum": 100},
    })
}

fn mirror_traffic_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Percent (1-50) of live traffic mirrored to one deployment that has no live traffic.",
        "type": "object",
        "maxProperties": 1,
        "additionalProperties": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 50},
    })
}

/// One deployment of a model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.runtime) || has(self.model.format)")
    .message("spec.deployments[]: runtime.image is required when model.format is not set"))]
pub struct ServingDeployment {
    /// Deployment name (a DNS label), unique in the ModelDeployment.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// The model served.
    pub model: ModelSource,
    /// Serving runtime; defaults from the chart's runtime catalog by model
    /// format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<ServingRuntime>,
    /// Fixed or autoscaled replicas; one replica when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
    /// Resources of each replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequests>,
    /// ComputeCluster to run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub compute: Option<String>,
    /// Request handling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_settings: Option<RequestSettings>,
    /// HTTP probes of the serving container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<Probes>,
    /// Labels and annotations added to this deployment's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_metadata: Option<PodMetadata>,
}

/// Where a model comes from: a URI (`{uri, format}`) or an Experiment run's
/// output (`{experiment, run, output}`). Exactly one of `uri`, `experiment`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.uri) != has(self.experiment)")
        .message("spec.deployments[].model must set exactly one of uri or experiment"),
    validation = Rule::new("has(self.experiment) || (!has(self.run) && !has(self.output))")
        .message("spec.deployments[].model.run and output are only allowed with experiment"),
)]
pub struct ModelSource {
    /// Model URI, e.g. `s3://models/resnet/3/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = URI_MAX_LENGTH), regex(pattern = URI_PATTERN))]
    pub uri: Option<String>,
    /// Model format (`ONNX`, `MLflow`, `TorchScript`, ...), which picks the
    /// default runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub format: Option<String>,
    /// Experiment in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub experiment: Option<String>,
    /// Run name, `best` (default) or `latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub run: Option<String>,
    /// Output of that run; `model` when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub output: Option<String>,
}

/// A serving runtime.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServingRuntime {
    /// Container image.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
}

/// Replicas: fixed (`instanceCount`) or autoscaled (`minInstances`,
/// `maxInstances`, `targetUtilization`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.instanceCount) != (has(self.minInstances) || has(self.maxInstances))")
        .message("spec.deployments[].scale must set exactly one of instanceCount or minInstances/maxInstances"),
    validation = Rule::new("!has(self.minInstances) || has(self.maxInstances)")
        .message("spec.deployments[].scale.minInstances requires maxInstances"),
    validation = Rule::new("!has(self.minInstances) || !has(self.maxInstances) || self.minInstances <= self.maxInstances")
        .message("spec.deployments[].scale.minInstances must be <= maxInstances"),
    validation = Rule::new("!has(self.targetUtilization) || has(self.maxInstances)")
        .message("spec.deployments[].scale.targetUtilization requires maxInstances"),
)]
pub struct Scale {
    /// Fixed number of replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub instance_count: Option<i32>,
    /// Autoscaling lower bound (default 1). At least 1: a
    /// HorizontalPodAutoscaler cannot scale to zero (alpha feature gate
    /// HPAScaleToZero); `instanceCount: 0` stops a deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_instances: Option<i32>,
    /// Autoscaling upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_instances: Option<i32>,
    /// Target CPU utilization percent (default 70).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_utilization: Option<i32>,
}

/// Request handling.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestSettings {
    /// Request timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Concurrent requests per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrent_requests_per_instance: Option<i32>,
}

/// Probes of the serving container.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Probes {
    /// Readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<HttpProbe>,
    /// Liveness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<HttpProbe>,
}

/// An HTTP GET probe.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpProbe {
    /// Path, e.g. `/v2/health/ready`.
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^/"))]
    pub path: String,
    /// Container port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// Observed state of a ModelDeployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// One-word summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ModelDeploymentPhase>,
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// In-cluster URL, `http://<name>.<namespace>.svc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Per-deployment state, in the order of `spec.deployments`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<DeploymentStatus>,
    /// Conditions, merged by type (`Ready`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Phase of a ModelDeployment.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ModelDeploymentPhase {
    /// Not reconciled yet, or waiting for what the spec names.
    #[default]
    Pending,
    /// Rolling out: some deployment is not Available yet, or the effective
    /// traffic split is not yet the desired one.
    Updating,
    /// Every deployment Available and serving the desired split.
    Ready,
    /// Serving, but some replicas are not ready or a rollout stalled.
    Degraded,
    /// Cannot be reconciled as specified (see conditions).
    Failed,
}

impl ModelDeploymentPhase {
    /// Every phase, for metrics.
    pub const ALL: [Self; 5] = [Self::Pending, Self::Updating, Self::Ready, Self::Degraded, Self::Failed];

    /// The name written to `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Updating => "Updating",
            Self::Ready => "Ready",
            Self::Degraded => "Degraded",
            Self::Failed => "Failed",
        }
    }
}

/// Observed state of one deployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// Deployment name.
    pub name: String,
    /// Replicas (as the Deployment, or its autoscaler, asks for).
    #[serde(default)]
    pub replicas: i32,
    /// Ready replicas.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Percent of live traffic the spec asks for.
    #[serde(default)]
    pub traffic: i32,
    /// Percent of live traffic actually routed to it: the desired split once
    /// every deployment it names is Available, until then the previous one.
    #[serde(default)]
    pub effective_traffic: i32,
    /// Percent of live traffic actually mirrored to it (omitted when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mirror_traffic: i32,
    /// The model served, as resolved and pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PinnedModel>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// A model as resolved for a deployment. A model taken from an Experiment is
/// resolved once and kept: a later best run does not change a serving
/// deployment until its `model` (or the annotation `mlplane.io/resolve`)
/// changes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PinnedModel {
    /// The location fetched into the serving pods.
    pub uri: String,
    /// The Experiment it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// The run (its name) it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// The run output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Hash of the `model` spec (and `mlplane.io/resolve` annotation) it was
    /// resolved from: when that changes, the model is resolved again.
    pub source_hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::test_support::{assert_invalid, assert_valid, set, unset};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn crd() -> CustomResourceDefinition {
        ModelDeployment::crd()
    }

    fn valid() -> serde_json::Value {
        json!({
            "apiVersion": "mlplane.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "resnet", "namespace": "default"},
            "spec": {
                "deployments": [
                    {
                        "name": "blue",
                        "model": {"uri": "s3://models/resnet/3/", "format": "ONNX"},
                        "runtime": {"image": "nvcr.io/nvidia/tritonserver:24.08-py3"},
                        "scale": {"minInstances": 1, "maxInstances": 4, "targetUtilization": 70},
                        "resources": {"cpu": "2", "memory": "4Gi", "gpu": 0},
                        "compute": "gpu",
                        "requestSettings": {"timeout": "5s", "maxConcurrentRequestsPerInstance": 1},
                        "probes": {"readiness": {"path": "/v2/health/ready", "port": 8080}}
                    },
                    {"name": "green", "model": {"uri": "s3://models/resnet/4/", "format": "ONNX"}},
                    {"name": "canary", "model": {"experiment": "resnet", "run": "best", "output": "model"}, "runtime": {"image": "ghcr.io/acme/serve:1"}, "scale": {"instanceCount": 1}}
                ],
                "traffic": {"blue": 100, "green": 0},
                "mirrorTraffic": {"green": 10}
            }
        })
    }

    #[test]
    fn valid_endpoint_passes() {
        assert_valid(&crd(), &valid());
        let split = set(valid(), "/spec/traffic", json!({"blue": 90, "green": 10, "canary": 0}));
        assert_valid(&crd(), &set(split, "/spec/mirrorTraffic", json!({"canary": 5})));
        assert_valid(&crd(), &set(valid(), "/spec/traffic", json!({"blue": 0})));
        assert_valid(&crd(), &unset(unset(valid(), "/spec/traffic"), "/spec/mirrorTraffic"));
        // Mirror to a deployment absent from traffic.
        assert_valid(&crd(), &set(valid(), "/spec/mirrorTraffic", json!({"canary": 50})));
        let typed: ModelDeployment = serde_json::from_value(valid()).unwrap();
        assert_eq!(typed.spec.traffic["blue"], 100);
        assert_eq!(
            typed.spec.deployments[2].scale.as_ref().unwrap().instance_count,
            Some(1)
        );
    }

    #[test]
    fn name_is_a_service_name() {
        for bad in ["1resnet", "team.resnet", &"a".repeat(64)] {
            let md = set(valid(), "/metadata/name", json!(bad));
            assert_invalid(
                &crd(),
                &md,
                "metadata.name names the endpoint Service and must be a DNS-1035 label",
            );
        }
        assert_valid(&crd(), &set(valid(), "/metadata/name", json!("resnet-50")));
    }

    #[test]
    fn deployment_names_unique() {
        let md = set(valid(), "/spec/deployments/2/name", json!("blue"));
        assert_invalid(&crd(), &md, "spec.deployments[].name must be unique");
    }

    #[test]
    fn traffic_keys_are_deployments() {
        let md = set(valid(), "/spec/traffic", json!({"blue": 90, "purple": 10}));
        assert_invalid(&crd(), &md, "spec.traffic keys must be names of spec.deployments");
    }

    #[test]
    fn traffic_sums_to_0_or_100() {
        let md = set(
            unset(valid(), "/spec/mirrorTraffic"),
            "/spec/traffic",
            json!({"blue": 90, "green": 20}),
        );
        assert_invalid(&crd(), &md, "spec.traffic values must sum to 0 or 100");
        let md = set(valid(), "/spec/traffic", json!({"blue": 50}));
        assert_invalid(&crd(), &md, "spec.traffic values must sum to 0 or 100");
    }

    #[test]
    fn mirror_targets_existing_deployment() {
        let md = set(valid(), "/spec/mirrorTraffic", json!({"purple": 10}));
        assert_invalid(&crd(), &md, "spec.mirrorTraffic keys must be names of spec.deployments");
    }

    #[test]
    fn mirror_target_has_no_live_traffic() {
        let md = set(valid(), "/spec/mirrorTraffic", json!({"blue": 10}));
        assert_invalid(
            &crd(),
            &md,
            "spec.mirrorTraffic must target a deployment with no live traffic",
        );
    }

    #[test]
    fn model_exactly_one_source() {
        let md = set(valid(), "/spec/deployments/1/model/experiment", json!("resnet"));
        assert_invalid(
            &crd(),
            &md,
            "spec.deployments[].model must set exactly one of uri or experiment",
        );
        let md = set(valid(), "/spec/deployments/1/model", json!({"format": "ONNX"}));
        assert_invalid(
            &crd(),
            &md,
            "spec.deployments[].model must set exactly one of uri or experiment",
        );
        let md = set(valid(), "/spec/deployments/1/model/run", json!("best"));
        assert_invalid(
            &crd(),
            &md,
            "spec.deployments[].model.run and output are only allowed with experiment",
        );
    }

    #[test]
    fn runtime_or_format() {
        let md = unset(valid(), "/spec/deployments/1/model/format");
        assert_invalid(
            &crd(),
            &md,
            "spec.deployments[]: runtime.image is required when model.format is not set",
        );
        let md = unset(valid(), "/spec/deployments/2/runtime");
        assert_invalid(&crd(), &md, "runtime.image is required when model.format is not set");
    }

    #[test]
    fn scale_exactly_one_mode() {
        let md = set(valid(), "/spec/deployments/0/scale/instanceCount", json!(2));
        assert_invalid(
            &crd(),
            &md,
            "spec.deployments[].scale must set exactly one of instanceCount or minInstances/maxInstances",
        );
        let md = set(valid(), "/spec/deployments/0/scale", json!({}));
        assert_invalid(
            &crd(),
            &md,
            "spec.deployments[].scale must set exactly one of instanceCount",
        );
    }

    #[test]
    fn scale_bounds() {
        let md = unset(valid(), "/spec/deployments/0/scale/maxInstances");
        let errs = crate::api::test_support::validate(&crd(), &md, None).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains("spec.deployments[].scale.minInstances requires maxInstances")),
            "{errs:?}"
        );
        let md = set(valid(), "/spec/deployments/0/scale/minInstances", json!(5));
        assert_invalid(
            &crd(),
            &md,
            "spec.deployments[].scale.minInstances must be <= maxInstances",
        );
        let md = set(valid(), "/spec/deployments/2/scale/targetUtilization", json!(50));
        assert_invalid(
            &crd(),
            &md,
            "spec.deployments[].scale.targetUtilization requires maxInstances",
        );
    }

    #[test]
    fn schema_shape() {
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["deployments"]["maxItems"], json!(16));
        assert_eq!(spec["traffic"]["additionalProperties"]["maximum"], json!(100.0));
        assert_eq!(spec["mirrorTraffic"]["maxProperties"], json!(1));
        assert_eq!(spec["mirrorTraffic"]["additionalProperties"]["maximum"], json!(50.0));
        let scale = &spec["deployments"]["items"]["properties"]["scale"]["properties"];
        assert_eq!(scale["targetUtilization"]["maximum"], json!(100.0));
        assert_eq!(scale["minInstances"]["minimum"], json!(1.0));
    }
}
