//! Controllers, one module per kind. Each reconcile is a short driver:
//! dereference → validate (pure) → build children (pure) → apply changed
//! children → delete orphans → status from what was applied. This module holds
//! what they share: the context, the error type with its metric category, the
//! per-object backoff, events, and the guarded watch streams.
pub mod apply;
pub mod cached;
pub mod compute_cluster;
pub mod data_asset;
pub mod experiment;
pub mod fanout;
pub mod label_index;
pub mod model_deployment;
pub mod pinning;
pub mod pipeline;
pub mod priority;
pub mod run;
pub mod status_writer;
pub mod workspace;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::runtime::metrics::Metrics;

/// Settings shared by every controller (from the `run` flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespace the operator runs in (NetworkPolicies admit its traffic).
    pub operator_namespace: String,
    /// Reconciles of one kind running at once.
    pub concurrency: u16,
    /// Requeue interval of a converged object (periodic resync).
    pub resync: Duration,
    /// The tracking server (MLFLOW_TRACKING_URI of run pods), when configured.
    pub tracking: Option<crate::tracking::client::TrackingClient>,
    /// Curated environments (`environment: {name}`) -> images.
    pub catalog: run::environment::Catalog,
    /// The operator's image (init containers run its `fetch` subcommand).
    pub image: String,
    /// Serving runtimes by model format (ModelDeployments).
    pub runtimes: model_deployment::runtime::RuntimeCatalog,
    /// ModelDeployment serving settings (Gateway API, rollout deadline).
    pub serving: model_deployment::ServingSettings,
}

/// State shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub settings: Settings,
    /// Foreground writes (run Jobs, serving Deployments) go before
    /// bookkeeping (status, Events): see [`priority`].
    pub foreground: priority::Foreground,
    failures: Mutex<HashMap<String, u32>>,
    events: tokio::sync::mpsc::Sender<QueuedEvent>,
}

/// Events waiting to be published (see [`Context::event`]): room for a
/// burst of a few thousand new runs while publishing is deferred behind
/// their Job creates ([`priority`]); about half a KiB each.
pub const EVENT_QUEUE: usize = 4096;
/// Tasks publishing events.
pub const EVENT_PUBLISHERS: usize = 4;

impl Context {
    pub fn new(client: Client, metrics: Metrics, settings: Settings, instance: String) -> Arc<Self> {
        let reporter = Reporter {
            controller: "mlplane".into(),
            instance: Some(instance),
        };
        let recorder = Recorder::new(client.clone(), reporter.clone());
        let (events, queue) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        let foreground = priority::Foreground::default();
        for _ in 0..EVENT_PUBLISHERS {
            tokio::spawn(publish_events(
                client.clone(),
                reporter.clone(),
                recorder.clone(),
                queue.clone(),
                foreground.clone(),
            ));
        }
        Arc::new(Self {
            recorder,
            client,
            metrics,
            settings,
            foreground,
            failures: Mutex::default(),
            events,
        })
    }

