//! The Experiment controller's I/O driver: observe the experiment's Jobs (and,
//! while some run is unfinished, their pods), record runs that ended, start
//! new runs and sweep trials, stop trials early, cancel on suspend, and write
//! status only when it changed.
//!
//! Owns: run Jobs (and headless Services) labelled `mlplane.io/experiment`,
//! and the MLflow runs of those runs. Must not touch anything else.
//!
//! Reads come from watch caches ([`super::observe`]): a reconcile that has
//! nothing to change sends no request at all. The one exception is the end
//! of a failed run, whose cause is read from a fresh list of its pods.
//!
//! Restart safety: everything is derived from the Jobs, as the Job cache
//! holds them after its first (consistent) list, with this process's own
//! writes laid over until the watch shows them. A run's Job carries its index, trial, generation, spec
//! hash, rerun token, parameters and MLflow run id; names are deterministic
//! and Jobs are only ever created (AlreadyExists means found), so a restarted
//! operator recomputes the same next run and never duplicates a Job. When a
//! run ends, the outcome (phase, reason, metrics, times) is recorded once as
//! the annotation [`RESULT_ANNOTATION`]; that patch is the "end transition"
//! (event, metrics, MLflow status), so each happens once per run even when
//! the run has dropped out of the bounded `status.runs`.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{SecretKeySelector, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Predicate, WatchStreamExt, predicates};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::early_termination::{EARLY_TERMINATED, TrialCurve, decide};
use super::observe::{Caches, Expect, RunTriggers, caches, drive};
use super::status::{
    CANCEL_ANNOTATION, HISTORY_LIMIT, RunState, SUSPENDED, best_run, bound_history, cancel_patch, finish_time,
    holds_resources, run_state, start_time, sweep_phase,
};
use super::sweep::{merge_params, next_trials, seed, trial_limits, trial_params};
use super::validate::{GENERATION_ANNOTATION, RUN_INDEX_LABEL, RunInputs, TRIAL_LABEL, run_spec, validate};
use crate::api::experiment::PinnedInput;
use crate::api::{Experiment, ExperimentStatus, NewCondition, Params, READY, RunPhase, RunStatus, set_condition};
use crate::controllers::cached::{CachedJob, CachedPod};
use crate::controllers::compute_cluster::observe::Caches as ClusterCaches;
use crate::controllers::pinning::{pin_inputs, recorded};
use crate::controllers::run::artifacts::{artifacts_root, experiment_output, pvc_mount_path};
use crate::controllers::run::build::{EXPERIMENT_LABEL, RUN_LABEL, Tracking, build_run};
use crate::controllers::run::inputs::{INPUTS_ANNOTATION, PodData, WAITING_REASONS, describe};
use crate::controllers::run::names::{run_name, trial_name};
use crate::controllers::status_writer::{Key as StatusKey, StatusWriter};
use crate::controllers::workspace::build::RUN_TOKEN_SECRET;
use crate::controllers::{Context, Error, Result, error_policy, guarded_watch, watch_config};
use crate::tracking::client::RunStatus as TrackingStatus;

const KIND: &str = "Experiment";
/// Annotation of an Experiment whose every change starts a new run.
pub const RERUN_ANNOTATION: &str = "mlplane.io/rerun";
/// Job annotation: the rerun token the run was started for.
pub const RUN_RERUN_ANNOTATION: &str = "mlplane.io/rerun-token";
/// Job annotation: hash of the spec (without `suspend`) the run was started from.
pub const SPEC_HASH_ANNOTATION: &str = "mlplane.io/spec-hash";
/// Job annotation: the run's parameters (JSON).
pub const PARAMS_ANNOTATION: &str = "mlplane.io/params";
/// Job annotation: the MLflow run id.
pub const TRACKING_RUN_ANNOTATION: &str = "mlplane.io/tracking-run-id";
/// Job annotation: the recorded outcome of a finished run (JSON).
pub const RESULT_ANNOTATION: &str = "mlplane.io/result";
/// Cancel reason of a run replaced by a newer one while still active.
pub const SUPERSEDED: &str = "Superseded";
/// Ready reason when `spec.compute` names no ComputeCluster.
pub const COMPUTE_CLUSTER_NOT_FOUND: &str = "ComputeClusterNotFound";
/// Requeue while waiting for a missing ComputeCluster to appear.
const BLOCKED_POLL: Duration = Duration::from_secs(15);
/// Workers writing Experiment statuses (see [`StatusWriter`]): few, so that
/// under a flood of new Experiments the API server's time goes to their Jobs
/// first and status updates coalesce.
const STATUS_WRITERS: usize = 2;
/// How long an Experiment's reconcile waits for its triggers to settle: a
/// new run's Job and pod go through 4 to 6 watch events in their first
/// second (created, started, scheduled, running), and each would otherwise
/// be its own reconcile. Like the Job controller's 1 s batching of pod
/// updates, at the cost of this much latency on every change.
const RECONCILE_DEBOUNCE: Duration = Duration::from_millis(500);
/// Requeue while trials are evaluated for early termination.
const EARLY_TERMINATION_POLL: Duration = Duration::from_secs(2);

