//! The `clusterAPI` provider: each pool is a Cluster API MachineDeployment
//! (`spec.provider.clusterAPI.machineDeployments`, in its `namespace`);
//! growing a pool raises the MachineDeployment's `spec.replicas`, removing a
//! node marks its Machine with `cluster.x-k8s.io/delete-machine` (so the
//! MachineSet deletes that Machine and no other) and then lowers the
//! replicas, as the Cluster Autoscaler's clusterapi provider does.
//!
//! Owns: reading MachineDeployments and Machines (whatever API version the
//! cluster serves: `spec.replicas`, the `cluster.x-k8s.io/deployment-name`
//! label and `status.nodeRef.name` are the same in v1beta1 and v1beta2),
//! and those two writes. Must not create or delete Machines or Nodes: the
//! Cluster API controllers and the infrastructure provider do.
//!
//! A node belongs to a pool when a Machine of the pool's MachineDeployment
//! names it in `status.nodeRef`. Its Machine being marked for deletion (or
//! deleted) means its removal was requested.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::{NodeProvider, NodeRef};
use crate::api::{ClusterApiProvider as ClusterApiSpec, Pool};

/// The Cluster API group.
pub const GROUP: &str = "cluster.x-k8s.io";
/// Label on a Machine naming its MachineDeployment.
pub const DEPLOYMENT_NAME_LABEL: &str = "cluster.x-k8s.io/deployment-name";
/// Annotation that makes a MachineSet delete this Machine first.
pub const DELETE_MACHINE_ANNOTATION: &str = "cluster.x-k8s.io/delete-machine";

/// The served resources of the two kinds used.
#[derive(Clone, Debug)]
pub struct Resources {
    /// MachineDeployments.
    pub machine_deployments: ApiResource,
    /// Machines.
    pub machines: ApiResource,
}

/// The Cluster API resources the cluster serves, or `None` when it serves
/// neither kind (the CRDs are not installed).
pub async fn discover(client: &Client) -> kube::Result<Option<Resources>> {
    let group = match kube::discovery::group(client, GROUP).await {
        Ok(g) => g,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
        Err(kube::Error::Discovery(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let md = group.recommended_kind("MachineDeployment");
    let m = group.recommended_kind("Machine");
    Ok(match (md, m) {
        (Some((md, _)), Some((m, _))) => Some(Resources {
            machine_deployments: md,
            machines: m,
        }),
        _ => None,
    })
}

/// `spec.replicas` of a MachineDeployment.
pub fn replicas(md: &DynamicObject) -> Option<u32> {
    md.data["spec"]["replicas"].as_u64().map(|r| r as u32)
}

/// The node a Machine names (`status.nodeRef.name`).
pub fn machine_node(m: &DynamicObject) -> Option<&str> {
    m.data["status"]["nodeRef"]["name"].as_str()
}

/// Whether a Machine is being removed: marked for deletion or deleted.
pub fn machine_removing(m: &DynamicObject) -> bool {
    m.metadata.deletion_timestamp.is_some() || m.annotations().contains_key(DELETE_MACHINE_ANNOTATION)
}

/// Keeps of a cached MachineDeployment or Machine only what this provider
/// reads.
pub fn strip(obj: &mut DynamicObject) {
    obj.managed_fields_mut().clear();
    let keep = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DELETE_MACHINE_ANNOTATION))
        .cloned();
    obj.metadata.annotations = keep.map(|v| BTreeMap::from([(DELETE_MACHINE_ANNOTATION.to_string(), v)]));
    let replicas = obj.data["spec"]["replicas"].clone();
    let node = obj.data["status"]["nodeRef"]["name"].clone();
    obj.data = json!({"spec": {"replicas": replicas}, "status": {"nodeRef": {"name": node}}});
}

/// Pools of the cluster's nodes through their Machines.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Membership {
    /// Node name -> (pool index, whether its removal was requested).
    pub nodes: HashMap<String, (usize, bool)>,
    /// Per pool: its MachineDeployment's replicas, `None` when it is missing.
    pub replicas: Vec<Option<u32>>,
}

/// Which node belongs to which pool, from the cached MachineDeployments and
/// Machines (every namespace; only `spec.namespace`'s count).
pub fn membership(
    spec: &ClusterApiSpec,
    pools: &[Pool],
    deployments: &[Arc<DynamicObject>],
    machines: &[Arc<DynamicObject>],
) -> Membership {
    let in_ns = |o: &DynamicObject| o.metadata.namespace.as_deref() == Some(spec.namespace.as_str());
    let md_of_pool: Vec<Option<&String>> = pools.iter().map(|p| spec.machine_deployments.get(&p.name)).collect();
    let replicas = md_of_pool
        .iter()
        .map(|md| {
            let md = (*md)?;
            deployments
                .iter()
                .find(|d| in_ns(d) && d.metadata.name.as_ref() == Some(md))
                .map(|d| replicas(d).unwrap_or(0))
        })
        .collect();
    let mut nodes = HashMap::new();
    for m in machines.iter().filter(|m| in_ns(m)) {
        let (Some(md), Some(node)) = (m.labels().get(DEPLOYMENT_NAME_LABEL), machine_node(m)) else {
            continue;
        };
        if let Some(pool) = md_of_pool.iter().position(|p| *p == Some(md)) {
            nodes.insert(node.to_string(), (pool, machine_removing(m)));
        }
    }
    Membership { nodes, replicas }
}