    /// Records a Kubernetes Event on `obj` without holding up the reconcile:
    /// it is queued (up to [`EVENT_QUEUE`]; a reconcile waits only when the
    /// queue is full) and published in order by [`EVENT_PUBLISHERS`]
    /// background tasks; failures are logged, not fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.queue_event(obj, type_, reason, action, note, None, false).await
    }

    /// Like [`Context::event`], but always a new Event. kube's `Recorder`
    /// folds every event with the same reason and action on an object into
    /// one series (within its cache TTL) and keeps the *first* note, so two
    /// different decisions of one kind (traffic shifted to 90/10, later to
    /// 0/100) would show only the first. For decisions recorded once each.
    pub async fn distinct_event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.queue_event(obj, type_, reason, action, note, None, true).await
    }

    /// [`Context::event`] with a related object (e.g. the Job of a pipeline
    /// step). Events that repeat a reason and action on the same object form
    /// one series; a related object tells them apart.
    pub async fn event_related<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        related: Option<ObjectReference>,
    ) {
        self.queue_event(obj, type_, reason, action, note, related, false).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn queue_event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        related: Option<ObjectReference>,
        distinct: bool,
    ) {
        self.metrics.events.with_label_values(&[&K::kind(&()), reason]).inc();
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: related,
        };
        let queued = QueuedEvent {
            event: ev,
            reference: obj.object_ref(&()),
            distinct,
        };
        if self.events.send(queued).await.is_err() {
            tracing::warn!(reason, "event publishers stopped; event dropped");
        }
    }

    /// Clears the failure count of an object after a successful reconcile.
    pub fn reset_failures(&self, uid: &str) {
        self.failures.lock().expect("failures lock").remove(uid);
    }

    /// Exponential backoff per object: 1s, 2s, 4s, ... capped at 5 minutes.
    pub fn backoff(&self, uid: &str) -> Duration {
        let mut f = self.failures.lock().expect("failures lock");
        let n = f.entry(uid.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }
}

/// An event waiting to be published.
struct QueuedEvent {
    event: Event,
    reference: ObjectReference,
    /// Published by a fresh recorder: a new Event, never folded into a series.
    distinct: bool,
}

/// Publishes queued events until the queue's sender (the Context) is dropped.
async fn publish_events(
    client: Client,
    reporter: Reporter,
    recorder: Recorder,
    queue: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<QueuedEvent>>>,
    foreground: priority::Foreground,
) {
    loop {
        let Some(q) = queue.lock().await.recv().await else {
            return;
        };
        foreground.wait_turn().await;
        let result = if q.distinct {
            Recorder::new(client.clone(), reporter.clone())
                .publish(&q.event, &q.reference)
                .await
        } else {
            recorder.publish(&q.event, &q.reference).await
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, reason = %q.event.reason, "recording event failed");
        }
    }
}

/// Errors of a reconcile. `category()` is the low-cardinality label used in
/// metrics and event reasons.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialization error: {0}")]
    Serialization(#[from] serde_json::Error),
    #[error("the stored object could not be read: {0}")]
    InvalidObject(String),
    #[error("tracking server: {0}")]
    Tracking(#[from] crate::tracking::client::ClientError),
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => "invalid",
            Error::Kube(_) => "kube_api",
            Error::Serialization(_) => "serialization",
            Error::InvalidObject(_) => "invalid_object",
            Error::Tracking(_) => "tracking",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A reflector-backed watch of `K` that survives objects failing to
/// deserialize (they arrive as `DeserializeGuard` errors for the reconciler to
/// report) and strips managedFields before caching.
pub fn guarded_watch<K>(
    api: Api<DeserializeGuard<K>>,
    cfg: watcher::Config,
) -> (
    Store<DeserializeGuard<K>>,
    impl Stream<Item = Result<DeserializeGuard<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, cfg)
        .default_backoff()
        .modify(|o: &mut DeserializeGuard<K>| o.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects()
        .boxed();
    (reader, stream)
}

/// A boxed stream of the objects a watch touched.
pub type Touched<K> = std::pin::Pin<Box<dyn Stream<Item = Result<K, watcher::Error>> + Send>>;

/// Polls a cache-filling stream until `stop` fires (errors are retried by
/// the watcher's backoff and only logged).
pub async fn drive<K>(stream: Touched<K>, stop: tokio_util::sync::CancellationToken, what: &'static str) {
    drive_each(stream, stop, what, |_| {}).await
}

/// [`drive`], handing every object the stream yields to `each`.
pub async fn drive_each<K>(
    stream: impl Stream<Item = Result<K, watcher::Error>>,
    stop: tokio_util::sync::CancellationToken,
    what: &'static str,
    mut each: impl FnMut(K),
) {
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            item = stream.next() => match item {
                None => return,
                Some(Err(e)) => tracing::debug!(error = %e, what, "watch error"),
                Some(Ok(obj)) => each(obj),
            },
        }
    }
}

