//! Service writes of the ModelDeployment controller, off the reconcile path.
//!
//! Why: kube-apiserver hands out ClusterIPs one at a time (its allocator
//! holds one lock across the IPAddress object it creates for each), so on a
//! busy control plane a Service create waits behind every other one: 5.5 s
//! each, measured here while 500 ModelDeployments were created at once. A
//! reconcile that waited for its Services would hold its worker that long,
//! and every other ModelDeployment's Deployment (what users wait for: its
//! pods take longest) would queue behind it. So the reconcile applies
//! Deployments, autoscalers and the HTTPRoute itself and hands its Services
//! to the [`ServiceWriter`].
//!
//! Per ModelDeployment the newest set of Services to write waits (a newer
//! one replaces it) and one set is written at a time; [`SERVICE_WRITERS`]
//! workers take them in order of submission. A Service is written as the
//! reconcile would write it: only when the cache (with this process's
//! writes laid over) does not show it up to date, and never over a Service
//! another owner holds. Such names are kept for the reconcile to report
//! (`NameConflict`) and looked at again every [`RECHECK`]. A written Service
//! reaches its owner through the Service watch; a conflict found, a conflict
//! gone, or a failed write through a trigger.
//!
//! Owns: the queue, the workers and the names found taken. Must not decide
//! what a Service contains.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use futures::future::join_all;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::observe::{ChildCache, controller_uid};
use super::reconcile::{Synced, namespace_terminating, sync_child};
use crate::api::ModelDeployment;
use crate::controllers::{Context, Error};

/// Workers writing Services. Few: the API server takes them one at a time
/// anyway, and a Service waiting here holds no reconcile.
pub const SERVICE_WRITERS: usize = 4;
/// How often a name found taken is looked at again.
pub const RECHECK: Duration = Duration::from_secs(15);
/// A conflict no reconcile asked about for this long is forgotten (its
/// ModelDeployment is gone).
const FORGET_TAKEN: Duration = Duration::from_secs(600);
/// Delay before a ModelDeployment whose Services failed to write is
/// reconciled again.
const RETRY: Duration = Duration::from_secs(10);
const KIND: &str = "ModelDeployment";

type Trigger = UnboundedSender<ObjectRef<DeserializeGuard<ModelDeployment>>>;

/// Services to write for one ModelDeployment.
#[derive(Clone, Debug)]
struct Batch {
    owner: Arc<ModelDeployment>,
    services: Vec<Service>,
}

/// Batches by ModelDeployment uid: the newest waiting one per object, in
/// order of first submission, one in flight per object.
#[derive(Default)]
struct Queue {
    pending: HashMap<String, Batch>,
    order: VecDeque<String>,
    in_flight: HashMap<String, Vec<Service>>,
}

impl Queue {
    /// Queues `batch` unless the same Services are already waiting or being
    /// written. Returns whether it was queued.
    fn submit(&mut self, uid: &str, batch: Batch) -> bool {
        if self.in_flight.get(uid) == Some(&batch.services) {
            // What is being written is the newest: an older wait is moot.
            self.pending.remove(uid);
            return false;
        }
        if self.pending.get(uid).is_some_and(|p| p.services == batch.services) {
            return false;
        }
        if self.pending.insert(uid.to_string(), batch).is_none() {
            self.order.push_back(uid.to_string());
        }
        true
    }

    /// The oldest waiting batch of an object with none in flight, marked in
    /// flight.
    fn take_next(&mut self) -> Option<(String, Batch)> {
        loop {
            let i = self.order.iter().position(|uid| !self.in_flight.contains_key(uid))?;
            let uid = self.order.remove(i)?;
            let Some(batch) = self.pending.remove(&uid) else {
                continue;
            };
            self.in_flight.insert(uid.clone(), batch.services.clone());
            return Some((uid, batch));
        }
    }

    fn finish(&mut self, uid: &str) {
        self.in_flight.remove(uid);
    }
}

/// Service names (`Service/name`) of one ModelDeployment held by another
/// owner, with who that is.
struct Taken {
    names: BTreeMap<String, String>,
    checked: Instant,
    asked: Instant,
    checking: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    taken: Mutex<HashMap<String, Taken>>,
    notify: Notify,
    ctx: Arc<Context>,
    cache: Arc<ChildCache<Service>>,
    trigger: Trigger,
}

/// The Service writer (see the module docs).
pub struct ServiceWriter {
    inner: Arc<Inner>,
}

fn trigger(inner: &Inner, md: &ModelDeployment) {
    let r = ObjectRef::new(&md.name_any()).within(&md.namespace().unwrap_or_default());
    let _ = inner.trigger.unbounded_send(r);
}

impl ServiceWriter {
    /// Starts `workers` writers that run until `stop` is cancelled.
    pub fn start(
        ctx: Arc<Context>,
        cache: Arc<ChildCache<Service>>,
        trigger: Trigger,
        workers: usize,
        stop: CancellationToken,
    ) -> Self {
        let inner = Arc::new(Inner {
            queue: Mutex::default(),
            taken: Mutex::default(),
            notify: Notify::new(),
            ctx,
            cache,
            trigger,
        });
        for _ in 0..workers.max(1) {
            tokio::spawn(work(inner.clone(), stop.clone()));
        }
        Self { inner }
    }

