//! The ModelDeployment controller's I/O driver: gather what the plan needs
//! from the watch caches, plan ([`super::plan`]), apply the children that
//! changed (serving Deployments first, then Services, autoscalers and the
//! HTTPRoute), delete the children the spec no longer has, write status
//! only when it changed, record events.
//!
//! Services are written by the [`super::services::ServiceWriter`], off the
//! reconcile path (the API server creates them one at a time); the reconcile
//! hands it those the cache does not show up to date and reports them as
//! being created until they exist.
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
use kube::runtime::{Predicate, WatchStreamExt, predicates};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::build::DEPLOYMENT_LABEL;
use super::gateway::{API_VERSION, HTTPRoute};
use super::observe::{Caches, ChildCache, OVERLAY_TTL, caches, controller_of, controller_uid};
use super::plan::{Children, Config, Observed, Plan, child_keys, plan};
use super::services::{SERVICE_WRITERS, ServiceWriter};
use super::status::ROLLOUT_STALLED;
use crate::api::model_deployment::{ModelDeployment, ModelDeploymentPhase, ModelDeploymentStatus};
use crate::controllers::apply::{adopt_created_fields, apply_changed, create_new, created_by_post, up_to_date};
use crate::controllers::priority::Foreground;
use crate::controllers::status_writer::{Key as StatusKey, StatusWriter};
use crate::controllers::{Context, Error, Result, drive, error_policy, guarded_watch, watch_config};

const KIND: &str = "ModelDeployment";
/// Requeue while waiting for something the spec names (a run, a
/// ComputeCluster, an artifact store) or for a name held by someone else.
const BLOCKED_POLL: Duration = Duration::from_secs(15);
/// Workers writing ModelDeployment statuses (see [`StatusWriter`]): few, so
/// that under a flood of new ModelDeployments the API server's time goes to
/// their Deployments first and status updates coalesce.
const STATUS_WRITERS: usize = 2;
/// How long a ModelDeployment's reconcile waits for its triggers to
/// settle: a new deployment's Deployment, Service and route go through a
/// burst of watch events as they are created and roll out, and each would
/// otherwise be its own reconcile (and status write).
const RECONCILE_DEBOUNCE: Duration = Duration::from_millis(500);
/// How often `mlplane_objects{kind="ModelDeployment"}` is refreshed.
const GAUGE_PERIOD: Duration = Duration::from_secs(15);

