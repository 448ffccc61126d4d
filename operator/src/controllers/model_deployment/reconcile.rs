//! The ModelDeployment controller's I/O driver: gather what the plan needs
//! from the watch caches, plan ([`super::plan`]), apply the children that
//! changed (serving Deployments first, then Services, autoscalers and the
//! HTTPRoute), delete the children the spec no longer has, write status
//! only when it changed, record events.
//!
//! Owns: Deployments, Services, HorizontalPodAutoscalers and HTTPRoutes
//! labelled `mlplane.io/model-deployment` and controlled by a
//! ModelDeployment. Must not touch anything else: a child name already taken
//! by an object it does not control is reported (`NameConflict`), never
//! taken over.
//!
//! Reads come from the caches; the only reads sent to the API server are a
//! GET of a child the plan wants that the caches do not have (a first
//! creation, or a name held by someone else). A converged reconcile sends
//! nothing. Deleting the ModelDeployment removes its children through their
//! ownerReferences (garbage collection).
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::try_join_all;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::build::DEPLOYMENT_LABEL;
use super::gateway::{API_VERSION, HTTPRoute};
use super::observe::{Caches, ChildCache, OVERLAY_TTL, caches, controller_of, controller_uid, drive};
use super::plan::{Config, Observed, Plan, child_keys, plan};
use super::status::ROLLOUT_STALLED;
use crate::api::model_deployment::{ModelDeployment, ModelDeploymentPhase};
use crate::controllers::apply::{apply_changed, patch_status_if_changed};
use crate::controllers::{Context, Error, Result, error_policy, guarded_watch, watch_config};

const KIND: &str = "ModelDeployment";
/// Requeue while waiting for something the spec names (a run, a
/// ComputeCluster, an artifact store) or for a name held by someone else.
const BLOCKED_POLL: Duration = Duration::from_secs(15);
/// How often `mlplane_objects{kind="ModelDeployment"}` is refreshed.
const GAUGE_PERIOD: Duration = Duration::from_secs(15);

/// The controller's context: the shared one plus its caches.
pub struct ModelDeploymentContext {
    pub base: Arc<Context>,
    pub caches: Caches,
    /// Whether HTTPRoutes are used (Gateway API served and not turned off).
    pub routes: bool,
}

impl std::ops::Deref for ModelDeploymentContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.base
    }
}

/// Whether the API server serves `gateway.networking.k8s.io/v1` HTTPRoutes
/// (a few tries: a transient error must not turn routing off).
async fn gateway_api_served(client: &Client) -> bool {
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        match client.list_api_group_resources(API_VERSION).await {
            Ok(list) => return list.resources.iter().any(|r| r.kind == "HTTPRoute"),
            Err(kube::Error::Api(s)) if s.code == 404 => return false,
            Err(e) => tracing::warn!(error = %e, "discovering Gateway API failed"),
        }
    }
    false
}

/// The ModelDeployments of `ns` whose models name the Experiment `exp`.
fn naming_experiment(
    store: &Store<DeserializeGuard<ModelDeployment>>,
    ns: &str,
    exp: &str,
) -> Vec<ObjectRef<DeserializeGuard<ModelDeployment>>> {
    store
        .state_filter(|g| {
            g.0.as_ref().is_ok_and(|md| {
                md.metadata.namespace.as_deref() == Some(ns)
                    && md
                        .spec
                        .deployments
                        .iter()
                        .any(|d| d.model.experiment.as_deref() == Some(exp))
            })
        })
        .iter()
        .filter_map(|g| g.0.as_ref().ok())
        .map(|md| ObjectRef::new(&md.name_any()).within(ns))
        .collect()
}

