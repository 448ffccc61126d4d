//! ComputeCluster status from a pass: per-pool sizes, the queue counts, the
//! phase and the Ready condition.
//!
//! Owns: how a snapshot and its plan become [`ComputeClusterStatus`]. Pure;
//! must not touch the API server.
//!
//! - `pools[]`: `nodes` (every node of the pool, draining ones too),
//!   `readyNodes`, `desiredNodes` (the plan's), `pendingPods` (waiting pods
//!   the plan placed on the pool), `allocatable` (sum over Ready nodes),
//!   `lastScaleUp` / `lastScaleDown` (carried over, set when the pool grew or
//!   shrank).
//! - `queue`: `admitted` (run Jobs holding resources), `waiting` (run Jobs in
//!   the queue).
//! - `phase`: `Degraded` when the cluster cannot be acted on (Ready=False),
//!   `Scaling` while some pool is not at its desired size, has nodes starting
//!   or nodes draining, else `Ready`.
//! - `Ready`: True (`Ready` or `Scaling`) while the provider works and the
//!   spec is valid; False with `InvalidSpec`, `ClusterAPINotInstalled`,
//!   `MachineDeploymentNotFound`.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::snapshot::Snapshot;
use crate::api::{ComputeClusterPhase, PoolStatus, QueueStatus};
use crate::autoscaler::plan::{NodeState, Plan};
use crate::autoscaler::resources::Resources;

/// Ready=False: the spec cannot be acted on (a quantity or duration).
pub const INVALID_SPEC: &str = "InvalidSpec";
/// Ready=False: a clusterAPI cluster, and the Cluster API CRDs are missing.
pub const CLUSTER_API_NOT_INSTALLED: &str = "ClusterAPINotInstalled";
/// Ready=False: a pool's MachineDeployment does not exist.
pub const MACHINE_DEPLOYMENT_NOT_FOUND: &str = "MachineDeploymentNotFound";

/// When each pool last grew and shrank in this pass.
#[derive(Clone, Debug, Default)]
pub struct Scaled {
    /// Per pool.
    pub up: Vec<bool>,
    /// Per pool.
    pub down: Vec<bool>,
}

/// The pools' statuses.
pub fn pools(
    names: &[String],
    prev: &[PoolStatus],
    snap: &Snapshot,
    plan: &Plan,
    scaled: &Scaled,
    now: &Time,
) -> Vec<PoolStatus> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let before = prev.iter().find(|p| &p.name == name);
            let nodes: Vec<_> = snap
                .input
                .nodes
                .iter()
                .zip(&snap.nodes)
                .filter(|(n, _)| n.pool == i)
                .collect();
            let mut allocatable = Resources::default();
            for (_, f) in nodes.iter().filter(|(n, _)| n.ready) {
                allocatable.add(&f.allocatable);
            }
            let pp = plan.pools.get(i).cloned().unwrap_or_default();
            let stamp = |now_set: bool, old: Option<&Option<Time>>| {
                if now_set {
                    Some(now.clone())
                } else {
                    old.cloned().flatten()
                }
            };
            PoolStatus {
                name: name.clone(),
                nodes: nodes.len() as i32,
                ready_nodes: nodes.iter().filter(|(n, _)| n.ready).count() as i32,
                desired_nodes: pp.desired as i32,
                pending_pods: pp.pending_pods as i32,
                allocatable: allocatable.to_quantities(),
                last_scale_up: stamp(
                    scaled.up.get(i).copied().unwrap_or(false),
                    before.map(|b| &b.last_scale_up),
                ),
                last_scale_down: stamp(
                    scaled.down.get(i).copied().unwrap_or(false),
                    before.map(|b| &b.last_scale_down),
                ),
            }
        })
        .collect()
}

/// The queue counts.
pub fn queue(snap: &Snapshot) -> QueueStatus {
    QueueStatus {
        admitted: snap.admitted as i32,
        waiting: snap.queue.len() as i32,
    }
}