/// The Experiment controller's context: the shared one plus its caches.
pub struct ExperimentContext {
    pub base: Arc<Context>,
    pub caches: Caches,
    /// Status writes, coalesced and off the reconcile path.
    pub status: StatusWriter<Experiment, ExperimentStatus>,
}

impl std::ops::Deref for ExperimentContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.base
    }
}

/// Runs the controller until `stop` is cancelled.
pub async fn run(ctx: Arc<Context>, cluster: Arc<ClusterCaches>, triggers: RunTriggers, stop: CancellationToken) {
    let client = ctx.client.clone();
    let (store, stream) = guarded_watch(Api::<DeserializeGuard<Experiment>>::all(client.clone()), watch_config());
    // A new spec (generation) or a changed annotation (`mlplane.io/rerun`)
    // is work; the controller's own status writes are not.
    let stream = stream.predicate_filter(
        predicates::generation.combine(predicates::annotations),
        Default::default(),
    );
    let (caches, streams) = caches(&client, EXPERIMENT_LABEL, &cluster, triggers);
    let status = StatusWriter::start_namespaced(
        &client,
        ctx.metrics.clone(),
        ctx.foreground.clone(),
        STATUS_WRITERS,
        stop.clone(),
    );
    let ectx = Arc::new(ExperimentContext {
        base: ctx,
        caches,
        status,
    });
    // Namespaces and ComputeClusters only fill caches: they trigger nothing
    // (a missing ComputeCluster is polled for, see BLOCKED_POLL).
    tokio::spawn(drive(streams.namespaces, stop.clone(), "namespaces"));
    tokio::spawn(drive(streams.clusters, stop.clone(), "computeclusters"));
    tokio::spawn(drive(streams.data_assets, stop.clone(), "dataassets"));
    tokio::spawn(drive(streams.workspaces, stop.clone(), "workspaces"));
    let ready = ectx.clone();
    tokio::spawn(async move { ready.caches.watch_ready().await });
    // Every change of a run Job (status included) reaches its Experiment by
    // ownerReference; a pod's, through the Job it belongs to.
    let pod_owner = ectx.clone();
    Controller::for_stream(stream, store)
        .owns_stream(streams.jobs)
        .watches_stream(streams.pods, move |pod| {
            pod_owner
                .caches
                .owner_of_pod::<Experiment>(&pod)
                .map(|r| ObjectRef::new(&r.name).within(r.namespace.as_deref().unwrap_or_default()))
        })
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(ectx.settings.concurrency)
                .debounce(RECONCILE_DEBOUNCE),
        )
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile_guarded, guarded_error_policy, ectx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "experiment controller stream error");
            }
        })
        .await;
}

async fn reconcile_guarded(obj: Arc<DeserializeGuard<Experiment>>, ctx: Arc<ExperimentContext>) -> Result<Action> {
    match &obj.0 {
        Ok(exp) => reconcile(exp, &ctx).await,
        Err(invalid) => {
            tracing::error!(name = ?invalid.metadata.name, error = %invalid.error, "stored Experiment cannot be read");
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[KIND, "invalid_object"])
                .inc();
            Ok(Action::await_change())
        }
    }
}

fn guarded_error_policy(obj: Arc<DeserializeGuard<Experiment>>, err: &Error, ctx: Arc<ExperimentContext>) -> Action {
    match &obj.0 {
        Ok(exp) => error_policy(exp, err, &ctx),
        Err(_) => Action::await_change(),
    }
}

/// The outcome of a finished run, recorded on its Job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    pub phase: RunPhase,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// One run (or trial) as seen on its Job.
#[derive(Clone, Debug)]
struct Observed {
    job: CachedJob,
    index: u64,
    trial: Option<u32>,
    /// Outcome, once recorded.
    result: Option<RunResult>,
    /// Current state (for unrecorded runs).
    state: Option<RunState>,
}

impl Observed {
    fn name(&self) -> String {
        self.job.name_any()
    }
    fn annotation(&self, key: &str) -> Option<&str> {
        self.job.metadata.annotations.as_ref()?.get(key).map(String::as_str)
    }
    fn phase(&self) -> RunPhase {
        match (&self.result, &self.state) {
            (Some(r), _) => r.phase,
            (None, Some(s)) => s.phase,
            (None, None) => RunPhase::Pending,
        }
    }
    fn active(&self) -> bool {
        !self.phase().is_terminal()
    }
    fn reason(&self) -> String {
        match (&self.result, &self.state) {
            (Some(r), _) => r.reason.clone(),
            (None, Some(s)) => s.reason.clone(),
            _ => String::new(),
        }
    }
    fn status(&self) -> RunStatus {
        let (reason, message, metrics, start, end) = match (&self.result, &self.state) {
            (Some(r), _) => (
                r.reason.clone(),
                r.message.clone(),
                r.metrics.clone(),
                r.start_time.clone(),
                r.completion_time.clone(),
            ),
            (None, Some(s)) => (
                s.reason.clone(),
                s.message.clone(),
                BTreeMap::new(),
                start_time(&self.job),
                None,
            ),
            _ => Default::default(),
        };
        RunStatus {
            name: self.name(),
            generation: self
                .annotation(GENERATION_ANNOTATION)
                .and_then(|g| g.parse().ok())
                .unwrap_or_default(),
            trial: self.trial.map(|t| t as i32),
            params: self
                .annotation(PARAMS_ANNOTATION)
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or_default(),
            inputs: recorded(self.job.annotations()),
            phase: self.phase(),
            job: Some(self.name()),
            tracking_run_id: self.annotation(TRACKING_RUN_ANNOTATION).map(str::to_string),
            start_time: start,
            completion_time: end,
            metrics,
            reason: (!reason.is_empty()).then_some(reason),
            message: (!message.is_empty()).then_some(message),
        }
    }
}