    /// Hands `services` of `owner` to the writers. Returns whether they were
    /// queued (false: the same are already waiting or being written).
    pub fn submit(&self, owner: &ModelDeployment, services: Vec<Service>) -> bool {
        let uid = owner.uid().unwrap_or_default();
        let batch = Batch {
            owner: Arc::new(owner.clone()),
            services,
        };
        let queued = self
            .inner
            .queue
            .lock()
            .expect("service writer lock")
            .submit(&uid, batch);
        if queued {
            self.inner.notify.notify_one();
        }
        queued
    }

    /// Service names of `md` found held by another owner (`Service/name` ->
    /// who). Asking keeps them; once they are older than [`RECHECK`] they
    /// are looked at again in the background.
    pub fn taken(&self, md: &ModelDeployment) -> BTreeMap<String, String> {
        let uid = md.uid().unwrap_or_default();
        let now = Instant::now();
        let mut all = self.inner.taken.lock().expect("service writer lock");
        all.retain(|_, t| now.duration_since(t.asked) < FORGET_TAKEN);
        let Some(t) = all.get_mut(&uid) else {
            return BTreeMap::new();
        };
        t.asked = now;
        if !t.checking && now.duration_since(t.checked) >= RECHECK {
            t.checking = true;
            let names: Vec<String> = t.names.keys().cloned().collect();
            tokio::spawn(recheck(self.inner.clone(), Arc::new(md.clone()), uid.clone(), names));
        }
        t.names.clone()
    }

    /// Batches waiting (for tests and debugging).
    pub fn pending(&self) -> usize {
        self.inner.queue.lock().expect("service writer lock").pending.len()
    }
}

async fn work(inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        // After the serving Deployments (priority): nothing is routed to a
        // Service before its pods are ready anyway.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = inner.ctx.foreground.wait_turn() => {}
        }
        let next = inner.queue.lock().expect("service writer lock").take_next();
        let Some((uid, batch)) = next else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = inner.notify.notified() => continue,
            }
        };
        write(&inner, &uid, &batch).await;
        inner.queue.lock().expect("service writer lock").finish(&uid);
        // A newer batch of this object may be waiting for this one.
        inner.notify.notify_one();
    }
}

/// Writes one batch; records what it found taken, its events, and triggers
/// the owner when the reconcile must hear of it.
async fn write(inner: &Inner, uid: &str, batch: &Batch) {
    let md = batch.owner.as_ref();
    let api: Api<Service> = Api::namespaced(inner.ctx.client.clone(), &md.namespace().unwrap_or_default());
    let results = join_all(
        batch
            .services
            .iter()
            .map(|s| sync_child(&api, &inner.cache, s, uid, "Service", None)),
    )
    .await;
    let (mut created, mut updated) = (vec![], vec![]);
    let mut found: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut failed: Option<Error> = None;
    for (s, result) in batch.services.iter().zip(results) {
        let key = format!("Service/{}", s.name_any());
        match result {
            Ok(Synced::Created) => created.push(key.clone()),
            Ok(Synced::Updated) => updated.push(key.clone()),
            Ok(Synced::Unchanged) => {}
            Ok(Synced::Foreign(_, owner)) => {
                found.insert(key, Some(owner));
                continue;
            }
            Err(e) => {
                failed = Some(e);
                continue;
            }
        }
        found.insert(key, None);
    }
    let changed = record_taken(inner, uid, found);
    for (reason, list) in [("Created", &created), ("Updated", &updated)] {
        if !list.is_empty() {
            let note = format!("{} {}", reason.to_lowercase(), list.join(", "));
            inner
                .ctx
                .distinct_event(md, EventType::Normal, reason, "Reconcile", note)
                .await;
        }
    }
    if changed {
        trigger(inner, md);
    }
    match failed {
        None => {}
        Some(e) if namespace_terminating(&e) => {}
        Some(e) => {
            inner
                .ctx
                .metrics
                .reconcile_errors
                .with_label_values(&[KIND, e.category()])
                .inc();
            tracing::warn!(name = %md.name_any(), error = %e, "writing Services failed; retrying in {RETRY:?}");
            let trigger = inner.trigger.clone();
            let r = ObjectRef::new(&md.name_any()).within(&md.namespace().unwrap_or_default());
            tokio::spawn(async move {
                tokio::time::sleep(RETRY).await;
                let _ = trigger.unbounded_send(r);
            });
        }
    }
}

/// Updates the names of `uid` found taken (`Some(owner)`) or not (`None`).
/// Returns whether the set changed.
fn record_taken(inner: &Inner, uid: &str, found: BTreeMap<String, Option<String>>) -> bool {
    let mut all = inner.taken.lock().expect("service writer lock");
    merge_taken(&mut all, uid, found, Instant::now())
}

