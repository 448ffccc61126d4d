//! Resource amounts as integers: a pod's effective requests, a node's
//! allocatable, a pool's node shape, a workspace's usage.
//!
//! Owns: [`Resources`] (CPU in millicores, bytes, counts) and how a pod's
//! requests are computed from its spec. Pure; must not touch the API server.
//!
//! A pod's effective request follows the scheduler: the larger of (the sum
//! of its containers plus its sidecars, i.e. init containers with
//! `restartPolicy: Always`) and (each other init container plus the sidecars
//! started before it), plus the pod overhead, plus one `pods` slot. A
//! container's request for a resource is its `requests` entry, else its
//! `limits` entry (the API server defaults requests to limits).
use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::controllers::cached::{CachedContainer, CachedPodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::quantity;

/// CPU, in cores as quantities.
pub const CPU: &str = "cpu";
/// Memory, in bytes.
pub const MEMORY: &str = "memory";
/// Pod slots of a node.
pub const PODS: &str = "pods";
/// Local ephemeral storage, in bytes.
pub const EPHEMERAL_STORAGE: &str = "ephemeral-storage";
/// NVIDIA GPUs.
pub use crate::controllers::run::build::GPU_RESOURCE as GPU;
/// Pod slots of a node whose capacity does not say (the kubelet's default).
pub const DEFAULT_PODS: i64 = 110;

/// Amounts of every resource the planner accounts for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// Millicores.
    pub cpu: i64,
    /// Bytes.
    pub memory: i64,
    /// `nvidia.com/gpu`.
    pub gpu: i64,
    /// Pod slots.
    pub pods: i64,
    /// Bytes of `ephemeral-storage`.
    pub ephemeral_storage: i64,
    /// Every other (extended) resource, in its own units.
    pub extended: BTreeMap<String, i64>,
}

/// `v` base units as integer units of `scale` (1000 for millicores): exact
/// values stay exact despite floating point, the rest round up.
fn units(v: f64, scale: f64) -> i64 {
    let x = v * scale;
    let r = x.round();
    if (x - r).abs() < 1e-6 {
        r as i64
    } else {
        x.ceil() as i64
    }
}

impl Resources {
    /// Amounts from a Kubernetes resource list; `Err` names an unparsable entry.
    pub fn from_quantities(list: &BTreeMap<String, Quantity>) -> Result<Self, String> {
        let mut r = Resources::default();
        for (name, q) in list {
            let v = quantity::parse(&q.0).ok_or_else(|| format!("{name}: {:?} is not a quantity", q.0))?;
            if v < 0.0 {
                return Err(format!("{name}: {:?} is negative", q.0));
            }
            r.set(name, v);
        }
        Ok(r)
    }

    /// Amounts from a resource list, skipping unparsable entries (objects the
    /// API server already validated).
    pub fn from_list(list: &BTreeMap<String, Quantity>) -> Self {
        let mut r = Resources::default();
        for (name, q) in list {
            if let Some(v) = quantity::parse(&q.0).filter(|v| *v >= 0.0) {
                r.set(name, v);
            }
        }
        r
    }

    fn set(&mut self, name: &str, v: f64) {
        match name {
            CPU => self.cpu = units(v, 1000.0),
            MEMORY => self.memory = units(v, 1.0),
            GPU => self.gpu = units(v, 1.0),
            PODS => self.pods = units(v, 1.0),
            EPHEMERAL_STORAGE => self.ephemeral_storage = units(v, 1.0),
            other => {
                self.extended.insert(other.to_string(), units(v, 1.0));
            }
        }
    }

    fn get(&self, name: &str) -> i64 {
        match name {
            CPU => self.cpu,
            MEMORY => self.memory,
            GPU => self.gpu,
            PODS => self.pods,
            EPHEMERAL_STORAGE => self.ephemeral_storage,
            other => self.extended.get(other).copied().unwrap_or(0),
        }
    }

