//! Node providers: what adds nodes to a pool and removes them.
//!
//! Owns: the labels and taints every pool node carries
//! ([`pool_labels`], [`pool_taints`]), which pool a labelled node belongs to
//! ([`pool_of`]), and the [`NodeProvider`] trait with its three
//! implementations: [`kwok`] (simulated Node objects), [`cluster_api`]
//! (MachineDeployment replicas) and [`r#static`] (accounting only). Must not
//! cordon, drain or evict (the ComputeCluster controller does, for every
//! provider, before it asks a provider to remove a node) and must not touch
//! ComputeCluster status.
//!
//! Pool nodes carry:
//! - labels `mlplane.io/compute-cluster: <cluster>` (through
//!   [`label_value`]), `mlplane.io/pool: <pool>`,
//!   `node.kubernetes.io/instance-type: <instanceType>` (when set), the
//!   pool's `labels`, and for `tier: Spot` pools
//!   `kubernetes.azure.com/scalesetpriority: spot` (AKS) and
//!   `cloud.google.com/gke-spot: "true"` (GKE);
//! - taints `mlplane.io/compute-cluster=<cluster>:NoSchedule`, for Spot pools
//!   `kubernetes.azure.com/scalesetpriority=spot:NoSchedule` (as AKS taints
//!   its Spot nodes: only pods that accept preemption go there; run pods
//!   tolerate it), and the pool's `taints`.
pub mod cluster_api;
pub mod kwok;
pub mod r#static;

use std::collections::BTreeMap;
use std::future::Future;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::ResourceExt;

use crate::api::{Pool, Tier};
use crate::controllers::run::build::{COMPUTE_CLUSTER_LABEL, POOL_LABEL};
use crate::controllers::run::names::label_value;

/// Well-known node label of the instance type.
pub const INSTANCE_TYPE_LABEL: &str = "node.kubernetes.io/instance-type";
/// Label (AKS) and taint key of Spot nodes (run pods tolerate it).
pub use crate::controllers::run::build::SPOT_TAINT_KEY as SPOT_PRIORITY_LABEL;
/// Label (GKE) of Spot nodes.
pub const GKE_SPOT_LABEL: &str = "cloud.google.com/gke-spot";
/// Labels that every Linux node has and pods commonly select.
const OS_LABELS: [(&str, &str); 2] = [("kubernetes.io/os", "linux"), ("kubernetes.io/arch", "amd64")];

/// The labels of a node of `pool` in the cluster `cluster` (see the module
/// docs), including `kubernetes.io/os` and `/arch` unless the pool sets them.
pub fn pool_labels(cluster: &str, pool: &Pool) -> BTreeMap<String, String> {
    let mut l: BTreeMap<String, String> = OS_LABELS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    if let Some(t) = &pool.instance_type {
        l.insert(INSTANCE_TYPE_LABEL.into(), label_value(t));
    }
    if pool.tier == Tier::Spot {
        l.insert(SPOT_PRIORITY_LABEL.into(), "spot".into());
        l.insert(GKE_SPOT_LABEL.into(), "true".into());
    }
    l.extend(pool.labels.clone());
    l.insert(COMPUTE_CLUSTER_LABEL.into(), label_value(cluster));
    l.insert(POOL_LABEL.into(), pool.name.clone());
    l
}

/// A `key=value:NoSchedule` taint.
pub fn no_schedule(key: &str, value: &str) -> Taint {
    Taint {
        key: key.into(),
        value: Some(value.into()),
        effect: "NoSchedule".into(),
        time_added: None,
    }
}

/// The taint every node of the cluster `cluster` carries.
pub fn cluster_taint(cluster: &str) -> Taint {
    no_schedule(COMPUTE_CLUSTER_LABEL, &label_value(cluster))
}

/// The taint of Spot nodes.
pub fn spot_taint() -> Taint {
    no_schedule(SPOT_PRIORITY_LABEL, "spot")
}

/// The taints of a node of `pool` (see the module docs).
pub fn pool_taints(cluster: &str, pool: &Pool) -> Vec<Taint> {
    let mut t = vec![cluster_taint(cluster)];
    if pool.tier == Tier::Spot {
        t.push(spot_taint());
    }
    for extra in &pool.taints {
        if !t.iter().any(|x| x.key == extra.key && x.effect == extra.effect) {
            t.push(extra.clone());
        }
    }
    t
}