/// Hash of the spec without `suspend`: a new generation starts a new run only
/// when this changes (suspending and resuming is not a new spec).
pub fn spec_hash(exp: &Experiment) -> String {
    let mut spec = exp.spec.clone();
    spec.suspend = false;
    let text = serde_json::to_string(&spec).unwrap_or_default();
    crate::controllers::run::names::short_hash(&text)
}

/// Whether the latest run (all Jobs of the highest index) is superseded by
/// the spec: a changed rerun token, a new generation with a different spec,
/// or a resume after the run was cancelled by suspend.
pub fn needs_new_run(latest: Option<(&str, i64, &str, bool)>, rerun: &str, generation: i64, hash: &str) -> bool {
    match latest {
        None => true,
        Some((token, run_gen, run_hash, cancelled_by_suspend)) => {
            token != rerun || (generation > run_gen && run_hash != hash) || cancelled_by_suspend
        }
    }
}

fn now_seconds() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()))
}

fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Lazily resolved MLflow experiment id of this reconcile.
struct TrackingCtx<'a> {
    client: &'a crate::tracking::client::TrackingClient,
    name: String,
    id: Option<String>,
}

impl TrackingCtx<'_> {
    async fn experiment_id(&mut self) -> Result<String> {
        if let Some(id) = &self.id {
            return Ok(id.clone());
        }
        let id = self.client.ensure_experiment(&self.name).await?;
        self.id = Some(id.clone());
        Ok(id)
    }
}

