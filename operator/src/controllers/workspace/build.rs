//! Pure builders of a Workspace's children: the namespace, RoleBindings for
//! members to the chart's ClusterRoles, ResourceQuota, LimitRange, the
//! `mlplane-run` ServiceAccount and its token Secret `mlplane-run-token`
//! (run pods' bearer token for the tracking API), NetworkPolicy and artifacts
//! PVC. No I/O.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LimitRange, LimitRangeItem, LimitRangeSpec, Namespace, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    ResourceQuota, ResourceQuotaSpec, Secret, ServiceAccount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicySpec};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::{Resource, ResourceExt};

use crate::api::{MemberKind, MemberRole, Workspace};

/// Label naming the Workspace a child belongs to.
pub const WORKSPACE_LABEL: &str = "mlplane.io/workspace";
/// Standard managed-by label and its value.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "mlplane";
/// ServiceAccount that run pods use.
pub const RUN_SERVICE_ACCOUNT: &str = "mlplane-run";
/// Secret holding a long-lived token of [`RUN_SERVICE_ACCOUNT`] (filled by
/// Kubernetes' token controller), key `token`: run pods' `MLFLOW_TRACKING_TOKEN`.
pub const RUN_TOKEN_SECRET: &str = "mlplane-run-token";
/// Annotation naming the ServiceAccount of a service-account-token Secret.
pub const SERVICE_ACCOUNT_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
/// Name of the artifacts PVC.
pub const ARTIFACTS_PVC: &str = "mlplane-artifacts";
/// Names of the ResourceQuota, LimitRange and NetworkPolicy.
pub const QUOTA_NAME: &str = "mlplane-quota";
pub const LIMIT_RANGE_NAME: &str = "mlplane-defaults";
pub const NETWORK_POLICY_NAME: &str = "mlplane-isolation";
/// Default CPU request of containers without one (the LimitRange).
pub const DEFAULT_CPU_REQUEST: &str = "250m";
/// Default memory request of containers without one (the LimitRange).
pub const DEFAULT_MEMORY_REQUEST: &str = "512Mi";
/// Annotation on a namespace that existed before its Workspace: the Delete
/// policy then never deletes it.
pub const ADOPTED_ANNOTATION: &str = "mlplane.io/adopted";

/// ClusterRole (shipped by the chart) that a member role binds to.
pub fn cluster_role(role: MemberRole) -> &'static str {
    match role {
        MemberRole::Owner => "mlplane-workspace-owner",
        MemberRole::Contributor => "mlplane-workspace-contributor",
        MemberRole::Reader => "mlplane-workspace-reader",
    }
}

/// Name of the RoleBinding of a member role.
pub fn role_binding_name(role: MemberRole) -> &'static str {
    match role {
        MemberRole::Owner => "mlplane-owner",
        MemberRole::Contributor => "mlplane-contributor",
        MemberRole::Reader => "mlplane-reader",
    }
}

/// Everything a Workspace should have, built from its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    pub namespace: Namespace,
    pub role_bindings: Vec<RoleBinding>,
    pub quota: Option<ResourceQuota>,
    pub limit_range: LimitRange,
    pub service_account: ServiceAccount,
    pub run_token: Secret,
    pub network_policy: Option<NetworkPolicy>,
    pub pvc: Option<PersistentVolumeClaim>,
}

/// Labels on every child.
pub fn labels(ws: &Workspace) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (WORKSPACE_LABEL.to_string(), ws.name_any()),
    ])
}

fn meta(ws: &Workspace, name: &str, owned: bool) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(ws.target_namespace()),
        labels: Some(labels(ws)),
        owner_references: owned.then(|| ws.controller_owner_ref(&()).into_iter().collect()),
        ..Default::default()
    }
}

