//! `ComputeCluster` (cluster-scoped, short name `cc`): node pools that scale
//! between `minNodes` and `maxNodes` with demand, and an admission queue.
//!
//! Owns: the ComputeCluster spec/status types and their admission rules.
//! Must not touch the API server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, Duration};

/// Node pools that scale with demand, and who may use them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mlplane.io",
    version = "v1alpha1",
    kind = "ComputeCluster",
    plural = "computeclusters",
    shortname = "cc",
    category = "mlplane",
    status = "ComputeClusterStatus",
    doc = "Node pools that scale between minNodes and maxNodes with demand, and an admission queue.",
    printcolumn = r#"{"name":"Admitted","type":"integer","jsonPath":".status.queue.admitted"}"#,
    printcolumn = r#"{"name":"Waiting","type":"integer","jsonPath":".status.queue.waiting"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.provider.clusterAPI) || self.pools.all(p, p.name in self.provider.clusterAPI.machineDeployments)"
).message("spec.provider.clusterAPI.machineDeployments must name a MachineDeployment for every pool in spec.pools"))]
pub struct ComputeClusterSpec {
    /// How nodes are provided. Exactly one of kwok, clusterAPI, static.
    pub provider: Provider,

    /// The node pools.
    #[schemars(length(min = 1, max = 50))]
    #[x_kube(
        validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))")
            .message("spec.pools[].name must be unique"),
        merge_strategy = ListMerge::Map(vec!["name".into()])
    )]
    pub pools: Vec<Pool>,

    /// How long a node must be idle before it is drained and removed.
    #[serde(default = "default_idle_time")]
    pub idle_time_before_scale_down: Duration,

    /// Workspaces (by name) that may submit work; empty means every workspace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub workspaces: Vec<String>,
}

impl Default for ComputeClusterSpec {
    fn default() -> Self {
        Self {
            provider: Provider::default(),
            pools: Vec::new(),
            idle_time_before_scale_down: default_idle_time(),
            workspaces: Vec::new(),
        }
    }
}

fn default_idle_time() -> Duration {
    Duration::from("120s")
}

/// The node provider: exactly one of `kwok`, `clusterAPI`, `static`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.kwok), has(self.clusterAPI), has(self.static)].exists_one(x, x)")
    .message("spec.provider must set exactly one of kwok, clusterAPI or static"))]
pub struct Provider {
    /// Simulated nodes (KWOK): development, demos, capacity planning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwok: Option<KwokProvider>,
    /// Cluster API MachineDeployments, one per pool.
    #[serde(default, rename = "clusterAPI", skip_serializing_if = "Option::is_none")]
    pub cluster_api: Option<ClusterApiProvider>,
    /// Existing nodes labelled into pools; accounting only, no scaling.
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    pub static_: Option<StaticProvider>,
}

/// KWOK provider settings (none yet).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct KwokProvider {}

/// Static provider settings (none yet).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct StaticProvider {}

/// Cluster API provider: the MachineDeployment scaled for each pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterApiProvider {
    /// Namespace of the MachineDeployments.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub namespace: String,
    /// Pool name -> MachineDeployment name.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 50))]
    pub machine_deployments: BTreeMap<String, String>,
}

/// A node pool: nodes of one shape that scale together.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minNodes <= self.maxNodes").message("spec.pools[].maxNodes must be >= minNodes"))]
pub struct Pool {
    /// Pool name (a DNS label), copied to the node label `mlplane.io/pool`.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// Informational instance type, copied to a node label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub instance_type: Option<String>,
    /// Allocatable resources of one node, e.g. `{cpu: "24", memory: 220Gi,
    /// nvidia.com/gpu: "1"}`; must include cpu and memory.
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new("'cpu' in self && 'memory' in self")
        .message("spec.pools[].capacity must include cpu and memory"))]
    pub capacity: BTreeMap<String, Quantity>,
    /// Never fewer nodes than this.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_nodes: i32,
    /// Never more nodes than this; 0 disables the pool.
    #[schemars(range(min = 0, max = 1000))]
    pub max_nodes: i32,
    /// Dedicated or Spot.
    #[serde(default)]
    pub tier: Tier,
    /// Extra node labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub labels: BTreeMap<String, String>,
    /// Extra node taints (besides `mlplane.io/compute-cluster=<name>:NoSchedule`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub taints: Vec<Taint>,
}

/// Pricing tier of a pool's nodes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Regular nodes.
    #[default]
    Dedicated,
    /// Preemptible nodes.
    Spot,
}

/// Observed state of a ComputeCluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComputeClusterStatus {
    /// One-word summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ComputeClusterPhase>,
    /// The `metadata.generation` last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Per-pool sizes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
    /// The admission queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    /// Conditions, merged by type (`Ready`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Phase of a ComputeCluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ComputeClusterPhase {
    /// Not reconciled yet.
    #[default]
    Pending,
    /// Every pool at its desired size.
    Ready,
    /// A pool is scaling up or down.
    Scaling,
    /// A pool cannot reach its desired size (see conditions).
    Degraded,
}