/// One reconcile of an Experiment.
pub async fn reconcile(exp: &Experiment, ctx: &ExperimentContext) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    if exp.metadata.deletion_timestamp.is_some() {
        // Jobs go with the ownerReference cascade; tracking history stays.
        return Ok(Action::await_change());
    }
    let client = &ctx.client;
    let ns = exp.namespace().unwrap_or_default();
    let name = exp.name_any();
    let uid = exp.uid().unwrap_or_default();
    let generation = exp.metadata.generation.unwrap_or_default();
    // Writes to Jobs are patches whose answers stand in for the cache, so
    // they decode as the cache holds Jobs; creates go through `Api<Job>`.
    let jobs_api: Api<CachedJob> = Api::namespaced(client.clone(), &ns);
    let mut tracking = ctx.settings.tracking.as_ref().map(|c| TrackingCtx {
        client: c,
        name: format!("{ns}/{name}"),
        id: None,
    });

    // Observe, from the watch caches: the experiment's Jobs and, while some
    // run is unrecorded, their pods.
    ctx.caches.ready().await;
    let mut observed: Vec<Observed> = ctx
        .caches
        .jobs_of(&ns, &name, &uid)
        .into_iter()
        .filter_map(|job| {
            let index = job.labels().get(RUN_INDEX_LABEL)?.parse().ok()?;
            let trial = job.labels().get(TRIAL_LABEL).and_then(|t| t.parse().ok());
            let result = job
                .annotations()
                .get(RESULT_ANNOTATION)
                .and_then(|r| serde_json::from_str(r).ok());
            Some(Observed {
                job,
                index,
                trial,
                result,
                state: None,
            })
        })
        .collect();
    let unrecorded: Vec<String> = observed
        .iter()
        .filter(|o| o.result.is_none())
        .map(Observed::name)
        .collect();
    if !unrecorded.is_empty() {
        let by_run = ctx.caches.pods_of(&ns, &unrecorded);
        for o in observed.iter_mut().filter(|o| o.result.is_none()) {
            let pods = by_run.get(&o.name()).map(Vec::as_slice).unwrap_or(&[]);
            o.state = Some(run_state(&o.job, pods));
        }
    }

    // Record runs that ended (once each).
    for o in observed.iter_mut() {
        if let Some(state) = o.state.clone().filter(|s| s.phase.is_terminal()) {
            record_end(exp, ctx, &jobs_api, o, state).await?;
        }
    }

    let mut status = exp.status.clone().unwrap_or_default();
    status.observed_generation = Some(generation);
    let now = Time(Timestamp::now());

    // What blocks new runs: a spec that cannot run, a missing ComputeCluster.
    let mut blocked: Option<(String, String)> = validate(exp, &ctx.settings.catalog)
        .err()
        .map(|e| (e.reason.to_string(), e.message));
    if blocked.is_none()
        && let Some(cc) = &exp.spec.compute
        && !ctx.caches.cluster_exists(cc)
    {
        blocked = Some((
            COMPUTE_CLUSTER_NOT_FOUND.into(),
            format!("spec.compute: ComputeCluster {cc:?} does not exist"),
        ));
    }

    let suspend = exp.spec.suspend;
    let rerun = exp.annotations().get(RERUN_ANNOTATION).cloned().unwrap_or_default();
    let hash = spec_hash(exp);
    let mut requeue = ctx.settings.resync;

    // Suspend: cancel every active run; history stays.
    if suspend {
        for o in observed.iter_mut().filter(|o| o.active()) {
            cancel(exp, ctx, &jobs_api, o, SUSPENDED, "spec.suspend is true").await?;
        }
    }

    let max_index = observed.iter().map(|o| o.index).max();
    let latest_key = max_index.and_then(|i| {
        let runs: Vec<&Observed> = observed.iter().filter(|o| o.index == i).collect();
        let first = runs.first()?;
        let all_suspended = runs
            .iter()
            .all(|o| o.phase() == RunPhase::Cancelled && o.reason() == SUSPENDED);
        Some((
            first.annotation(RUN_RERUN_ANNOTATION).unwrap_or_default().to_string(),
            first
                .annotation(GENERATION_ANNOTATION)
                .and_then(|g| g.parse::<i64>().ok())
                .unwrap_or_default(),
            first.annotation(SPEC_HASH_ANNOTATION).unwrap_or_default().to_string(),
            all_suspended,
        ))
    });
    let mut current = max_index;

    if blocked.is_none() && !suspend {
        let new_run = needs_new_run(
            latest_key.as_ref().map(|(t, g, h, s)| (t.as_str(), *g, h.as_str(), *s)),
            &rerun,
            generation,
            &hash,
        );
        // A namespace being deleted loses its Jobs first: that is no reason
        // to start runs again (and creating anything there is refused).
        if new_run && ctx.caches.namespace_terminating(&ns) {
            return Ok(Action::await_change());
        }
        if new_run {
            // Older runs still active are replaced by the new one.
            for o in observed.iter_mut().filter(|o| o.active()) {
                let msg = "a newer run of the experiment started".to_string();
                cancel(exp, ctx, &jobs_api, o, SUPERSEDED, &msg).await?;
            }
            let index = max_index.map_or(1, |i| i + 1);
            current = Some(index);
            if exp.spec.sweep.is_none() {
                let params = exp.spec.params.clone();
                match start_run(
                    exp,
                    ctx,
                    &jobs_api,
                    &mut tracking,
                    index,
                    None,
                    params,
                    &rerun,
                    &hash,
                    None,
                )
                .await?
                {
                    Ok(o) => observed.push(o),
                    Err(e) => blocked = Some(e),
                }
            }
        }
        // Sweep: start trials of the current run within the budget.
        if let (Some(sweep), Some(index)) = (&exp.spec.sweep, current)
            && blocked.is_none()
            && let Ok(limits) = trial_limits(sweep)
        {
            let trials: Vec<&Observed> = observed.iter().filter(|o| o.index == index).collect();
            // Trial Jobs of a sweep run are its own only when they are trials.
            if trials.iter().all(|o| o.trial.is_some()) {
                let started = trials
                    .iter()
                    .filter_map(|o| o.trial)
                    .map(|t| t as u64 + 1)
                    .max()
                    .unwrap_or(0);
                let active = trials.iter().filter(|o| o.active() || holds_resources(&o.job)).count() as u64;
                let k = next_trials(started, active, &limits);
                let seed = seed(sweep, &uid);
                let earlier = trials.first().map(|o| recorded(o.job.annotations()));
                for n in started..started + k {
                    let Ok(Some(sampled)) = trial_params(sweep, seed, n) else {
                        break;
                    };
                    let params = merge_params(&exp.spec.params, &sampled);
                    match start_run(
                        exp,
                        ctx,
                        &jobs_api,
                        &mut tracking,
                        index,
                        Some(n as u32),
                        params,
                        &rerun,
                        &hash,
                        earlier.as_ref(),
                    )
                    .await?
                    {
                        Ok(o) => observed.push(o),
                        Err(e) => {
                            blocked = Some(e);
                            break;
                        }
                    }
                }
            }
        }
        // Early termination of the current sweep's active trials.
        if let (Some(sweep), Some(index), Some(tr)) = (&exp.spec.sweep, current, tracking.as_ref())
            && let Some(policy) = &sweep.early_termination
            && observed
                .iter()
                .any(|o| o.index == index && o.trial.is_some() && o.active())
        {
            requeue = requeue.min(EARLY_TERMINATION_POLL);
            let mut curves = vec![];
            for o in observed.iter().filter(|o| o.index == index && o.trial.is_some()) {
                let Some(run_id) = o.annotation(TRACKING_RUN_ANNOTATION) else {
                    continue;
                };
                let history = match tr.client.metric_history(run_id, &sweep.objective.metric).await {
                    Ok(h) => h.into_iter().collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, run = %o.name(), "reading metric history failed");
                        continue;
                    }
                };
                curves.push(TrialCurve {
                    name: o.name(),
                    history,
                    active: o.active(),
                });
            }
            for stop in decide(policy, sweep.objective.goal, &sweep.objective.metric, &curves) {
                if let Some(o) = observed.iter_mut().find(|o| o.name() == stop.trial) {
                    cancel(exp, ctx, &jobs_api, o, EARLY_TERMINATED, &stop.reason).await?;
                }
            }
        }
    }

    // Runs that were cancelled just now are recorded now.
    for o in observed.iter_mut() {
        if o.result.is_none()
            && let Some(state) = o.state.clone().filter(|s| s.phase.is_terminal())
        {
            record_end(exp, ctx, &jobs_api, o, state).await?;
        }
    }

    // Status from what exists.
    observed.sort_by_key(|o| std::cmp::Reverse((o.index, o.trial)));
    let runs: Vec<RunStatus> = observed.iter().map(Observed::status).collect();
    if let Some(sweep) = &exp.spec.sweep {
        status.best_run = best_run(status.best_run.as_ref(), &runs, &sweep.objective);
    }
    status.runs = bound_history(runs, HISTORY_LIMIT).0;
    let latest: Vec<&Observed> = current
        .map(|i| observed.iter().filter(|o| o.index == i).collect())
        .unwrap_or_default();
    let phase = if let Some((reason, _)) = &blocked {
        // A missing ComputeCluster or DataAsset (version) may still come:
        // the run waits.
        if reason == COMPUTE_CLUSTER_NOT_FOUND || WAITING_REASONS.contains(&reason.as_str()) {
            requeue = requeue.min(BLOCKED_POLL);
            RunPhase::Pending
        } else {
            RunPhase::Failed
        }
    } else if latest.is_empty() {
        RunPhase::Pending
    } else if exp.spec.sweep.is_some() && latest.iter().all(|o| o.trial.is_some()) {
        let total = exp
            .spec
            .sweep
            .as_ref()
            .and_then(|s| trial_limits(s).ok())
            .map_or(0, |l| l.total);
        let started = latest
            .iter()
            .filter_map(|o| o.trial)
            .map(|t| t as u64 + 1)
            .max()
            .unwrap_or(0);
        let phases: Vec<RunPhase> = latest.iter().map(|o| o.phase()).collect();
        // A suspended or superseded sweep starts no more trials.
        let cancelled = latest
            .iter()
            .any(|o| o.phase() == RunPhase::Cancelled && o.reason() != EARLY_TERMINATED);
        sweep_phase(&phases, started >= total || cancelled || suspend)
    } else {
        latest[0].phase()
    };
    status.phase = Some(phase);
    let (ready, reason, message) = match &blocked {
        Some((reason, message)) => (false, reason.clone(), message.clone()),
        None => ready_condition(phase, &latest, suspend),
    };
    set_condition(
        &mut status.conditions,
        NewCondition::new(READY, ready, &reason, message).observed_generation(Some(generation)),
        &now,
    );
    let was_blocked = exp
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
        .map(|c| c.reason.clone());
    if ctx
        .status
        .submit_if_changed(StatusKey::of(exp), exp.status.as_ref(), &status)
        && let Some((reason, message)) = &blocked
        && was_blocked.as_deref() != Some(reason.as_str())
    {
        ctx.event(exp, EventType::Warning, reason, "Reconcile", message.clone())
            .await;
    }
    ctx.reset_failures(&uid);
    if latest.iter().any(|o| o.active()) && exp.spec.sweep.as_ref().is_some_and(|s| s.early_termination.is_some()) {
        requeue = requeue.min(EARLY_TERMINATION_POLL);
    }
    Ok(Action::requeue(requeue))
}

