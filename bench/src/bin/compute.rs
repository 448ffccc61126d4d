//! ComputeCluster benchmark (`make bench`; the cluster parts need `make
//! cluster`):
//!
//! 1. Planner: one planning pass (`autoscaler::plan::plan`) for 10,000
//!    waiting pods over 20 pools with 500 partly used nodes, and for a queue
//!    of 2,000 runs (gangs of 1 to 8 pods, 20 workspaces with quotas). Goal:
//!    under 20 ms. Baselines measured in the same run on the same input:
//!    - the floor: cloning and sorting the pods, which any planner pays;
//!    - naive first fit: every pod in arrival order scans every bin of every
//!      pool it may use, then opens a node: the obvious planner, for its time
//!      and for how many nodes it asks for (first-fit decreasing should ask
//!      for no more).
//! 2. Latency on the local cluster: from creating an unschedulable pod that
//!    selects a ComputeCluster (it needs a whole new node) to its node being
//!    Ready, p50/p99 over 100 pods one at a time, split into mlplane's part
//!    (pod created -> Node created) and KWOK's (Node created -> Ready); the
//!    KWOK stage delay configured for node readiness is read from
//!    tests/cluster/kwok.yaml and printed. Goal: p99 of mlplane's part under
//!    2 s.
//! 3. Memory: the operator's peak RSS with the cluster's 4 default nodes,
//!    then with 1,000 more (a kwok pool with minNodes 1000, which the
//!    operator creates; the time until all are Ready is printed too).
//!
//! The operator runs as the chart's ServiceAccount (release build via
//! MLPLANE_BIN), on its own Lease. `compute --planner-only` runs part 1 alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use mlplane::api::ComputeCluster;
use mlplane::autoscaler::admission::{Outcome, Quota};
use mlplane::autoscaler::binpack::{Constraints, Item, pool_bit, sort_decreasing};
use mlplane::autoscaler::plan::{DemandInput, NodeInput, NodeState, PlanInput, PoolInput, QueueInput, plan};
use mlplane::autoscaler::providers::no_schedule as taint;
use mlplane::autoscaler::resources::Resources;
use mlplane_test_support::*;
use serde_json::json;

/// A small, fixed PRNG (xorshift64*): the same input on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const POOLS: usize = 20;
const PODS: usize = 10_000;
const NODES: usize = 500;
const RUNS: usize = 2_000;

fn pools() -> Vec<PoolInput> {
    (0..POOLS)
        .map(|i| {
            let gpu = i % 2 == 1;
            let shape = Resources {
                cpu: [8, 16, 32, 48, 64][i % 5] * 1000,
                memory: [32i64, 64, 128, 192, 256][i % 5] << 30,
                gpu: if gpu { [1, 2, 4, 8][i % 4] } else { 0 },
                pods: 110,
                ..Default::default()
            };
            let name = format!("pool-{i}");
            let mut taints = vec![taint("mlplane.io/compute-cluster", "bench")];
            if gpu {
                taints.push(taint("nvidia.com/gpu", "present"));
            }
            PoolInput {
                labels: BTreeMap::from([
                    ("mlplane.io/compute-cluster".to_string(), "bench".to_string()),
                    ("mlplane.io/pool".to_string(), name.clone()),
                ]),
                name,
                taints,
                shape,
                min_nodes: 0,
                max_nodes: 1000,
                scalable: true,
                size: (NODES / POOLS) as u32,
                upcoming: 0,
            }
        })
        .collect()
}

