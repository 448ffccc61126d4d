//! What the ModelDeployment controller knows of the cluster without asking
//! the API server: watch caches of its children (Deployments, Services,
//! HorizontalPodAutoscalers and, with Gateway API, HTTPRoutes labelled
//! `mlplane.io/model-deployment`), of Experiments, Workspaces and (metadata
//! only) ComputeClusters, plus the controller's own recent child writes that
//! the watches have not delivered yet.
//!
//! Owns: the reflectors and the write overlay. Must not write anything.
//!
//! The overlay: a reconcile applies a child and the next reconcile of the
//! same ModelDeployment may start before that write's watch event arrives.
//! Every write is remembered with the spec hash it set; until the cache shows
//! that hash, the API server's answer stands in for the cached object. An
//! entry goes once the cache has caught up, or after [`OVERLAY_TTL`].
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Lookup, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::build::{MODEL_DEPLOYMENT_LABEL, spec_hash};
use super::gateway::HTTPRoute;
use crate::api::{ComputeCluster, Experiment, Workspace};
use crate::controllers::apply::{created_by_post, created_by_post_marker};
use crate::controllers::label_index::LabelIndex;
use crate::controllers::{Touched, watch_config};

/// How long a write stands in for a cache that has not shown it.
pub const OVERLAY_TTL: Duration = Duration::from_secs(60);

/// A child's cache with this process's writes laid over it.
pub struct ChildCache<K: Lookup<DynamicType = ()> + Clone + 'static> {
    /// The watch cache.
    pub store: Store<K>,
    /// Its objects by controller uid.
    owners: Arc<LabelIndex>,
    written: Mutex<HashMap<(String, String), (K, Instant)>>,
}

impl<K> ChildCache<K>
where
    K: Resource<DynamicType = ()> + Lookup<DynamicType = ()> + Clone + 'static,
{
    fn new(store: Store<K>, owners: Arc<LabelIndex>) -> Self {
        Self {
            store,
            owners,
            written: Mutex::default(),
        }
    }

    /// Remembers an object the API server returned for a write of ours.
    pub fn record(&self, obj: &K) {
        let key = (ResourceExt::namespace(obj).unwrap_or_default(), obj.name_any());
        self.written
            .lock()
            .expect("overlay lock")
            .insert(key, (obj.clone(), Instant::now()));
    }

    /// Forgets a written object (after deleting it).
    pub fn forget(&self, ns: &str, name: &str) {
        self.written
            .lock()
            .expect("overlay lock")
            .remove(&(ns.to_string(), name.to_string()));
    }

    /// The object `ns/name` as known: the cache, unless a write of ours that
    /// it does not show yet is newer.
    pub fn get(&self, ns: &str, name: &str) -> Option<K> {
        let cached = self.store.get(&ObjectRef::new(name).within(ns));
        let key = (ns.to_string(), name.to_string());
        let mut written = self.written.lock().expect("overlay lock");
        let now = Instant::now();
        written.retain(|_, (_, at)| now.duration_since(*at) < OVERLAY_TTL);
        match (written.get(&key), cached) {
            (Some((w, _)), Some(c)) if spec_hash(&*c) == spec_hash(w) => {
                written.remove(&key);
                Some(K::clone(&c))
            }
            (Some((w, _)), _) => Some(w.clone()),
            (None, c) => c.map(|c| K::clone(&c)),
        }
    }

    /// Cached children of the ModelDeployment `uid` in `ns`.
    pub fn owned_by(&self, ns: &str, uid: &str) -> Vec<K> {
        self.owners
            .get(&self.store, ns, uid)
            .into_iter()
            .filter(|o| controller_uid(&**o) == Some(uid))
            .map(|o| K::clone(&o))
            .collect()
    }
}