/// The controller's context: the shared one plus its caches.
pub struct ModelDeploymentContext {
    pub base: Arc<Context>,
    pub caches: Caches,
    /// Whether HTTPRoutes are used (Gateway API served and not turned off).
    pub routes: bool,
    /// Service writes, off the reconcile path.
    pub services: ServiceWriter,
    /// Status writes, coalesced and off the reconcile path.
    pub status: StatusWriter<ModelDeployment, ModelDeploymentStatus>,
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
    // A new spec (generation) or a changed annotation (`mlplane.io/resolve`)
    // is work; the controller's own status writes are not.
    let stream = stream.predicate_filter(
        predicates::generation.combine(predicates::annotations),
        Default::default(),
    );
    let (caches, streams) = caches(&client, routes);
    // Service writes that found a name taken, or failed, come back here.
    let (trigger, triggered) = futures::channel::mpsc::unbounded();
    let services = ServiceWriter::start(
        ctx.clone(),
        caches.services.clone(),
        trigger,
        SERVICE_WRITERS,
        stop.clone(),
    );
    let status = StatusWriter::start_namespaced(
        &client,
        ctx.metrics.clone(),
        ctx.foreground.clone(),
        STATUS_WRITERS,
        stop.clone(),
    );
    let mctx = Arc::new(ModelDeploymentContext {
        base: ctx,
        caches,
        routes,
        services,
        status,
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
        .reconcile_on(triggered)
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
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(mctx.settings.concurrency)
                .debounce(RECONCILE_DEBOUNCE),
        )
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
pub(super) fn namespace_terminating(e: &Error) -> bool {
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

/// What writing one child did.
pub(super) enum Synced {
    Unchanged,
    Created,
    Updated,
    /// The name is held by an object this ModelDeployment does not control
    /// (`Kind/name`, its controller): left alone.
    Foreign(String, String),
}

/// Writes `desired` unless what is live already contains it. What is live
/// comes from the cache (with this process's writes laid over). When that
/// has nothing, the child is created by POST ([`create_new`]); if the name is
/// taken, a GET tells whether it is ours and not cached yet, or someone
/// else's, which is never taken over. A live child is updated by server-side
/// apply, its creation entry first made the apply entry
/// ([`adopt_created_fields`]). With `foreground`, these count as foreground
/// writes ([`crate::controllers::priority`]).
pub(super) async fn sync_child<K>(
    api: &Api<K>,
    cache: &ChildCache<K>,
    desired: &K,
    uid: &str,
    kind: &str,
    foreground: Option<&Foreground>,
) -> Result<Synced>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = desired.name_any();
    let foreign = |l: &K| Synced::Foreign(format!("{kind}/{name}"), controller_of(l));
    // Compared once: a cached child is either up to date (nothing to send)
    // or applied without comparing again.
    let (live, compared) = match cache.get(&desired.namespace().unwrap_or_default(), &name) {
        Some(l) if controller_uid(&l) != Some(uid) => return Ok(foreign(&l)),
        Some(l) if up_to_date(&l, desired)? => return Ok(Synced::Unchanged),
        Some(l) => (Some(l), true),
        None => (None, false),
    };
    let _busy = foreground.map(Foreground::begin);
    let live = match live {
        Some(l) => Some(l),
        None => match create_new(api, desired).await? {
            Some(created) => {
                cache.record(&created);
                return Ok(Synced::Created);
            }
            None => api.get_opt(&name).await?,
        },
    };
    if let Some(l) = &live {
        if controller_uid(l) != Some(uid) {
            return Ok(foreign(l));
        }
        if !compared && up_to_date(l, desired)? {
            return Ok(Synced::Unchanged);
        }
        if created_by_post(l) {
            adopt_created_fields(api, &name, desired).await?;
        }
    }
    match apply_changed(api, None, desired).await? {
        Some(written) => {
            cache.record(&written);
            Ok(if live.is_none() {
                Synced::Created
            } else {
                Synced::Updated
            })
        }
        None => Ok(Synced::Unchanged),
    }
}

/// The Apis of the children's kinds in one namespace.
struct Apis {
    deployments: Api<Deployment>,
    services: Api<Service>,
    autoscalers: Api<HorizontalPodAutoscaler>,
    routes: Api<HTTPRoute>,
}

/// Writes every child that changed, all at once, Services aside (see
/// [`services_to_write`]). Returns the names taken by others (`Kind/name` ->
/// their controller).
async fn sync_children(
    ctx: &ModelDeploymentContext,
    apis: &Apis,
    c: &Children,
    uid: &str,
    changes: &mut Changes,
) -> Result<BTreeMap<String, String>> {
    let caches = &ctx.caches;
    let (deployments, autoscalers, route) = futures::try_join!(
        // The serving Deployments are what users wait for: foreground
        // (priority), ahead of Services, status and Events.
        try_join_all(c.deployments.iter().map(|d| sync_child(
            &apis.deployments,
            &caches.deployments,
            d,
            uid,
            "Deployment",
            Some(&ctx.foreground)
        ))),
        try_join_all(c.autoscalers.iter().map(|a| sync_child(
            &apis.autoscalers,
            &caches.autoscalers,
            a,
            uid,
            "HorizontalPodAutoscaler",
            None
        ))),
        async {
            match (&caches.routes, &c.route) {
                (Some(cache), Some(r)) => sync_child(&apis.routes, cache, r, uid, "HTTPRoute", None)
                    .await
                    .map(Some),
                _ => Ok(None),
            }
        },
    )?;
    let mut taken = BTreeMap::new();
    let named =
        |kind: &str, objs: Vec<String>| objs.into_iter().map(move |n| format!("{kind}/{n}")).collect::<Vec<_>>();
    let keys = named("Deployment", c.deployments.iter().map(|o| o.name_any()).collect())
        .into_iter()
        .chain(named(
            "HorizontalPodAutoscaler",
            c.autoscalers.iter().map(|o| o.name_any()).collect(),
        ))
        .chain(named("HTTPRoute", c.route.iter().map(|o| o.name_any()).collect()));
    let results = deployments.into_iter().chain(autoscalers).chain(route);
    for (key, synced) in keys.zip(results) {
        match synced {
            Synced::Unchanged => {}
            Synced::Created => changes.created.push(key),
            Synced::Updated => changes.updated.push(key),
            Synced::Foreign(k, owner) => {
                taken.insert(k, owner);
            }
        }
    }
    Ok(taken)
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

/// The Services of `c` that the cache does not show up to date (absent,
/// or lacking a desired field): the ones to hand to the writer.
fn services_to_write(cache: &ChildCache<Service>, c: &Children, uid: &str) -> Vec<Service> {
    c.services
        .iter()
        .filter(|s| {
            let live = cache.get(&s.namespace().unwrap_or_default(), &s.name_any());
            !live.is_some_and(|l| controller_uid(&l) == Some(uid) && up_to_date(&l, *s).unwrap_or(false))
        })
        .cloned()
        .collect()
}

/// Observed state of `md` from the caches, with `foreign` child names.
fn observe<'a>(
    md: &ModelDeployment,
    ctx: &ModelDeploymentContext,
    live_deployments: &'a BTreeMap<String, Deployment>,
    experiments: &'a BTreeMap<String, Arc<crate::api::Experiment>>,
    workspace: Option<&'a crate::api::Workspace>,
    foreign: BTreeMap<String, String>,
    creating_services: &BTreeSet<String>,
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
        creating_services: creating_services.clone(),
        route_exists: ctx.caches.routes.as_ref().is_some_and(|routes| {
            routes
                .get(&md.namespace().unwrap_or_default(), &md.name_any())
                .is_some_and(|r| controller_uid(&r) == md.uid().as_deref())
        }),
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
    // The status the plan starts from: the last one this process wrote (or
    // queued), where the cache does not show it yet.
    let status_key = StatusKey::of(md);
    let current = ctx.status.current(&status_key, md.status.as_ref());
    let with_current;
    let md = if current.as_ref() != md.status.as_ref() {
        let mut m = md.clone();
        m.status = current;
        with_current = m;
        &with_current
    } else {
        md
    };
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
    // Names the Service writer found held by an owner the cache does not show.
    foreign.extend(ctx.services.taken(md));
    let creating_services: BTreeSet<String> = child_keys(md)
        .iter()
        .filter_map(|k| k.strip_prefix("Service/"))
        .filter(|n| ctx.caches.services.get(&ns, n).is_none())
        .map(String::from)
        .collect();
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

    let apis = Apis {
        deployments: Api::namespaced(client.clone(), &ns),
        services: Api::namespaced(client.clone(), &ns),
        autoscalers: Api::namespaced(client.clone(), &ns),
        routes: Api::namespaced(client.clone(), &ns),
    };

    // Plan, then write every child that changed, all at once. A name that
    // turns out to be taken (an object the caches do not show) is left
    // alone, and the plan is made again without it.
    let plan_with = |foreign: &BTreeMap<String, String>| {
        let observed = observe(
            md,
            ctx,
            &live_deployments,
            &experiments,
            workspace.as_deref(),
            foreign.clone(),
            &creating_services,
        );
        plan(md, &observed, &config, &now)
    };
    let mut planned: Plan = plan_with(&foreign);
    let mut changes = Changes::default();
    let taken = sync_children(ctx, &apis, &planned.children, &uid, &mut changes).await?;
    if !taken.is_empty() {
        foreign.extend(taken);
        planned = plan_with(&foreign);
        sync_children(ctx, &apis, &planned.children, &uid, &mut changes).await?;
    }
    let c = &planned.children;
    let stale = services_to_write(&ctx.caches.services, c, &uid);
    if !stale.is_empty() {
        ctx.services.submit(md, stale);
    }

    // Orphans: children of deployments gone from the spec, autoscalers of
    // deployments no longer autoscaled.
    let orphans = Orphans {
        ns: &ns,
        uid: &uid,
        held: &planned.held,
    };
    let ch = &mut changes;
    let keep = names(&c.deployments);
    orphans
        .delete(&apis.deployments, &ctx.caches.deployments, &keep, "Deployment", ch)
        .await?;
    let keep = names(&c.services);
    orphans
        .delete(&apis.services, &ctx.caches.services, &keep, "Service", ch)
        .await?;
    let keep = names(&c.autoscalers);
    let kind = "HorizontalPodAutoscaler";
    orphans
        .delete(&apis.autoscalers, &ctx.caches.autoscalers, &keep, kind, ch)
        .await?;
    if let Some(cache) = &ctx.caches.routes {
        let keep = c.route.iter().map(|r| r.name_any()).collect();
        orphans.delete(&apis.routes, cache, &keep, "HTTPRoute", ch).await?;
    }

    // Status, then events.
    ctx.status
        .submit_if_changed(status_key, md.status.as_ref(), &planned.status);
    // Events go to the Context's publisher queue: recording them must not
    // hold up the next reconcile.
    let mut events: Vec<(EventType, &'static str, String)> = vec![];
    for (reason, list) in [
        ("Created", &changes.created),
        ("Updated", &changes.updated),
        ("Deleted", &changes.deleted),
    ] {
        if !list.is_empty() {
            let note = format!("{} {}", reason.to_lowercase(), list.join(", "));
            events.push((EventType::Normal, reason, note));
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
        events.push((type_, e.reason, e.message.clone()));
    }
    for (type_, reason, note) in events {
        ctx.distinct_event(md, type_, reason, "Reconcile", note).await;
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