    /// The resources of one node of a pool: `pods` defaults to [`DEFAULT_PODS`].
    pub fn node_shape(capacity: &BTreeMap<String, Quantity>) -> Result<Self, String> {
        let mut r = Self::from_quantities(capacity)?;
        if !capacity.contains_key(PODS) {
            r.pods = DEFAULT_PODS;
        }
        Ok(r)
    }

    /// Adds `o`.
    pub fn add(&mut self, o: &Resources) {
        self.cpu += o.cpu;
        self.memory += o.memory;
        self.gpu += o.gpu;
        self.pods += o.pods;
        self.ephemeral_storage += o.ephemeral_storage;
        for (k, v) in &o.extended {
            *self.extended.entry(k.clone()).or_insert(0) += v;
        }
    }

    /// Subtracts `o` (amounts may go negative: an overcommitted node).
    pub fn sub(&mut self, o: &Resources) {
        self.cpu -= o.cpu;
        self.memory -= o.memory;
        self.gpu -= o.gpu;
        self.pods -= o.pods;
        self.ephemeral_storage -= o.ephemeral_storage;
        for (k, v) in &o.extended {
            *self.extended.entry(k.clone()).or_insert(0) -= v;
        }
    }

    /// Each amount the larger of the two.
    pub fn max(&mut self, o: &Resources) {
        self.cpu = self.cpu.max(o.cpu);
        self.memory = self.memory.max(o.memory);
        self.gpu = self.gpu.max(o.gpu);
        self.pods = self.pods.max(o.pods);
        self.ephemeral_storage = self.ephemeral_storage.max(o.ephemeral_storage);
        for (k, v) in &o.extended {
            let e = self.extended.entry(k.clone()).or_insert(*v);
            *e = (*e).max(*v);
        }
    }

    /// Each amount the smaller of the two (absent extended entries are 0).
    pub fn min(&mut self, o: &Resources) {
        self.cpu = self.cpu.min(o.cpu);
        self.memory = self.memory.min(o.memory);
        self.gpu = self.gpu.min(o.gpu);
        self.pods = self.pods.min(o.pods);
        self.ephemeral_storage = self.ephemeral_storage.min(o.ephemeral_storage);
        self.extended.retain(|k, v| {
            *v = (*v).min(o.extended.get(k).copied().unwrap_or(0));
            *v > 0
        });
    }

    /// `n` times these amounts.
    pub fn times(&self, n: i64) -> Resources {
        Resources {
            cpu: self.cpu * n,
            memory: self.memory * n,
            gpu: self.gpu * n,
            pods: self.pods * n,
            ephemeral_storage: self.ephemeral_storage * n,
            extended: self.extended.iter().map(|(k, v)| (k.clone(), v * n)).collect(),
        }
    }

    /// Whether `req` fits in these amounts.
    pub fn fits(&self, req: &Resources) -> bool {
        req.cpu <= self.cpu
            && req.memory <= self.memory
            && req.gpu <= self.gpu
            && req.pods <= self.pods
            && req.ephemeral_storage <= self.ephemeral_storage
            && req
                .extended
                .iter()
                .all(|(k, v)| *v <= self.extended.get(k).copied().unwrap_or(0))
    }

    /// How many copies of `req` fit in these amounts (`i64::MAX` when `req`
    /// asks for nothing).
    pub fn fit_count(&self, req: &Resources) -> i64 {
        fn dim(free: i64, want: i64) -> i64 {
            if want <= 0 {
                i64::MAX
            } else if free <= 0 {
                0
            } else {
                free / want
            }
        }
        let mut n = dim(self.cpu, req.cpu)
            .min(dim(self.memory, req.memory))
            .min(dim(self.gpu, req.gpu))
            .min(dim(self.pods, req.pods))
            .min(dim(self.ephemeral_storage, req.ephemeral_storage));
        for (k, v) in &req.extended {
            n = n.min(dim(self.extended.get(k).copied().unwrap_or(0), *v));
        }
        n
    }