fn constraints(rng: &mut Rng, gpu: bool) -> Constraints {
    let mut spec = json!({
        "containers": [],
        "nodeSelector": {"mlplane.io/compute-cluster": "bench"},
        "tolerations": [{"key": "mlplane.io/compute-cluster", "operator": "Equal", "value": "bench", "effect": "NoSchedule"}]
    });
    if gpu {
        spec["tolerations"]
            .as_array_mut()
            .unwrap()
            .push(json!({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}));
    }
    // Half the pods pick a pool (instanceType), the rest take any that fits.
    if rng.below(2) == 0 {
        let pool = if gpu { 1 + 2 * rng.below(10) } else { 2 * rng.below(10) };
        spec["nodeSelector"]["mlplane.io/pool"] = json!(format!("pool-{pool}"));
    }
    Constraints::of(&serde_json::from_value(spec).unwrap())
}

fn request(rng: &mut Rng, gpu: bool) -> Resources {
    Resources {
        cpu: 100 * (1 + rng.below(80)) as i64,
        memory: (128 << 20) * (1 + rng.below(64)) as i64,
        gpu: if gpu { 1 + rng.below(2) as i64 } else { 0 },
        pods: 1,
        ..Default::default()
    }
}

/// 10,000 distinct pending pods (30% GPU) over 20 pools with 500 nodes.
fn demand_input() -> PlanInput {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let pools = pools();
    let nodes = (0..NODES)
        .map(|i| {
            let pool = i % POOLS;
            let capacity = pools[pool].shape.clone();
            let mut free = capacity.clone();
            free.cpu = free.cpu * rng.below(100) as i64 / 100;
            free.memory = free.memory * rng.below(100) as i64 / 100;
            NodeInput {
                name: format!("node-{i}"),
                pool,
                capacity,
                free,
                ready: true,
                schedulable: true,
                state: NodeState::Live,
                busy: true,
                idle_since: None,
                blocked: None,
            }
        })
        .collect();
    let demand = (0..PODS)
        .map(|_| {
            let gpu = rng.below(10) < 3;
            DemandInput {
                request: request(&mut rng, gpu),
                count: 1,
                constraints: constraints(&mut rng, gpu),
            }
        })
        .collect();
    PlanInput {
        cluster: "bench".into(),
        pools,
        nodes,
        demand,
        idle_time: Duration::from_secs(600),
        now: Timestamp::now(),
        ..Default::default()
    }
}

/// 2,000 queued runs of 1 to 8 pods (about 9,000 pods) in 20 workspaces.
fn queue_input() -> PlanInput {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut input = demand_input();
    input.demand.clear();
    for w in 0..20 {
        input.quotas.insert(
            format!("ws-{w}"),
            Quota {
                cpu: Some(400_000),
                gpu: Some(40),
                max_active_runs: Some(100),
                ..Default::default()
            },
        );
    }
    input.queue = (0..RUNS)
        .map(|i| {
            let gpu = rng.below(10) < 3;
            let ws = format!("ws-{}", i % 20);
            QueueInput {
                key: format!("{ws}/run-{i}"),
                namespace: ws.clone(),
                workspace: Some(ws),
                pod: request(&mut rng, gpu),
                pods: 1 + rng.below(8) as u32,
                constraints: constraints(&mut rng, gpu),
            }
        })
        .collect();
    input
}

/// The naive planner: pods in arrival order, every bin of every allowed pool
/// scanned, then a new node in the first allowed pool with room. Returns
/// the new nodes, their CPU cores and the pods left unplaced.
fn naive_first_fit(input: &PlanInput) -> (u32, i64, u32) {
    let mut bins: Vec<(usize, Resources)> = input.nodes.iter().map(|n| (n.pool, n.free.clone())).collect();
    let mut room: Vec<u32> = input.pools.iter().map(|p| p.max_nodes - p.size).collect();
    let mut opened = 0;
    let mut cores = 0;
    let mut unplaced = 0;
    for d in &input.demand {
        let allowed: Vec<usize> = (0..input.pools.len())
            .filter(|p| {
                d.constraints
                    .mismatch(&input.pools[*p].labels, &input.pools[*p].taints)
                    .is_none()
            })
            .collect();
        if let Some(b) = bins
            .iter_mut()
            .find(|(p, free)| allowed.contains(p) && free.fits(&d.request))
        {
            b.1.sub(&d.request);
            continue;
        }
        if let Some(&p) = allowed
            .iter()
            .find(|p| room[**p] > 0 && input.pools[**p].shape.fits(&d.request))
        {
            room[p] -= 1;
            opened += 1;
            cores += input.pools[p].shape.cpu / 1000;
            let mut free = input.pools[p].shape.clone();
            free.sub(&d.request);
            bins.push((p, free));
        } else {
            unplaced += 1;
        }
    }
    (opened, cores, unplaced)
}

