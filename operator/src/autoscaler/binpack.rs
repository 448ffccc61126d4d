//! Placement: whether a pod may run on a pool's nodes, and first-fit bin
//! packing of pods onto existing nodes and onto the nodes a pool may still
//! add.
//!
//! Owns: [`Constraints`] (nodeSelector, required node affinity and
//! tolerations, checked against the labels and taints a pool's nodes carry)
//! and [`Packer`]. Pure; must not touch the API server.
//!
//! The packer holds one bin per node that can take pods (its free capacity)
//! and, per pool, the shape of a new node (allocatable minus DaemonSet
//! overhead) and how many more it may add (`maxNodes` minus the nodes it
//! has). An [`Item`] is `count` identical pods (the pods of one run Job, or
//! one pending pod) with the pools it may use, in the order of
//! `spec.pools`. Placing an item is first fit: the bins of its pools in
//! order (existing and already opened nodes first, fullest first as the
//! caller orders them), then new nodes of the first pool with room. Sorting
//! the items biggest first ([`sort_decreasing`]) makes it first-fit
//! decreasing. A gang
//! ([`Packer::place_gang`]) is placed whole or not at all.
//!
//! Speed: each pool keeps a segment tree of its bins' free capacity
//! (component-wise maxima), so the leftmost bin that may fit is found
//! without scanning the full ones: a pass over 10,000 pods and thousands of
//! nodes takes milliseconds (see `bench/src/bin/compute.rs`).
use std::collections::BTreeMap;

use crate::controllers::cached::CachedPodSpec;
use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration};

use super::resources::Resources;

/// Where a pod may run: the parts of its spec that depend on node labels
/// and taints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Constraints {
    /// `spec.nodeSelector`.
    pub node_selector: BTreeMap<String, String>,
    /// Terms of `requiredDuringSchedulingIgnoredDuringExecution` (any one
    /// must match); empty when the pod has none.
    pub required_terms: Vec<NodeSelectorTerm>,
    /// `spec.tolerations`.
    pub tolerations: Vec<Toleration>,
}

impl Constraints {
    /// The constraints of a pod (or pod template) spec.
    pub fn of(spec: &CachedPodSpec) -> Self {
        Self {
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required_terms: spec
                .affinity
                .as_ref()
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref())
                .map(|r| r.node_selector_terms.clone())
                .unwrap_or_default(),
            tolerations: spec.tolerations.clone().unwrap_or_default(),
        }
    }

    /// A hash of the constraints: pods alike (all pods of a Job) share it,
    /// so their pools are worked out once.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.node_selector.hash(&mut h);
        for t in &self.tolerations {
            (&t.key, &t.operator, &t.value, &t.effect, t.toleration_seconds).hash(&mut h);
        }
        if !self.required_terms.is_empty() {
            format!("{:?}", self.required_terms).hash(&mut h);
        }
        h.finish()
    }

    /// Why a node with these labels and taints cannot run the pod; `None`
    /// when it can.
    pub fn mismatch(&self, labels: &BTreeMap<String, String>, taints: &[Taint]) -> Option<String> {
        for (k, v) in &self.node_selector {
            match labels.get(k) {
                Some(l) if l == v => {}
                Some(l) => return Some(format!("nodeSelector {k}={v} does not match the node label {k}={l}")),
                None => return Some(format!("nodeSelector {k}={v} does not match: nodes have no label {k}")),
            }
        }
        if !self.required_terms.is_empty() && !self.required_terms.iter().any(|t| term_matches(t, labels)) {
            return Some("required node affinity matches none of its labels".into());
        }
        for t in taints {
            let hard = matches!(t.effect.as_str(), "NoSchedule" | "NoExecute");
            if hard && !self.tolerations.iter().any(|tol| tolerates(tol, t)) {
                let value = t.value.as_deref().map(|v| format!("={v}")).unwrap_or_default();
                return Some(format!("the taint {}{value}:{} is not tolerated", t.key, t.effect));
            }
        }
        None
    }
}

fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>) -> bool {
    // Fields (metadata.name) name one node: a pool's new nodes match none.
    if term.match_fields.as_ref().is_some_and(|f| !f.is_empty()) {
        return false;
    }
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    // An empty term matches no objects (as the scheduler reads it).
    !exprs.is_empty() && exprs.iter().all(|e| requirement_matches(e, labels))
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: Option<&String>| s.and_then(|v| v.parse::<i64>().ok());
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => matches!((number(value), number(values.first())), (Some(a), Some(b)) if a > b),
        "Lt" => matches!((number(value), number(values.first())), (Some(a), Some(b)) if a < b),
        _ => false,
    }
}

/// Whether `tol` tolerates `taint` (the scheduler's rules).
pub fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = tol.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    let exists = tol.operator.as_deref() == Some("Exists");
    match tol.key.as_deref().filter(|k| !k.is_empty()) {
        // An empty key with Exists tolerates everything.
        None => exists,
        Some(key) if key != taint.key => false,
        Some(_) if exists => true,
        Some(_) => tol.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
    }
}

/// Pools an item may use, one bit per pool index (at most 64 pools; the API
/// allows 50).
pub type PoolMask = u64;

/// The mask with only pool `i`.
pub fn pool_bit(i: usize) -> PoolMask {
    1u64 << i
}

/// `count` identical pods that may go to the pools in `pools`.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// The effective request of one pod.
    pub request: Resources,
    /// How many pods.
    pub count: u32,
    /// Pools the pods may use.
    pub pools: PoolMask,
}

/// The resources the packer's search tree indexes (extended resources are
/// checked bin by bin).
const DIMS: usize = 5;

fn dims(r: &Resources) -> [i64; DIMS] {
    [r.cpu, r.memory, r.gpu, r.pods, r.ephemeral_storage]
}

/// Sorts items biggest first (GPUs, then CPU, then memory, then ephemeral
/// storage), stable: first-fit decreasing.
///
/// Not by dominant share of a pool's node shape, nor pods that can use
/// fewer pools first: on the planner bench (10,000 pods, 20 pools) those
/// orders asked for about 3,100 new nodes where this one asks for about
/// 2,100, and dominant share left 120 pods unplaced at `maxNodes`.
pub fn sort_decreasing(items: &mut [Item]) {
    items.sort_by_key(|i| std::cmp::Reverse(i.request.size_key()));
}

/// Component-wise maxima of the free capacity of a pool's bins over ranges
/// (a segment tree): the leftmost bin that may fit a request is found by
/// descending only into ranges whose maxima all reach it, typically in
/// O(log n), and a placement updates one path.
#[derive(Clone, Debug, Default)]
struct MaxTree {
    /// Leaves (a power of two).
    cap: usize,
    /// Node `k` covers its children `2k` and `2k + 1`; leaves start at `cap`.
    t: Vec<[i64; DIMS]>,
}

const NONE_FREE: [i64; DIMS] = [i64::MIN; DIMS];

impl MaxTree {
    fn reserve(&mut self, n: usize) {
        if n <= self.cap {
            return;
        }
        let cap = n.next_power_of_two().max(8);
        let mut t = vec![NONE_FREE; 2 * cap];
        if self.cap > 0 {
            t[cap..cap + self.cap].copy_from_slice(&self.t[self.cap..2 * self.cap]);
        }
        for k in (1..cap).rev() {
            t[k] = Self::join(&t[2 * k], &t[2 * k + 1]);
        }
        self.cap = cap;
        self.t = t;
    }

    fn join(a: &[i64; DIMS], b: &[i64; DIMS]) -> [i64; DIMS] {
        std::array::from_fn(|i| a[i].max(b[i]))
    }

    fn set(&mut self, slot: usize, v: [i64; DIMS]) {
        let mut k = slot + self.cap;
        self.t[k] = v;
        while k > 1 {
            k /= 2;
            self.t[k] = Self::join(&self.t[2 * k], &self.t[2 * k + 1]);
        }
    }