/// Scales the MachineDeployments of one ComputeCluster.
pub struct ClusterApiProvider<'a> {
    /// The client.
    pub client: Client,
    /// The served resources.
    pub resources: &'a Resources,
    /// `spec.provider.clusterAPI`.
    pub spec: &'a ClusterApiSpec,
    /// The cached Machines (to find a node's Machine).
    pub machines: &'a [Arc<DynamicObject>],
}

impl ClusterApiProvider<'_> {
    fn deployments(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.spec.namespace,
            &self.resources.machine_deployments,
        )
    }

    async fn set_replicas(&self, pool: &Pool, replicas: u32) -> kube::Result<()> {
        let Some(md) = self.spec.machine_deployments.get(&pool.name) else {
            return Ok(());
        };
        let patch = json!({"spec": {"replicas": replicas}});
        self.deployments()
            .patch(md, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

impl NodeProvider for ClusterApiProvider<'_> {
    async fn grow(&self, pool: &Pool, _existing: &[String], size: u32, add: u32) -> kube::Result<Vec<String>> {
        self.set_replicas(pool, size + add).await?;
        Ok(Vec::new())
    }

    async fn remove(&self, pool: &Pool, size: u32, nodes: &[NodeRef]) -> kube::Result<()> {
        let machines: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.spec.namespace, &self.resources.machines);
        let mut marked = 0;
        for node in nodes {
            let Some(m) = self.machines.iter().find(|m| {
                m.metadata.namespace.as_deref() == Some(self.spec.namespace.as_str())
                    && machine_node(m) == Some(node.name.as_str())
            }) else {
                continue;
            };
            if !machine_removing(m) {
                let at = Timestamp::now().to_string();
                let patch = json!({"metadata": {"annotations": {DELETE_MACHINE_ANNOTATION: at}}});
                machines
                    .patch(&m.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            marked += 1;
        }
        if marked > 0 {
            self.set_replicas(pool, size.saturating_sub(marked)).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: serde_json::Value) -> Arc<DynamicObject> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn nodes_map_to_pools_through_their_machines() {
        let spec: ClusterApiSpec =
            serde_json::from_value(json!({"namespace": "capi", "machineDeployments": {"a100": "md-a100"}})).unwrap();
        let pools: Vec<Pool> = serde_json::from_value(json!([
            {"name": "a100", "capacity": {"cpu": "24", "memory": "220Gi"}, "maxNodes": 4},
            {"name": "cpu", "capacity": {"cpu": "8", "memory": "32Gi"}, "maxNodes": 4}
        ]))
        .unwrap();
        let mds = vec![
            obj(
                json!({"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "MachineDeployment",
                "metadata": {"name": "md-a100", "namespace": "capi"}, "spec": {"replicas": 2}}),
            ),
            obj(
                json!({"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "MachineDeployment",
                "metadata": {"name": "md-a100", "namespace": "elsewhere"}, "spec": {"replicas": 9}}),
            ),
        ];
        let machine = |name: &str, node: Option<&str>, marked: bool| {
            let mut m = json!({"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine",
                "metadata": {"name": name, "namespace": "capi", "labels": {DEPLOYMENT_NAME_LABEL: "md-a100"}},
                "status": {}});
            if let Some(n) = node {
                m["status"]["nodeRef"] = json!({"name": n});
            }
            if marked {
                m["metadata"]["annotations"] = json!({DELETE_MACHINE_ANNOTATION: "now"});
            }
            obj(m)
        };
        let machines = vec![
            machine("m0", Some("node-0"), false),
            machine("m1", Some("node-1"), true),
            machine("m2", None, false),
        ];
        let m = membership(&spec, &pools, &mds, &machines);
        assert_eq!(m.replicas, vec![Some(2), None]);
        assert_eq!(m.nodes["node-0"], (0, false));
        assert_eq!(m.nodes["node-1"], (0, true));
        assert_eq!(m.nodes.len(), 2);
    }

    #[test]
    fn stripping_keeps_what_is_read() {
        let mut m: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine",
            "metadata": {"name": "m0", "namespace": "capi", "annotations": {DELETE_MACHINE_ANNOTATION: "x", "big": "y"},
                         "labels": {DEPLOYMENT_NAME_LABEL: "md"}},
            "spec": {"clusterName": "c", "bootstrap": {"dataSecretName": "s"}},
            "status": {"nodeRef": {"name": "n0"}, "conditions": [{"type": "Ready"}]}
        }))
        .unwrap();
        strip(&mut m);
        assert_eq!(machine_node(&m), Some("n0"));
        assert!(machine_removing(&m));
        assert_eq!(m.annotations().len(), 1);
        assert!(m.data["spec"]["clusterName"].is_null());
        assert_eq!(m.labels()[DEPLOYMENT_NAME_LABEL], "md");
    }
}
