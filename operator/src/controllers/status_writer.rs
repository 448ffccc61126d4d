//! Status writes off the reconcile path, coalesced per object.
//!
//! A reconcile decides what an object's status should be and hands it to the
//! [`StatusWriter`]; a few workers patch it (server-side apply, the
//! operator's field manager) in order of submission. While a status waits,
//! a newer one for the same object replaces it, so a burst of changes costs
//! one write. Reconciles therefore spend their API round trips on what users
//! wait for (creating run Jobs), and under a flood of new objects the status
//! updates trail by the queue's length instead of holding up every start —
//! the same trade Kubernetes' Job controller makes by batching its status
//! updates. The workers also yield to foreground writes (run Jobs, serving
//! Deployments: [`super::priority`]), for at most two seconds at a time.
//!
//! [`StatusWriter::current`] is the status a reconcile must compare against:
//! the one waiting to be written, else the last one written while the
//! object's watch has not delivered it yet, else the cached one. So a
//! reconcile never submits the same status twice, and a converged object
//! writes nothing.
//!
//! Owns: the queue and the workers. Must not decide any status itself.
use std::collections::{HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Error;
use super::apply::FIELD_MANAGER;
use super::priority::Foreground;
use crate::runtime::metrics::Metrics;

/// How long a written status stands in for a cache that has not shown it.
const WRITTEN_TTL: Duration = Duration::from_secs(60);
/// Attempts of one status before it is dropped (the next reconcile
/// computes it again).
const MAX_ATTEMPTS: u32 = 5;

/// Which object a status belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
}

impl Key {
    pub fn of<K: Resource>(obj: &K) -> Self {
        let meta = obj.meta();
        Self {
            namespace: meta.namespace.clone(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
        }
    }
}

struct State<S> {
    /// Latest status to write, per object.
    pending: HashMap<Key, (S, u32)>,
    /// Objects with a pending status, in order of first submission.
    queue: VecDeque<Key>,
    /// Last status written, until the watch shows it.
    written: HashMap<Key, (S, Instant)>,
    /// Objects whose status a worker is writing: one write per object at a
    /// time, so a newer status never lands before an older one.
    in_flight: HashSet<Key>,
}

struct Shared<S> {
    state: Mutex<State<S>>,
    notify: Notify,
}

/// The status writer of one kind `K` with status type `S`.
pub struct StatusWriter<K, S> {
    shared: Arc<Shared<S>>,
    _kind: PhantomData<fn() -> K>,
}

impl<K, S> StatusWriter<K, S>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    S: Serialize + Clone + PartialEq + Send + Sync + 'static,
{
    /// Starts `workers` writers that run until `stop` is cancelled;
    /// `api_for` gives the API of an object (namespaced or cluster-scoped).
    pub fn start(
        api_for: impl Fn(&Key) -> Api<K> + Send + Sync + 'static,
        metrics: Metrics,
        foreground: Foreground,
        workers: usize,
        stop: CancellationToken,
    ) -> Self {
        let api_for: ApiFor<K> = Arc::new(api_for);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                queue: VecDeque::new(),
                written: HashMap::new(),
                in_flight: HashSet::new(),
            }),
            notify: Notify::new(),
        });
        for _ in 0..workers.max(1) {
            tokio::spawn(work::<K, S>(
                shared.clone(),
                api_for.clone(),
                metrics.clone(),
                foreground.clone(),
                stop.clone(),
            ));
        }
        Self {
            shared,
            _kind: PhantomData,
        }
    }

    /// [`Self::start`] for a namespaced kind: each object's API is its
    /// namespace's.
    pub fn start_namespaced(
        client: &Client,
        metrics: Metrics,
        foreground: Foreground,
        workers: usize,
        stop: CancellationToken,
    ) -> Self
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    {
        let client = client.clone();
        Self::start(
            move |key| Api::namespaced(client.clone(), key.namespace.as_deref().unwrap_or_default()),
            metrics,
            foreground,
            workers,
            stop,
        )
    }

    /// The status to compare a newly computed one against (see the module docs).
    pub fn current(&self, key: &Key, cached: Option<&S>) -> Option<S> {
        let mut state = self.shared.state.lock().expect("status writer lock");
        if let Some((s, _)) = state.pending.get(key) {
            return Some(s.clone());
        }
        let now = Instant::now();
        state.written.retain(|_, (_, at)| now.duration_since(*at) < WRITTEN_TTL);
        match state.written.get(key) {
            Some((w, _)) if cached != Some(w) => Some(w.clone()),
            Some(_) => {
                state.written.remove(key);
                cached.cloned()
            }
            None => cached.cloned(),
        }
    }

    /// Writes `status` unless it equals [`Self::current`]. Returns whether
    /// a write was queued.
    pub fn submit_if_changed(&self, key: Key, cached: Option<&S>, status: &S) -> bool {
        if self.current(&key, cached).as_ref() == Some(status) {
            return false;
        }
        let mut state = self.shared.state.lock().expect("status writer lock");
        if state.pending.insert(key.clone(), (status.clone(), 0)).is_none() {
            state.queue.push_back(key);
        }
        drop(state);
        self.shared.notify.notify_one();
        true
    }

    /// Writes `status` now, on the caller's task, unless it equals
    /// [`Self::current`]; for controllers that must know a status is stored
    /// before they go on (a Pipeline records a run before it creates its
    /// steps). A status waiting in the queue is superseded. Returns whether
    /// it wrote.
    pub async fn write_now(&self, api: &Api<K>, key: Key, cached: Option<&S>, status: &S) -> kube::Result<bool> {
        if self.current(&key, cached).as_ref() == Some(status) {
            return Ok(false);
        }
        self.shared
            .state
            .lock()
            .expect("status writer lock")
            .pending
            .remove(&key);
        write_status(api, &key.name, status).await?;
        self.shared
            .state
            .lock()
            .expect("status writer lock")
            .written
            .insert(key, (status.clone(), Instant::now()));
        Ok(true)
    }

    /// Statuses waiting to be written.
    pub fn pending(&self) -> usize {
        self.shared.state.lock().expect("status writer lock").pending.len()
    }
}