/// The floor: copy the pods and sort them biggest first (as the planner
/// does).
fn floor(input: &PlanInput) -> usize {
    let mut items: Vec<Item> = input
        .demand
        .iter()
        .map(|d| Item {
            request: d.request.clone(),
            count: d.count,
            pools: pool_bit(0),
        })
        .collect();
    sort_decreasing(&mut items);
    items.len()
}

/// Median, 90th percentile and minimum of `f`'s duration over `n` runs
/// (after one warm-up), in ms.
fn time<T>(n: usize, mut f: impl FnMut() -> T) -> (f64, f64, f64, T) {
    let mut out = f();
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            out = std::hint::black_box(f());
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[n / 2], ms[n * 9 / 10], ms[0], out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn planner() {
    println!("== planner: one pass, {PODS} waiting pods, {POOLS} pools, {NODES} partly used nodes");
    let input = demand_input();
    let (p50, p90, min, result) = time(20, || plan(&input));
    let opened: u32 = result.pools.iter().map(|p| p.add).sum();
    let cores: i64 = result
        .pools
        .iter()
        .zip(&input.pools)
        .map(|(pp, p)| i64::from(pp.add) * p.shape.cpu / 1000)
        .sum();
    let (f50, _, _, _) = time(20, || floor(&input));
    let (n50, _, _, (naive_opened, naive_cores, naive_unplaced)) = time(5, || naive_first_fit(&input));
    println!("{:<52} {:>10}", "measure", "value");
    println!("{:<52} {:>10.2}", "plan: median ms (p90, min)", p50);
    println!("{:<52} {:>10}", "", format!("({p90:.2}, {min:.2})"));
    println!("{:<52} {:>10}", "plan: new nodes asked for", opened);
    println!("{:<52} {:>10}", "plan: CPU cores of those nodes", cores);
    println!("{:<52} {:>10}", "plan: pods left unplaced", result.unplaced_pods);
    println!("{:<52} {:>10.2}", "baseline floor (clone + sort): median ms", f50);
    println!("{:<52} {:>10.2}", "baseline naive first fit: median ms", n50);
    println!("{:<52} {:>10}", "baseline naive first fit: new nodes", naive_opened);
    println!(
        "{:<52} {:>10}",
        "baseline naive first fit: CPU cores of those", naive_cores
    );
    println!(
        "{:<52} {:>10}",
        "baseline naive first fit: pods left unplaced", naive_unplaced
    );
    println!(
        "plan {p50:.2} ms (goal < 20 ms: {}); {:.1}x the floor, {:.1}x faster than naive first fit; new nodes {opened} ({cores} cores) vs naive {naive_opened} ({naive_cores} cores); unplaced {} vs naive {naive_unplaced}",
        if p50 < 20.0 { "met" } else { "NOT met" },
        p50 / f50.max(1e-9),
        n50 / p50.max(1e-9),
        result.unplaced_pods,
    );

    println!("== planner: admission queue of {RUNS} runs (gangs of 1-8 pods), 20 workspaces with quotas");
    let input = queue_input();
    let pods: u32 = input.queue.iter().map(|q| q.pods).sum();
    let (q50, q90, _, result) = time(20, || plan(&input));
    let admitted = result
        .outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Admitted(_)))
        .count();
    println!("{:<52} {:>10}", "queued pods", pods);
    println!("{:<52} {:>10.2}", "plan: median ms", q50);
    println!("{:<52} {:>10.2}", "plan: p90 ms", q90);
    println!("{:<52} {:>10}", "runs admitted", admitted);
    println!(
        "queue pass {q50:.2} ms (goal < 20 ms: {})",
        if q50 < 20.0 { "met" } else { "NOT met" }
    );
}

