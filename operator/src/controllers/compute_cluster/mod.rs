//! ComputeCluster controller: node pools that scale with demand, and the
//! admission queue of run Jobs.
//!
//! Modules: [`observe`] (watch caches and the controller's own recent
//! writes), [`snapshot`] (cached objects to the planner's input, pure),
//! [`status`] (pure), [`scale_down`] (cordon, evict) and [`reconcile`] (the
//! driver). The decisions are [`crate::autoscaler`]'s.
//!
//! Owns: the admission of run Jobs labelled `mlplane.io/compute-cluster`
//! (any run Job the shared builder made: Experiment runs, sweep trials,
//! Pipeline steps), the nodes of the clusters' pools, and ComputeCluster
//! status. Must not create run Jobs or change anything in them but
//! `spec.suspend` and the queue annotations.
//!
//! Triggers: a ComputeCluster; its nodes (by label) and, for clusterAPI,
//! its MachineDeployments and Machines; its run Jobs (by label); pods that
//! select it or run on its nodes; Workspaces (quotas). DaemonSets,
//! PodDisruptionBudgets and namespaces only fill caches (passes are
//! requeued while runs wait or drains are blocked).
pub mod observe;
pub mod reconcile;
pub mod scale_down;
pub mod snapshot;
pub mod status;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::controllers::cached::{CachedJob, CachedPod};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use tokio_util::sync::CancellationToken;

use self::reconcile::{ClusterContext, KIND, clusters_labelled};
use super::experiment::observe::drive;
use super::run::build::COMPUTE_CLUSTER_LABEL;
use super::status_writer::StatusWriter;
use super::{Context, Error, Result, error_policy, guarded_watch, watch_config};
use crate::api::ComputeCluster;

/// Runs the controller until `stop` is cancelled. `caches` and `streams`
/// come from [`observe::caches`]: the controller polls the streams, and
/// others (the Workspace controller's usage) may read the caches.
pub async fn run(ctx: Arc<Context>, caches: Arc<observe::Caches>, streams: observe::Streams, stop: CancellationToken) {
    let client = ctx.client.clone();
    let (store, stream) = guarded_watch(
        Api::<DeserializeGuard<ComputeCluster>>::all(client.clone()),
        watch_config(),
    );
    let (trigger, triggered) = futures::channel::mpsc::unbounded();
    let nodes = caches.nodes.clone();
    let status_client = ctx.client.clone();
    // Statuses are written on the pass's task (write_now); the worker only
    // retries. What it remembers stands in for a cache that lags behind.
    let statuses = StatusWriter::start(
        move |_| Api::all(status_client.clone()),
        ctx.metrics.clone(),
        ctx.foreground.clone(),
        1,
        stop.clone(),
    );
    let cctx = Arc::new(ClusterContext {
        statuses,
        base: ctx,
        caches,
        clusters: store.clone(),
        admission: tokio::sync::Mutex::new(()),
        writes: Default::default(),
        memory: Mutex::default(),
        trigger,
        capi_checked: Mutex::new(None),
        stop: stop.clone(),
    });
    tokio::spawn(drive(streams.daemonsets, stop.clone(), "daemonsets"));
    tokio::spawn(drive(streams.pdbs, stop.clone(), "poddisruptionbudgets"));
    tokio::spawn(drive(streams.namespaces, stop.clone(), "namespaces"));
    // Gauges of deleted clusters go (deleted objects are not reconciled).
    let refresher = cctx.clone();
    let refresh_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = refresh_stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(15)) => refresher.refresh_metrics(),
            }
        }
    });

    let (s1, s2, s3, s4) = (store.clone(), store.clone(), store.clone(), store.clone());
    let by_node = move |n: Node| {
        n.labels()
            .get(COMPUTE_CLUSTER_LABEL)
            .map(|v| clusters_labelled(&s1, v))
            .unwrap_or_default()
    };
    let by_job = move |j: CachedJob| {
        j.labels()
            .get(COMPUTE_CLUSTER_LABEL)
            .map(|v| clusters_labelled(&s2, v))
            .unwrap_or_default()
    };
    // A pod selecting a cluster, or on a node of one.
    let by_pod = move |p: CachedPod| {
        let spec = p.spec.as_ref();
        if let Some(v) = spec
            .and_then(|s| s.node_selector.as_ref())
            .and_then(|s| s.get(COMPUTE_CLUSTER_LABEL))
        {
            return clusters_labelled(&s3, v);
        }
        spec.and_then(|s| s.node_name.as_ref())
            .and_then(|n| nodes.get(&ObjectRef::new(n)))
            .and_then(|n| n.labels().get(COMPUTE_CLUSTER_LABEL).map(|v| clusters_labelled(&s3, v)))
            .unwrap_or_default()
    };
    let every = move |_| {
        s4.state()
            .iter()
            .map(|c| ObjectRef::new(&c.name_any()))
            .collect::<Vec<_>>()
    };
    Controller::for_stream(stream, store)
        .watches_stream(streams.nodes, by_node)
        .watches_stream(streams.jobs, by_job)
        .watches_stream(streams.pods, by_pod)
        .watches_stream(streams.workspaces, every)
        .reconcile_on(triggered)
        .with_config(kube::runtime::controller::Config::default().concurrency(cctx.settings.concurrency))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile_guarded, guarded_error_policy, cctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "computecluster controller stream error");
            }
        })
        .await;
}

async fn reconcile_guarded(obj: Arc<DeserializeGuard<ComputeCluster>>, ctx: Arc<ClusterContext>) -> Result<Action> {
    match &obj.0 {
        Ok(cc) => reconcile::reconcile(cc, &ctx).await,
        Err(invalid) => {
            tracing::error!(name = ?invalid.metadata.name, error = %invalid.error, "stored ComputeCluster cannot be read");
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[KIND, "invalid_object"])
                .inc();
            Ok(Action::await_change())
        }
    }
}

fn guarded_error_policy(obj: Arc<DeserializeGuard<ComputeCluster>>, err: &Error, ctx: Arc<ClusterContext>) -> Action {
    match &obj.0 {
        Ok(cc) => error_policy(cc, err, &ctx),
        Err(_) => Action::await_change(),
    }
}