/// Drops the in-flight record of `status` when its write failed, unless a
/// newer one took its place.
fn forget_written<S: PartialEq>(shared: &Shared<S>, key: &Key, status: &S) {
    let mut state = shared.state.lock().expect("status writer lock");
    if state.written.get(key).is_some_and(|(w, _)| w == status) {
        state.written.remove(key);
    }
}

/// The oldest object with a pending status that no worker is writing,
/// marked in flight (and as written: a reconcile running while the patch is
/// on the wire must not submit the same status again).
fn take_next<S: Clone>(state: &mut State<S>) -> Option<(Key, S, u32)> {
    loop {
        let i = state.queue.iter().position(|k| !state.in_flight.contains(k))?;
        let key = state.queue.remove(i)?;
        // Written meanwhile by `write_now`: nothing left to do for it.
        let Some((status, attempts)) = state.pending.remove(&key) else {
            continue;
        };
        state.written.insert(key.clone(), (status.clone(), Instant::now()));
        state.in_flight.insert(key.clone());
        return Some((key, status, attempts));
    }
}

type ApiFor<K> = Arc<dyn Fn(&Key) -> Api<K> + Send + Sync>;

async fn work<K, S>(
    shared: Arc<Shared<S>>,
    api_for: ApiFor<K>,
    metrics: Metrics,
    foreground: Foreground,
    stop: CancellationToken,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + Clone + PartialEq + Send + Sync + 'static,
{
    let kind = K::kind(&()).to_string();
    loop {
        // Deferred behind foreground writes before an object is taken, so
        // that statuses submitted meanwhile replace the one waiting.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = foreground.wait_turn() => {}
        }
        let next = {
            let mut state = shared.state.lock().expect("status writer lock");
            take_next(&mut state)
        };
        let Some((key, status, attempts)) = next else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.notify.notified() => continue,
            }
        };
        let result = write_status(&api_for(&key), &key.name, &status).await;
        shared.state.lock().expect("status writer lock").in_flight.remove(&key);
        // A newer status of this object may be waiting for this write.
        shared.notify.notify_one();
        match result {
            Ok(()) => {}
            // Deleted meanwhile: nothing to report on.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                shared.state.lock().expect("status writer lock").written.remove(&key);
            }
            Err(e) => {
                forget_written(&shared, &key, &status);
                let err = Error::Kube(e);
                metrics
                    .reconcile_errors
                    .with_label_values(&[&kind, err.category()])
                    .inc();
                tracing::warn!(kind = %kind, name = %key.name, error = %err, attempts, "writing status failed");
                if attempts + 1 < MAX_ATTEMPTS {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(200 << attempts)).await;
                        let mut state = shared.state.lock().expect("status writer lock");
                        // A newer status submitted meanwhile wins.
                        if !state.pending.contains_key(&key) {
                            state.pending.insert(key.clone(), (status, attempts + 1));
                            state.queue.push_back(key);
                        }
                        drop(state);
                        shared.notify.notify_one();
                    });
                }
            }
        }
    }
}