/// Ready and its reason from the latest run.
fn ready_condition(phase: RunPhase, latest: &[&Observed], suspend: bool) -> (bool, String, String) {
    let names = latest.iter().map(|o| o.name()).collect::<Vec<_>>().join(", ");
    match phase {
        RunPhase::Succeeded => (true, "Succeeded".into(), format!("run {names} succeeded")),
        RunPhase::Pending => (false, "Pending".into(), format!("run {names} is starting")),
        RunPhase::Queued => {
            // The queue's reason (QuotaExceeded, WaitingForCapacity, ...), or
            // the scheduler's (Unschedulable).
            match latest
                .iter()
                .find(|o| o.phase() == RunPhase::Queued && !o.reason().is_empty())
            {
                Some(o) => (
                    false,
                    o.reason(),
                    format!("run {} is queued: {}", o.name(), o.status().message.unwrap_or_default()),
                ),
                None => (false, "Queued".into(), format!("run {names} is waiting for capacity")),
            }
        }
        RunPhase::Running => (false, "Running".into(), format!("run {names} is running")),
        RunPhase::Cancelled => {
            let reason = if suspend {
                SUSPENDED.to_string()
            } else {
                latest.first().map(|o| o.reason()).unwrap_or_else(|| "Cancelled".into())
            };
            (false, reason, format!("run {names} was cancelled"))
        }
        RunPhase::Failed => {
            let failed = latest.iter().find(|o| o.phase() == RunPhase::Failed);
            let reason = failed
                .map(|o| o.reason())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "Failed".into());
            let message = failed
                .map(|o| {
                    let s = o.status();
                    format!("run {} failed: {}", s.name, s.message.unwrap_or_default())
                })
                .unwrap_or_default();
            (false, reason, message)
        }
    }
}