/// The configured delay (ms) of KWOK's node-initialize stage.
fn kwok_node_delay_ms() -> Result<u64> {
    let text = std::fs::read_to_string(repo_root().join("tests/cluster/kwok.yaml"))?;
    for doc in text.split("\n---") {
        if doc.contains("name: node-initialize") {
            let v: serde_json::Value = serde_yaml::from_str(doc)?;
            return Ok(v["spec"]["delay"]["durationMilliseconds"].as_u64().unwrap_or(0));
        }
    }
    bail!("no node-initialize stage in tests/cluster/kwok.yaml")
}

async fn create_cc(admin: &Client, name: &str, pool: serde_json::Value) -> Result<()> {
    let cc: ComputeCluster = serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "ComputeCluster", "metadata": {"name": name},
        "spec": {"provider": {"kwok": {}}, "pools": [pool], "idleTimeBeforeScaleDown": "1h"},
    }))?;
    Api::<ComputeCluster>::all(admin.clone())
        .create(&PostParams::default(), &cc)
        .await?;
    Ok(())
}

/// First-seen and Ready times of the nodes of a cluster, as a watch sees them.
type Seen = Arc<Mutex<HashMap<String, (Instant, Option<Instant>)>>>;

fn watch_nodes(admin: &Client, cc: &str) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let api: Api<Node> = Api::all(admin.clone());
    let cfg = watcher::Config::default().labels(&format!("mlplane.io/compute-cluster={cc}"));
    let task = tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, cfg));
        while let Some(ev) = events.next().await {
            let (Ok(watcher::Event::Apply(n)) | Ok(watcher::Event::InitApply(n))) = ev else {
                continue;
            };
            let now = Instant::now();
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let mut m = s.lock().unwrap();
            let e = m.entry(n.name_any()).or_insert((now, None));
            if ready && e.1.is_none() {
                e.1 = Some(now);
            }
        }
    });
    (seen, task)
}

