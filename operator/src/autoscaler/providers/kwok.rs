//! The `kwok` provider: simulated nodes, for development, demos and capacity
//! planning. A node is a Node object that KWOK manages (annotation
//! `kwok.x-k8s.io/node: fake`): KWOK makes it Ready and plays its pods.
//!
//! Owns: the Node objects of the cluster's pools (named, built, created and
//! deleted here). Must not touch other nodes.
//!
//! Nodes are named `<cluster>-<pool>-<n>` with the smallest `n` not in use,
//! so names are deterministic and a restarted operator finds (by label)
//! what it made and never duplicates it; a name already taken answers
//! AlreadyExists, which counts as made. Each node has the pool's `capacity`
//! as capacity and allocatable (`pods: 110` unless given), the pool's
//! labels and taints ([`super::pool_labels`], [`super::pool_taints`]), the
//! usual `kubernetes.io/hostname`, `/os`, `/arch` labels, and a controller
//! ownerReference to the ComputeCluster (deleting the cluster deletes its
//! simulated nodes).
use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::{Client, Resource, ResourceExt};

use super::{NodeProvider, NodeRef, pool_labels, pool_taints};
use crate::api::{ComputeCluster, Pool};
use crate::autoscaler::resources::{DEFAULT_PODS, PODS};
use crate::controllers::run::names::{label_value, short_hash};
use crate::controllers::workspace::build::{MANAGED_BY, MANAGED_BY_LABEL};

/// Annotation by which KWOK manages a node.
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// Longest node name (a DNS subdomain).
const MAX_NODE_NAME: usize = 253;
/// Node creations in flight at once.
const CREATE_CONCURRENCY: usize = 16;

/// Name of node `n` of `pool`: `<cluster>-<pool>-<n>`, the cluster name cut
/// and hashed if that is too long.
pub fn node_name(cluster: &str, pool: &str, n: u32) -> String {
    let name = format!("{cluster}-{pool}-{n}");
    if name.len() <= MAX_NODE_NAME {
        return name;
    }
    let suffix = format!("-{pool}-{n}");
    let hash = short_hash(cluster);
    let keep = MAX_NODE_NAME - suffix.len() - hash.len() - 1;
    // Cluster names are DNS subdomains (ASCII).
    let cut = cluster[..keep].trim_end_matches(['-', '.']);
    format!("{cut}-{hash}{suffix}")
}

/// The names of `add` new nodes of `pool`: the smallest indices whose names
/// are not in `taken`.
pub fn next_names(cluster: &str, pool: &str, taken: &BTreeSet<String>, add: u32) -> Vec<String> {
    (0..)
        .map(|n| node_name(cluster, pool, n))
        .filter(|name| !taken.contains(name))
        .take(add as usize)
        .collect()
}

/// The Node object of a new simulated node.
pub fn build_node(cc: &ComputeCluster, pool: &Pool, name: &str) -> Node {
    let cluster = cc.name_any();
    let mut labels = pool_labels(&cluster, pool);
    labels.insert("kubernetes.io/hostname".into(), label_value(name));
    labels.insert("type".into(), "kwok".into());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    let mut capacity: BTreeMap<String, Quantity> = pool.capacity.clone();
    capacity
        .entry(PODS.into())
        .or_insert_with(|| Quantity(DEFAULT_PODS.to_string()));
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([
                (KWOK_NODE_ANNOTATION.to_string(), "fake".to_string()),
                ("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string()),
            ])),
            owner_references: cc.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(pool_taints(&cluster, pool)),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            allocatable: Some(capacity.clone()),
            capacity: Some(capacity),
            ..Default::default()
        }),
    }
}

/// Creates and deletes simulated nodes of one ComputeCluster.
pub struct KwokProvider<'a> {
    /// The client.
    pub client: Client,
    /// The cluster.
    pub cc: &'a ComputeCluster,
}

impl NodeProvider for KwokProvider<'_> {
    async fn grow(&self, pool: &Pool, existing: &[String], _size: u32, add: u32) -> kube::Result<Vec<String>> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let taken: BTreeSet<String> = existing.iter().cloned().collect();
        let names = next_names(&self.cc.name_any(), &pool.name, &taken, add);
        // A few creations in flight, so a large scale-up does not take one
        // round trip per node.
        let results: Vec<kube::Result<String>> = futures::stream::iter(names)
            .map(|name| {
                let (nodes, node) = (nodes.clone(), build_node(self.cc, pool, &name));
                async move {
                    match nodes.create(&PostParams::default(), &node).await {
                        Ok(_) => Ok(name),
                        // Made before a restart, or by a reconcile racing this one.
                        Err(kube::Error::Api(s)) if s.code == 409 => Ok(name),
                        Err(e) => Err(e),
                    }
                }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn remove(&self, _pool: &Pool, _size: u32, nodes: &[NodeRef]) -> kube::Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        for node in nodes {
            match api.delete(&node.name, &delete_exactly(node.uid.clone())).await {
                Ok(_) => {}
                // Gone already, or a namesake created since (409): not ours to delete.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Delete options that remove only the object with `uid` (not a namesake
/// created since).
pub fn delete_exactly(uid: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::background()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cc() -> ComputeCluster {
        serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "ComputeCluster",
            "metadata": {"name": "gpu", "uid": "u1"},
            "spec": {"provider": {"kwok": {}}, "pools": [{
                "name": "a100", "instanceType": "Standard_NC24ads_A100_v4",
                "capacity": {"cpu": "24", "memory": "220Gi", "nvidia.com/gpu": "1"}, "maxNodes": 2}]}
        }))
        .unwrap()
    }

    #[test]
    fn names_are_deterministic_and_fill_gaps() {
        assert_eq!(node_name("gpu", "a100", 0), "gpu-a100-0");
        let taken: BTreeSet<String> = ["gpu-a100-0", "gpu-a100-2"].iter().map(|s| s.to_string()).collect();
        assert_eq!(next_names("gpu", "a100", &taken, 2), ["gpu-a100-1", "gpu-a100-3"]);
        let long = "c".repeat(250);
        let name = node_name(&long, "a100", 7);
        assert!(name.len() <= MAX_NODE_NAME && name.ends_with("-a100-7"), "{name}");
        assert_eq!(name, node_name(&long, "a100", 7));
    }

    #[test]
    fn a_simulated_node_has_the_pool_shape_labels_taint_and_owner() {
        let cc = cc();
        let node = build_node(&cc, &cc.spec.pools[0], "gpu-a100-0");
        let v = serde_json::to_value(&node).unwrap();
        assert_eq!(v["metadata"]["annotations"][KWOK_NODE_ANNOTATION], "fake");
        assert_eq!(v["metadata"]["labels"]["mlplane.io/compute-cluster"], "gpu");
        assert_eq!(v["metadata"]["labels"]["mlplane.io/pool"], "a100");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/hostname"], "gpu-a100-0");
        assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "u1");
        assert_eq!(v["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(v["spec"]["taints"][0]["key"], "mlplane.io/compute-cluster");
        assert_eq!(v["status"]["allocatable"]["nvidia.com/gpu"], "1");
        assert_eq!(v["status"]["capacity"]["pods"], "110");
    }
}