/// Runs the controller until `stop` is cancelled.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let routes = ctx.settings.serving.gateway_api && gateway_api_served(&client).await;
    tracing::info!(
        routes,
        "ModelDeployment controller: traffic splits and mirrors {}",
        if routes {
            "through Gateway API HTTPRoutes"
        } else {
            "refused (no Gateway API)"
        }
    );
    let (store, stream) = guarded_watch(
        Api::<DeserializeGuard<ModelDeployment>>::all(client.clone()),
        watch_config(),
    );
    let (caches, streams) = caches(&client, routes);
    let mctx = Arc::new(ModelDeploymentContext {
        base: ctx,
        caches,
        routes,
    });
    // Workspaces and ComputeClusters only fill caches (what waits on them is
    // polled, see BLOCKED_POLL).
    tokio::spawn(drive(streams.workspaces, stop.clone(), "workspaces"));
    tokio::spawn(drive(streams.clusters, stop.clone(), "computeclusters"));
    let ready = mctx.clone();
    tokio::spawn(async move { ready.caches.watch_ready().await });
    tokio::spawn(refresh_phase_gauge(mctx.clone(), store.clone(), stop.clone()));
    let by_experiment = store.clone();
    let mut controller = Controller::for_stream(stream, store)
        .owns_stream(streams.deployments)
        .owns_stream(streams.services)
        .owns_stream(streams.autoscalers)
        .watches_stream(streams.experiments, move |exp| {
            naming_experiment(&by_experiment, &exp.namespace().unwrap_or_default(), &exp.name_any())
        });
    if let Some(routes) = streams.routes {
        controller = controller.owns_stream(routes);
    }
    controller
        .with_config(kube::runtime::controller::Config::default().concurrency(mctx.settings.concurrency))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile_guarded, guarded_error_policy, mctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "model deployment controller stream error");
            }
        })
        .await;
}

/// Sets `mlplane_objects{kind="ModelDeployment", phase}` from the cache.
async fn refresh_phase_gauge(
    ctx: Arc<ModelDeploymentContext>,
    store: Store<DeserializeGuard<ModelDeployment>>,
    stop: CancellationToken,
) {
    loop {
        let mut counts: BTreeMap<&str, i64> = ModelDeploymentPhase::ALL.iter().map(|p| (p.as_str(), 0)).collect();
        for g in store.state() {
            if let Ok(md) = &g.0 {
                let phase = md.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
                *counts.entry(phase.as_str()).or_default() += 1;
            }
        }
        for (phase, n) in counts {
            ctx.metrics.objects.with_label_values(&[KIND, phase]).set(n);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(GAUGE_PERIOD) => {}
        }
    }
}

/// Whether a write failed because its namespace is being deleted, or is
/// gone (its ModelDeployments go with it: nothing to retry).
fn namespace_terminating(e: &Error) -> bool {
    let Error::Kube(kube::Error::Api(s)) = e else {
        return false;
    };
    let details = s.details.as_ref();
    (s.code == 403 && details.is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating")))
        || (s.code == 404 && details.is_some_and(|d| d.kind == "namespaces"))
}

async fn reconcile_guarded(
    obj: Arc<DeserializeGuard<ModelDeployment>>,
    ctx: Arc<ModelDeploymentContext>,
) -> Result<Action> {
    match &obj.0 {
        Ok(md) => match reconcile(md, &ctx).await {
            Err(e) if namespace_terminating(&e) => Ok(Action::await_change()),
            r => r,
        },
        Err(invalid) => {
            tracing::error!(name = ?invalid.metadata.name, error = %invalid.error, "stored ModelDeployment cannot be read");
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[KIND, "invalid_object"])
                .inc();
            Ok(Action::await_change())
        }
    }
}

fn guarded_error_policy(
    obj: Arc<DeserializeGuard<ModelDeployment>>,
    err: &Error,
    ctx: Arc<ModelDeploymentContext>,
) -> Action {
    match &obj.0 {
        Ok(md) => error_policy(md, err, &ctx),
        Err(_) => Action::await_change(),
    }
}

/// Children written by one reconcile, for its events.
#[derive(Default)]
struct Changes {
    created: Vec<String>,
    updated: Vec<String>,
    deleted: Vec<String>,
}

/// Applies `desired` over what the cache (or a GET, when the cache has
/// nothing) shows. `Ok(Some(true))`: created; `Some(false)`: updated.
async fn apply_child<K>(api: &Api<K>, cache: &ChildCache<K>, desired: &K) -> Result<Option<bool>>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let ns = desired.namespace().unwrap_or_default();
    let live = cache.get(&ns, &desired.name_any());
    match apply_changed(api, live.as_ref(), desired).await? {
        Some(written) => {
            cache.record(&written);
            Ok(Some(live.is_none()))
        }
        None => Ok(None),
    }
}

