//! CRD types of the `mlplane.io/v1alpha1` API, one module per kind, plus the
//! shared types (conditions, references, resources) in [`shared`].
//!
//! Owns: the API contract (field names, defaults, admission rules) and CRD
//! generation ([`crds`], [`crds_yaml`], [`crd_files`]). Must not touch the API
//! server or hold controller logic.

pub mod compute_cluster;
pub mod data_asset;
pub mod experiment;
pub mod model_deployment;
pub mod pipeline;
pub mod shared;
pub mod workspace;

#[cfg(test)]
mod test_support;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use compute_cluster::*;
pub use data_asset::*;
pub use experiment::*;
pub use model_deployment::*;
pub use pipeline::*;
pub use shared::*;
pub use workspace::*;

/// API group of every mlplane kind.
pub const GROUP: &str = "mlplane.io";
/// API version of every mlplane kind.
pub const VERSION: &str = "v1alpha1";

/// All CRDs, in a fixed order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        Workspace::crd(),
        ComputeCluster::crd(),
        Experiment::crd(),
        Pipeline::crd(),
        DataAsset::crd(),
        ModelDeployment::crd(),
    ]
}

/// One CRD as YAML (no leading `---`).
pub fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    serde_yaml::to_string(crd).expect("CRD serializes to YAML")
}

/// All CRDs as one multi-document YAML stream, in the order of [`crds`].
pub fn crds_yaml() -> String {
    crds().iter().map(|crd| format!("---\n{}", crd_yaml(crd))).collect()
}