    /// The leftmost slot at or after `from` whose free amounts all reach `req`.
    fn first(&self, req: &[i64; DIMS], from: usize) -> Option<usize> {
        if self.cap == 0 {
            return None;
        }
        self.search(1, 0, self.cap, req, from)
    }

    fn search(&self, k: usize, lo: usize, hi: usize, req: &[i64; DIMS], from: usize) -> Option<usize> {
        if hi <= from || !self.t[k].iter().zip(req).all(|(have, want)| have >= want) {
            return None;
        }
        if k >= self.cap {
            return Some(k - self.cap);
        }
        let mid = (lo + hi) / 2;
        self.search(2 * k, lo, mid, req, from)
            .or_else(|| self.search(2 * k + 1, mid, hi, req, from))
    }
}

/// A node that can take pods: an existing one or one the packer opened.
#[derive(Clone, Debug)]
pub struct Bin {
    /// Pool index.
    pub pool: usize,
    /// Free capacity.
    pub free: Resources,
    /// Pods placed on it by the packer.
    pub placed: u32,
    /// The caller's index of an existing node; `None` for a new node.
    pub node: Option<usize>,
    /// Its place in its pool's order.
    slot: usize,
}

#[derive(Clone, Debug)]
struct PoolState {
    shape: Resources,
    room: u32,
    opened: u32,
    /// Bin indices in first-fit order.
    bins: Vec<usize>,
    tree: MaxTree,
}

/// One placement made while placing a gang, undone if the gang does not fit.
#[derive(Clone, Debug)]
struct Change {
    bin: usize,
    pods: u32,
    request: Resources,
}

/// Bins and pools being filled (see the module docs).
#[derive(Clone, Debug)]
pub struct Packer {
    pools: Vec<PoolState>,
    bins: Vec<Bin>,
}

impl Packer {
    /// A packer for pools with these new-node shapes and rooms (nodes each
    /// may still add), and no bins yet.
    pub fn new(pools: impl IntoIterator<Item = (Resources, u32)>) -> Self {
        Self {
            pools: pools
                .into_iter()
                .map(|(shape, room)| PoolState {
                    shape,
                    room,
                    opened: 0,
                    bins: Vec::new(),
                    tree: MaxTree::default(),
                })
                .collect(),
            bins: Vec::new(),
        }
    }

    /// Adds a bin (an existing or announced node of `pool`) with `free`
    /// capacity; bins are tried in the order they are added.
    pub fn add_bin(&mut self, pool: usize, free: Resources, node: Option<usize>) {
        let i = self.bins.len();
        let p = &mut self.pools[pool];
        let slot = p.bins.len();
        p.bins.push(i);
        p.tree.reserve(slot + 1);
        p.tree.set(slot, dims(&free));
        self.bins.push(Bin {
            pool,
            free,
            placed: 0,
            node,
            slot,
        });
    }

    /// Every bin.
    pub fn bins(&self) -> &[Bin] {
        &self.bins
    }

    /// New nodes opened in `pool`.
    pub fn opened(&self, pool: usize) -> u32 {
        self.pools[pool].opened
    }

    fn put(&mut self, bin: usize, req: &Resources, n: u32, log: &mut Option<&mut Vec<Change>>) {
        let b = &mut self.bins[bin];
        b.free.sub(&req.times(i64::from(n)));
        b.placed += n;
        let (slot, free) = (b.slot, dims(&b.free));
        self.pools[b.pool].tree.set(slot, free);
        if let Some(log) = log {
            log.push(Change {
                bin,
                pods: n,
                request: req.clone(),
            });
        }
    }

