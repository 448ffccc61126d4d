//! One planning pass of a ComputeCluster: where waiting pods go, which
//! queued runs start, how many nodes each pool should have, and which idle
//! nodes to drain.
//!
//! Owns: [`plan`] and its input and output types. Pure (the caller passes
//! `now`); must not touch the API server.
//!
//! The pass:
//! 1. Bins: every schedulable node of the cluster's pools with its free
//!    capacity (fullest first, so idle nodes stay idle and can go), then one
//!    full bin per node already asked for but not seen yet.
//! 2. Demand: the pods that wait for this cluster (pods of admitted runs not
//!    on a node yet, and other unbound pods selecting the cluster) are
//!    packed first-fit decreasing; pools open new nodes up to `maxNodes`.
//! 3. Queue: each waiting run in arrival order (see [`super::admission`]);
//!    an admitted run's pods are packed as a gang on top of step 2.
//! 4. Sizes: each pool wants its live nodes plus the nodes it opened, and
//!    at least `minNodes`. A pool that must grow first takes back nodes it
//!    was draining.
//! 5. Scale-down: a live, ready node with no pod other than DaemonSet pods
//!    (so never one with a run's pod), idle for `idleTimeBeforeScaleDown`,
//!    given no pod by this pass, and not protected by a
//!    PodDisruptionBudget, is drained, longest idle first, while the pool
//!    stays at `minNodes` or more. Nothing is drained in a pool that grows.
//!    A draining node that got a pod again is taken back.
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::jiff::Timestamp;

use super::admission::{Outcome, PoolView, QueuedRun, Quota, Usage, decide};
use super::binpack::{Constraints, Item, Packer, PoolMask, pool_bit, sort_decreasing};
use super::resources::Resources;

/// A pool as the planner sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolInput {
    /// Pool name.
    pub name: String,
    /// Labels of the pool's nodes.
    pub labels: BTreeMap<String, String>,
    /// Taints of the pool's nodes.
    pub taints: Vec<Taint>,
    /// A new node's allocatable minus the requests of the DaemonSets that
    /// would run on it.
    pub shape: Resources,
    /// `minNodes`.
    pub min_nodes: u32,
    /// `maxNodes`.
    pub max_nodes: u32,
    /// Whether the provider can add and remove nodes (not `static`).
    pub scalable: bool,
    /// The pool's size as its provider counts it: every node it has or has
    /// been asked for (a MachineDeployment's replicas).
    pub size: u32,
    /// Nodes asked for but not seen yet.
    pub upcoming: u32,
}

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodeState {
    /// In service.
    #[default]
    Live,
    /// Cordoned by the autoscaler to be removed.
    Draining,
    /// Its removal was requested.
    Removing,
}

/// A node of one of the cluster's pools.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInput {
    /// Node name.
    pub name: String,
    /// Pool index.
    pub pool: usize,
    /// Allocatable minus the DaemonSet overhead of its pool.
    pub capacity: Resources,
    /// `capacity` minus the requests of its live non-DaemonSet pods.
    pub free: Resources,
    /// Whether it is Ready.
    pub ready: bool,
    /// Whether pods can go there: Ready (or still starting) and not cordoned.
    pub schedulable: bool,
    /// Its state.
    pub state: NodeState,
    /// Whether it runs a pod that is not a DaemonSet's.
    pub busy: bool,
    /// Since when it has run only DaemonSet pods (`None`: busy).
    pub idle_since: Option<Timestamp>,
    /// Why it cannot be drained now (a PodDisruptionBudget), if so.
    pub blocked: Option<String>,
}

/// Identical pods waiting for the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DemandInput {
    /// The effective request of one pod.
    pub request: Resources,
    /// How many.
    pub count: u32,
    /// Where they may run.
    pub constraints: Constraints,
}

/// A run waiting for admission.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueInput {
    /// `namespace/name` of its Job.
    pub key: String,
    /// Its namespace.
    pub namespace: String,
    /// Its workspace.
    pub workspace: Option<String>,
    /// The effective request of one pod.
    pub pod: Resources,
    /// Pods of the run.
    pub pods: u32,
    /// Where its pods may run.
    pub constraints: Constraints,
}