/// Observed state of one pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Nodes that exist.
    #[serde(default)]
    pub nodes: i32,
    /// Nodes that are Ready.
    #[serde(default)]
    pub ready_nodes: i32,
    /// Nodes the autoscaler wants.
    #[serde(default)]
    pub desired_nodes: i32,
    /// Pods waiting for this pool.
    #[serde(default)]
    pub pending_pods: i32,
    /// Total allocatable resources of the pool's ready nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allocatable: BTreeMap<String, Quantity>,
    /// When the pool last grew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_up: Option<Time>,
    /// When the pool last shrank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_down: Option<Time>,
}

/// The admission queue.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Runs admitted (their pods may be placed).
    #[serde(default)]
    pub admitted: i32,
    /// Runs waiting for quota or capacity.
    #[serde(default)]
    pub waiting: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::test_support::{assert_invalid, assert_valid, set, unset};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn crd() -> CustomResourceDefinition {
        ComputeCluster::crd()
    }

    fn valid() -> serde_json::Value {
        json!({
            "apiVersion": "mlplane.io/v1alpha1",
            "kind": "ComputeCluster",
            "metadata": {"name": "gpu"},
            "spec": {
                "provider": {"kwok": {}},
                "pools": [
                    {
                        "name": "a100",
                        "instanceType": "Standard_NC24ads_A100_v4",
                        "capacity": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1"},
                        "minNodes": 0,
                        "maxNodes": 8,
                        "tier": "Dedicated",
                        "labels": {},
                        "taints": []
                    },
                    {"name": "cpu", "capacity": {"cpu": "8", "memory": "32Gi"}, "maxNodes": 4}
                ],
                "idleTimeBeforeScaleDown": "120s",
                "workspaces": ["vision"]
            }
        })
    }

    #[test]
    fn valid_cluster_passes() {
        assert_valid(&crd(), &valid());
        let typed: ComputeCluster = serde_json::from_value(valid()).unwrap();
        assert_eq!(typed.spec.pools[1].min_nodes, 0);
        assert_eq!(typed.spec.pools[1].tier, Tier::Dedicated);
        let capi = set(
            valid(),
            "/spec/provider",
            json!({"clusterAPI": {"namespace": "capi", "machineDeployments": {"a100": "md-a100", "cpu": "md-cpu"}}}),
        );
        assert_valid(&crd(), &capi);
        let typed: ComputeCluster = serde_json::from_value(capi).unwrap();
        assert_eq!(
            typed.spec.provider.cluster_api.unwrap().machine_deployments["a100"],
            "md-a100"
        );
        assert_valid(&crd(), &set(valid(), "/spec/provider", json!({"static": {}})));
        // maxNodes 0 (disabled pool) is allowed.
        assert_valid(&crd(), &set(valid(), "/spec/pools/1/maxNodes", json!(0)));
    }

    #[test]
    fn exactly_one_provider() {
        let two = set(valid(), "/spec/provider/static", json!({}));
        assert_invalid(
            &crd(),
            &two,
            "spec.provider must set exactly one of kwok, clusterAPI or static",
        );
        let none = set(valid(), "/spec/provider", json!({}));
        assert_invalid(
            &crd(),
            &none,
            "spec.provider must set exactly one of kwok, clusterAPI or static",
        );
    }

    #[test]
    fn min_nodes_not_above_max_nodes() {
        let cc = set(valid(), "/spec/pools/0/minNodes", json!(9));
        assert_invalid(&crd(), &cc, "spec.pools[].maxNodes must be >= minNodes");
        // The default minNodes (0) is applied before the rule runs.
        let cc = set(
            unset(valid(), "/spec/pools/0/minNodes"),
            "/spec/pools/0/maxNodes",
            json!(0),
        );
        assert_valid(&crd(), &cc);
    }

    #[test]
    fn pool_names_unique() {
        let cc = set(valid(), "/spec/pools/1/name", json!("a100"));
        assert_invalid(&crd(), &cc, "spec.pools[].name must be unique");
    }

    #[test]
    fn capacity_needs_cpu_and_memory() {
        let cc = set(valid(), "/spec/pools/1/capacity", json!({"cpu": "8"}));
        assert_invalid(&crd(), &cc, "spec.pools[].capacity must include cpu and memory");
    }

    #[test]
    fn cluster_api_covers_every_pool() {
        let cc = set(
            valid(),
            "/spec/provider",
            json!({"clusterAPI": {"namespace": "capi", "machineDeployments": {"a100": "md-a100"}}}),
        );
        assert_invalid(
            &crd(),
            &cc,
            "spec.provider.clusterAPI.machineDeployments must name a MachineDeployment for every pool",
        );
    }

    #[test]
    fn schema_bounds() {
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["pools"]["maxItems"], json!(50));
        assert_eq!(spec["pools"]["x-kubernetes-list-type"], json!("map"));
        assert_eq!(spec["idleTimeBeforeScaleDown"]["default"], json!("120s"));
        let pool = &spec["pools"]["items"]["properties"];
        assert_eq!(pool["name"]["pattern"], json!(crate::api::DNS_LABEL_PATTERN));
        assert_eq!(pool["tier"]["default"], json!("Dedicated"));
        assert_eq!(pool["minNodes"]["default"], json!(0));
        assert!(
            spec["pools"]["items"]["required"]
                .as_array()
                .unwrap()
                .contains(&json!("maxNodes"))
        );
    }
}