/// The uid of an object's controller ownerReference.
pub fn controller_uid<K: Resource>(obj: &K) -> Option<&str> {
    obj.meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Who controls an object, for messages (`ModelDeployment resnet`, or
/// `no mlplane ModelDeployment`).
pub fn controller_of<K: Resource>(obj: &K) -> String {
    obj.meta()
        .owner_references
        .as_ref()
        .and_then(|refs| refs.iter().find(|o| o.controller == Some(true)))
        .map(|o| format!("{} {}", o.kind, o.name))
        .unwrap_or_else(|| "no ModelDeployment (it was not made by mlplane)".into())
}

/// The caches.
pub struct Caches {
    pub deployments: ChildCache<Deployment>,
    /// Shared with the [`super::services::ServiceWriter`].
    pub services: Arc<ChildCache<Service>>,
    pub autoscalers: ChildCache<HorizontalPodAutoscaler>,
    pub routes: Option<ChildCache<HTTPRoute>>,
    pub experiments: Store<Experiment>,
    pub workspaces: Store<Workspace>,
    pub clusters: Store<PartialObjectMeta<ComputeCluster>>,
    ready: tokio::sync::watch::Sender<bool>,
}

/// The streams behind [`Caches`]: children trigger their owner; Experiments
/// trigger the ModelDeployments naming them; the rest only fill caches.
pub struct Streams {
    pub deployments: Touched<Deployment>,
    pub services: Touched<Service>,
    pub autoscalers: Touched<HorizontalPodAutoscaler>,
    pub routes: Option<Touched<HTTPRoute>>,
    pub experiments: Touched<Experiment>,
    pub workspaces: Touched<Workspace>,
    pub clusters: Touched<PartialObjectMeta<ComputeCluster>>,
}

/// A reflector; `index`, if any, follows its events.
fn reflect<K>(api: Api<K>, cfg: watcher::Config, index: Option<Arc<LabelIndex>>) -> (Store<K>, Touched<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let reader = store.clone();
    let stream = watcher(api, cfg)
        .default_backoff()
        // managedFields dropped, but for a marker of a child still carrying
        // the entry of the operator's create (`apply::created_by_post`).
        .modify(|o: &mut K| {
            let created = created_by_post(o);
            o.meta_mut().managed_fields = created.then(|| vec![created_by_post_marker()]);
        })
        .reflect(writer)
        .inspect_ok(move |ev| {
            if let Some(i) = &index {
                i.observe(ev, &reader)
            }
        })
        .touched_objects()
        .boxed();
    (store, stream)
}

/// A child kind's cache (labelled `mlplane.io/model-deployment`, indexed by
/// controller uid) and its stream.
fn child_cache<K>(api: Api<K>) -> (ChildCache<K>, Touched<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let owners = LabelIndex::by_controller();
    let (store, stream) = reflect(api, watch_config().labels(MODEL_DEPLOYMENT_LABEL), Some(owners.clone()));
    (ChildCache::new(store, owners), stream)
}

/// Starts the reflectors (lazily: nothing is listed until a stream is
/// polled). `routes`: whether the API server serves HTTPRoutes.
pub fn caches(client: &Client, routes: bool) -> (Caches, Streams) {
    let (deployments, dep_s) = child_cache(Api::<Deployment>::all(client.clone()));
    let (services, svc_s) = child_cache(Api::<Service>::all(client.clone()));
    let (autoscalers, hpa_s) = child_cache(Api::<HorizontalPodAutoscaler>::all(client.clone()));
    let (routes, route_s) = match routes {
        true => {
            let (c, s) = child_cache(Api::<HTTPRoute>::all(client.clone()));
            (Some(c), Some(s))
        }
        false => (None, None),
    };
    // Models read only an Experiment's status and outputs: its run history
    // stays, the rest of the spec is not needed.
    let (experiments, exp_w) = reflector::store();
    let exp_s = watcher(Api::<Experiment>::all(client.clone()), watch_config())
        .default_backoff()
        .modify(|e: &mut Experiment| {
            e.managed_fields_mut().clear();
            e.spec.command.clear();
            e.spec.env.clear();
            e.spec.params.clear();
        })
        .reflect(exp_w)
        .touched_objects()
        .boxed();
    let (workspaces, ws_s) = reflect(Api::<Workspace>::all(client.clone()), watch_config(), None);
    let (clusters, cc_s) = reflect(
        Api::<PartialObjectMeta<ComputeCluster>>::all(client.clone()),
        watch_config(),
        None,
    );
    (
        Caches {
            deployments,
            services: Arc::new(services),
            autoscalers,
            routes,
            experiments,
            workspaces,
            clusters,
            ready: tokio::sync::watch::Sender::new(false),
        },
        Streams {
            deployments: dep_s,
            services: svc_s,
            autoscalers: hpa_s,
            routes: route_s,
            experiments: exp_s,
            workspaces: ws_s,
            clusters: cc_s,
        },
    )
}

impl Caches {
    /// Resolves once every cache has done its first list. Any number of
    /// reconciles may wait here: one task ([`Caches::watch_ready`]) waits on
    /// the stores (kube's `Store::wait_until_ready` wakes only the last of
    /// several concurrent waiters) and flips this flag.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Waits on every store once, then marks the caches ready.
    pub async fn watch_ready(&self) {
        let _ = self.deployments.store.wait_until_ready().await;
        let _ = self.services.store.wait_until_ready().await;
        let _ = self.autoscalers.store.wait_until_ready().await;
        if let Some(r) = &self.routes {
            let _ = r.store.wait_until_ready().await;
        }
        let _ = self.experiments.wait_until_ready().await;
        let _ = self.workspaces.wait_until_ready().await;
        let _ = self.clusters.wait_until_ready().await;
        self.ready.send_replace(true);
    }

    /// The Experiment `ns/name`.
    pub fn experiment(&self, ns: &str, name: &str) -> Option<Arc<Experiment>> {
        self.experiments.get(&ObjectRef::new(name).within(ns))
    }

    /// The Workspace of namespace `ns`: the one whose status says it owns
    /// the namespace, else the one whose spec names it.
    pub fn workspace_of(&self, ns: &str) -> Option<Arc<Workspace>> {
        self.workspaces
            .find(|w| w.status.as_ref().and_then(|s| s.namespace.as_deref()) == Some(ns))
            .or_else(|| self.workspaces.find(|w| w.target_namespace() == ns))
    }

    /// Whether the ComputeCluster exists.
    pub fn cluster_exists(&self, name: &str) -> bool {
        self.clusters.get(&ObjectRef::new(name)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::model_deployment::build::SPEC_HASH_ANNOTATION;
    use kube::runtime::watcher::Event;
    use serde_json::json;

    fn svc(name: &str, hash: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "annotations": {SPEC_HASH_ANNOTATION: hash},
                         "ownerReferences": [{"apiVersion": "mlplane.io/v1alpha1", "kind": "ModelDeployment",
                                              "name": "md", "uid": "u1", "controller": true}]},
        }))
        .unwrap()
    }

    #[test]
    fn a_write_stands_in_until_the_cache_shows_its_hash() {
        let (store, mut writer) = reflector::store::<Service>();
        let owners = LabelIndex::by_controller();
        let cache = ChildCache::new(store, owners.clone());
        let mut apply = |ev: Event<Service>| {
            writer.apply_watcher_event(&ev);
            owners.observe(&ev, &cache.store);
        };
        cache.record(&svc("md", "new"));
        assert_eq!(spec_hash(&cache.get("ns", "md").unwrap()), Some("new"));
        // The cache shows the old version: the write still wins.
        apply(Event::Apply(svc("md", "old")));
        assert_eq!(spec_hash(&cache.get("ns", "md").unwrap()), Some("new"));
        // The cache caught up: the entry goes, the cache is read.
        apply(Event::Apply(svc("md", "new")));
        assert_eq!(spec_hash(&cache.get("ns", "md").unwrap()), Some("new"));
        assert!(cache.written.lock().unwrap().is_empty());
        assert!(cache.get("ns", "other").is_none());
        assert_eq!(cache.owned_by("ns", "u1").len(), 1);
        assert!(cache.owned_by("ns", "u2").is_empty());
        assert!(cache.owned_by("other", "u1").is_empty());
        // Controlled by another ModelDeployment now: it is that one's child
        // only, though the index may still list it under the first.
        let mut taken = svc("md", "new");
        taken.metadata.owner_references.as_mut().unwrap()[0].uid = "u2".into();
        apply(Event::Apply(taken));
        assert!(cache.owned_by("ns", "u1").is_empty());
        assert_eq!(cache.owned_by("ns", "u2").len(), 1);
        apply(Event::Delete(svc("md", "new")));
        assert!(cache.owned_by("ns", "u2").is_empty());
    }

    #[test]
    fn controllers_are_named() {
        let s = svc("md", "h");
        assert_eq!(controller_uid(&s), Some("u1"));
        assert_eq!(controller_of(&s), "ModelDeployment md");
        assert!(controller_of(&Service::default()).starts_with("no ModelDeployment"));
    }
}
