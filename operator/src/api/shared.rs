//! Types shared by several kinds: references, resources, environments, data
//! inputs, durations, free-form parameter values, and `status.conditions`
//! handling (merge by `type`, `lastTransitionTime` moves only on a flip).
//!
//! Owns: value types and their OpenAPI schemas. Must not touch the API
//! server: everything here is pure.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The `Ready` condition type every kind carries.
pub const READY: &str = "Ready";

/// A DNS-1123 label: names of pools, deployments, steps, outputs, namespaces.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 subdomain: names of (cluster-scoped) objects such as
/// ComputeClusters, DataAssets and Secrets.
pub const DNS_SUBDOMAIN_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Durations as written in specs: `120s`, `1h`, `1h30m`, `1.5h`, `500ms`.
/// A subset of Go's `time.ParseDuration` syntax (no sign, no `us`/`ns`).
pub const DURATION_PATTERN: &str = "^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$";
/// A URI with a scheme (`s3://`, `gs://`, `az://`, `https://`, ...). Which
/// schemes are supported is decided by the controllers (a `Ready=False`
/// condition names an unsupported one); the schema only requires the shape.
pub const URI_PATTERN: &str = "^[a-z][a-z0-9+.-]*://[^\\s]+$";
/// Maximum length of a URI field.
pub const URI_MAX_LENGTH: u32 = 2048;

// ---------------------------------------------------------------------------
// Duration
// ---------------------------------------------------------------------------

/// A duration string (`120s`, `1h`). Kept as written so that objects round-trip
/// unchanged; [`Duration::to_std`] parses it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(transparent)]
pub struct Duration(pub String);

impl Duration {
    /// Wrap a duration string (not validated; the API server validates it).
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The duration as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parse with Go's `time.ParseDuration` semantics (what the API server's
    /// CEL `duration()` uses). Negative durations are an error.
    pub fn to_std(&self) -> Result<std::time::Duration, DurationError> {
        let parsed: kube::core::Duration = self
            .0
            .parse()
            .map_err(|e: kube::core::duration::ParseError| DurationError(self.0.clone(), e.to_string()))?;
        if parsed.is_negative() {
            return Err(DurationError(self.0.clone(), "negative duration".into()));
        }
        Ok(parsed.into())
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Duration {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// A duration string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}: {1}")]
pub struct DurationError(pub String, pub String);

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration such as 120s, 5m, 1h or 1h30m.",
            "type": "string",
            "maxLength": 32,
            "pattern": DURATION_PATTERN,
        })
    }
}

// ---------------------------------------------------------------------------
// Free-form parameter values
// ---------------------------------------------------------------------------

/// A parameter value: a number, string or boolean (`lr: 0.01`,
/// `optimizer: adam`, `epochs: 10`). Stored as JSON; the schema preserves it
/// as written (`x-kubernetes-preserve-unknown-fields`), so it is opaque to CEL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(transparent)]
pub struct ParamValue(pub serde_json::Value);

impl ParamValue {
    /// The value as substituted into `${{params.x}}`: strings verbatim,
    /// numbers and booleans as JSON writes them, anything else as JSON.
    pub fn render(&self) -> String {
        match &self.0 {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl From<serde_json::Value> for ParamValue {
    fn from(v: serde_json::Value) -> Self {
        Self(v)
    }
}

impl JsonSchema for ParamValue {
    fn schema_name() -> Cow<'static, str> {
        "ParamValue".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A scalar parameter value: number, string or boolean.",
            "x-kubernetes-preserve-unknown-fields": true,
        })
    }
}

/// Free-form parameters, name -> scalar value.
pub type Params = BTreeMap<String, ParamValue>;

// ---------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------

/// A reference to a Secret in the same namespace as the referring object
/// (for cluster-scoped Workspaces: the Workspace's namespace).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// A reference by name to an object in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    /// Name of the object.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

// ---------------------------------------------------------------------------
// Resources, pod metadata, environment
// ---------------------------------------------------------------------------