/// Builds every child. `operator_namespace` is admitted by the NetworkPolicy.
pub fn build(ws: &Workspace, operator_namespace: &str) -> Children {
    let ns = ws.target_namespace();
    let mut ns_labels = labels(ws);
    // Run images are arbitrary training images: baseline is enforced,
    // restricted is reported so users see what would not pass.
    ns_labels.insert("pod-security.kubernetes.io/enforce".into(), "baseline".into());
    ns_labels.insert("pod-security.kubernetes.io/warn".into(), "restricted".into());
    // The namespace and the PVC are not owned: deleting the Workspace must not
    // garbage-collect them (deletionPolicy Retain keeps namespace and data).
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(ns.clone()),
            labels: Some(ns_labels),
            ..Default::default()
        },
        ..Default::default()
    };

    let role_bindings = [MemberRole::Owner, MemberRole::Contributor, MemberRole::Reader]
        .into_iter()
        .filter_map(|role| {
            let subjects: Vec<Subject> = ws
                .spec
                .members
                .iter()
                .filter(|m| m.role == role)
                .map(|m| match m.kind {
                    MemberKind::User | MemberKind::Group => Subject {
                        kind: format!("{:?}", m.kind),
                        api_group: Some("rbac.authorization.k8s.io".into()),
                        name: m.name.clone(),
                        namespace: None,
                    },
                    MemberKind::ServiceAccount => Subject {
                        kind: "ServiceAccount".into(),
                        api_group: None,
                        name: m.name.clone(),
                        namespace: Some(m.namespace.clone().unwrap_or_else(|| ns.clone())),
                    },
                })
                .collect();
            (!subjects.is_empty()).then(|| RoleBinding {
                metadata: meta(ws, role_binding_name(role), true),
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name: cluster_role(role).into(),
                },
                subjects: Some(subjects),
            })
        })
        .collect();

    let quota = ws.spec.quota.as_ref().and_then(|q| {
        let mut hard = BTreeMap::new();
        if let Some(cpu) = &q.cpu {
            hard.insert("requests.cpu".to_string(), cpu.clone());
        }
        if let Some(mem) = &q.memory {
            hard.insert("requests.memory".to_string(), mem.clone());
        }
        if let Some(gpu) = q.gpu {
            hard.insert("requests.nvidia.com/gpu".to_string(), Quantity(gpu.to_string()));
        }
        (!hard.is_empty()).then(|| ResourceQuota {
            metadata: meta(ws, QUOTA_NAME, true),
            spec: Some(ResourceQuotaSpec {
                hard: Some(hard),
                ..Default::default()
            }),
            ..Default::default()
        })
    });

    // Pods without requests get these, so the quota can account for them.
    let limit_range = LimitRange {
        metadata: meta(ws, LIMIT_RANGE_NAME, true),
        spec: Some(LimitRangeSpec {
            limits: vec![LimitRangeItem {
                type_: "Container".into(),
                default_request: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity(DEFAULT_CPU_REQUEST.into())),
                    ("memory".to_string(), Quantity(DEFAULT_MEMORY_REQUEST.into())),
                ])),
                ..Default::default()
            }],
        }),
    };

    let service_account = ServiceAccount {
        metadata: meta(ws, RUN_SERVICE_ACCOUNT, true),
        ..Default::default()
    };

    let network_policy = ws.spec.network_isolation.then(|| NetworkPolicy {
        metadata: meta(ws, NETWORK_POLICY_NAME, true),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![
                    NetworkPolicyPeer {
                        pod_selector: Some(LabelSelector::default()),
                        ..Default::default()
                    },
                    NetworkPolicyPeer {
                        namespace_selector: Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([(
                                "kubernetes.io/metadata.name".to_string(),
                                operator_namespace.to_string(),
                            )])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    });

    let pvc = ws
        .spec
        .storage
        .as_ref()
        .and_then(|s| s.artifacts.pvc.as_ref())
        .map(|p| PersistentVolumeClaim {
            metadata: meta(ws, ARTIFACTS_PVC, false),
            spec: Some(PersistentVolumeClaimSpec {
                // Runs on different nodes read and write the same artifacts.
                access_modes: Some(vec!["ReadWriteMany".into()]),
                storage_class_name: p.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".to_string(), p.size.clone())])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });

    // Kubernetes' token controller fills `data.token` (and deletes the Secret
    // if the ServiceAccount goes away).
    let mut token_meta = meta(ws, RUN_TOKEN_SECRET, true);
    token_meta.annotations = Some(BTreeMap::from([(
        SERVICE_ACCOUNT_NAME_ANNOTATION.to_string(),
        RUN_SERVICE_ACCOUNT.to_string(),
    )]));
    let run_token = Secret {
        metadata: token_meta,
        type_: Some("kubernetes.io/service-account-token".into()),
        ..Default::default()
    };

    Children {
        namespace,
        role_bindings,
        quota,
        limit_range,
        service_account,
        run_token,
        network_policy,
        pvc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ArtifactStorage, Member, PvcStorage, WorkspaceQuota, WorkspaceSpec, WorkspaceStorage};

    fn ws(spec: WorkspaceSpec) -> Workspace {
        let mut w = Workspace::new("vision", spec);
        w.metadata.uid = Some("uid-1".into());
        w
    }

    fn member(kind: MemberKind, name: &str, role: MemberRole) -> Member {
        Member {
            kind,
            name: name.into(),
            namespace: None,
            role,
        }
    }

    #[test]
    fn minimal_workspace_gets_namespace_account_limits_and_isolation() {
        let c = build(
            &ws(WorkspaceSpec {
                network_isolation: true,
                ..Default::default()
            }),
            "mlplane-system",
        );
        assert_eq!(c.namespace.metadata.name.as_deref(), Some("vision"));
        assert!(
            c.namespace.metadata.owner_references.is_none(),
            "namespace must survive GC"
        );
        assert_eq!(c.namespace.metadata.labels.as_ref().unwrap()[WORKSPACE_LABEL], "vision");
        assert!(c.role_bindings.is_empty());
        assert!(c.quota.is_none());
        assert!(c.pvc.is_none());
        assert_eq!(c.service_account.metadata.name.as_deref(), Some(RUN_SERVICE_ACCOUNT));
        assert_eq!(c.run_token.metadata.name.as_deref(), Some(RUN_TOKEN_SECRET));
        assert_eq!(
            c.run_token.type_.as_deref(),
            Some("kubernetes.io/service-account-token")
        );
        assert_eq!(
            c.run_token.metadata.annotations.as_ref().unwrap()[SERVICE_ACCOUNT_NAME_ANNOTATION],
            RUN_SERVICE_ACCOUNT
        );
        assert!(c.run_token.data.is_none(), "the token controller fills the token");
        assert!(c.run_token.metadata.owner_references.is_some());
        let owner = &c.service_account.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("Workspace", Some(true)));
        let np = c.network_policy.expect("isolation on");
        let from = &np.spec.unwrap().ingress.unwrap()[0].from.clone().unwrap();
        assert_eq!(from.len(), 2);
        assert_eq!(
            from[1]
                .namespace_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["kubernetes.io/metadata.name"],
            "mlplane-system"
        );
    }

    #[test]
    fn members_become_one_binding_per_role() {
        let mut sa = member(MemberKind::ServiceAccount, "ci", MemberRole::Contributor);
        sa.namespace = Some("ci-system".into());
        let c = build(
            &ws(WorkspaceSpec {
                members: vec![
                    member(MemberKind::Group, "vision-admins", MemberRole::Owner),
                    member(MemberKind::User, "alice@example.com", MemberRole::Contributor),
                    sa,
                    member(MemberKind::User, "bob", MemberRole::Contributor),
                ],
                ..Default::default()
            }),
            "mlplane-system",
        );
        let names: Vec<_> = c
            .role_bindings
            .iter()
            .map(|r| r.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["mlplane-owner", "mlplane-contributor"]);
        let contrib = &c.role_bindings[1];
        assert_eq!(contrib.role_ref.name, "mlplane-workspace-contributor");
        let subjects = contrib.subjects.as_ref().unwrap();
        assert_eq!(subjects.len(), 3);
        assert_eq!(subjects[0].kind, "User");
        assert_eq!(subjects[1].kind, "ServiceAccount");
        assert_eq!(subjects[1].namespace.as_deref(), Some("ci-system"));
        assert_eq!(subjects[1].api_group, None);
        assert_eq!(c.role_bindings[0].subjects.as_ref().unwrap()[0].kind, "Group");
    }

    #[test]
    fn quota_and_pvc_follow_the_spec() {
        let c = build(
            &ws(WorkspaceSpec {
                namespace: Some("cv-team".into()),
                quota: Some(WorkspaceQuota {
                    cpu: Some(Quantity("64".into())),
                    memory: Some(Quantity("256Gi".into())),
                    gpu: Some(8),
                    max_active_runs: Some(20),
                }),
                storage: Some(WorkspaceStorage {
                    artifacts: ArtifactStorage {
                        pvc: Some(PvcStorage {
                            size: Quantity("100Gi".into()),
                            storage_class_name: Some("standard".into()),
                        }),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }),
            "mlplane-system",
        );
        assert_eq!(c.namespace.metadata.name.as_deref(), Some("cv-team"));
        let hard = c.quota.unwrap().spec.unwrap().hard.unwrap();
        assert_eq!(hard["requests.cpu"].0, "64");
        assert_eq!(hard["requests.memory"].0, "256Gi");
        assert_eq!(hard["requests.nvidia.com/gpu"].0, "8");
        assert_eq!(hard.len(), 3, "maxActiveRuns is enforced by admission, not the quota");
        let pvc = c.pvc.unwrap();
        assert!(pvc.metadata.owner_references.is_none(), "artifacts must survive GC");
        assert_eq!(pvc.metadata.namespace.as_deref(), Some("cv-team"));
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("standard"));
        assert_eq!(spec.resources.unwrap().requests.unwrap()["storage"].0, "100Gi");
        assert!(c.network_policy.is_none());
    }
}