/// For each child the plan wants that the cache does not have: a GET (all
/// at once). One that exists is either ours (remembered, so it is compared,
/// not re-created) or someone else's (returned: `Kind/name` -> its
/// controller).
async fn check_absent<K>(
    api: &Api<K>,
    cache: &ChildCache<K>,
    desired: &[K],
    uid: &str,
    kind: &str,
) -> Result<BTreeMap<String, String>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let absent = desired
        .iter()
        .filter(|d| cache.get(&d.namespace().unwrap_or_default(), &d.name_any()).is_none())
        .map(|d| d.name_any());
    let found = try_join_all(absent.map(|name| async move { api.get_opt(&name).await })).await?;
    let mut foreign = BTreeMap::new();
    for live in found.into_iter().flatten() {
        if controller_uid(&live) == Some(uid) {
            cache.record(&live);
        } else {
            foreign.insert(format!("{kind}/{}", live.name_any()), controller_of(&live));
        }
    }
    Ok(foreign)
}

/// Whose children a cleanup looks at, and which of them stay.
struct Orphans<'a> {
    ns: &'a str,
    uid: &'a str,
    /// Deployments whose children are held (not built now, not deleted).
    held: &'a BTreeSet<String>,
}

impl Orphans<'_> {
    /// Deletes the cached children of `uid` that the plan neither built
    /// (`keep`) nor held.
    async fn delete<K>(
        &self,
        api: &Api<K>,
        cache: &ChildCache<K>,
        keep: &BTreeSet<String>,
        kind: &str,
        changes: &mut Changes,
    ) -> Result<()>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
    {
        for child in cache.owned_by(self.ns, self.uid) {
            let name = child.name_any();
            let held = child
                .labels()
                .get(DEPLOYMENT_LABEL)
                .is_some_and(|d| self.held.contains(d));
            if keep.contains(&name) || held {
                continue;
            }
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            cache.forget(self.ns, &name);
            changes.deleted.push(format!("{kind}/{name}"));
        }
        Ok(())
    }
}

fn names<K: Resource>(objs: &[K]) -> BTreeSet<String> {
    objs.iter().filter_map(|o| o.meta().name.clone()).collect()
}

/// Observed state of `md` from the caches, with `foreign` child names.
fn observe<'a>(
    md: &ModelDeployment,
    ctx: &ModelDeploymentContext,
    live_deployments: &'a BTreeMap<String, Deployment>,
    experiments: &'a BTreeMap<String, Arc<crate::api::Experiment>>,
    workspace: Option<&'a crate::api::Workspace>,
    foreign: BTreeMap<String, String>,
) -> Observed<'a> {
    let storage = workspace.and_then(|w| w.spec.storage.as_ref());
    Observed {
        deployments: live_deployments.iter().map(|(k, v)| (k.clone(), v)).collect(),
        experiments: experiments.iter().map(|(k, v)| (k.clone(), v.as_ref())).collect(),
        storage,
        credentials: storage
            .and_then(|s| s.artifacts.secret_ref.as_ref())
            .map(|r| r.name.as_str()),
        missing_clusters: md
            .spec
            .deployments
            .iter()
            .filter_map(|d| d.compute.clone())
            .filter(|cc| !ctx.caches.cluster_exists(cc))
            .collect(),
        foreign,
    }
}