/// Resources requested by each pod of a run, step or model deployment.
/// Requests equal limits for memory and GPU; CPU is a request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequests {
    /// CPU, e.g. "8" or "500m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory, e.g. "32Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Number of GPUs (`nvidia.com/gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub gpu: Option<i32>,
    /// Size of the in-memory `/dev/shm` volume (PyTorch data loaders need it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<Quantity>,
}

/// Labels and annotations added to every pod the object creates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodMetadata {
    /// Extra pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The container environment: an image, or the name of a curated environment
/// from the chart's catalog. Exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.image) != has(self.name)").message("environment must set exactly one of image or name"))]
pub struct Environment {
    /// Container image, e.g. `pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Name of a curated environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: Option<String>,
}

// ---------------------------------------------------------------------------
// Data inputs and outputs
// ---------------------------------------------------------------------------

/// How an input reaches the pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum InputMode {
    /// Mounted read-only (default).
    #[default]
    Mount,
    /// Downloaded into the pod before the run starts.
    Download,
}

/// A data input: a DataAsset version (`{dataAsset, version}`) or a URI
/// (`{uri}`); exactly one of `dataAsset` and `uri`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.dataAsset) != has(self.uri)").message("inputs[]: exactly one of dataAsset or uri must be set"),
    validation = Rule::new("has(self.dataAsset) || !has(self.version)").message("inputs[].version is only allowed with dataAsset"),
)]
pub struct DataInput {
    /// Name of a DataAsset in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub data_asset: Option<String>,
    /// Version of the DataAsset; `latest` (the default) is resolved and pinned
    /// when a run starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub version: Option<String>,
    /// A URI read directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = URI_MAX_LENGTH), regex(pattern = URI_PATTERN))]
    pub uri: Option<String>,
    /// Mount (default) or Download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<InputMode>,
}

/// An output. Its location is derived (`<artifacts>/.../<output>`), so it has
/// no fields yet; written as `{}`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {}

// ---------------------------------------------------------------------------
// Conditions
// ---------------------------------------------------------------------------

/// Status of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    /// `True`.
    True,
    /// `False`.
    False,
    /// `Unknown`.
    Unknown,
}

impl ConditionStatus {
    /// The string written to `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }
}

impl fmt::Display for ConditionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The input of [`set_condition`]: everything but `lastTransitionTime`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCondition {
    /// Condition type, e.g. `Ready`.
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// CamelCase reason, e.g. `ComputeClusterNotFound`.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// The `metadata.generation` this condition was computed from.
    pub observed_generation: Option<i64>,
}

impl NewCondition {
    /// A condition with the given type, status, reason and message.
    pub fn new(
        type_: impl Into<String>,
        status: impl Into<ConditionStatus>,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
        }
    }

    /// Set `observedGeneration`.
    pub fn observed_generation(mut self, generation: Option<i64>) -> Self {
        self.observed_generation = generation;
        self
    }
}

/// Merge `new` into `conditions` by type. `lastTransitionTime` is set to `now`
/// only when the condition is added or its status flips; reason, message and
/// observedGeneration are updated in place. Returns whether anything changed,
/// so callers can skip a status write that would change nothing.
pub fn set_condition(conditions: &mut Vec<Condition>, new: NewCondition, now: &Time) -> bool {
    let status = new.status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let mut changed = false;
            if existing.status != status {
                existing.status = status.to_string();
                existing.last_transition_time = now.clone();
                changed = true;
            }
            if existing.reason != new.reason {
                existing.reason = new.reason;
                changed = true;
            }
            if existing.message != new.message {
                existing.message = new.message;
                changed = true;
            }
            if existing.observed_generation != new.observed_generation {
                existing.observed_generation = new.observed_generation;
                changed = true;
            }
            changed
        }
        None => {
            conditions.push(Condition {
                type_: new.type_,
                status: status.to_string(),
                reason: new.reason,
                message: new.message,
                observed_generation: new.observed_generation,
                last_transition_time: now.clone(),
            });
            true
        }
    }
}