/// Everything one pass decides from.
#[derive(Clone, Debug, Default)]
pub struct PlanInput {
    /// The ComputeCluster's name.
    pub cluster: String,
    /// `spec.workspaces`.
    pub allowed: Vec<String>,
    /// Pools in `spec.pools` order (the order pools are preferred in).
    pub pools: Vec<PoolInput>,
    /// Nodes of the pools.
    pub nodes: Vec<NodeInput>,
    /// Pods waiting for the cluster.
    pub demand: Vec<DemandInput>,
    /// Runs waiting for admission, in arrival order.
    pub queue: Vec<QueueInput>,
    /// Quotas of the workspaces in the queue.
    pub quotas: HashMap<String, Quota>,
    /// What those workspaces use now.
    pub usage: HashMap<String, Usage>,
    /// `idleTimeBeforeScaleDown`.
    pub idle_time: Duration,
    /// The time of the pass.
    pub now: Timestamp,
}

/// What one pool should do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolPlan {
    /// Nodes it should have once this pass is carried out.
    pub desired: u32,
    /// New nodes to ask for.
    pub add: u32,
    /// Waiting pods placed on it (existing or new nodes).
    pub pending_pods: u32,
    /// Idle nodes to cordon and drain.
    pub drain: Vec<String>,
    /// Draining nodes to put back in service.
    pub undrain: Vec<String>,
    /// Idle nodes that cannot be drained, and why.
    pub blocked: Vec<(String, String)>,
}

/// The result of a pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// One per pool, in order.
    pub pools: Vec<PoolPlan>,
    /// One per queued run, in the order of [`PlanInput::queue`].
    pub outcomes: Vec<Outcome>,
    /// Pods waiting (all of [`PlanInput::demand`]).
    pub pending_pods: u32,
    /// Waiting pods no pool can take now.
    pub unplaced_pods: u32,
    /// When the next idle node becomes removable (to plan again then).
    pub wake_in: Option<Duration>,
}

/// Pools whose nodes may run pods with `c`, and why the others may not.
fn pools_for(c: &Constraints, pools: &[PoolInput]) -> (PoolMask, Vec<String>) {
    let mut mask = 0;
    let mut why = Vec::new();
    for (i, p) in pools.iter().enumerate() {
        match c.mismatch(&p.labels, &p.taints) {
            None => mask |= pool_bit(i),
            Some(reason) => why.push(format!("pool {}: {reason}", p.name)),
        }
    }
    (mask, why)
}

/// Pools per distinct constraints, worked out once: pods alike (every pod
/// of a Job, pods of one workload) share their constraints, and checking
/// each pool's labels and taints for every pod would be most of a pass.
struct MaskCache<'a> {
    pools: &'a [PoolInput],
    known: HashMap<u64, Vec<(Constraints, PoolMask)>>,
}

impl<'a> MaskCache<'a> {
    fn new(pools: &'a [PoolInput]) -> Self {
        Self {
            pools,
            known: HashMap::new(),
        }
    }

    fn mask(&mut self, c: &Constraints) -> PoolMask {
        let same = self.known.entry(c.fingerprint()).or_default();
        if let Some((_, m)) = same.iter().find(|(k, _)| k == c) {
            return *m;
        }
        let m = pools_for(c, self.pools).0;
        same.push((c.clone(), m));
        m
    }
}

/// How long a node has been idle at `now`.
fn idle_for(node: &NodeInput, now: Timestamp) -> Option<Duration> {
    let since = node.idle_since?;
    let d = now.duration_since(since);
    Some(Duration::try_from(d).unwrap_or_default())
}