async fn latency(admin: &Client) -> Result<()> {
    const N: usize = 100;
    println!("== latency: unschedulable pod -> its new node Ready, {N} pods one at a time");
    let cc = format!("bench-lat-{}", random_suffix());
    create_cc(
        admin,
        &cc,
        json!({"name": "p", "capacity": {"cpu": "4", "memory": "8Gi"}, "maxNodes": N + 5}),
    )
    .await?;
    let ns = TestNamespace::create(admin, "bench-lat").await?;
    let (seen, task) = watch_nodes(admin, &cc);
    let pods: Api<Pod> = ns.api();
    let (mut mine, mut kwok, mut total) = (vec![], vec![], vec![]);
    for i in 0..N {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("p-{i}")},
            "spec": {"nodeSelector": {"mlplane.io/compute-cluster": cc},
                     "tolerations": [{"key": "mlplane.io/compute-cluster", "operator": "Exists"}],
                     "containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "4"}}}]}
        }))?;
        let before: usize = seen.lock().unwrap().len();
        let t0 = Instant::now();
        pods.create(&PostParams::default(), &pod).await?;
        let deadline = t0 + Duration::from_secs(60);
        let (created, ready) = loop {
            {
                let m = seen.lock().unwrap();
                if m.len() > before
                    && let Some((c, Some(r))) = m.values().filter(|(c, _)| *c >= t0).copied().next()
                {
                    break (c, r);
                }
            }
            if Instant::now() > deadline {
                bail!("no Ready node for pod {i} after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        mine.push(created.duration_since(t0).as_secs_f64() * 1000.0);
        kwok.push(ready.duration_since(created).as_secs_f64() * 1000.0);
        total.push(ready.duration_since(t0).as_secs_f64() * 1000.0);
    }
    task.abort();
    for v in [&mut mine, &mut kwok, &mut total] {
        v.sort_by(f64::total_cmp);
    }
    let delay = kwok_node_delay_ms()?;
    println!("{:<52} {:>10} {:>10}", "measure (ms)", "p50", "p99");
    println!(
        "{:<52} {:>10.0} {:>10.0}",
        "pod created -> node Ready (total)",
        percentile(&total, 0.5),
        percentile(&total, 0.99)
    );
    println!(
        "{:<52} {:>10.0} {:>10.0}",
        "mlplane: pod created -> Node object created",
        percentile(&mine, 0.5),
        percentile(&mine, 0.99)
    );
    println!(
        "{:<52} {:>10.0} {:>10.0}",
        "KWOK: Node created -> Ready",
        percentile(&kwok, 0.5),
        percentile(&kwok, 0.99)
    );
    println!("KWOK's configured node-initialize delay (tests/cluster/kwok.yaml): {delay} ms");
    let p99 = percentile(&mine, 0.99);
    println!(
        "mlplane p99 {p99:.0} ms (goal < 2000 ms: {})",
        if p99 < 2000.0 { "met" } else { "NOT met" }
    );
    let _ = Api::<ComputeCluster>::all(admin.clone())
        .delete(&cc, &DeleteParams::default())
        .await;
    drop(ns);
    Ok(())
}

async fn memory(admin: &Client, op: &Operator, baseline_kib: u64) -> Result<()> {
    const N: usize = 1_000;
    println!("== memory: operator peak RSS with the 4 default nodes, then with {N} more");
    let cc = format!("bench-mem-{}", random_suffix());
    let (seen, task) = watch_nodes(admin, &cc);
    let start = Instant::now();
    create_cc(
        admin,
        &cc,
        json!({"name": "p", "capacity": {"cpu": "8", "memory": "32Gi"}, "minNodes": N, "maxNodes": N}),
    )
    .await?;
    loop {
        let ready = seen.lock().unwrap().values().filter(|(_, r)| r.is_some()).count();
        if ready >= N {
            break;
        }
        if start.elapsed() > Duration::from_secs(900) {
            bail!(
                "only {ready} of {N} nodes Ready after 900 s; operator log:\n{}",
                op.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready_secs = start.elapsed().as_secs_f64();
    task.abort();
    // Steady state with the nodes: a few resyncs and lease renewals.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let with_nodes = peak_rss_kib(op.child.id());
    println!("{:<52} {:>10}", "measure", "value");
    println!(
        "{:<52} {:>10.1}",
        "peak RSS, 4 default nodes (MiB)",
        baseline_kib as f64 / 1024.0
    );
    println!(
        "{:<52} {:>10.1}",
        "peak RSS, + 1,000 pool nodes (MiB)",
        with_nodes as f64 / 1024.0
    );
    println!("{:<52} {:>10.1}", "seconds until the 1,000 nodes are Ready", ready_secs);
    println!(
        "{:<52} {:>10.1}",
        "KiB per node",
        (with_nodes.saturating_sub(baseline_kib)) as f64 / N as f64
    );
    let _ = Api::<ComputeCluster>::all(admin.clone())
        .delete(&cc, &DeleteParams::default())
        .await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    planner();
    // `compute --planner-only`: the pure part, no cluster needed.
    if std::env::args().any(|a| a == "--planner-only") {
        return Ok(());
    }
    let admin = bench_cluster().await?;
    let lease = format!("bench-cc-{}", random_suffix());
    let op = Operator::start(&admin, &["--lease-name", &lease]).await?;
    // The baseline: the operator settled with only the default nodes.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let baseline = peak_rss_kib(op.child.id());
    latency(&admin).await?;
    memory(&admin, &op, baseline).await?;
    drop(op);
    Ok(())
}