    fn place_logged(&mut self, item: &Item, mut log: Option<&mut Vec<Change>>) -> u32 {
        let req = &item.request;
        let want = dims(req);
        let mut remaining = item.count;
        let pools: Vec<usize> = (0..self.pools.len())
            .filter(|p| item.pools & pool_bit(*p) != 0)
            .collect();
        // Bins that exist (or were opened earlier), pool by pool, leftmost first.
        for &p in &pools {
            let mut from = 0;
            while remaining > 0 {
                let Some(slot) = self.pools[p].tree.first(&want, from) else {
                    break;
                };
                from = slot + 1;
                let b = self.pools[p].bins[slot];
                let n = if remaining == 1 {
                    i64::from(self.bins[b].free.fits(req))
                } else {
                    self.bins[b].free.fit_count(req).min(i64::from(remaining))
                } as u32;
                if n > 0 {
                    self.put(b, req, n, &mut log);
                    remaining -= n;
                }
            }
        }
        // New nodes, first pool with room first.
        for &p in &pools {
            let per_node = self.pools[p].shape.fit_count(req);
            if per_node <= 0 {
                continue;
            }
            while remaining > 0 && self.pools[p].room > 0 {
                let shape = self.pools[p].shape.clone();
                self.pools[p].room -= 1;
                self.pools[p].opened += 1;
                self.add_bin(p, shape, None);
                let b = self.bins.len() - 1;
                let n = per_node.min(i64::from(remaining)) as u32;
                self.put(b, req, n, &mut log);
                remaining -= n;
            }
        }
        item.count - remaining
    }

    /// Places as many pods of `item` as fit; returns how many.
    pub fn place(&mut self, item: &Item) -> u32 {
        self.place_logged(item, None)
    }