/// The pool (index in `pools`) a node belongs to by its labels, if it is
/// labelled as a node of `cluster`.
pub fn pool_of(cluster: &str, pools: &[Pool], node: &Node) -> Option<usize> {
    let labels = node.labels();
    if labels.get(COMPUTE_CLUSTER_LABEL)? != &label_value(cluster) {
        return None;
    }
    let pool = labels.get(POOL_LABEL)?;
    pools.iter().position(|p| &p.name == pool)
}

/// Adds nodes to and removes nodes from pools. Implementations make API
/// calls; deciding how many is the planner's job.
pub trait NodeProvider {
    /// Asks for `add` more nodes in `pool`, whose size is `size` and whose
    /// node names (any state) are `existing`. Returns the names of nodes
    /// created now (nodes a provider makes later are seen when they appear).
    fn grow(
        &self,
        pool: &Pool,
        existing: &[String],
        size: u32,
        add: u32,
    ) -> impl Future<Output = kube::Result<Vec<String>>> + Send;

    /// Removes the drained nodes `nodes` of `pool`, whose size is `size`.
    fn remove(&self, pool: &Pool, size: u32, nodes: &[NodeRef]) -> impl Future<Output = kube::Result<()>> + Send;
}

/// A node to remove: its name and the uid it had when it was drained (a
/// node created since under the same name is not removed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRef {
    /// Node name.
    pub name: String,
    /// Node uid.
    pub uid: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(tier: &str) -> Pool {
        serde_json::from_value(json!({
            "name": "a100", "instanceType": "Standard_NC24ads_A100_v4",
            "capacity": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1"}, "maxNodes": 2, "tier": tier,
            "labels": {"accelerator": "nvidia", "mlplane.io/pool": "ignored"},
            "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
        }))
        .unwrap()
    }

    #[test]
    fn pool_nodes_are_labelled_and_tainted() {
        let l = pool_labels("gpu", &pool("Dedicated"));
        assert_eq!(l[COMPUTE_CLUSTER_LABEL], "gpu");
        assert_eq!(l[POOL_LABEL], "a100", "the pool label cannot be overridden");
        assert_eq!(l[INSTANCE_TYPE_LABEL], "Standard_NC24ads_A100_v4");
        assert_eq!(l["accelerator"], "nvidia");
        assert_eq!(l["kubernetes.io/os"], "linux");
        assert!(!l.contains_key(SPOT_PRIORITY_LABEL));
        let t = pool_taints("gpu", &pool("Dedicated"));
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].key.as_str(), t[0].value.as_deref()),
            (COMPUTE_CLUSTER_LABEL, Some("gpu"))
        );
        // Spot pools: the AKS and GKE labels and the AKS taint.
        let l = pool_labels("gpu", &pool("Spot"));
        assert_eq!(
            (l[SPOT_PRIORITY_LABEL].as_str(), l[GKE_SPOT_LABEL].as_str()),
            ("spot", "true")
        );
        let t = pool_taints("gpu", &pool("Spot"));
        assert!(
            t.iter()
                .any(|t| t.key == SPOT_PRIORITY_LABEL && t.effect == "NoSchedule")
        );
        // Long cluster names go through label_value, as run pods' selectors do.
        let long = "a".repeat(100);
        assert_eq!(
            pool_labels(&long, &pool("Dedicated"))[COMPUTE_CLUSTER_LABEL],
            label_value(&long)
        );
    }

    #[test]
    fn nodes_belong_to_pools_by_label() {
        let node = |cc: &str, p: &str| -> Node {
            serde_json::from_value(
                json!({"metadata": {"name": "n", "labels": {COMPUTE_CLUSTER_LABEL: cc, POOL_LABEL: p}}}),
            )
            .unwrap()
        };
        let pools = vec![pool("Dedicated")];
        assert_eq!(pool_of("gpu", &pools, &node("gpu", "a100")), Some(0));
        assert_eq!(pool_of("gpu", &pools, &node("cpu", "a100")), None);
        assert_eq!(pool_of("gpu", &pools, &node("gpu", "gone")), None);
    }
}
