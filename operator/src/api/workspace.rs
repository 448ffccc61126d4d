//! `Workspace` (cluster-scoped, short name `ws`): the tenant — one namespace,
//! its members, quota and artifact storage.
//!
//! Owns: the Workspace spec/status types and their admission rules. Must not
//! touch the API server.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{DNS_LABEL_PATTERN, SecretRef, URI_MAX_LENGTH, URI_PATTERN};

/// A tenant: one namespace plus who may do what in it, its quota and storage.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "mlplane.io",
    version = "v1alpha1",
    kind = "Workspace",
    plural = "workspaces",
    shortname = "ws",
    category = "mlplane",
    status = "WorkspaceStatus",
    doc = "A tenant: one namespace plus its members, quota and artifact storage.",
    printcolumn = r#"{"name":"Namespace","type":"string","jsonPath":".status.namespace"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new(
        "has(self.spec.__namespace__) || (size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))"
    ).message("metadata.name is the default for spec.namespace and must then be a DNS label (at most 63 of a-z, 0-9, '-'); set spec.namespace"),
    validation = Rule::new(
        "has(self.spec.__namespace__) || !(self.metadata.name in ['default', 'kube-system', 'kube-public', 'kube-node-lease'])"
    ).message("metadata.name is the default for spec.namespace and must not be a system namespace (default, kube-system, kube-public, kube-node-lease); set spec.namespace"),
    validation = Rule::new(
        "(has(self.spec.__namespace__) ? self.spec.__namespace__ : self.metadata.name) == (has(oldSelf.spec.__namespace__) ? oldSelf.spec.__namespace__ : oldSelf.metadata.name)"
    ).message("spec.namespace is immutable").field_path(".spec.namespace"),
)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// The namespace this workspace owns; defaults to `metadata.name`.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    #[x_kube(validation = Rule::new(
        "!(self in ['default', 'kube-system', 'kube-public', 'kube-node-lease'])"
    ).message("spec.namespace must not be a system namespace (default, kube-system, kube-public, kube-node-lease)"))]
    pub namespace: Option<String>,

    /// Who may do what in the namespace (RoleBindings to the chart's
    /// ClusterRoles).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub members: Vec<Member>,

    /// ResourceQuota of the namespace plus the admission limit on active runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<WorkspaceQuota>,

    /// Where runs, pipelines and models keep artifacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<WorkspaceStorage>,

    /// NetworkPolicy allowing only same-namespace and operator traffic.
    #[serde(default = "default_true")]
    pub network_isolation: bool,

    /// What happens to the namespace when the Workspace is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn default_true() -> bool {
    true
}

/// A member of a workspace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'ServiceAccount' || !has(self.__namespace__)")
    .message("spec.members[].namespace is only allowed for kind ServiceAccount"))]
pub struct Member {
    /// User, Group or ServiceAccount.
    pub kind: MemberKind,
    /// User name, group name or ServiceAccount name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of a ServiceAccount; defaults to the workspace namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub namespace: Option<String>,
    /// Owner, Contributor or Reader.
    pub role: MemberRole,
}

/// Kind of subject of a [`Member`].
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MemberKind {
    /// A user name as the API server authenticates it.
    #[default]
    User,
    /// A group.
    Group,
    /// A ServiceAccount.
    ServiceAccount,
}

/// Role of a [`Member`].
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MemberRole {
    /// Everything, including membership.
    Owner,
    /// Create and change experiments, pipelines, data assets and models.
    Contributor,
    /// Read only.
    #[default]
    Reader,
}

/// Workspace quota.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceQuota {
    /// Total CPU requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Total memory requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Total GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub gpu: Option<i64>,
    /// Runs (experiment runs and pipeline steps) active at once; more wait
    /// in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_active_runs: Option<i32>,
}

/// Workspace storage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceStorage {
    /// The artifact store.
    pub artifacts: ArtifactStorage,
}

/// The artifact store: an object-store URI (`{uri, secretRef}`) or a PVC
/// (`{pvc: {size, storageClassName}}`). Exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.uri) != has(self.pvc)")
        .message("spec.storage.artifacts must set exactly one of uri or pvc"),
    validation = Rule::new("has(self.uri) || !has(self.secretRef)")
        .message("spec.storage.artifacts.secretRef is only allowed with uri"),
)]
pub struct ArtifactStorage {
    /// Object-store URI, e.g. `s3://ml-artifacts/vision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = URI_MAX_LENGTH), regex(pattern = URI_PATTERN))]
    pub uri: Option<String>,
    /// Credentials for `uri`, a Secret in the workspace namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// A PVC created in the workspace namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcStorage>,
}

/// A PersistentVolumeClaim for artifacts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcStorage {
    /// Requested size, e.g. `100Gi`.
    pub size: Quantity,
    /// StorageClass; the cluster default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

/// What happens to the namespace when the Workspace is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeletionPolicy {
    /// Keep the namespace and its data.
    #[default]
    Retain,
    /// Delete the namespace.
    Delete,
}

/// Observed state of a Workspace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceStatus {
    /// One-word summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<WorkspacePhase>,
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The namespace in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Current usage against the quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<WorkspaceUsage>,
    /// Conditions, merged by type (`Ready`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Phase of a Workspace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WorkspacePhase {
    /// Not reconciled yet.
    #[default]
    Pending,
    /// Namespace and children in place.
    Active,
    /// Being deleted.
    Terminating,
    /// Cannot be reconciled (see conditions).
    Failed,
}