/// One `(file name, YAML)` per CRD, file names `<group>_<plural>.yaml`
/// (e.g. `mlplane.io_workspaces.yaml`), for `mlplane crds --dir crds/`.
pub fn crd_files() -> Vec<(String, String)> {
    crds()
        .iter()
        .map(|crd| {
            (
                format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural),
                crd_yaml(crd),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Walk every schema node, calling `f(path, node)`.
    fn walk(path: &str, node: &Value, f: &mut dyn FnMut(&str, &Value)) {
        f(path, node);
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                walk(&format!("{path}.{k}"), v, f);
            }
        }
        if let Some(items) = node.get("items") {
            walk(&format!("{path}[]"), items, f);
        }
        if let Some(ap) = node.get("additionalProperties").filter(|v| v.is_object()) {
            walk(&format!("{path}.*"), ap, f);
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(list) = node.get(key).and_then(Value::as_array) {
                for (i, v) in list.iter().enumerate() {
                    walk(&format!("{path}<{key}{i}>"), v, f);
                }
            }
        }
    }

    fn schemas() -> Vec<(String, Value)> {
        crds()
            .iter()
            .map(|crd| (crd.spec.names.kind.clone(), test_support::schema_of(crd)))
            .collect()
    }

    #[test]
    fn six_kinds_in_fixed_order() {
        let names: Vec<_> = crds().iter().map(|c| c.metadata.name.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                "workspaces.mlplane.io",
                "computeclusters.mlplane.io",
                "experiments.mlplane.io",
                "pipelines.mlplane.io",
                "dataassets.mlplane.io",
                "modeldeployments.mlplane.io"
            ]
        );
        for crd in crds() {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.versions.len(), 1);
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, VERSION);
            assert!(v.subresources.as_ref().unwrap().status.is_some());
            assert_eq!(crd.spec.names.categories.as_deref(), Some(&["mlplane".to_string()][..]));
            let cols: Vec<_> = v
                .additional_printer_columns
                .as_ref()
                .unwrap()
                .iter()
                .map(|c| c.name.as_str())
                .collect();
            assert!(
                cols.contains(&"Phase") && cols.contains(&"Ready") && cols.contains(&"Age"),
                "{cols:?}"
            );
            let scope = if ["Workspace", "ComputeCluster"].contains(&crd.spec.names.kind.as_str()) {
                "Cluster"
            } else {
                "Namespaced"
            };
            assert_eq!(crd.spec.scope, scope, "{}", crd.spec.names.kind);
        }
        let short: Vec<_> = crds()
            .iter()
            .map(|c| c.spec.names.short_names.clone().unwrap().join(","))
            .collect();
        assert_eq!(short, ["ws", "cc", "exp", "pl", "da", "md"]);
    }

    /// Structural schema: every node has a type unless it is int-or-string or
    /// preserve-unknown-fields; no anyOf/oneOf/allOf/not; no `additionalProperties`
    /// beside `properties`; preserve-unknown-fields only on parameter values.
    #[test]
    fn schemas_are_structural() {
        for (kind, schema) in schemas() {
            walk(kind.as_str(), &schema, &mut |path, node| {
                let obj = node
                    .as_object()
                    .unwrap_or_else(|| panic!("{path}: not an object schema"));
                for bad in ["anyOf", "oneOf", "allOf", "not", "$ref", "definitions", "$defs"] {
                    assert!(!obj.contains_key(bad), "{path}: has {bad}");
                }
                let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
                let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
                if preserve {
                    assert!(
                        path.ends_with(".params.*") || path.ends_with(".choice[]"),
                        "{path}: unexpected x-kubernetes-preserve-unknown-fields"
                    );
                }
                if !int_or_string && !preserve {
                    let ty = obj.get("type").and_then(Value::as_str);
                    assert!(ty.is_some(), "{path}: no type");
                    if ty == Some("array") {
                        assert!(obj.contains_key("items"), "{path}: array without items");
                    }
                }
                assert!(
                    !(obj.contains_key("properties") && obj.contains_key("additionalProperties")),
                    "{path}: both properties and additionalProperties"
                );
                if let Some(ap) = obj.get("additionalProperties") {
                    assert!(ap.is_object(), "{path}: additionalProperties must be a schema");
                }
            });
        }
    }

    /// Every CEL rule compiles, and names the field in its message.
    #[test]
    fn rules_compile_and_have_messages() {
        let mut count = 0;
        for (kind, schema) in schemas() {
            walk(kind.as_str(), &schema, &mut |path, node| {
                if let Some(rules) = node.get("x-kubernetes-validations").and_then(Value::as_array) {
                    // compile_schema's has_errors() is per node: check each node.
                    let compiled = kube::core::cel::compile_schema(node);
                    assert!(!compiled.has_errors(), "{path}: {:?}", compiled.compilation_errors());
                    for r in rules {
                        let rule = r["rule"].as_str().unwrap();
                        let warnings = kube::core::cel::estimate_rule_cost(rule, &compiled);
                        assert!(warnings.is_empty(), "{path}: {rule}: {warnings:?}");
                        count += 1;
                        let msg = r["message"]
                            .as_str()
                            .unwrap_or_else(|| panic!("{path}: rule without message"));
                        assert!(
                            msg.starts_with("spec.")
                                || msg.starts_with("metadata.")
                                || msg.starts_with("environment")
                                || msg.starts_with("inputs[]"),
                            "{path}: message does not name the field: {msg}"
                        );
                    }
                }
            });
        }
        assert!(count >= 40, "only {count} rules");
    }

    /// Lists and maps that CEL iterates carry maxItems/maxProperties, and
    /// strings CEL compares carry maxLength, so the API server's cost
    /// estimate stays within its budget.
    #[test]
    fn iterated_collections_are_bounded() {
        for (kind, schema) in schemas() {
            walk(kind.as_str(), &schema, &mut |path, node| {
                if path.contains(".status") {
                    return;
                }
                match node.get("type").and_then(Value::as_str) {
                    Some("array") => assert!(node.get("maxItems").is_some(), "{path}: array without maxItems"),
                    Some("object") if node.get("additionalProperties").is_some() => assert!(
                        node.get("maxProperties").is_some()
                            || path.ends_with(".labels")
                            || path.ends_with(".annotations"),
                        "{path}: map without maxProperties"
                    ),
                    _ => {}
                }
            });
        }
    }

    /// crds/ holds exactly what the types generate. Run with
    /// `MLPLANE_UPDATE_CRDS=1` to rewrite it.
    #[test]
    fn checked_in_crds_are_fresh() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        if std::env::var_os("MLPLANE_UPDATE_CRDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, yaml) in crd_files() {
                std::fs::write(dir.join(name), yaml).unwrap();
            }
        }
        for (name, yaml) in crd_files() {
            let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| {
                panic!("crds/{name}: {e}; run MLPLANE_UPDATE_CRDS=1 cargo test -p mlplane checked_in_crds")
            });
            assert!(
                on_disk == yaml,
                "crds/{name} is stale; run MLPLANE_UPDATE_CRDS=1 cargo test -p mlplane checked_in_crds"
            );
        }
    }

    #[test]
    fn yaml_stream_is_deterministic_and_parses_back() {
        let a = crds_yaml();
        assert_eq!(a, crds_yaml());
        assert_eq!(a.matches("\n---\n").count() + 1, 6);
        for doc in a.split("---\n").filter(|d| !d.trim().is_empty()) {
            let _: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
                serde_yaml::from_str(doc).unwrap();
        }
    }
}
