//! Pure builders of a ModelDeployment's children, one per kind: the serving
//! Deployment ([`deployment`]), the Services ([`service`]: one per
//! deployment and the endpoint), the HorizontalPodAutoscaler
//! ([`autoscaler`]) and the HTTPRoute ([`route`]). Each returns a plain
//! object; nothing here touches the API server.
//!
//! Owns: child names, labels and the spec-hash annotation shared by the
//! builders. Every child carries `app.kubernetes.io/managed-by: mlplane`,
//! `mlplane.io/model-deployment: <name>` (per-deployment children also
//! `mlplane.io/deployment: <deployment>`), a controller ownerReference (so
//! deleting the ModelDeployment removes them), and [`SPEC_HASH_ANNOTATION`]:
//! a hash of everything else the builder set, so the write-when-changed
//! comparison also sees a field that was removed from the desired object.
pub mod autoscaler;
pub mod deployment;
pub mod route;
pub mod service;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::Serialize;

use crate::api::model_deployment::ModelDeployment;
use crate::controllers::run::names::{MAX_DNS_LABEL_LEN, label_value, short_hash};
use crate::controllers::workspace::build::{MANAGED_BY, MANAGED_BY_LABEL};

/// Label naming the ModelDeployment a child belongs to.
pub const MODEL_DEPLOYMENT_LABEL: &str = "mlplane.io/model-deployment";
/// Label naming the deployment (of the ModelDeployment) a child serves.
pub const DEPLOYMENT_LABEL: &str = "mlplane.io/deployment";
/// Annotation with the hash of a child as built.
pub const SPEC_HASH_ANNOTATION: &str = "mlplane.io/spec-hash";
/// Port of every Service (the endpoint URL has no port).
pub const SERVICE_PORT: i32 = 80;
/// Name of the serving container's port, the Services' target.
pub const HTTP_PORT_NAME: &str = "http";

/// Name of the Deployment, Service and autoscaler of deployment `d` of the
/// ModelDeployment `md`: `<md>-<d>`, or when that is longer than a DNS label
/// its start and a hash of both names. `md` is a DNS-1035 label (CEL), so
/// the result is a valid Service name.
pub fn child_name(md: &str, d: &str) -> String {
    let name = format!("{md}-{d}");
    if name.len() <= MAX_DNS_LABEL_LEN {
        return name;
    }
    let hash = short_hash(&format!("{md}/{d}"));
    let keep = MAX_DNS_LABEL_LEN - hash.len() - 1;
    format!("{}-{hash}", name[..keep].trim_end_matches('-'))
}

/// Labels of every child of `md`.
pub fn labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (MODEL_DEPLOYMENT_LABEL.to_string(), label_value(&md.name_any())),
    ])
}

/// Labels of the children (and pods) of deployment `d`.
pub fn deployment_labels(md: &ModelDeployment, d: &str) -> BTreeMap<String, String> {
    let mut l = labels(md);
    l.insert(DEPLOYMENT_LABEL.into(), d.to_string());
    l
}

/// Selector of the pods of deployment `d`.
pub fn pod_selector(md: &ModelDeployment, d: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MODEL_DEPLOYMENT_LABEL.to_string(), label_value(&md.name_any())),
        (DEPLOYMENT_LABEL.to_string(), d.to_string()),
    ])
}

/// Metadata of a child named `name` with `labels`.
pub fn metadata(md: &ModelDeployment, name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: md.namespace(),
        labels: Some(labels),
        owner_references: md.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Sets [`SPEC_HASH_ANNOTATION`] to the hash of `obj` as built (without the
/// annotation itself).
pub fn with_spec_hash<K: Resource + Serialize>(mut obj: K) -> K {
    if let Some(a) = obj.meta_mut().annotations.as_mut() {
        a.remove(SPEC_HASH_ANNOTATION);
    }
    let hash = short_hash(&serde_json::to_string(&obj).unwrap_or_default());
    obj.meta_mut()
        .annotations
        .get_or_insert_default()
        .insert(SPEC_HASH_ANNOTATION.into(), hash);
    obj
}

/// The spec hash a live child carries.
pub fn spec_hash<K: Resource>(obj: &K) -> Option<&str> {
    obj.meta()
        .annotations
        .as_ref()?
        .get(SPEC_HASH_ANNOTATION)
        .map(String::as_str)
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::api::model_deployment::ModelDeployment;

    /// A ModelDeployment `resnet` in `vision` with `spec`.
    pub fn md(spec: serde_json::Value) -> ModelDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "resnet", "namespace": "vision", "uid": "uid-1", "generation": 1},
            "spec": spec,
        }))
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::run::names::is_dns_label;
    use k8s_openapi::api::core::v1::Service;

    #[test]
    fn child_names_fit_dns_labels_without_collisions() {
        assert_eq!(child_name("resnet", "blue"), "resnet-blue");
        let md = "m".repeat(63);
        let a = child_name(&md, "blue");
        let b = child_name(&md, "green");
        assert!(a.len() <= 63 && is_dns_label(&a), "{a}");
        assert_ne!(a, b);
        // `a-b` + `c` and `a` + `b-c` are different children.
        let long = "x".repeat(60);
        assert_ne!(child_name(&format!("{long}-b"), "c"), child_name(&long, "b-c"));
    }

    #[test]
    fn spec_hash_changes_when_a_field_is_removed() {
        let md = test_support::md(
            serde_json::json!({"deployments": [{"name": "blue", "model": {"uri": "s3://m/1", "format": "ONNX"}}]}),
        );
        let mut svc = Service {
            metadata: metadata(&md, "resnet", labels(&md)),
            ..Default::default()
        };
        svc.metadata.annotations = Some(BTreeMap::from([("x".to_string(), "1".to_string())]));
        let a = with_spec_hash(svc.clone());
        assert_eq!(spec_hash(&with_spec_hash(a.clone())), spec_hash(&a), "idempotent");
        svc.metadata.annotations = None;
        let b = with_spec_hash(svc);
        assert_ne!(spec_hash(&a), spec_hash(&b));
        let owner = &a.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("ModelDeployment", Some(true)));
        assert_eq!(a.metadata.labels.as_ref().unwrap()[MODEL_DEPLOYMENT_LABEL], "resnet");
    }
}