/// Cancels an active run: `suspend: true` plus the cancel annotation on its Job.
async fn cancel(
    exp: &Experiment,
    ctx: &ExperimentContext,
    jobs: &Api<CachedJob>,
    o: &mut Observed,
    reason: &str,
    message: &str,
) -> Result<()> {
    if o.job.annotations().contains_key(CANCEL_ANNOTATION) {
        return Ok(());
    }
    let job = jobs
        .patch(
            &o.name(),
            &PatchParams::default(),
            &Patch::Merge(cancel_patch(reason, message)),
        )
        .await?;
    ctx.caches.overlay.record(&job, Expect::Annotation(CANCEL_ANNOTATION));
    o.job = job;
    o.state = Some(RunState {
        phase: RunPhase::Cancelled,
        reason: reason.into(),
        message: message.into(),
        exit_code: None,
    });
    let event_reason = if reason == EARLY_TERMINATED {
        "TrialEarlyTerminated"
    } else {
        "RunCancelling"
    };
    ctx.event(
        exp,
        EventType::Normal,
        event_reason,
        "Cancel",
        format!("run {}: {message}", o.name()),
    )
    .await;
    Ok(())
}

/// Records the end of a run: final metrics from the tracking store, the MLflow
/// status, the event and metrics, then the result annotation on the Job.
async fn record_end(
    exp: &Experiment,
    ctx: &ExperimentContext,
    jobs: &Api<CachedJob>,
    o: &mut Observed,
    state: RunState,
) -> Result<()> {
    // The cause of a failure is read from the pods as they are now, not as
    // the pod cache last saw them: it is recorded once.
    let state = if state.phase == RunPhase::Failed {
        let pods: Api<CachedPod> = Api::namespaced(ctx.client.clone(), &exp.namespace().unwrap_or_default());
        let selector = format!("{RUN_LABEL}={}", o.name());
        let pods = pods.list(&ListParams::default().labels(&selector)).await?.items;
        run_state(&o.job, &pods)
    } else {
        state
    };
    let end = finish_time(&o.job).unwrap_or_else(now_seconds);
    let start = start_time(&o.job).or_else(|| o.job.metadata.creation_timestamp.clone());
    let mut metrics = BTreeMap::new();
    if let (Some(tc), Some(run_id)) = (ctx.settings.tracking.as_ref(), o.annotation(TRACKING_RUN_ANNOTATION)) {
        match tc.latest_metrics(run_id).await {
            Ok(m) => metrics = m.into_iter().filter(|(_, v)| v.is_finite()).collect(),
            Err(e) => tracing::warn!(error = %e, run = %o.name(), "reading run metrics failed"),
        }
        let st = match state.phase {
            RunPhase::Succeeded => TrackingStatus::Finished,
            RunPhase::Failed => TrackingStatus::Failed,
            _ => TrackingStatus::Killed,
        };
        match tc.set_status(run_id, st, Some(end.0.as_millisecond())).await {
            Ok(()) => {}
            // The tracking run is gone (deleted by a user): nothing to mark.
            Err(e) if e.code.as_deref() == Some("RESOURCE_DOES_NOT_EXIST") => {
                tracing::warn!(error = %e, run = %o.name(), "tracking run not found; not marked")
            }
            // The server is unreachable: retry the whole end transition.
            Err(e) => return Err(e.into()),
        }
    }
    let result = RunResult {
        phase: state.phase,
        reason: state.reason.clone(),
        message: state.message.clone(),
        exit_code: state.exit_code,
        metrics,
        start_time: start.clone(),
        completion_time: Some(end.clone()),
    };
    let patch = serde_json::json!({"metadata": {"annotations": {RESULT_ANNOTATION: serde_json::to_string(&result)?}}});
    o.job = jobs
        .patch(&o.name(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    ctx.caches.overlay.record(&o.job, Expect::Annotation(RESULT_ANNOTATION));
    let phase = format!("{:?}", state.phase);
    ctx.metrics.runs.with_label_values(&[KIND, &phase]).inc();
    if let Some(s) = &start {
        let secs = (end.0.as_millisecond() - s.0.as_millisecond()).max(0) as f64 / 1000.0;
        ctx.metrics.run_duration.with_label_values(&[KIND]).observe(secs);
    }
    let (type_, reason) = match state.phase {
        RunPhase::Succeeded => (EventType::Normal, "RunSucceeded"),
        RunPhase::Failed => (EventType::Warning, "RunFailed"),
        _ => (EventType::Normal, "RunCancelled"),
    };
    let detail = if state.message.is_empty() {
        state.reason.clone()
    } else {
        format!("{}: {}", state.reason, state.message)
    };
    ctx.event(
        exp,
        type_,
        reason,
        "RunEnded",
        format!("run {} {phase}: {detail}", o.name()),
    )
    .await;
    o.result = Some(result);
    Ok(())
}

/// Creates the MLflow run and then the Job (and Service) of run `index`
/// (trial `trial`). The outer error is an API failure; the inner one a spec
/// that cannot run (reason, message).
#[allow(clippy::too_many_arguments)]
async fn start_run(
    exp: &Experiment,
    ctx: &ExperimentContext,
    jobs: &Api<CachedJob>,
    tracking: &mut Option<TrackingCtx<'_>>,
    index: u64,
    trial: Option<u32>,
    params: Params,
    rerun: &str,
    hash: &str,
    earlier: Option<&BTreeMap<String, PinnedInput>>,
) -> Result<std::result::Result<Observed, (String, String)>> {
    let spec = &exp.spec;
    let ns = exp.namespace().unwrap_or_default();
    let name = match trial {
        Some(t) => trial_name(&exp.name_any(), index, t),
        None => run_name(&exp.name_any(), index),
    };
    // Inputs pinned now (trials of a sweep share the first trial's pins).
    let pins = match pin_inputs(
        &ns,
        "spec.inputs",
        &spec.inputs,
        earlier,
        &ctx.caches,
        ctx.settings.tracking.as_ref(),
    )
    .await?
    {
        Ok(p) => p,
        Err(e) => return Ok(Err((e.reason.to_string(), e.message))),
    };
    let mut data = PodData::default();
    for (k, p) in &pins {
        data.input(k, p, &ctx.settings.image);
    }
    // Outputs in the workspace's artifact store (without one: paths in the
    // pod that are not kept).
    let storage = ctx.caches.workspace_of(&ns).and_then(|w| w.spec.storage.clone());
    let outputs_dir = match artifacts_root(storage.as_ref()) {
        Some(root) if !spec.outputs.is_empty() => {
            for k in spec.outputs.keys() {
                data.output(k, &experiment_output(&root, &exp.name_any(), &name, k));
            }
            if let Some(secret) = storage.as_ref().and_then(|s| s.artifacts.secret_ref.as_ref()) {
                data.credentials(&secret.name);
            }
            let dir = experiment_output(&root, &exp.name_any(), &name, "");
            Some(pvc_mount_path(&dir).unwrap_or(dir).trim_end_matches('/').to_string())
        }
        _ => {
            for k in spec.outputs.keys() {
                data.outputs.insert(k.clone(), format!("/mnt/outputs/{k}"));
            }
            (!spec.outputs.is_empty()).then(|| "/mnt/outputs".to_string())
        }
    };
    let pinned: BTreeMap<String, PinnedInput> = pins.iter().map(|(k, p)| (k.clone(), p.pin.clone())).collect();
    let mut inputs = RunInputs {
        index,
        trial,
        params: params.clone(),
        inputs: data.inputs,
        outputs: data.outputs,
        outputs_dir,
        tracking: None,
        // On a ComputeCluster the run waits, suspended, for its admission queue.
        suspend: spec.compute.is_some(),
        volumes: data.volumes,
        volume_mounts: data.volume_mounts,
        init_containers: data.init_containers,
        env_from: data.env_from,
    };
    // The name first, for the MLflow run (the same function names the Job).
    let probe = match run_spec(exp, &ctx.settings.catalog, inputs.clone()) {
        Ok(s) => s,
        Err(e) => return Ok(Err((e.reason.to_string(), e.message))),
    };
    let run_name = probe.name.clone();
    let rendered: BTreeMap<String, String> = params.iter().map(|(k, v)| (k.clone(), v.render())).collect();
    if let Some(tr) = tracking.as_mut() {
        let exp_id = tr.experiment_id().await?;
        let tags = BTreeMap::from([
            ("mlplane.namespace".to_string(), exp.namespace().unwrap_or_default()),
            ("mlplane.experiment".to_string(), exp.name_any()),
            ("mlplane.run-index".to_string(), index.to_string()),
            ("mlflow.runName".to_string(), run_name.clone()),
        ]);
        let run_id = tr
            .client
            .ensure_run(&exp_id, &run_name, Timestamp::now().as_millisecond(), &rendered, &tags)
            .await?;
        inputs.tracking = Some(Tracking {
            uri: tr.client.run_url().to_string(),
            experiment_id: exp_id,
            run_id,
            token: Some(SecretKeySelector {
                name: RUN_TOKEN_SECRET.into(),
                key: "token".into(),
                optional: None,
            }),
        });
    }
    let mut rs = match run_spec(exp, &ctx.settings.catalog, inputs.clone()) {
        Ok(s) => s,
        Err(e) => return Ok(Err((e.reason.to_string(), e.message))),
    };
    rs.annotations.insert(RUN_RERUN_ANNOTATION.into(), rerun.into());
    rs.annotations.insert(SPEC_HASH_ANNOTATION.into(), hash.into());
    rs.annotations
        .insert(PARAMS_ANNOTATION.into(), serde_json::to_string(&params)?);
    if !pinned.is_empty() {
        rs.annotations
            .insert(INPUTS_ANNOTATION.into(), serde_json::to_string(&pinned)?);
    }
    if let Some(t) = &inputs.tracking {
        rs.annotations.insert(TRACKING_RUN_ANNOTATION.into(), t.run_id.clone());
    }
    let objs = match build_run(&rs) {
        Ok(o) => o,
        Err(e) => {
            let e = super::validate::ValidationError::from(e);
            return Ok(Err((e.reason.to_string(), e.message)));
        }
    };
    // The writes that start the run go before status and Events (priority).
    let busy = ctx.foreground.begin();
    if let Some(svc) = &objs.service {
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), &rs.namespace);
        match services.create(&PostParams::default(), svc).await {
            Ok(_) => {}
            Err(e) if is_already_exists(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let created = crate::controllers::cached::create_job(&ctx.client, &rs.namespace, &objs.job).await;
    drop(busy);
    let job = match created {
        Ok(j) => {
            let what = match trial {
                Some(t) => format!("trial {t} as Job {run_name}"),
                None => format!("run {index} as Job {run_name}"),
            };
            let what = match pinned.values().map(describe).collect::<Vec<_>>() {
                p if p.is_empty() => what,
                p => format!("{what} with inputs {}", p.join(", ")),
            };
            ctx.event(
                exp,
                EventType::Normal,
                "RunStarted",
                "CreateRun",
                format!("started {what}"),
            )
            .await;
            j
        }
        // Made before a restart (or by a concurrent reconcile): found.
        Err(e) if is_already_exists(&e) => jobs.get(&run_name).await?,
        Err(e) => return Err(e.into()),
    };
    ctx.caches.overlay.record(&job, Expect::Exists);
    Ok(Ok(Observed {
        state: Some(RunState {
            phase: RunPhase::Pending,
            reason: "Starting".into(),
            message: String::new(),
            exit_code: None,
        }),
        job,
        index,
        trial,
        result: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_runs_follow_spec_changes_and_rerun_tokens() {
        assert!(needs_new_run(None, "", 1, "h"));
        // Converged: same token, same generation.
        assert!(!needs_new_run(Some(("", 1, "h", false)), "", 1, "h"));
        // A new generation with the same spec (suspend toggled) is not a new run.
        assert!(!needs_new_run(Some(("", 1, "h", false)), "", 2, "h"));
        assert!(needs_new_run(Some(("", 1, "h", false)), "", 2, "h2"));
        assert!(needs_new_run(Some(("", 1, "h", false)), "again", 1, "h"));
        // Resumed after suspend.
        assert!(needs_new_run(Some(("", 1, "h", true)), "", 2, "h"));
    }

    #[test]
    fn spec_hash_ignores_suspend() {
        let mut exp: Experiment = serde_json::from_value(serde_json::json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": "e", "namespace": "n"},
            "spec": {"environment": {"image": "python:3.12"}, "command": ["python"]}
        }))
        .unwrap();
        let h = spec_hash(&exp);
        exp.spec.suspend = true;
        assert_eq!(spec_hash(&exp), h);
        exp.spec.command.push("x".into());
        assert_ne!(spec_hash(&exp), h);
    }

    #[test]
    fn a_queued_run_surfaces_the_queue_reason_in_ready() {
        let job: CachedJob = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "e-1", "annotations": {
                "mlplane.io/queue-reason": "ExceedsPoolMaximum",
                "mlplane.io/queue-message": "the run needs 3 pod(s) of nvidia.com/gpu 1 at once"}},
            "spec": {"suspend": true, "template": {}}
        }))
        .unwrap();
        let state = run_state(&job, &[]);
        let o = Observed {
            job,
            index: 1,
            trial: None,
            result: None,
            state: Some(state),
        };
        let (ready, reason, message) = ready_condition(RunPhase::Queued, &[&o], false);
        assert!(!ready);
        assert_eq!(reason, "ExceedsPoolMaximum");
        assert_eq!(
            message,
            "run e-1 is queued: the run needs 3 pod(s) of nvidia.com/gpu 1 at once"
        );
    }

    #[test]
    fn run_results_round_trip() {
        let r = RunResult {
            phase: RunPhase::Failed,
            reason: "ExitCode".into(),
            message: "exit code 3".into(),
            exit_code: Some(3),
            metrics: BTreeMap::from([("loss".into(), 0.25)]),
            ..Default::default()
        };
        let back: RunResult = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
