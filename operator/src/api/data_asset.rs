//! `DataAsset` (namespaced, short name `da`): a versioned, immutable reference
//! to data; new data at the source becomes a new version.
//!
//! Owns: the DataAsset spec/status types and their admission rules. Must not
//! touch the API server.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{Duration, SecretRef, URI_MAX_LENGTH, URI_PATTERN};

/// The `SourceReachable` condition type of a DataAsset.
pub const SOURCE_REACHABLE: &str = "SourceReachable";
/// Annotation whose every change asks for a refresh
/// (`kubectl annotate da x mlplane.io/refresh=$(date +%s) --overwrite`).
pub const REFRESH_ANNOTATION: &str = "mlplane.io/refresh";

/// A versioned reference to data at a URI.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mlplane.io",
    version = "v1alpha1",
    kind = "DataAsset",
    plural = "dataassets",
    shortname = "da",
    category = "mlplane",
    namespaced,
    status = "DataAssetStatus",
    doc = "A versioned, immutable reference to data; new data at the source becomes a new version.",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Latest","type":"string","jsonPath":".status.latestVersion"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type != 'UriFile' || !self.source.uri.endsWith('/')")
    .message("spec.source.uri must not end with '/' when spec.type is UriFile"))]
pub struct DataAssetSpec {
    /// UriFile (one object) or UriFolder (a prefix).
    #[serde(rename = "type")]
    pub type_: DataAssetType,
    /// Where the data is.
    pub source: DataSource,
    /// Periodic refresh; without it only a spec change or the annotation
    /// `mlplane.io/refresh` looks for new data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<Refresh>,
    /// Versions kept in status (older ones are forgotten, not deleted).
    #[serde(default = "default_retain_versions")]
    #[schemars(range(min = 1, max = 1000))]
    pub retain_versions: i32,
}

impl Default for DataAssetSpec {
    fn default() -> Self {
        Self {
            type_: DataAssetType::default(),
            source: DataSource::default(),
            refresh: None,
            retain_versions: default_retain_versions(),
        }
    }
}

fn default_retain_versions() -> i32 {
    20
}

/// Shape of a data asset.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DataAssetType {
    /// One object.
    UriFile,
    /// Every object under a prefix.
    #[default]
    UriFolder,
}

/// Where a data asset's data is.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DataSource {
    /// `s3://`, `gs://`, `az://` (Azure Blob) or `http(s)://` URI.
    #[schemars(length(min = 1, max = URI_MAX_LENGTH), regex(pattern = URI_PATTERN))]
    pub uri: String,
    /// Credentials, a Secret in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// Periodic refresh.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
// Guarded by the pattern so a malformed interval reports only the pattern
// error, not also a CEL conversion error.
#[x_kube(validation = Rule::new(
    "!self.interval.matches('^([0-9]+([.][0-9]+)?(ms|s|m|h))+$') || duration(self.interval) >= duration('1m')"
)
    .message("spec.refresh.interval must be at least 1m"))]
pub struct Refresh {
    /// How often to list the source.
    pub interval: Duration,
}

/// Observed state of a DataAsset.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataAssetStatus {
    /// One-word summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DataAssetPhase>,
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The newest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<String>,
    /// Known versions, newest first, at most `retainVersions`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<DataVersion>,
    /// When the source was last listed successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
    /// The value of the annotation `mlplane.io/refresh` last acted on (a
    /// change of it requests a refresh, like Flux's `lastHandledReconcileAt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_refresh: Option<String>,
    /// Conditions, merged by type (`Ready`, `SourceReachable`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Phase of a DataAsset.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DataAssetPhase {
    /// No version yet.
    #[default]
    Pending,
    /// At least one version, source reachable.
    Ready,
    /// Listing the source (not written by this version: a listing is
    /// reported once it is done).
    Refreshing,
    /// The source cannot be read (see conditions).
    Failed,
}

/// One version of a data asset.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataVersion {
    /// Version ("1", "2", ...).
    pub version: String,
    /// `sha256:` of the sorted manifest (key, size, etag).
    pub digest: String,
    /// Number of files.
    #[serde(default)]
    pub files: i64,
    /// Total bytes.
    #[serde(default)]
    pub bytes: i64,
    /// When this version was first seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::test_support::{assert_invalid, assert_valid, set, unset};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn crd() -> CustomResourceDefinition {
        DataAsset::crd()
    }

    fn valid() -> serde_json::Value {
        json!({
            "apiVersion": "mlplane.io/v1alpha1",
            "kind": "DataAsset",
            "metadata": {"name": "imagenet-mini", "namespace": "default"},
            "spec": {
                "type": "UriFolder",
                "source": {"uri": "s3://datasets/imagenet-mini/", "secretRef": {"name": "s3-creds"}},
                "refresh": {"interval": "1h"},
                "retainVersions": 20
            }
        })
    }

    #[test]
    fn valid_asset_passes() {
        assert_valid(&crd(), &valid());
        assert_valid(&crd(), &unset(valid(), "/spec/refresh"));
        assert_valid(&crd(), &set(valid(), "/spec/refresh/interval", json!("1m")));
        assert_valid(&crd(), &set(valid(), "/spec/refresh/interval", json!("1h30m")));
        let file = set(valid(), "/spec/type", json!("UriFile"));
        assert_valid(
            &crd(),
            &set(file, "/spec/source/uri", json!("https://example.com/data.csv")),
        );
        let typed: DataAsset = serde_json::from_value(unset(valid(), "/spec/retainVersions")).unwrap();
        assert_eq!(typed.spec.retain_versions, 20);
    }

    #[test]
    fn refresh_interval_minimum() {
        let da = set(valid(), "/spec/refresh/interval", json!("30s"));
        assert_invalid(&crd(), &da, "spec.refresh.interval must be at least 1m");
        let da = set(valid(), "/spec/refresh/interval", json!("500ms"));
        assert_invalid(&crd(), &da, "spec.refresh.interval must be at least 1m");
        // A malformed interval is left to the schema pattern.
        assert_valid(&crd(), &set(valid(), "/spec/refresh/interval", json!("hourly")));
    }

    #[test]
    fn uri_file_is_not_a_folder() {
        let da = set(valid(), "/spec/type", json!("UriFile"));
        assert_invalid(
            &crd(),
            &da,
            "spec.source.uri must not end with '/' when spec.type is UriFile",
        );
    }

    #[test]
    fn schema_shape() {
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["retainVersions"]["default"], json!(20));
        assert_eq!(spec["retainVersions"]["minimum"], json!(1.0));
        assert_eq!(spec["type"]["enum"], json!(["UriFile", "UriFolder"]));
        assert_eq!(spec["source"]["properties"]["uri"]["maxLength"], json!(2048));
    }
}