    /// Whether every amount is zero.
    pub fn is_zero(&self) -> bool {
        self.cpu == 0
            && self.memory == 0
            && self.gpu == 0
            && self.pods == 0
            && self.ephemeral_storage == 0
            && self.extended.values().all(|v| *v == 0)
    }

    /// The first resource of `req` that does not fit here, with both amounts.
    pub fn shortfall(&self, req: &Resources) -> Option<(String, String, String)> {
        let names = [CPU, MEMORY, GPU, PODS, EPHEMERAL_STORAGE]
            .into_iter()
            .map(str::to_string)
            .chain(req.extended.keys().cloned());
        for name in names {
            let (want, have) = (req.get(&name), self.get(&name));
            if want > have {
                return Some((
                    name.clone(),
                    format_amount(&name, want),
                    format_amount(&name, have.max(0)),
                ));
            }
        }
        None
    }

    /// The amounts as Kubernetes quantities (zero entries left out, `pods` too).
    pub fn to_quantities(&self) -> BTreeMap<String, Quantity> {
        let mut out = BTreeMap::new();
        let names = [CPU, MEMORY, GPU, EPHEMERAL_STORAGE]
            .into_iter()
            .map(str::to_string)
            .chain(self.extended.keys().cloned());
        for name in names {
            let v = self.get(&name);
            if v > 0 {
                out.insert(name.clone(), Quantity(format_amount(&name, v)));
            }
        }
        out
    }

    /// `cpu 8, memory 32Gi, nvidia.com/gpu 1` (zero amounts and pod slots left out).
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (name, q) in self.to_quantities() {
            if !s.is_empty() {
                s.push_str(", ");
            }
            let _ = write!(s, "{name} {}", q.0);
        }
        if s.is_empty() { "nothing".into() } else { s }
    }

    /// A key for "biggest first" ordering: GPUs, then CPU, then memory.
    pub fn size_key(&self) -> (i64, i64, i64, i64) {
        (self.gpu, self.cpu, self.memory, self.ephemeral_storage)
    }
}

/// One amount as a canonical quantity string.
fn format_amount(name: &str, v: i64) -> String {
    match name {
        CPU => quantity::format_cpu(v as f64 / 1000.0).0,
        MEMORY | EPHEMERAL_STORAGE => quantity::format_bytes(v as f64).0,
        _ => v.to_string(),
    }
}

/// A container's request: `requests`, else `limits`, per resource; `defaults`
/// fill CPU and memory the container does not mention (a LimitRange's
/// default requests, for pods not created yet).
fn container_requests(c: &CachedContainer, defaults: Option<&Resources>) -> Resources {
    let res = c.resources.as_ref();
    let mut list: BTreeMap<String, Quantity> = res.and_then(|r| r.limits.clone()).unwrap_or_default();
    list.extend(res.and_then(|r| r.requests.clone()).unwrap_or_default());
    let mut r = Resources::from_list(&list);
    if let Some(d) = defaults {
        if !list.contains_key(CPU) {
            r.cpu = d.cpu;
        }
        if !list.contains_key(MEMORY) {
            r.memory = d.memory;
        }
    }
    r
}