/// Shared error policy: count the error by category, log it, and requeue the
/// object with its own exponential backoff.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: &K,
    err: &Error,
    ctx: &Context,
) -> kube::runtime::controller::Action {
    let kind = K::kind(&());
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[&kind, err.category()])
        .inc();
    let backoff = ctx.backoff(&obj.uid().unwrap_or_default());
    tracing::warn!(kind = %kind, name = %obj.name_any(), error = %err, ?backoff, "reconcile failed");
    kube::runtime::controller::Action::requeue(backoff)
}

/// The object of a guarded watch, or `None` after reporting (log and
/// metric) a stored object that cannot be read: it waits for a change
/// instead of being retried.
pub fn readable<'a, K: Resource<DynamicType = ()>>(obj: &'a DeserializeGuard<K>, metrics: &Metrics) -> Option<&'a K> {
    match &obj.0 {
        Ok(k) => Some(k),
        Err(invalid) => {
            let kind = K::kind(&());
            tracing::error!(kind = %kind, name = ?invalid.metadata.name, error = %invalid.error, "stored object cannot be read");
            metrics
                .reconcile_errors
                .with_label_values(&[&kind, "invalid_object"])
                .inc();
            None
        }
    }
}

/// [`error_policy`] for controllers of guarded watches whose context
/// dereferences to the shared [`Context`].
pub fn guarded_error_policy<K, C>(
    obj: std::sync::Arc<DeserializeGuard<K>>,
    err: &Error,
    ctx: std::sync::Arc<C>,
) -> kube::runtime::controller::Action
where
    K: Resource<DynamicType = ()>,
    C: std::ops::Deref<Target = Context>,
{
    match &obj.0 {
        Ok(k) => error_policy(k, err, &ctx),
        Err(_) => kube::runtime::controller::Action::await_change(),
    }
}

/// Controller watcher config: watch timeouts below the 240 s idle timeout of
/// common cloud load balancers.
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(200)
}

/// Runs every controller until `stop` is cancelled.
pub async fn run_all(ctx: Arc<Context>, stop: tokio_util::sync::CancellationToken) {
    // The cluster-wide pod and run Job caches: the ComputeCluster
    // controller's, also read by the Workspace controller for usage.
    // The Experiment and Pipeline controllers read them too, and take their
    // pod and Job triggers from the same two watches.
    let (cluster, mut cluster_streams) = compute_cluster::observe::caches(&ctx.client);
    let cluster = Arc::new(cluster);
    let ready = cluster.clone();
    tokio::spawn(async move { ready.watch_ready().await });
    let (mut pods, mut jobs) = (fanout::Fanout::default(), fanout::Fanout::default());
    let mut triggers = |label| experiment::observe::RunTriggers {
        jobs: jobs.subscribe(Some(label)),
        pods: pods.subscribe(Some(label)),
    };
    let experiments = triggers(run::build::EXPERIMENT_LABEL);
    let pipelines = triggers(run::build::PIPELINE_LABEL);
    let pod_source = std::mem::replace(&mut cluster_streams.pods, pods.subscribe(None));
    let job_source = std::mem::replace(&mut cluster_streams.jobs, jobs.subscribe(None));
    tokio::spawn(pods.run(pod_source, stop.clone(), "pods"));
    tokio::spawn(jobs.run(job_source, stop.clone(), "run jobs"));
    tokio::join!(
        workspace::run(ctx.clone(), cluster.clone(), stop.clone().cancelled_owned()),
        experiment::run(ctx.clone(), cluster.clone(), experiments, stop.clone()),
        pipeline::run(ctx.clone(), cluster.clone(), pipelines, stop.clone()),
        compute_cluster::run(ctx.clone(), cluster, cluster_streams, stop.clone()),
        data_asset::run(ctx.clone(), stop.clone()),
        model_deployment::run(ctx.clone(), stop.clone()),
    );
}