/// One planning pass (see the module docs).
pub fn plan(input: &PlanInput) -> Plan {
    let pools = &input.pools;
    let room = |p: &PoolInput| {
        if p.scalable {
            p.max_nodes.saturating_sub(p.size)
        } else {
            0
        }
    };
    let mut packer = Packer::new(pools.iter().map(|p| (p.shape.clone(), room(p))));
    // Existing bins, fullest first within each pool, then announced nodes.
    let mut live: Vec<usize> = (0..input.nodes.len())
        .filter(|i| {
            let n = &input.nodes[*i];
            n.state == NodeState::Live && n.schedulable
        })
        .collect();
    live.sort_by(|a, b| {
        let (na, nb) = (&input.nodes[*a], &input.nodes[*b]);
        (na.pool, na.free.size_key(), &na.name).cmp(&(nb.pool, nb.free.size_key(), &nb.name))
    });
    for i in live {
        let n = &input.nodes[i];
        packer.add_bin(n.pool, n.free.clone(), Some(i));
    }
    for (p, pool) in pools.iter().enumerate() {
        for _ in 0..pool.upcoming {
            packer.add_bin(p, pool.shape.clone(), None);
        }
    }

    // Demand, first-fit decreasing.
    let mut masks = MaskCache::new(pools);
    let mut items: Vec<Item> = input
        .demand
        .iter()
        .map(|d| Item {
            request: d.request.clone(),
            count: d.count,
            pools: masks.mask(&d.constraints),
        })
        .collect();
    sort_decreasing(&mut items);
    let mut plan = Plan::default();
    for item in &items {
        plan.pending_pods += item.count;
        plan.unplaced_pods += item.count - packer.place(item);
    }

    // The queue, on top.
    let views: Vec<PoolView> = pools
        .iter()
        .map(|p| PoolView {
            name: p.name.clone(),
            shape: p.shape.clone(),
            max_nodes: if p.scalable { p.max_nodes } else { p.size },
        })
        .collect();
    let queue: Vec<QueuedRun> = input
        .queue
        .iter()
        .map(|q| {
            let mask = masks.mask(&q.constraints);
            let why = if mask == 0 {
                pools_for(&q.constraints, pools).1
            } else {
                Vec::new()
            };
            QueuedRun {
                key: q.key.clone(),
                namespace: q.namespace.clone(),
                workspace: q.workspace.clone(),
                pod: q.pod.clone(),
                pods: q.pods,
                pools: mask,
                excluded: why,
            }
        })
        .collect();
    let mut ever = Packer::new(pools.iter().map(|p| {
        let max = if p.scalable { p.max_nodes } else { 0 };
        (p.shape.clone(), max)
    }));
    for n in &input.nodes {
        if !pools[n.pool].scalable && n.state == NodeState::Live {
            ever.add_bin(n.pool, n.capacity.clone(), None);
        }
    }
    let mut usage = input.usage.clone();
    plan.outcomes = decide(
        &input.cluster,
        &input.allowed,
        &queue,
        &views,
        &mut packer,
        &ever,
        &input.quotas,
        &mut usage,
    );

    // Sizes and scale-down.
    let mut pending = vec![0u32; pools.len()];
    let mut placed_on: Vec<bool> = vec![false; input.nodes.len()];
    for b in packer.bins() {
        pending[b.pool] += b.placed;
        if let Some(i) = b.node
            && b.placed > 0
        {
            placed_on[i] = true;
        }
    }
    for (p, pool) in pools.iter().enumerate() {
        let nodes: Vec<(usize, &NodeInput)> = input.nodes.iter().enumerate().filter(|(_, n)| n.pool == p).collect();
        let live = nodes.iter().filter(|(_, n)| n.state == NodeState::Live).count() as u32;
        let mut draining: Vec<&NodeInput> = nodes
            .iter()
            .map(|(_, n)| *n)
            .filter(|n| n.state == NodeState::Draining)
            .collect();
        draining.sort_by(|a, b| a.name.cmp(&b.name));
        let mut pp = PoolPlan {
            pending_pods: pending[p],
            ..Default::default()
        };
        if !pool.scalable {
            pp.desired = live;
            plan.pools.push(pp);
            continue;
        }
        let mut add = packer.opened(p);
        // Draining nodes that got a pod again go back into service.
        for n in draining.iter().filter(|n| n.busy) {
            pp.undrain.push(n.name.clone());
        }
        let mut idle_draining: Vec<&&NodeInput> = draining.iter().filter(|n| !n.busy).collect();
        let mut kept = live + pool.upcoming + pp.undrain.len() as u32;
        // Below minNodes: grow.
        add = add.max(pool.min_nodes.saturating_sub(kept));
        // A pool that must grow takes back what it was draining first.
        while add > 0
            && let Some(n) = idle_draining.pop()
        {
            pp.undrain.push(n.name.clone());
            add -= 1;
            kept += 1;
        }
        add = add.min(room(pool));
        pp.add = add;
        if add == 0 {
            let mut candidates: Vec<(Duration, &NodeInput)> = nodes
                .iter()
                .filter(|(i, n)| n.state == NodeState::Live && n.ready && n.schedulable && !n.busy && !placed_on[*i])
                .filter_map(|(_, n)| Some((idle_for(n, input.now)?, *n)))
                .collect();
            for (idle, _) in &candidates {
                if *idle < input.idle_time {
                    let left = input.idle_time - *idle;
                    plan.wake_in = Some(plan.wake_in.map_or(left, |w| w.min(left)));
                }
            }
            candidates.retain(|(idle, _)| *idle >= input.idle_time);
            // Longest idle first; the newest name first among equals.
            candidates.sort_by(|(ia, a), (ib, b)| ib.cmp(ia).then_with(|| b.name.cmp(&a.name)));
            let mut removable = kept.saturating_sub(pool.min_nodes);
            for (_, n) in candidates {
                if removable == 0 {
                    break;
                }
                match &n.blocked {
                    Some(why) => pp.blocked.push((n.name.clone(), why.clone())),
                    None => {
                        pp.drain.push(n.name.clone());
                        removable -= 1;
                    }
                }
            }
        }
        pp.desired = (kept + add).saturating_sub(pp.drain.len() as u32);
        plan.pools.push(pp);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscaler::admission::QueueReason;
    use crate::autoscaler::fixtures::{gpu_node as gpu_node_shape, gpu_pod};
    use serde_json::json;

    fn labels() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("mlplane.io/compute-cluster".to_string(), "gpu".to_string()),
            ("mlplane.io/pool".to_string(), "a100".to_string()),
        ])
    }

    fn taints() -> Vec<Taint> {
        vec![crate::autoscaler::providers::cluster_taint("gpu")]
    }

    fn run_constraints() -> Constraints {
        Constraints::of(
            &serde_json::from_value(json!({
                "containers": [],
                "nodeSelector": {"mlplane.io/compute-cluster": "gpu"},
                "tolerations": [{"key": "mlplane.io/compute-cluster", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
            }))
            .unwrap(),
        )
    }

    fn pool(min: u32, max: u32) -> PoolInput {
        PoolInput {
            name: "a100".into(),
            labels: labels(),
            taints: taints(),
            shape: gpu_node_shape(),
            min_nodes: min,
            max_nodes: max,
            scalable: true,
            size: 0,
            upcoming: 0,
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn node(name: &str, busy: bool, idle_since: Option<i64>) -> NodeInput {
        let mut free = gpu_node_shape();
        if busy {
            free.sub(&gpu_pod());
        }
        NodeInput {
            name: name.into(),
            pool: 0,
            capacity: gpu_node_shape(),
            free,
            ready: true,
            schedulable: true,
            state: NodeState::Live,
            busy,
            idle_since: idle_since.map(at),
            blocked: None,
        }
    }

    fn queued(name: &str, pods: u32) -> QueueInput {
        QueueInput {
            key: format!("vision/{name}"),
            namespace: "vision".into(),
            workspace: Some("vision".into()),
            pod: gpu_pod(),
            pods,
            constraints: run_constraints(),
        }
    }

    fn input(pool: PoolInput, nodes: Vec<NodeInput>) -> PlanInput {
        let mut pool = pool;
        pool.size = nodes.len() as u32 + pool.upcoming;
        PlanInput {
            cluster: "gpu".into(),
            pools: vec![pool],
            nodes,
            idle_time: Duration::from_secs(60),
            now: at(1_000),
            ..Default::default()
        }
    }

    #[test]
    fn a_waiting_gpu_run_scales_the_pool_from_zero() {
        let mut i = input(pool(0, 4), vec![]);
        i.queue = vec![queued("r1", 1)];
        let p = plan(&i);
        assert_eq!(p.outcomes, vec![Outcome::Admitted(BTreeMap::from([(0, 1)]))]);
        assert_eq!((p.pools[0].add, p.pools[0].desired, p.pools[0].pending_pods), (1, 1, 1));
        // The next pass sees the Job admitted (its pod as demand) and the node
        // announced: nothing more is added.
        let mut next = input(
            PoolInput {
                upcoming: 1,
                ..pool(0, 4)
            },
            vec![],
        );
        next.demand = vec![DemandInput {
            request: gpu_pod(),
            count: 1,
            constraints: run_constraints(),
        }];
        let p = plan(&next);
        assert_eq!((p.pools[0].add, p.pools[0].desired, p.unplaced_pods), (0, 1, 0));
    }

    #[test]
    fn only_max_nodes_are_made_and_the_rest_waits() {
        let mut i = input(pool(0, 2), vec![]);
        i.queue = (0..4).map(|n| queued(&format!("r{n}"), 1)).collect();
        let p = plan(&i);
        assert_eq!(p.pools[0].add, 2);
        let waiting: Vec<_> = p
            .outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Waiting(QueueReason::WaitingForCapacity, _)))
            .collect();
        assert_eq!(waiting.len(), 2);
        // Demand beyond maxNodes (pods, not runs) is left unplaced.
        let mut i = input(pool(0, 2), vec![]);
        i.demand = vec![DemandInput {
            request: gpu_pod(),
            count: 5,
            constraints: run_constraints(),
        }];
        let p = plan(&i);
        assert_eq!((p.pools[0].add, p.pending_pods, p.unplaced_pods), (2, 5, 3));
    }

    #[test]
    fn a_gang_larger_than_the_pool_is_never_admitted() {
        let mut i = input(pool(0, 2), vec![]);
        i.queue = vec![queued("dist", 3)];
        let p = plan(&i);
        assert!(matches!(
            &p.outcomes[0],
            Outcome::Waiting(QueueReason::ExceedsPoolMaximum, _)
        ));
        assert_eq!(p.pools[0].add, 0, "nothing is made for a run that cannot start");
    }

    #[test]
    fn pods_that_do_not_tolerate_the_pool_taint_say_why() {
        let mut i = input(pool(0, 2), vec![]);
        let mut q = queued("r", 1);
        q.constraints.tolerations.clear();
        i.queue = vec![q];
        let p = plan(&i);
        let Outcome::Waiting(QueueReason::ExceedsPoolMaximum, msg) = &p.outcomes[0] else {
            panic!("{:?}", p.outcomes)
        };
        assert!(
            msg.contains("pool a100: the taint mlplane.io/compute-cluster=gpu:NoSchedule"),
            "{msg}"
        );
    }

    #[test]
    fn min_nodes_are_kept_without_demand() {
        let p = plan(&input(pool(2, 4), vec![]));
        assert_eq!((p.pools[0].add, p.pools[0].desired), (2, 2));
        // Idle nodes at minNodes stay.
        let nodes = vec![node("n0", false, Some(0)), node("n1", false, Some(0))];
        let p = plan(&input(pool(2, 4), nodes));
        assert!(p.pools[0].drain.is_empty());
        assert_eq!(p.pools[0].desired, 2);
    }

    #[test]
    fn idle_nodes_drain_after_the_idle_time_never_busy_ones_never_below_min() {
        let nodes = vec![
            node("n0", true, None),
            node("n1", false, Some(0)),   // idle 1000 s
            node("n2", false, Some(500)), // idle 500 s
            node("n3", false, Some(990)), // idle 10 s: not yet
        ];
        let mut i = input(pool(2, 4), nodes);
        i.idle_time = Duration::from_secs(60);
        let p = plan(&i);
        // 4 nodes, min 2, n0 busy: two of the idle ones may go, longest idle first.
        assert_eq!(p.pools[0].drain, ["n1", "n2"]);
        assert_eq!(p.pools[0].desired, 2);
        assert_eq!(p.wake_in, Some(Duration::from_secs(50)));
        // A PodDisruptionBudget protects n1: it is reported, n2 and n3 wait.
        let mut i2 = i.clone();
        i2.nodes[1].blocked = Some("PodDisruptionBudget x allows no disruption".into());
        let p = plan(&i2);
        assert_eq!(p.pools[0].drain, ["n2"]);
        assert_eq!(p.pools[0].blocked[0].0, "n1");
    }

    #[test]
    fn pending_demand_keeps_idle_nodes_and_takes_back_draining_ones() {
        let mut i = input(pool(0, 4), vec![node("n0", false, Some(0))]);
        i.demand = vec![DemandInput {
            request: gpu_pod(),
            count: 1,
            constraints: run_constraints(),
        }];
        let p = plan(&i);
        assert!(p.pools[0].drain.is_empty(), "the idle node takes the pod");
        assert_eq!(p.pools[0].add, 0);
        // A draining node is taken back instead of adding a node.
        let mut d = node("n0", false, Some(0));
        d.state = NodeState::Draining;
        d.schedulable = false;
        let mut i = input(pool(0, 4), vec![d]);
        i.demand = vec![DemandInput {
            request: gpu_pod(),
            count: 1,
            constraints: run_constraints(),
        }];
        let p = plan(&i);
        assert_eq!(
            (p.pools[0].add, p.pools[0].undrain.clone()),
            (0, vec!["n0".to_string()])
        );
        // A draining node that got a pod is taken back too.
        let mut busy = node("n1", true, None);
        busy.state = NodeState::Draining;
        let p = plan(&input(pool(0, 4), vec![busy]));
        assert_eq!(p.pools[0].undrain, ["n1"]);
    }

    #[test]
    fn static_pools_only_account() {
        let mut pool = pool(0, 8);
        pool.scalable = false;
        let mut i = input(pool, vec![node("s0", true, None)]);
        i.queue = vec![queued("r1", 1), queued("r2", 1)];
        let p = plan(&i);
        assert_eq!(p.pools[0].add, 0);
        assert!(matches!(
            p.outcomes[0],
            Outcome::Waiting(QueueReason::WaitingForCapacity, _)
        ));
        // Two GPUs can never be had from one static node.
        assert!(matches!(
            plan(&PlanInput {
                queue: vec![queued("r", 2)],
                ..i
            })
            .outcomes[0],
            Outcome::Waiting(QueueReason::ExceedsPoolMaximum, _)
        ));
    }

    #[test]
    fn pools_are_used_in_spec_order() {
        let mut spot = pool(0, 4);
        spot.name = "spot".into();
        spot.labels.insert("mlplane.io/pool".into(), "spot".into());
        let mut i = input(pool(0, 1), vec![]);
        i.pools.push(spot);
        i.queue = vec![queued("a", 1), queued("b", 1)];
        let p = plan(&i);
        assert_eq!(p.outcomes[0], Outcome::Admitted(BTreeMap::from([(0, 1)])));
        assert_eq!(p.outcomes[1], Outcome::Admitted(BTreeMap::from([(1, 1)])));
        assert_eq!((p.pools[0].add, p.pools[1].add), (1, 1));
    }

    /// Cached pools are those worked out afresh, for constraints that differ
    /// only in a toleration, a selector value or an affinity term.
    #[test]
    fn cached_pools_match_pools_worked_out_for_each_pod() {
        let mut other = pool(0, 1);
        other.name = "cpu".into();
        other.labels.insert("mlplane.io/pool".into(), "cpu".into());
        other.taints.clear();
        let pools = vec![pool(0, 1), other];
        let spec = |v: serde_json::Value| Constraints::of(&serde_json::from_value(v).unwrap());
        let affinity = |op: &str| {
            json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "mlplane.io/pool", "operator": op, "values": ["a100"]}]}
            ]}}})
        };
        let variants = [
            run_constraints(),
            Constraints::default(),
            spec(json!({"containers": [], "nodeSelector": {"mlplane.io/pool": "cpu"}})),
            spec(json!({"containers": [], "nodeSelector": {"mlplane.io/pool": "a100"}})),
            spec(json!({"containers": [], "tolerations": [{"operator": "Exists"}]})),
            spec(json!({"containers": [], "tolerations": [{"operator": "Exists"}], "affinity": affinity("In")})),
            spec(json!({"containers": [], "tolerations": [{"operator": "Exists"}], "affinity": affinity("NotIn")})),
        ];
        let mut cache = MaskCache::new(&pools);
        for round in 0..3 {
            for (i, c) in variants.iter().enumerate() {
                assert_eq!(cache.mask(c), pools_for(c, &pools).0, "variant {i}, round {round}");
            }
        }
        assert_eq!(cache.known.values().map(Vec::len).sum::<usize>(), variants.len());
    }
}