fn merge_taken(
    all: &mut HashMap<String, Taken>,
    uid: &str,
    found: BTreeMap<String, Option<String>>,
    now: Instant,
) -> bool {
    let before = all.get(uid).map(|t| t.names.clone()).unwrap_or_default();
    let mut names = before.clone();
    for (key, owner) in found {
        match owner {
            Some(o) => names.insert(key, o),
            None => names.remove(&key),
        };
    }
    let changed = names != before;
    if names.is_empty() {
        all.remove(uid);
    } else {
        let t = all.entry(uid.to_string()).or_insert(Taken {
            names: BTreeMap::new(),
            checked: now,
            asked: now,
            checking: false,
        });
        t.names = names;
        t.checked = now;
        t.checking = false;
    }
    changed
}

/// Looks at names found taken again: those gone, or now this
/// ModelDeployment's, are dropped and the owner is reconciled.
async fn recheck(inner: Arc<Inner>, md: Arc<ModelDeployment>, uid: String, names: Vec<String>) {
    let api: Api<Service> = Api::namespaced(inner.ctx.client.clone(), &md.namespace().unwrap_or_default());
    let mut found = BTreeMap::new();
    for key in names {
        let name = key.trim_start_matches("Service/");
        match api.get_opt(name).await {
            Ok(Some(s)) if controller_uid(&s) != Some(uid.as_str()) => {
                found.insert(key, Some(super::observe::controller_of(&s)));
            }
            Ok(_) => {
                found.insert(key, None);
            }
            // Unknown: keep it as it was, look again next time.
            Err(e) => tracing::debug!(error = %e, "re-checking a taken Service name failed"),
        }
    }
    if record_taken(&inner, &uid, found) {
        trigger(&inner, &md);
    } else if let Some(t) = inner.taken.lock().expect("service writer lock").get_mut(&uid) {
        t.checking = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, port: i32) -> Service {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"ports": [{"port": port}]}})).unwrap()
    }

    fn batch(services: Vec<Service>) -> Batch {
        Batch {
            owner: Arc::new(
                serde_json::from_value(json!({
                    "apiVersion": "mlplane.io/v1alpha1", "kind": "ModelDeployment",
                    "metadata": {"name": "md", "namespace": "ns", "uid": "u1"},
                    "spec": {"deployments": []},
                }))
                .unwrap(),
            ),
            services,
        }
    }

    #[test]
    fn a_newer_batch_replaces_a_waiting_one() {
        let mut q = Queue::default();
        assert!(q.submit("u1", batch(vec![svc("a", 80)])));
        assert!(q.submit("u1", batch(vec![svc("a", 81)])));
        assert!(q.submit("u2", batch(vec![svc("b", 80)])));
        let (uid, b) = q.take_next().unwrap();
        assert_eq!((uid.as_str(), b.services), ("u1", vec![svc("a", 81)]));
        let (uid, _) = q.take_next().unwrap();
        assert_eq!(uid, "u2");
        assert!(q.take_next().is_none());
    }

    #[test]
    fn one_batch_per_object_at_a_time_and_no_repeats() {
        let mut q = Queue::default();
        q.submit("u1", batch(vec![svc("a", 80)]));
        let (uid, _) = q.take_next().unwrap();
        // The same Services again while they are written: nothing queued.
        assert!(!q.submit("u1", batch(vec![svc("a", 80)])));
        // Different ones wait for the write in flight.
        assert!(q.submit("u1", batch(vec![svc("a", 80), svc("b", 80)])));
        assert!(q.take_next().is_none());
        // Back to what is in flight: the wait is dropped.
        assert!(!q.submit("u1", batch(vec![svc("a", 80)])));
        q.finish(&uid);
        assert!(q.take_next().is_none());
        // A new one after the write goes.
        assert!(q.submit("u1", batch(vec![svc("a", 80), svc("b", 80)])));
        assert!(!q.submit("u1", batch(vec![svc("a", 80), svc("b", 80)])));
        assert_eq!(q.take_next().unwrap().1.services.len(), 2);
    }

    #[test]
    fn taken_names_are_added_kept_and_dropped() {
        let mut all = HashMap::new();
        let now = Instant::now();
        let found = |k: &str, o: Option<&str>| BTreeMap::from([(k.to_string(), o.map(String::from))]);
        assert!(!merge_taken(&mut all, "u1", found("Service/a", None), now));
        assert!(all.is_empty());
        assert!(merge_taken(
            &mut all,
            "u1",
            found("Service/a", Some("no ModelDeployment")),
            now
        ));
        // Found again: no change, nothing to tell the reconcile.
        assert!(!merge_taken(
            &mut all,
            "u1",
            found("Service/a", Some("no ModelDeployment")),
            now
        ));
        // Another name of the same object, written fine: the first stays.
        assert!(!merge_taken(&mut all, "u1", found("Service/b", None), now));
        assert_eq!(all["u1"].names.len(), 1);
        // Freed: dropped, and the entry with it.
        assert!(merge_taken(&mut all, "u1", found("Service/a", None), now));
        assert!(all.is_empty());
    }
}