/// Remove the condition of the given type. Returns whether it was present.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of the given type is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Whether `Ready` is `True`.
pub fn is_ready(conditions: &[Condition]) -> bool {
    is_condition_true(conditions, READY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn set_condition_adds_then_is_idempotent() {
        let mut conds = Vec::new();
        let c = NewCondition::new(READY, true, "Ready", "all good").observed_generation(Some(3));
        assert!(set_condition(&mut conds, c.clone(), &at(100)));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].status, "True");
        assert_eq!(conds[0].last_transition_time, at(100));
        assert_eq!(conds[0].observed_generation, Some(3));
        // Same input later: nothing changes, not even the time.
        assert!(!set_condition(&mut conds, c, &at(200)));
        assert_eq!(conds[0].last_transition_time, at(100));
        assert!(is_ready(&conds));
    }

    #[test]
    fn transition_time_moves_only_on_status_flip() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            NewCondition::new(READY, false, "Pending", "waiting"),
            &at(100),
        );
        // Reason/message change without flip: changed, time kept.
        assert!(set_condition(
            &mut conds,
            NewCondition::new(READY, false, "ComputeClusterNotFound", "compute gpu not found"),
            &at(150)
        ));
        assert_eq!(conds[0].last_transition_time, at(100));
        assert_eq!(conds[0].reason, "ComputeClusterNotFound");
        // observedGeneration change alone counts as a change.
        assert!(set_condition(
            &mut conds,
            NewCondition::new(READY, false, "ComputeClusterNotFound", "compute gpu not found")
                .observed_generation(Some(2)),
            &at(160)
        ));
        assert_eq!(conds[0].last_transition_time, at(100));
        // Flip: time moves.
        assert!(set_condition(
            &mut conds,
            NewCondition::new(READY, true, "Ready", ""),
            &at(200)
        ));
        assert_eq!(conds[0].last_transition_time, at(200));
        assert_eq!(conds[0].observed_generation, None);
        assert!(is_ready(&conds));
        // Unknown is a flip too.
        assert!(set_condition(
            &mut conds,
            NewCondition::new(READY, ConditionStatus::Unknown, "Reconciling", ""),
            &at(300)
        ));
        assert_eq!(conds[0].status, "Unknown");
        assert_eq!(conds[0].last_transition_time, at(300));
        assert!(!is_ready(&conds));
    }

    #[test]
    fn conditions_merge_by_type() {
        let mut conds = Vec::new();
        set_condition(&mut conds, NewCondition::new(READY, false, "Pending", ""), &at(1));
        set_condition(
            &mut conds,
            NewCondition::new("SourceReachable", true, "Listed", ""),
            &at(2),
        );
        set_condition(&mut conds, NewCondition::new(READY, true, "Ready", ""), &at(3));
        assert_eq!(conds.len(), 2);
        assert_eq!(conds[0].type_, READY);
        assert_eq!(conds[1].type_, "SourceReachable");
        assert!(is_condition_true(&conds, "SourceReachable"));
        assert!(find_condition(&conds, "Missing").is_none());
        assert!(remove_condition(&mut conds, "SourceReachable"));
        assert!(!remove_condition(&mut conds, "SourceReachable"));
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn is_ready_false_without_condition() {
        assert!(!is_ready(&[]));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            Duration::from("120s").to_std().unwrap(),
            std::time::Duration::from_secs(120)
        );
        assert_eq!(
            Duration::from("1h30m").to_std().unwrap(),
            std::time::Duration::from_secs(5400)
        );
        assert_eq!(
            Duration::from("1.5h").to_std().unwrap(),
            std::time::Duration::from_secs(5400)
        );
        assert_eq!(
            Duration::from("500ms").to_std().unwrap(),
            std::time::Duration::from_millis(500)
        );
        assert!(Duration::from("soon").to_std().is_err());
        assert!(Duration::from("-1s").to_std().is_err());
        // Round-trips as written.
        let d: Duration = serde_json::from_str("\"120s\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"120s\"");
    }

    #[test]
    fn param_values_render() {
        let p: Params = serde_json::from_str(r#"{"lr": 0.01, "epochs": 10, "opt": "adam", "amp": true}"#).unwrap();
        assert_eq!(p["lr"].render(), "0.01");
        assert_eq!(p["epochs"].render(), "10");
        assert_eq!(p["opt"].render(), "adam");
        assert_eq!(p["amp"].to_string(), "true");
    }
}