/// Phase and the Ready condition's (reason, message) of a cluster that
/// works.
pub fn phase(pools: &[PoolStatus], snap: &Snapshot) -> (ComputeClusterPhase, &'static str, String) {
    let draining = snap.input.nodes.iter().filter(|n| n.state != NodeState::Live).count();
    let moving: Vec<String> = pools
        .iter()
        .filter(|p| p.nodes != p.desired_nodes || p.ready_nodes != p.nodes)
        .map(|p| {
            format!(
                "pool {} has {} node(s) ({} ready), wants {}",
                p.name, p.nodes, p.ready_nodes, p.desired_nodes
            )
        })
        .collect();
    if moving.is_empty() && draining == 0 {
        return (
            ComputeClusterPhase::Ready,
            "Ready",
            "every pool is at its desired size".into(),
        );
    }
    let mut msg = moving.join("; ");
    if draining > 0 {
        if !msg.is_empty() {
            msg.push_str("; ");
        }
        msg.push_str(&format!("{draining} node(s) draining or being removed"));
    }
    (ComputeClusterPhase::Scaling, "Scaling", msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscaler::plan::{NodeInput, PlanInput, PoolPlan};
    use crate::controllers::compute_cluster::snapshot::NodeFacts;
    use k8s_openapi::jiff::Timestamp;

    fn snap(nodes: Vec<(bool, NodeState)>) -> Snapshot {
        let facts = nodes
            .iter()
            .enumerate()
            .map(|(i, _)| NodeFacts {
                name: format!("n{i}"),
                uid: None,
                resource_version: None,
                pool: 0,
                draining_since: None,
                evict: vec![],
                busy: false,
                needs_template: false,
                allocatable: Resources {
                    cpu: 8000,
                    memory: 32 << 30,
                    pods: 110,
                    ..Default::default()
                },
                ready: true,
            })
            .collect();
        Snapshot {
            input: PlanInput {
                nodes: nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (ready, state))| NodeInput {
                        name: format!("n{i}"),
                        ready,
                        state,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
            nodes: facts,
            names: vec![],
            queue: vec![],
            admitted: 2,
            deployment_found: vec![true],
            orphans: vec![],
            idle_now: vec![],
        }
    }

    #[test]
    fn pool_status_counts_and_carries_scale_times() {
        let s = snap(vec![(true, NodeState::Live), (false, NodeState::Live)]);
        let plan = Plan {
            pools: vec![PoolPlan {
                desired: 3,
                pending_pods: 4,
                ..Default::default()
            }],
            ..Default::default()
        };
        let then = Time(Timestamp::from_second(100).unwrap());
        let now = Time(Timestamp::from_second(200).unwrap());
        let prev = vec![PoolStatus {
            name: "a".into(),
            last_scale_down: Some(then.clone()),
            ..Default::default()
        }];
        let scaled = Scaled {
            up: vec![true],
            down: vec![false],
        };
        let p = pools(&["a".into()], &prev, &s, &plan, &scaled, &now);
        assert_eq!(
            (p[0].nodes, p[0].ready_nodes, p[0].desired_nodes, p[0].pending_pods),
            (2, 1, 3, 4)
        );
        assert_eq!(p[0].allocatable["cpu"].0, "8");
        assert_eq!(p[0].last_scale_up, Some(now));
        assert_eq!(p[0].last_scale_down, Some(then));
        let (phase, reason, msg) = phase(&p, &s);
        assert_eq!((phase, reason), (ComputeClusterPhase::Scaling, "Scaling"));
        assert!(msg.contains("pool a has 2 node(s) (1 ready), wants 3"), "{msg}");
        assert_eq!(queue(&s).admitted, 2);
    }

    #[test]
    fn at_size_is_ready_and_draining_is_scaling() {
        let s = snap(vec![(true, NodeState::Live)]);
        let plan = Plan {
            pools: vec![PoolPlan {
                desired: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let now = Time(Timestamp::from_second(1).unwrap());
        let p = pools(&["a".into()], &[], &s, &plan, &Scaled::default(), &now);
        assert_eq!(phase(&p, &s).0, ComputeClusterPhase::Ready);
        let s = snap(vec![(true, NodeState::Live), (true, NodeState::Draining)]);
        let plan = Plan {
            pools: vec![PoolPlan {
                desired: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        let p = pools(&["a".into()], &[], &s, &plan, &Scaled::default(), &now);
        let (ph, _, msg) = phase(&p, &s);
        assert_eq!(ph, ComputeClusterPhase::Scaling);
        assert!(msg.contains("1 node(s) draining"), "{msg}");
    }
}