/// Usage of a workspace's quota.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceUsage {
    /// CPU requests in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory requests in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// GPUs in use.
    #[serde(default)]
    pub gpu: i64,
    /// Active runs.
    #[serde(default)]
    pub active_runs: i32,
}

impl Workspace {
    /// The namespace this workspace owns: `spec.namespace` or the name.
    pub fn target_namespace(&self) -> String {
        self.spec
            .namespace
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::test_support::{assert_invalid, assert_valid, assert_valid_update, set};
    use serde_json::json;

    fn valid() -> serde_json::Value {
        json!({
            "apiVersion": "mlplane.io/v1alpha1",
            "kind": "Workspace",
            "metadata": {"name": "vision"},
            "spec": {
                "namespace": "vision",
                "members": [
                    {"kind": "Group", "name": "vision-admins", "role": "Owner"},
                    {"kind": "User", "name": "alice@example.com", "role": "Contributor"},
                    {"kind": "ServiceAccount", "name": "ci", "namespace": "ci", "role": "Reader"}
                ],
                "quota": {"cpu": "64", "memory": "256Gi", "gpu": 8, "maxActiveRuns": 20},
                "storage": {"artifacts": {"uri": "s3://ml-artifacts/vision", "secretRef": {"name": "s3-creds"}}},
                "networkIsolation": true,
                "deletionPolicy": "Retain"
            }
        })
    }

    fn crd() -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
        <Workspace as kube::CustomResourceExt>::crd()
    }

    #[test]
    fn valid_workspace_passes() {
        assert_valid(&crd(), &valid());
        // Namespace defaults to the name.
        let mut ws = valid();
        ws["spec"].as_object_mut().unwrap().remove("namespace");
        assert_valid(&crd(), &ws);
        // pvc instead of uri.
        let ws = set(valid(), "/spec/storage/artifacts", json!({"pvc": {"size": "100Gi"}}));
        assert_valid(&crd(), &ws);
        // Typed spec deserializes.
        let typed: Workspace = serde_json::from_value(valid()).unwrap();
        assert_eq!(typed.target_namespace(), "vision");
        assert!(typed.spec.network_isolation);
    }

    #[test]
    fn name_must_be_dns_label_when_namespace_defaults() {
        let mut ws = valid();
        ws["spec"].as_object_mut().unwrap().remove("namespace");
        ws["metadata"]["name"] = json!("team.vision");
        assert_invalid(&crd(), &ws, "must then be a DNS label");
        // With an explicit namespace a dotted name is fine.
        let ws = set(valid(), "/metadata/name", json!("team.vision"));
        assert_valid(&crd(), &ws);
    }

    #[test]
    fn system_namespaces_are_refused() {
        let ws = set(valid(), "/spec/namespace", json!("kube-system"));
        assert_invalid(&crd(), &ws, "spec.namespace must not be a system namespace");
        let mut ws = set(valid(), "/metadata/name", json!("default"));
        ws["spec"].as_object_mut().unwrap().remove("namespace");
        assert_invalid(
            &crd(),
            &ws,
            "metadata.name is the default for spec.namespace and must not be a system namespace",
        );
    }

    #[test]
    fn namespace_is_immutable() {
        let old = valid();
        assert_valid_update(&crd(), &valid(), &old);
        let new = set(valid(), "/spec/namespace", json!("vision2"));
        let err = crate::api::test_support::validate(&crd(), &new, Some(&old)).unwrap_err();
        assert!(err.iter().any(|e| e.contains("spec.namespace is immutable")), "{err:?}");
        // Removing spec.namespace when it equals the name is not a change.
        let mut new = valid();
        new["spec"].as_object_mut().unwrap().remove("namespace");
        assert_valid_update(&crd(), &new, &old);
        // Removing it when it differs from the name is.
        let old = set(valid(), "/spec/namespace", json!("other"));
        let err = crate::api::test_support::validate(&crd(), &new, Some(&old)).unwrap_err();
        assert!(err.iter().any(|e| e.contains("spec.namespace is immutable")), "{err:?}");
    }

    #[test]
    fn member_namespace_only_for_service_accounts() {
        let ws = set(valid(), "/spec/members/0/namespace", json!("ci"));
        assert_invalid(
            &crd(),
            &ws,
            "spec.members[].namespace is only allowed for kind ServiceAccount",
        );
    }

    #[test]
    fn artifacts_exactly_one_of_uri_or_pvc() {
        let ws = set(valid(), "/spec/storage/artifacts/pvc", json!({"size": "10Gi"}));
        assert_invalid(&crd(), &ws, "spec.storage.artifacts must set exactly one of uri or pvc");
        let ws = set(valid(), "/spec/storage/artifacts", json!({}));
        assert_invalid(&crd(), &ws, "spec.storage.artifacts must set exactly one of uri or pvc");
        let ws = set(
            valid(),
            "/spec/storage/artifacts",
            json!({"pvc": {"size": "10Gi"}, "secretRef": {"name": "x"}}),
        );
        assert_invalid(&crd(), &ws, "spec.storage.artifacts.secretRef is only allowed with uri");
    }

    #[test]
    fn defaults_are_in_the_schema() {
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["networkIsolation"]["default"], json!(true));
        assert_eq!(spec["deletionPolicy"]["default"], json!("Retain"));
        assert_eq!(spec["namespace"]["maxLength"], json!(63));
        assert_eq!(spec["quota"]["properties"]["maxActiveRuns"]["minimum"], json!(1.0));
        assert_eq!(spec["quota"]["properties"]["gpu"]["minimum"], json!(0.0));
    }
}