/// One reconcile of a ModelDeployment.
pub async fn reconcile(md: &ModelDeployment, ctx: &ModelDeploymentContext) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    if md.metadata.deletion_timestamp.is_some() {
        // Children go with the ownerReference cascade.
        return Ok(Action::await_change());
    }
    ctx.caches.ready().await;
    let client = &ctx.client;
    let ns = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let uid = md.uid().unwrap_or_default();
    let settings = &ctx.settings;

    // Observe, from the caches.
    let mut live_deployments = BTreeMap::new();
    let mut foreign = BTreeMap::new();
    for d in &md.spec.deployments {
        let child = super::build::child_name(&name, &d.name);
        if let Some(live) = ctx.caches.deployments.get(&ns, &child) {
            if controller_uid(&live) == Some(uid.as_str()) {
                live_deployments.insert(d.name.clone(), live);
            } else {
                foreign.insert(format!("Deployment/{child}"), controller_of(&live));
            }
        }
    }
    for key in child_keys(md) {
        let Some((kind, child)) = key.split_once('/') else {
            continue;
        };
        let owner = match kind {
            "Service" => ctx
                .caches
                .services
                .get(&ns, child)
                .map(|o| (controller_uid(&o).map(String::from), controller_of(&o))),
            "HorizontalPodAutoscaler" => ctx
                .caches
                .autoscalers
                .get(&ns, child)
                .map(|o| (controller_uid(&o).map(String::from), controller_of(&o))),
            "HTTPRoute" => ctx
                .caches
                .routes
                .as_ref()
                .and_then(|r| r.get(&ns, child))
                .map(|o| (controller_uid(&o).map(String::from), controller_of(&o))),
            _ => None,
        };
        if let Some((owner_uid, who)) = owner
            && owner_uid.as_deref() != Some(uid.as_str())
        {
            foreign.insert(key, who);
        }
    }
    let experiments: BTreeMap<String, Arc<crate::api::Experiment>> = md
        .spec
        .deployments
        .iter()
        .filter_map(|d| d.model.experiment.clone())
        .filter_map(|e| ctx.caches.experiment(&ns, &e).map(|x| (e, x)))
        .collect();
    let workspace = ctx.caches.workspace_of(&ns);
    let route_settings = ctx.routes.then_some(&settings.serving.routes);
    let config = Config {
        runtimes: &settings.runtimes,
        fetch_image: &settings.image,
        routes: route_settings,
        progress_deadline_seconds: settings.serving.progress_deadline_seconds,
    };
    let now = Time(Timestamp::now());

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let autoscalers: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    let routes: Api<HTTPRoute> = Api::namespaced(client.clone(), &ns);

    // Plan; children the caches do not have are looked up once (they may be
    // ours, not cached yet, or someone else's), then planned again if some
    // name turned out to be taken.
    let mut planned: Plan = plan(
        md,
        &observe(
            md,
            ctx,
            &live_deployments,
            &experiments,
            workspace.as_deref(),
            foreign.clone(),
        ),
        &config,
        &now,
    );
    let c = &planned.children;
    let (mut taken, svc, hpa, route) = futures::try_join!(
        check_absent(
            &deployments,
            &ctx.caches.deployments,
            &c.deployments,
            &uid,
            "Deployment"
        ),
        check_absent(&services, &ctx.caches.services, &c.services, &uid, "Service"),
        check_absent(
            &autoscalers,
            &ctx.caches.autoscalers,
            &c.autoscalers,
            &uid,
            "HorizontalPodAutoscaler"
        ),
        async {
            match (&ctx.caches.routes, &c.route) {
                (Some(cache), Some(r)) => {
                    check_absent(&routes, cache, std::slice::from_ref(r), &uid, "HTTPRoute").await
                }
                _ => Ok(BTreeMap::new()),
            }
        },
    )?;
    taken.extend(svc.into_iter().chain(hpa).chain(route));
    if !taken.is_empty() {
        foreign.extend(taken);
        planned = plan(
            md,
            &observe(
                md,
                ctx,
                &live_deployments,
                &experiments,
                workspace.as_deref(),
                foreign.clone(),
            ),
            &config,
            &now,
        );
    }

    // Apply: serving Deployments first (they take longest to become
    // Available), then the rest.
    let mut changes = Changes::default();
    let c = &planned.children;
    let record = |changes: &mut Changes, kind: &str, objs: &[String], results: Vec<Option<bool>>| {
        for (n, r) in objs.iter().zip(results) {
            match r {
                Some(true) => changes.created.push(format!("{kind}/{n}")),
                Some(false) => changes.updated.push(format!("{kind}/{n}")),
                None => {}
            }
        }
    };
    let results = try_join_all(
        c.deployments
            .iter()
            .map(|d| apply_child(&deployments, &ctx.caches.deployments, d)),
    )
    .await?;
    let dep_names: Vec<String> = c.deployments.iter().map(|d| d.name_any()).collect();
    record(&mut changes, "Deployment", &dep_names, results);
    let svc_names: Vec<String> = c.services.iter().map(|s| s.name_any()).collect();
    let hpa_names: Vec<String> = c.autoscalers.iter().map(|s| s.name_any()).collect();
    let (svc_results, hpa_results, route_result) = futures::try_join!(
        try_join_all(
            c.services
                .iter()
                .map(|s| apply_child(&services, &ctx.caches.services, s))
        ),
        try_join_all(
            c.autoscalers
                .iter()
                .map(|a| apply_child(&autoscalers, &ctx.caches.autoscalers, a))
        ),
        async {
            match (&ctx.caches.routes, &c.route) {
                (Some(cache), Some(route)) => apply_child(&routes, cache, route).await,
                _ => Ok(None),
            }
        },
    )?;
    record(&mut changes, "Service", &svc_names, svc_results);
    record(&mut changes, "HorizontalPodAutoscaler", &hpa_names, hpa_results);
    if let Some(route) = &c.route {
        record(&mut changes, "HTTPRoute", &[route.name_any()], vec![route_result]);
    }

    // Orphans: children of deployments gone from the spec, autoscalers of
    // deployments no longer autoscaled.
    let orphans = Orphans {
        ns: &ns,
        uid: &uid,
        held: &planned.held,
    };
    let ch = &mut changes;
    orphans
        .delete(
            &deployments,
            &ctx.caches.deployments,
            &names(&c.deployments),
            "Deployment",
            ch,
        )
        .await?;
    orphans
        .delete(&services, &ctx.caches.services, &names(&c.services), "Service", ch)
        .await?;
    let hpa_keep = names(&c.autoscalers);
    orphans
        .delete(
            &autoscalers,
            &ctx.caches.autoscalers,
            &hpa_keep,
            "HorizontalPodAutoscaler",
            ch,
        )
        .await?;
    if let Some(cache) = &ctx.caches.routes {
        let keep = c.route.iter().map(|r| r.name_any()).collect();
        orphans.delete(&routes, cache, &keep, "HTTPRoute", ch).await?;
    }

    // Status, then events.
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns);
    patch_status_if_changed(&mds, &name, md.status.as_ref(), &planned.status).await?;
    for (reason, list) in [
        ("Created", &changes.created),
        ("Updated", &changes.updated),
        ("Deleted", &changes.deleted),
    ] {
        if !list.is_empty() {
            let note = format!("{} {}", reason.to_lowercase(), list.join(", "));
            ctx.distinct_event(md, EventType::Normal, reason, "Reconcile", note)
                .await;
        }
    }
    if planned.shifted.is_some() {
        ctx.metrics.traffic_shifts.inc();
    }
    for e in &planned.events {
        if e.reason == ROLLOUT_STALLED {
            ctx.metrics.rollouts_stalled.inc();
        }
        let type_ = if e.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        ctx.distinct_event(md, type_, e.reason, "Reconcile", e.message.clone())
            .await;
    }
    ctx.reset_failures(&uid);
    let blocked = !foreign.is_empty() || planned.waiting;
    let mut requeue = if blocked { BLOCKED_POLL } else { settings.resync };
    if !(changes.created.is_empty() && changes.updated.is_empty()) {
        // Once the write overlay has expired, look again: a child deleted
        // right after it was written shows only in the cache.
        requeue = requeue.min(OVERLAY_TTL + Duration::from_secs(1));
    }
    Ok(Action::requeue(requeue))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, body: serde_json::Value) -> Error {
        let mut status: kube::core::Status = serde_json::from_value(body).unwrap();
        status.code = code;
        Error::Kube(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn writes_into_a_namespace_going_away_are_not_retried() {
        let terminating = api_error(
            403,
            serde_json::json!({"status": "Failure", "reason": "Forbidden", "details": {
                "name": "resnet", "kind": "services",
                "causes": [{"reason": "NamespaceTerminating", "message": "namespace x is being terminated"}]}}),
        );
        assert!(namespace_terminating(&terminating));
        let gone = api_error(
            404,
            serde_json::json!({"status": "Failure", "reason": "NotFound", "details": {"name": "x", "kind": "namespaces"}}),
        );
        assert!(namespace_terminating(&gone));
        let forbidden = api_error(403, serde_json::json!({"status": "Failure", "reason": "Forbidden"}));
        assert!(!namespace_terminating(&forbidden));
        let missing = api_error(
            404,
            serde_json::json!({"status": "Failure", "reason": "NotFound", "details": {"name": "x", "kind": "deployments"}}),
        );
        assert!(!namespace_terminating(&missing));
    }
}