/// The effective request of a pod with this spec (see the module docs),
/// including one pod slot.
pub fn pod_requests(spec: &CachedPodSpec, defaults: Option<&Resources>) -> Resources {
    let mut sum = Resources::default();
    for c in &spec.containers {
        sum.add(&container_requests(c, defaults));
    }
    let mut sidecars = Resources::default();
    let mut init_peak = Resources::default();
    for c in spec.init_containers.iter().flatten() {
        let r = container_requests(c, defaults);
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars.add(&r);
        } else {
            let mut during = sidecars.clone();
            during.add(&r);
            init_peak.max(&during);
        }
    }
    sum.add(&sidecars);
    sum.max(&init_peak);
    if let Some(o) = &spec.overhead {
        sum.add(&Resources::from_list(o));
    }
    sum.pods = 1;
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(m: serde_json::Value) -> BTreeMap<String, Quantity> {
        serde_json::from_value(m).unwrap()
    }

    #[test]
    fn quantities_become_exact_integers() {
        let r = Resources::from_quantities(&q(
            json!({"cpu": "0.1", "memory": "1.5Gi", "nvidia.com/gpu": "2", "example.com/fpga": "3"}),
        ))
        .unwrap();
        assert_eq!((r.cpu, r.memory, r.gpu), (100, 1536 << 20, 2));
        assert_eq!(r.extended["example.com/fpga"], 3);
        assert_eq!(Resources::from_quantities(&q(json!({"cpu": "250m"}))).unwrap().cpu, 250);
        // A fraction of a millicore rounds up.
        assert_eq!(Resources::from_quantities(&q(json!({"cpu": "0.0001"}))).unwrap().cpu, 1);
        assert!(
            Resources::from_quantities(&q(json!({"cpu": "lots"})))
                .unwrap_err()
                .contains("cpu")
        );
        assert_eq!(
            Resources::node_shape(&q(json!({"cpu": "8", "memory": "32Gi"})))
                .unwrap()
                .pods,
            DEFAULT_PODS
        );
    }

    #[test]
    fn fitting_and_counting() {
        let node = Resources::node_shape(&q(json!({"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}))).unwrap();
        let pod = Resources::from_quantities(&q(json!({"cpu": "3", "memory": "4Gi", "pods": "1"}))).unwrap();
        assert!(node.fits(&pod));
        assert_eq!(node.fit_count(&pod), 2);
        let gpu_pod = Resources::from_quantities(&q(json!({"cpu": "1", "nvidia.com/gpu": "2", "pods": "1"}))).unwrap();
        assert!(!node.fits(&gpu_pod));
        assert_eq!(node.fit_count(&gpu_pod), 0);
        assert_eq!(
            node.shortfall(&gpu_pod),
            Some(("nvidia.com/gpu".into(), "2".into(), "1".into()))
        );
        let fpga = Resources::from_quantities(&q(json!({"example.com/fpga": "1"}))).unwrap();
        assert!(!node.fits(&fpga), "an extended resource the node lacks does not fit");
        let mut free = node.clone();
        free.sub(&pod.times(2));
        assert_eq!((free.cpu, free.memory >> 30, free.pods), (2000, 24, DEFAULT_PODS - 2));
        assert_eq!(node.describe(), "cpu 8, memory 32Gi, nvidia.com/gpu 1");
        assert_eq!(node.to_quantities()["memory"].0, "32Gi");
    }

    #[test]
    fn pod_requests_follow_the_scheduler() {
        let spec: CachedPodSpec = serde_json::from_value(json!({
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
                {"name": "b", "resources": {"limits": {"cpu": "2", "nvidia.com/gpu": "1"}}}
            ],
            "initContainers": [
                {"name": "sidecar", "restartPolicy": "Always", "resources": {"requests": {"cpu": "500m"}}},
                {"name": "fetch", "resources": {"requests": {"cpu": "8", "memory": "512Mi"}}}
            ],
            "overhead": {"cpu": "100m"}
        }))
        .unwrap();
        let r = pod_requests(&spec, None);
        // cpu: max(1 + 2 + 0.5, 0.5 + 8) + 0.1; memory: max(1Gi, 512Mi).
        assert_eq!((r.cpu, r.memory, r.gpu, r.pods), (8600, 1 << 30, 1, 1));
        // Defaults fill what a container does not mention.
        let bare: CachedPodSpec = serde_json::from_value(json!({"containers": [{"name": "a"}]})).unwrap();
        let d = Resources {
            cpu: 250,
            memory: 512 << 20,
            ..Default::default()
        };
        assert_eq!(pod_requests(&bare, Some(&d)).cpu, 250);
        assert_eq!(pod_requests(&bare, None).cpu, 0);
    }
}