    /// Places every pod of every item, or nothing (then `None`). On success
    /// returns, per pool index, the pods placed there.
    pub fn place_gang(&mut self, items: &[Item]) -> Option<BTreeMap<usize, u32>> {
        let bins_before = self.bins.len();
        let pools_before: Vec<(u32, u32, usize)> =
            self.pools.iter().map(|p| (p.room, p.opened, p.bins.len())).collect();
        let mut log = Vec::new();
        let mut ok = true;
        for item in items {
            if self.place_logged(item, Some(&mut log)) < item.count {
                ok = false;
                break;
            }
        }
        if ok {
            let mut by_pool = BTreeMap::new();
            for c in &log {
                *by_pool.entry(self.bins[c.bin].pool).or_insert(0) += c.pods;
            }
            return Some(by_pool);
        }
        // Undo: give back what went to bins that existed before, then drop
        // the bins opened for the gang.
        for c in log.iter().rev() {
            if c.bin < bins_before {
                let b = &mut self.bins[c.bin];
                b.free.add(&c.request.times(i64::from(c.pods)));
                b.placed -= c.pods;
                let (slot, free) = (b.slot, dims(&b.free));
                self.pools[b.pool].tree.set(slot, free);
            }
        }
        self.bins.truncate(bins_before);
        for (p, (room, opened, len)) in self.pools.iter_mut().zip(pools_before) {
            for slot in len..p.bins.len() {
                p.tree.set(slot, NONE_FREE);
            }
            p.room = room;
            p.opened = opened;
            p.bins.truncate(len);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscaler::providers::no_schedule as taint;
    use serde_json::json;

    fn res(cpu: i64, mem_gi: i64, gpu: i64) -> Resources {
        Resources {
            cpu: cpu * 1000,
            memory: mem_gi << 30,
            gpu,
            pods: 1,
            ..Default::default()
        }
    }

    fn shape(cpu: i64, mem_gi: i64, gpu: i64) -> Resources {
        Resources {
            pods: 110,
            ..res(cpu, mem_gi, gpu)
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn constraints(spec: serde_json::Value) -> Constraints {
        let mut spec = spec;
        spec["containers"] = json!([]);
        Constraints::of(&serde_json::from_value(spec).unwrap())
    }

    #[test]
    fn node_selector_affinity_and_tolerations_against_pool_labels() {
        let pool_labels = labels(&[("mlplane.io/compute-cluster", "gpu"), ("mlplane.io/pool", "a100")]);
        let taints = [taint("mlplane.io/compute-cluster", "gpu")];
        let run = constraints(json!({
            "nodeSelector": {"mlplane.io/compute-cluster": "gpu"},
            "tolerations": [{"key": "mlplane.io/compute-cluster", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
        }));
        assert_eq!(run.mismatch(&pool_labels, &taints), None);
        // Without the toleration the taint keeps it off.
        let untolerated = constraints(json!({"nodeSelector": {"mlplane.io/compute-cluster": "gpu"}}));
        assert!(
            untolerated
                .mismatch(&pool_labels, &taints)
                .unwrap()
                .contains("mlplane.io/compute-cluster=gpu:NoSchedule")
        );
        // A selector for another pool.
        let other =
            constraints(json!({"nodeSelector": {"mlplane.io/pool": "cpu"}, "tolerations": [{"operator": "Exists"}]}));
        assert!(
            other
                .mismatch(&pool_labels, &taints)
                .unwrap()
                .contains("mlplane.io/pool=cpu")
        );
        // Required node affinity: In, NotIn, Exists, Gt.
        let aff = |expr: serde_json::Value| {
            constraints(json!({
                "tolerations": [{"operator": "Exists"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                    {"nodeSelectorTerms": [{"matchExpressions": [expr]}]}}}
            }))
        };
        let l = labels(&[("mlplane.io/pool", "a100"), ("gpus", "4")]);
        assert!(
            aff(json!({"key": "mlplane.io/pool", "operator": "In", "values": ["a100", "h100"]}))
                .mismatch(&l, &[])
                .is_none()
        );
        assert!(
            aff(json!({"key": "mlplane.io/pool", "operator": "NotIn", "values": ["a100"]}))
                .mismatch(&l, &[])
                .is_some()
        );
        assert!(
            aff(json!({"key": "spot", "operator": "DoesNotExist"}))
                .mismatch(&l, &[])
                .is_none()
        );
        assert!(
            aff(json!({"key": "gpus", "operator": "Gt", "values": ["2"]}))
                .mismatch(&l, &[])
                .is_none()
        );
        assert!(
            aff(json!({"key": "gpus", "operator": "Lt", "values": ["2"]}))
                .mismatch(&l, &[])
                .is_some()
        );
        // PreferNoSchedule taints do not keep pods off.
        let soft = Taint {
            effect: "PreferNoSchedule".into(),
            ..taint("x", "y")
        };
        assert!(Constraints::default().mismatch(&l, &[soft]).is_none());
    }

    #[test]
    fn toleration_rules() {
        let t = taint("k", "v");
        let tol = |v: serde_json::Value| -> Toleration { serde_json::from_value(v).unwrap() };
        assert!(tolerates(&tol(json!({"operator": "Exists"})), &t));
        assert!(tolerates(&tol(json!({"key": "k", "operator": "Exists"})), &t));
        assert!(tolerates(&tol(json!({"key": "k", "value": "v"})), &t));
        assert!(!tolerates(&tol(json!({"key": "k", "value": "w"})), &t));
        assert!(!tolerates(
            &tol(json!({"key": "k", "operator": "Exists", "effect": "NoExecute"})),
            &t
        ));
        assert!(!tolerates(&tol(json!({"key": "other", "operator": "Exists"})), &t));
    }

    #[test]
    fn first_fit_uses_existing_bins_then_opens_nodes_up_to_room() {
        // Pool 0: 8-CPU nodes, room 2; pool 1: 24-CPU nodes, room 1.
        let mut p = Packer::new([(shape(8, 32, 0), 2), (shape(24, 220, 1), 1)]);
        let mut free = shape(8, 32, 0);
        free.sub(&res(6, 1, 0));
        p.add_bin(0, free, Some(7)); // an existing node with 2 CPUs free
        let item = Item {
            request: res(2, 1, 0),
            count: 5,
            pools: pool_bit(0),
        };
        // 1 on the existing node, 4 on one new node: room for 1 more.
        assert_eq!(p.place(&item), 5);
        assert_eq!(p.opened(0), 1);
        assert_eq!(p.bins()[0].placed, 1);
        assert_eq!(p.bins()[1].placed, 4);
        // 9 more fit in pool 0's last node (4) only; pool 1 is not allowed.
        assert_eq!(
            p.place(&Item {
                count: 9,
                ..item.clone()
            }),
            4
        );
        assert_eq!(p.opened(0), 2);
        // With pool 1 allowed too the rest spills over there.
        let both = Item {
            count: 5,
            pools: pool_bit(0) | pool_bit(1),
            ..item
        };
        assert_eq!(p.place(&both), 5);
        assert_eq!(p.opened(1), 1);
    }

    #[test]
    fn gangs_are_all_or_nothing_and_undo_cleanly() {
        let mut p = Packer::new([(shape(24, 220, 1), 2)]);
        let gpu = |count| Item {
            request: res(4, 16, 1),
            count,
            pools: pool_bit(0),
        };
        // 3 one-GPU pods need 3 nodes: room is 2.
        assert!(p.place_gang(&[gpu(3)]).is_none());
        assert_eq!(p.opened(0), 0);
        assert!(p.bins().is_empty());
        let placed = p.place_gang(&[gpu(2)]).unwrap();
        assert_eq!(placed, BTreeMap::from([(0, 2)]));
        assert_eq!(p.opened(0), 2);
        // Undo also restores bins that existed before the gang.
        let mut p = Packer::new([(shape(8, 32, 0), 0)]);
        p.add_bin(0, shape(8, 32, 0), Some(0));
        let cpu = |count| Item {
            request: res(3, 1, 0),
            count,
            pools: pool_bit(0),
        };
        assert!(p.place_gang(&[cpu(3)]).is_none());
        assert_eq!(p.bins()[0].free, shape(8, 32, 0));
        assert_eq!(p.bins()[0].placed, 0);
        assert!(p.place_gang(&[cpu(2)]).is_some());
    }

    #[test]
    fn decreasing_order_packs_tighter_than_arrival_order() {
        // 8-CPU nodes; pods of 2, 2, 6, 6 CPUs: arrival order needs 3 nodes
        // (2+2, 6, 6), biggest first 2 (6+2, 6+2).
        let sizes = [2, 2, 6, 6];
        let items = |order: &[i64]| -> Vec<Item> {
            order
                .iter()
                .map(|c| Item {
                    request: res(*c, 1, 0),
                    count: 1,
                    pools: pool_bit(0),
                })
                .collect()
        };
        let mut arrival = Packer::new([(shape(8, 32, 0), 10)]);
        for i in items(&sizes) {
            arrival.place(&i);
        }
        let mut ffd = Packer::new([(shape(8, 32, 0), 10)]);
        let mut sorted = items(&sizes);
        sort_decreasing(&mut sorted);
        for i in &sorted {
            ffd.place(i);
        }
        assert_eq!(ffd.opened(0), 2);
        assert_eq!(arrival.opened(0), 3);
        // GPUs, then CPU, then memory decide (not the dominant share: see
        // sort_decreasing); equal items keep their order.
        let mut mixed: Vec<Item> = [res(1, 30, 0), res(4, 1, 0), res(1, 1, 1), res(4, 1, 0)]
            .into_iter()
            .enumerate()
            .map(|(n, request)| Item {
                request,
                count: 1 + n as u32,
                pools: pool_bit(0),
            })
            .collect();
        sort_decreasing(&mut mixed);
        let counts: Vec<u32> = mixed.iter().map(|i| i.count).collect();
        assert_eq!(counts, [3, 2, 4, 1]);
    }

    /// The tree finds exactly the bins a plain left-to-right scan finds.
    #[test]
    fn the_search_tree_places_like_a_plain_first_fit_scan() {
        let mut seed = 7u64;
        let mut rand = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut packer = Packer::new([(shape(8, 32, 1), 200), (shape(16, 64, 0), 200)]);
        // Reference: bins as (pool, free) in the same order, scanned linearly.
        let mut reference: Vec<(usize, Resources)> = vec![];
        for _ in 0..40 {
            let pool = rand(2) as usize;
            let mut free = if pool == 0 { shape(8, 32, 1) } else { shape(16, 64, 0) };
            free.sub(&res(rand(8) as i64, rand(32) as i64, 0));
            packer.add_bin(pool, free.clone(), None);
            reference.push((pool, free));
        }
        let shapes = [shape(8, 32, 1), shape(16, 64, 0)];
        let mut rooms = [200u32, 200];
        for _ in 0..600 {
            let item = Item {
                request: res(1 + rand(6) as i64, 1 + rand(20) as i64, rand(2) as i64),
                count: 1 + rand(3) as u32,
                pools: 1 + rand(3),
            };
            let placed = packer.place(&item);
            // The reference placement.
            let mut left = item.count;
            for p in 0..2 {
                if item.pools & pool_bit(p) == 0 {
                    continue;
                }
                for (bp, free) in reference.iter_mut().filter(|(bp, _)| *bp == p) {
                    let _ = bp;
                    while left > 0 && free.fits(&item.request) {
                        free.sub(&item.request);
                        left -= 1;
                    }
                }
            }
            for p in 0..2 {
                if item.pools & pool_bit(p) == 0 || !shapes[p].fits(&item.request) {
                    continue;
                }
                while left > 0 && rooms[p] > 0 {
                    rooms[p] -= 1;
                    let mut free = shapes[p].clone();
                    while left > 0 && free.fits(&item.request) {
                        free.sub(&item.request);
                        left -= 1;
                    }
                    reference.push((p, free));
                }
            }
            assert_eq!(placed, item.count - left);
        }
        // Bins are numbered in creation order in both.
        let ours: Vec<(usize, Resources)> = packer.bins().iter().map(|b| (b.pool, b.free.clone())).collect();
        assert_eq!(ours, reference);
    }

    /// A gang that does not fit leaves the packer as if it had never been
    /// tried (bins, pools and search trees): what comes next lands exactly
    /// where it would have. Some pods ask for an extended resource, which
    /// the trees do not index.
    #[test]
    fn a_failed_gang_leaves_no_trace_on_randomized_inputs() {
        let mut seed = 11u64;
        let mut rand = move |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let fpga = "example.com/fpga".to_string();
        let mut big = shape(16, 64, 0);
        big.extended.insert(fpga.clone(), 2);
        let mut packer = Packer::new([(shape(8, 32, 1), 30), (big.clone(), 30)]);
        for _ in 0..20 {
            let pool = rand(2) as usize;
            let mut free = if pool == 0 { shape(8, 32, 1) } else { big.clone() };
            free.sub(&res(rand(8) as i64, rand(32) as i64, 0));
            packer.add_bin(pool, free, None);
        }
        let item = |rand: &mut dyn FnMut(u64) -> u64| {
            let mut request = res(1 + rand(6) as i64, 1 + rand(20) as i64, rand(2) as i64);
            if rand(4) == 0 {
                request.extended.insert(fpga.clone(), 1);
            }
            Item {
                request,
                count: 1 + rand(4) as u32,
                pools: 1 + rand(3),
            }
        };
        let state = |p: &Packer| {
            let bins: Vec<_> = p
                .bins()
                .iter()
                .map(|b| (b.pool, b.free.clone(), b.placed, b.node))
                .collect();
            (bins, p.opened(0), p.opened(1))
        };
        let (mut failed, mut placed) = (0, 0);
        for _ in 0..400 {
            let gang: Vec<Item> = (0..1 + rand(3)).map(|_| item(&mut rand)).collect();
            let before = packer.clone();
            if packer.place_gang(&gang).is_some() {
                placed += 1;
                continue;
            }
            failed += 1;
            assert_eq!(state(&packer), state(&before));
            let mut twin = before;
            for _ in 0..3 {
                let next = item(&mut rand);
                assert_eq!(packer.place(&next), twin.place(&next));
                assert_eq!(state(&packer), state(&twin));
            }
        }
        assert!(failed > 20 && placed > 20, "{failed} failed, {placed} placed");
    }
}