/// Patches the status subresource of `name` with `status` (server-side
/// apply; SSA bodies carry apiVersion and kind).
pub async fn write_status<K, S>(api: &Api<K>, name: &str, status: &S) -> kube::Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &pp, &Patch::Apply(&body)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> StatusWriter<crate::api::Experiment, u32> {
        StatusWriter {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    pending: HashMap::new(),
                    queue: VecDeque::new(),
                    written: HashMap::new(),
                    in_flight: HashSet::new(),
                }),
                notify: Notify::new(),
            }),
            _kind: PhantomData,
        }
    }

    fn key(name: &str) -> Key {
        Key {
            namespace: Some("ns".into()),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    #[test]
    fn unchanged_statuses_are_not_queued_and_newer_ones_replace_waiting_ones() {
        let w = writer();
        assert!(
            !w.submit_if_changed(key("a"), Some(&1), &1),
            "equal to the cached status"
        );
        assert!(w.submit_if_changed(key("a"), Some(&1), &2));
        assert!(!w.submit_if_changed(key("a"), Some(&1), &2), "already waiting");
        assert!(w.submit_if_changed(key("a"), Some(&1), &3));
        assert!(w.submit_if_changed(key("b"), None, &7));
        let state = w.shared.state.lock().unwrap();
        assert_eq!(
            state.queue,
            VecDeque::from([key("a"), key("b")]),
            "one entry per object, in order"
        );
        assert_eq!(state.pending[&key("a")].0, 3, "the newest status is the one written");
    }

    #[test]
    fn one_write_per_object_at_a_time_in_submission_order() {
        let w = writer();
        assert!(w.submit_if_changed(key("a"), None, &1));
        assert!(w.submit_if_changed(key("b"), None, &1));
        let mut state = w.shared.state.lock().unwrap();
        let (k, s, _) = take_next(&mut state).unwrap();
        assert_eq!((k, s), (key("a"), 1));
        drop(state);
        // A newer status of `a` while its first write is on the wire waits
        // for that write; `b` goes meanwhile.
        assert!(w.submit_if_changed(key("a"), None, &2));
        let mut state = w.shared.state.lock().unwrap();
        assert_eq!(take_next(&mut state).map(|(k, _, _)| k), Some(key("b")));
        assert!(take_next(&mut state).is_none(), "a is still in flight");
        state.in_flight.remove(&key("a"));
        assert_eq!(take_next(&mut state).map(|(k, s, _)| (k, s)), Some((key("a"), 2)));
    }

    #[test]
    fn a_written_status_stands_in_until_the_cache_shows_it() {
        let w = writer();
        w.shared
            .state
            .lock()
            .unwrap()
            .written
            .insert(key("a"), (2, Instant::now()));
        assert_eq!(
            w.current(&key("a"), Some(&1)),
            Some(2),
            "the cache lags behind the write"
        );
        assert!(!w.submit_if_changed(key("a"), Some(&1), &2));
        assert_eq!(w.current(&key("a"), Some(&2)), Some(2));
        // Caught up: a later change by someone else is seen.
        assert_eq!(w.current(&key("a"), Some(&5)), Some(5));
    }
}
