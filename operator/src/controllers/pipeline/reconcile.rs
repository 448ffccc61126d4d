//! The Pipeline controller's I/O driver: start a run per spec change (new
//! generation) and per change of the annotation `mlplane.io/rerun`, pin its
//! inputs, then drive its steps: look up the cache for the steps that can be
//! decided, reuse or start them, record the outputs of steps that succeed,
//! skip what a failure stops, and write status only when it changed.
//!
//! Owns: step Jobs labelled `mlplane.io/pipeline`, Pipeline status, and the
//! workspace's step cache entries in the tracking server. Must not touch
//! anything else.
//!
//! Reads come from watch caches ([`crate::controllers::experiment::observe`],
//! with `mlplane.io/pipeline` as the parent label), and the Pipeline's status
//! through the [`StatusWriter`] record of this process's own writes, so a
//! reconcile started before the watch delivered the last status write acts
//! on it (the run it started, the steps it reused). The Pipeline watch
//! triggers on spec and annotation changes only, not on status writes.
//!
//! Restart safety: a run is written to status (its pins and every step's
//! cache key) before any of its Jobs exist, so a restarted operator
//! continues it with the same pins and keys. Step Jobs have deterministic
//! names and are only ever created (AlreadyExists means found). A reuse or
//! skip decision that did not reach status is taken again (the same cache
//! answer gives the same decision). A step's end is recorded once, as the
//! annotation `mlplane.io/result` on its Job, after its outputs went into
//! the step cache; events and metrics of the end happen with that write.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Predicate, WatchStreamExt, predicates};
use tokio_util::sync::CancellationToken;

use super::dag;
use super::plan::{Action as StepAction, KeyInputs, Known, cache_keys, decide, run_phase, run_salted, to_look_up};
use super::step::{self, RunContext, STEP_LABEL, StepError};
use crate::api::experiment::PinnedInput;
use crate::api::{
    NewCondition, Pipeline, PipelineRunStatus, PipelineStatus, READY, RunPhase, StepStatus, set_condition,
};
use crate::controllers::cached::{CachedJob, CachedPod};
use crate::controllers::compute_cluster::observe::Caches as ClusterCaches;
use crate::controllers::experiment::observe::{Caches, Expect, RunTriggers, caches, drive};
use crate::controllers::experiment::reconcile::{RESULT_ANNOTATION, RunResult};
use crate::controllers::experiment::status::{CANCEL_ANNOTATION, cancel_patch, finish_time, run_state, start_time};
use crate::controllers::experiment::validate::RUN_INDEX_LABEL;
use crate::controllers::pinning::pin_inputs;
use crate::controllers::run::artifacts::artifacts_root;
use crate::controllers::run::build::{PIPELINE_LABEL, RUN_LABEL, build_run};
use crate::controllers::run::inputs::{WAITING_REASONS, describe};
use crate::controllers::run::names::run_name;
use crate::controllers::status_writer::{Key as StatusKey, StatusWriter};
use crate::controllers::{Context, Error, Result, guarded_error_policy, guarded_watch, readable, watch_config};
use crate::tracking::client::{StepCacheJson, TrackingClient};

const KIND: &str = "Pipeline";
/// Annotation of a Pipeline whose every change starts a new run.
pub const RERUN_ANNOTATION: &str = "mlplane.io/rerun";
/// Ready reason without a tracking server (the step cache lives there).
pub const TRACKING_NOT_CONFIGURED: &str = "TrackingNotConfigured";
/// Cancel reason of a run replaced by a newer one.
pub const SUPERSEDED: &str = "Superseded";
/// Runs kept in status (the newest, and never more than [`MAX_STEPS_KEPT`] steps in all).
pub const HISTORY_LIMIT: usize = 10;
/// Steps kept in status over all runs (status must stay far below etcd's
/// object size limit); the latest run is always kept.
pub const MAX_STEPS_KEPT: usize = 1000;
/// Requeue while waiting for something that may still appear.
const BLOCKED_POLL: Duration = Duration::from_secs(15);

/// The Pipeline controller's context: the shared one, its caches, and its
/// own status writes.
pub struct PipelineContext {
    pub base: Arc<Context>,
    pub caches: Caches,
    pub statuses: StatusWriter<Pipeline, PipelineStatus>,
}

impl std::ops::Deref for PipelineContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.base
    }
}

/// Runs the controller until `stop` is cancelled.
pub async fn run(ctx: Arc<Context>, cluster: Arc<ClusterCaches>, triggers: RunTriggers, stop: CancellationToken) {
    let client = ctx.client.clone();
    let (store, stream) = guarded_watch(Api::<DeserializeGuard<Pipeline>>::all(client.clone()), watch_config());
    // A new spec or a changed annotation (`mlplane.io/rerun`) is work; the
    // controller's own status writes are not.
    let stream = stream.predicate_filter(
        predicates::generation.combine(predicates::annotations),
        Default::default(),
    );
    let (caches, streams) = caches(&client, PIPELINE_LABEL, &cluster, triggers);
    // Pipelines write their status on the reconcile's task (write_now);
    // the one worker only retries.
    let statuses =
        StatusWriter::start_namespaced(&client, ctx.metrics.clone(), ctx.foreground.clone(), 1, stop.clone());
    let pctx = Arc::new(PipelineContext {
        base: ctx,
        caches,
        statuses,
    });
    for (s, what) in [
        (streams.namespaces.map(|r| r.map(|_| ())).boxed(), "namespaces"),
        (streams.clusters.map(|r| r.map(|_| ())).boxed(), "computeclusters"),
        (streams.data_assets.map(|r| r.map(|_| ())).boxed(), "dataassets"),
        (streams.workspaces.map(|r| r.map(|_| ())).boxed(), "workspaces"),
    ] {
        tokio::spawn(drive(s, stop.clone(), what));
    }
    let ready = pctx.clone();
    tokio::spawn(async move { ready.caches.watch_ready().await });
    let pod_owner = pctx.clone();
    Controller::for_stream(stream, store)
        .owns_stream(streams.jobs)
        .watches_stream(streams.pods, move |pod| {
            pod_owner
                .caches
                .owner_of_pod::<Pipeline>(&pod)
                .map(|r| ObjectRef::new(&r.name).within(r.namespace.as_deref().unwrap_or_default()))
        })
        .with_config(kube::runtime::controller::Config::default().concurrency(pctx.settings.concurrency))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            |obj, ctx: Arc<PipelineContext>| async move {
                match readable(&obj, &ctx.metrics) {
                    Some(pl) => reconcile(pl, &ctx).await,
                    None => Ok(Action::await_change()),
                }
            },
            guarded_error_policy,
            pctx,
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "pipeline controller stream error");
            }
        })
        .await;
}

fn now_seconds() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// The index of a run from its name (`<pipeline>-<index>`).
pub fn run_index(run: &PipelineRunStatus) -> Option<u64> {
    run.name.rsplit('-').next()?.parse().ok()
}

/// Keeps the newest runs: at most [`HISTORY_LIMIT`], and no more than
/// [`MAX_STEPS_KEPT`] steps in all (the latest run always).
pub fn bound_runs(runs: &mut Vec<PipelineRunStatus>) {
    let mut steps = 0;
    let mut keep = 0;
    for (i, r) in runs.iter().enumerate() {
        steps += r.steps.len();
        if i > 0 && (i >= HISTORY_LIMIT || steps > MAX_STEPS_KEPT) {
            break;
        }
        keep = i + 1;
    }
    runs.truncate(keep);
}

/// A problem that keeps a new run from starting.
struct Blocked {
    reason: String,
    message: String,
    /// May resolve itself (poll for it).
    waiting: bool,
}

impl Blocked {
    fn new(reason: &str, message: impl Into<String>, waiting: bool) -> Self {
        Self {
            reason: reason.into(),
            message: message.into(),
            waiting,
        }
    }
}

impl From<dag::DagError> for Blocked {
    fn from(e: dag::DagError) -> Self {
        Self::new(e.reason, e.message, false)
    }
}

impl From<StepError> for Blocked {
    fn from(e: StepError) -> Self {
        let waiting = e.reason == "ArtifactStoreNotConfigured";
        Self::new(e.reason, e.message, waiting)
    }
}

/// The resolved image of every step.
fn images(pl: &Pipeline, ctx: &PipelineContext) -> std::result::Result<Vec<String>, Blocked> {
    pl.spec
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (env, field) = match &s.environment {
                Some(e) => (e.clone(), format!("spec.steps[{i}].environment")),
                None => (
                    pl.spec.environment.clone().unwrap_or_default(),
                    "spec.environment".to_string(),
                ),
            };
            ctx.settings
                .catalog
                .resolve(&env, &field)
                .map_err(|e| Blocked::new("UnknownEnvironment", e.to_string(), false))
        })
        .collect()
}

/// Everything a run's steps are built from, owned.
struct RunInputs {
    root: Option<String>,
    root_secret: Option<String>,
    secrets: BTreeMap<String, String>,
}

fn run_inputs(pl: &Pipeline, ctx: &PipelineContext, pins: &BTreeMap<String, PinnedInput>) -> RunInputs {
    let ns = pl.namespace().unwrap_or_default();
    let storage = ctx.caches.workspace_of(&ns).and_then(|w| w.spec.storage.clone());
    let secrets = pins
        .values()
        .filter_map(|p| p.data_asset.clone())
        .filter_map(|a| {
            let secret = ctx.caches.data_asset(&ns, &a)?.spec.source.secret_ref.clone()?;
            Some((a, secret.name))
        })
        .collect();
    RunInputs {
        root: artifacts_root(storage.as_ref()),
        root_secret: storage.and_then(|s| s.artifacts.secret_ref.map(|r| r.name)),
        secrets,
    }
}

/// One reconcile of a Pipeline.
pub async fn reconcile(cached: &Pipeline, ctx: &PipelineContext) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    if cached.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    ctx.caches.ready().await;
    let uid = cached.uid().unwrap_or_default();
    let mut pl = cached.clone();
    pl.status = ctx.statuses.current(&StatusKey::of(cached), cached.status.as_ref());
    let ns = pl.namespace().unwrap_or_default();
    let name = pl.name_any();
    let generation = pl.metadata.generation.unwrap_or_default();
    let api: Api<Pipeline> = Api::namespaced(ctx.client.clone(), &ns);
    // Patch answers stand in for the cache: they decode as it holds Jobs.
    let jobs_api: Api<CachedJob> = Api::namespaced(ctx.client.clone(), &ns);
    let now = now_seconds();
    let mut status = pl.status.clone().unwrap_or_default();
    // What status is now on the server (start_run may write it).
    let mut before = status.clone();
    let was = before
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.clone());
    status.observed_generation = Some(generation);
    let token = pl.annotations().get(RERUN_ANNOTATION).cloned().unwrap_or_default();
    let all_jobs = ctx.caches.jobs_of(&ns, &name, &uid);

    let spec_problem: Option<Blocked> = match (&ctx.settings.tracking, dag::build(&pl.spec)) {
        (None, _) => Some(Blocked::new(
            TRACKING_NOT_CONFIGURED,
            "no tracking server: the step cache is kept with the run history, so the operator needs \
             --tracking-url (the chart's tracking.enabled)",
            false,
        )),
        (_, Err(e)) => Some(e.into()),
        (_, Ok(_)) => images(&pl, ctx).err(),
    };

    let needs_new = status
        .runs
        .first()
        .is_none_or(|r| r.generation.unwrap_or_default() < generation)
        || status.last_handled_rerun.clone().unwrap_or_default() != token;
    let mut blocked: Option<Blocked> = None;
    if needs_new {
        // The run of an older spec (or rerun token) is replaced now.
        if let Some(cur) = status.runs.first_mut()
            && !cur.phase.is_terminal()
        {
            let why = if cur.generation.unwrap_or_default() < generation {
                "the spec changed"
            } else {
                "mlplane.io/rerun changed"
            };
            supersede(&pl, ctx, &jobs_api, &all_jobs, cur, why, &now).await?;
        }
        blocked = match spec_problem {
            Some(p) => Some(p),
            None => {
                if ctx.caches.namespace_terminating(&ns) {
                    return Ok(Action::await_change());
                }
                let started = start_run(&pl, ctx, &api, &mut status, &token, &now).await?;
                if started.is_ok() {
                    before = status.clone();
                }
                started.err()
            }
        };
    } else if let Some(p) = spec_problem {
        blocked = Some(p);
    }

    let mut requeue = ctx.settings.resync;
    if blocked.is_none()
        && let Some(cur) = status.runs.first().cloned()
        && !cur.phase.is_terminal()
        && cur.generation.unwrap_or_default() == generation
    {
        let mut cur = cur;
        drive_run(&pl, ctx, &jobs_api, &all_jobs, &mut cur, &now).await?;
        status.runs[0] = cur;
    }

    // Phase and Ready.
    let latest = status.runs.first();
    let (phase, ready, reason, message) = match (&blocked, latest) {
        (Some(b), _) => {
            if b.waiting || WAITING_REASONS.contains(&b.reason.as_str()) || b.reason == "ComputeClusterNotFound" {
                requeue = requeue.min(BLOCKED_POLL);
            }
            let phase =
                if b.waiting || WAITING_REASONS.contains(&b.reason.as_str()) || b.reason == TRACKING_NOT_CONFIGURED {
                    RunPhase::Pending
                } else {
                    RunPhase::Failed
                };
            (phase, false, b.reason.clone(), b.message.clone())
        }
        (None, None) => (
            RunPhase::Pending,
            false,
            "Pending".to_string(),
            "no run yet".to_string(),
        ),
        (None, Some(r)) => ready_of(r),
    };
    status.phase = Some(phase);
    set_condition(
        &mut status.conditions,
        NewCondition::new(READY, ready, &reason, message.clone()).observed_generation(Some(generation)),
        &now,
    );
    if write_status(&api, ctx, &pl, Some(&before), &status).await?
        && let Some(b) = &blocked
        && was.as_deref() != Some(b.reason.as_str())
    {
        ctx.event(&pl, EventType::Warning, &b.reason, "Reconcile", b.message.clone())
            .await;
    }
    ctx.reset_failures(&uid);
    Ok(Action::requeue(requeue))
}

/// Writes status when it changed, remembering it (see the module docs).
async fn write_status(
    api: &Api<Pipeline>,
    ctx: &PipelineContext,
    pl: &Pipeline,
    current: Option<&PipelineStatus>,
    status: &PipelineStatus,
) -> Result<bool> {
    Ok(ctx.statuses.write_now(api, StatusKey::of(pl), current, status).await?)
}

/// Ready and its reason from the latest run.
fn ready_of(r: &PipelineRunStatus) -> (RunPhase, bool, String, String) {
    let reused = r.steps.iter().filter(|s| s.reused).count();
    let ran = r.steps.iter().filter(|s| s.job.is_some()).count();
    match r.phase {
        RunPhase::Succeeded => (
            r.phase,
            true,
            "Succeeded".into(),
            format!("run {} succeeded: {ran} step(s) ran, {reused} reused", r.name),
        ),
        RunPhase::Failed => {
            let failed = r.steps.iter().find(|s| s.phase == RunPhase::Failed);
            let message = match failed {
                Some(s) => format!(
                    "run {}: step {} failed: {}",
                    r.name,
                    s.name,
                    s.message.clone().unwrap_or_default()
                ),
                None => format!("run {} failed", r.name),
            };
            (r.phase, false, "StepFailed".into(), message)
        }
        RunPhase::Cancelled => (
            r.phase,
            false,
            SUPERSEDED.into(),
            format!("run {} was cancelled", r.name),
        ),
        RunPhase::Pending | RunPhase::Queued => {
            (r.phase, false, "Pending".into(), format!("run {} is starting", r.name))
        }
        RunPhase::Running => {
            let active: Vec<&str> = r
                .steps
                .iter()
                .filter(|s| s.job.is_some() && !s.phase.is_terminal())
                .map(|s| s.name.as_str())
                .collect();
            (
                r.phase,
                false,
                "Running".into(),
                format!("run {} is running: {}", r.name, active.join(", ")),
            )
        }
    }
}

/// Pins the inputs and writes a new run to status (before any Job). An
/// `Err` inside says why it cannot start yet.
async fn start_run(
    pl: &Pipeline,
    ctx: &PipelineContext,
    api: &Api<Pipeline>,
    status: &mut PipelineStatus,
    token: &str,
    now: &Time,
) -> Result<std::result::Result<(), Blocked>> {
    let ns = pl.namespace().unwrap_or_default();
    let name = pl.name_any();
    let spec = &pl.spec;
    for (i, s) in spec.steps.iter().enumerate() {
        if let Some(cc) = s.compute.as_ref().or(spec.compute.as_ref())
            && !ctx.caches.cluster_exists(cc)
        {
            let field = if s.compute.is_some() {
                format!("spec.steps[{i}].compute")
            } else {
                "spec.compute".into()
            };
            return Ok(Err(Blocked::new(
                "ComputeClusterNotFound",
                format!("{field}: ComputeCluster {cc:?} not found"),
                true,
            )));
        }
    }
    let pins = match pin_inputs(
        &ns,
        "spec.inputs",
        &spec.inputs,
        None,
        &ctx.caches,
        ctx.settings.tracking.as_ref(),
    )
    .await?
    {
        Ok(p) => p,
        Err(e) => return Ok(Err(Blocked::new(e.reason, e.message, true))),
    };
    let pins: BTreeMap<String, PinnedInput> = pins.into_iter().map(|(k, p)| (k, p.pin)).collect();
    let dag = dag::build(spec).map_err(|e| Error::InvalidObject(e.to_string()))?;
    let images = images(pl, ctx).map_err(|b| Error::InvalidObject(b.message))?;
    let index = status.runs.iter().filter_map(run_index).max().map_or(1, |i| i + 1);
    let run = run_name(&name, index);
    let salt = format!("{}/{index}", pl.uid().unwrap_or_default());
    let inputs = run_inputs(pl, ctx, &pins);
    let keys = cache_keys(
        spec,
        &dag,
        &KeyInputs {
            images: &images,
            pins: &pins,
            root: inputs.root.as_deref(),
            run: &salt,
        },
    );
    // Every step must build before anything starts.
    let rc = RunContext {
        pipeline: pl,
        dag: &dag,
        index,
        run: &run,
        keys: &keys,
        images: &images,
        pins: &pins,
        secrets: &inputs.secrets,
        root: inputs.root.as_deref(),
        root_secret: inputs.root_secret.as_deref(),
        fetch_image: &ctx.settings.image,
    };
    for i in 0..spec.steps.len() {
        let rs = match step::run_spec(&rc, i) {
            Ok(rs) => rs,
            Err(e) => return Ok(Err(e.into())),
        };
        if let Err(e) = build_run(&rs) {
            return Ok(Err(StepError::build(i, e).into()));
        }
    }
    let before = status.clone();
    status.runs.insert(
        0,
        PipelineRunStatus {
            name: run.clone(),
            generation: pl.metadata.generation,
            phase: RunPhase::Pending,
            inputs: pins.clone(),
            steps: spec
                .steps
                .iter()
                .zip(&keys)
                .map(|(s, k)| StepStatus {
                    name: s.name.clone(),
                    phase: RunPhase::Pending,
                    cache_key: Some(k.clone()),
                    ..Default::default()
                })
                .collect(),
            start_time: Some(now.clone()),
            completion_time: None,
        },
    );
    status.last_handled_rerun = Some(token.to_string()).filter(|t| !t.is_empty());
    bound_runs(&mut status.runs);
    write_status(api, ctx, pl, Some(&before), status).await?;
    let pinned: Vec<String> = pins.iter().map(|(k, p)| format!("{k}={}", describe(p))).collect();
    let inputs_note = if pinned.is_empty() {
        String::new()
    } else {
        format!(", inputs {}", pinned.join(", "))
    };
    ctx.event(
        pl,
        EventType::Normal,
        "RunStarted",
        "StartRun",
        format!("run {run} started: {} step(s){inputs_note}", spec.steps.len()),
    )
    .await;
    Ok(Ok(()))
}

fn job_ref(ns: &str, job: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("batch/v1".into()),
        kind: Some("Job".into()),
        name: Some(job.to_string()),
        namespace: Some(ns.to_string()),
        ..Default::default()
    }
}

/// Cancels the active steps of a run that a newer one replaces.
async fn supersede(
    pl: &Pipeline,
    ctx: &PipelineContext,
    jobs_api: &Api<CachedJob>,
    all_jobs: &[CachedJob],
    run: &mut PipelineRunStatus,
    why: &str,
    now: &Time,
) -> Result<()> {
    let index = run_index(run).map(|i| i.to_string());
    let message = format!("a newer run replaced it ({why})");
    for job in all_jobs
        .iter()
        .filter(|j| j.labels().get(RUN_INDEX_LABEL) == index.as_ref())
    {
        let done =
            job.annotations().contains_key(RESULT_ANNOTATION) || job.annotations().contains_key(CANCEL_ANNOTATION);
        if !done && !run_state(job, &[]).phase.is_terminal() {
            let patched = jobs_api
                .patch(
                    &job.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(cancel_patch(SUPERSEDED, &message)),
                )
                .await?;
            ctx.caches
                .overlay
                .record(&patched, Expect::Annotation(CANCEL_ANNOTATION));
        }
    }
    for s in run.steps.iter_mut().filter(|s| !s.phase.is_terminal()) {
        s.phase = RunPhase::Cancelled;
        s.reason = Some(SUPERSEDED.into());
        s.message = Some(message.clone());
        s.completion_time.get_or_insert_with(|| now.clone());
        if s.job.is_some() {
            ctx.metrics.pipeline_steps.with_label_values(&["cancelled"]).inc();
        }
    }
    run.phase = RunPhase::Cancelled;
    run.completion_time = Some(now.clone());
    ctx.metrics.runs.with_label_values(&[KIND, "Cancelled"]).inc();
    ctx.event(
        pl,
        EventType::Normal,
        "RunCancelled",
        "Supersede",
        format!("run {} cancelled: {message}", run.name),
    )
    .await;
    Ok(())
}

/// Observes, decides and acts on the steps of the current run; updates its
/// status in place.
async fn drive_run(
    pl: &Pipeline,
    ctx: &PipelineContext,
    jobs_api: &Api<CachedJob>,
    all_jobs: &[CachedJob],
    run: &mut PipelineRunStatus,
    now: &Time,
) -> Result<()> {
    let ns = pl.namespace().unwrap_or_default();
    let spec = &pl.spec;
    let tracking = ctx.settings.tracking.as_ref().expect("checked by reconcile");
    let Some(index) = run_index(run) else {
        return Err(Error::InvalidObject(format!("run name {:?} has no index", run.name)));
    };
    let dag = dag::build(spec).map_err(|e| Error::InvalidObject(e.to_string()))?;
    let images = images(pl, ctx).map_err(|b| Error::InvalidObject(b.message))?;
    let n = spec.steps.len();
    if run.steps.len() != n || run.steps.iter().zip(&spec.steps).any(|(a, b)| a.name != b.name) {
        return Err(Error::InvalidObject(format!(
            "run {} does not match the spec's steps",
            run.name
        )));
    }
    let keys: Vec<String> = run
        .steps
        .iter()
        .map(|s| s.cache_key.clone().unwrap_or_default())
        .collect();
    let inputs = run_inputs(pl, ctx, &run.inputs);
    let rc = RunContext {
        pipeline: pl,
        dag: &dag,
        index,
        run: &run.name,
        keys: &keys,
        images: &images,
        pins: &run.inputs,
        secrets: &inputs.secrets,
        root: inputs.root.as_deref(),
        root_secret: inputs.root_secret.as_deref(),
        fetch_image: &ctx.settings.image,
    };

    // Observe: this run's step Jobs (and, while unrecorded, their pods).
    let index_label = index.to_string();
    let mut by_step: BTreeMap<usize, CachedJob> = all_jobs
        .iter()
        .filter(|j| j.labels().get(RUN_INDEX_LABEL) == Some(&index_label))
        .filter_map(|j| Some((*dag.index.get(j.labels().get(STEP_LABEL)?)?, j.clone())))
        .collect();
    let unrecorded: Vec<String> = by_step
        .values()
        .filter(|j| !j.annotations().contains_key(RESULT_ANNOTATION))
        .map(|j| j.name_any())
        .collect();
    let pods = if unrecorded.is_empty() {
        Default::default()
    } else {
        ctx.caches.pods_of(&ns, &unrecorded)
    };

    // Record the ends of steps that finished (once each).
    let mut results: BTreeMap<usize, RunResult> = BTreeMap::new();
    for (&i, job) in by_step.iter_mut() {
        let recorded = job
            .annotations()
            .get(RESULT_ANNOTATION)
            .and_then(|r| serde_json::from_str::<RunResult>(r).ok());
        let result = match recorded {
            Some(r) => r,
            None => {
                let state = run_state(job, pods.get(&job.name_any()).map(Vec::as_slice).unwrap_or(&[]));
                if !state.phase.is_terminal() {
                    continue;
                }
                record_step_end(pl, ctx, tracking, jobs_api, &rc, i, job, run_salted(spec, i)).await?
            }
        };
        results.insert(i, result);
    }

    let mut known: Vec<Known> = (0..n)
        .map(|i| {
            if let Some(r) = results.get(&i) {
                return Known::Job(r.phase);
            }
            if let Some(job) = by_step.get(&i) {
                let pods = pods.get(&job.name_any()).map(Vec::as_slice).unwrap_or(&[]);
                return Known::Job(run_state(job, pods).phase);
            }
            let s = &run.steps[i];
            if s.reused {
                Known::Reused
            } else if s.phase == RunPhase::Cancelled {
                Known::Skipped(s.reason.clone().unwrap_or_default())
            } else {
                Known::Undecided
            }
        })
        .collect();

    // Decide: look up only what can be decided now, then act.
    let reusable: Vec<bool> = (0..n).map(|i| !run_salted(spec, i)).collect();
    let ask = to_look_up(&dag, &known, &reusable, &keys);
    let mut hits: BTreeMap<usize, StepCacheJson> = BTreeMap::new();
    if !ask.is_empty() {
        let wanted: Vec<String> = ask.iter().map(|&i| keys[i].clone()).collect();
        let found = tracking.lookup_step_cache(&ns, &wanted).await?;
        for &i in &ask {
            if let Some(e) = found.iter().find(|e| e.cache_key == keys[i]) {
                hits.insert(i, e.clone());
            }
        }
    }
    let hit_set: BTreeSet<usize> = hits.keys().copied().collect();
    let cont = spec.settings.as_ref().is_some_and(|s| s.continue_on_step_failure);
    for (i, action) in decide(&dag, &known, &reusable, &keys, &hit_set, cont) {
        let step_name = spec.steps[i].name.clone();
        match action {
            StepAction::Start => {
                let job = start_step(pl, ctx, jobs_api, &rc, i).await?;
                known[i] = Known::Job(RunPhase::Pending);
                by_step.insert(i, job);
            }
            StepAction::Reuse => {
                let e = &hits[&i];
                let s = &mut run.steps[i];
                s.phase = RunPhase::Succeeded;
                s.reused = true;
                s.reason = Some("Reused".into());
                s.message = Some(format!(
                    "reused the outputs of step {} of run {} of pipeline {} (Job {})",
                    e.step, e.run, e.pipeline, e.job
                ));
                s.start_time = Some(now.clone());
                s.completion_time = Some(now.clone());
                known[i] = Known::Reused;
                ctx.metrics.pipeline_steps.with_label_values(&["reused"]).inc();
                ctx.event_related(
                    pl,
                    EventType::Normal,
                    "StepReused",
                    "ReuseStep",
                    format!(
                        "step {step_name} of run {} reused the outputs of run {} of pipeline {} (cache key {})",
                        run.name, e.run, e.pipeline, e.cache_key
                    ),
                    Some(job_ref(&ns, &e.job)),
                )
                .await;
            }
            StepAction::Skip(reason) => {
                let s = &mut run.steps[i];
                s.phase = RunPhase::Cancelled;
                s.reason = Some(reason.into());
                s.message = Some(match reason {
                    super::plan::UPSTREAM_FAILED => "not run: a step it depends on failed".into(),
                    _ => "not run: a step failed and settings.continueOnStepFailure is false".into(),
                });
                s.completion_time = Some(now.clone());
                known[i] = Known::Skipped(reason.into());
                ctx.metrics.pipeline_steps.with_label_values(&["skipped"]).inc();
            }
        }
    }

    // Status of each step from its Job.
    for (&i, job) in &by_step {
        let s = &mut run.steps[i];
        s.job = Some(job.name_any());
        s.reused = false;
        match results.get(&i) {
            Some(r) => {
                s.phase = r.phase;
                s.reason = (!r.reason.is_empty()).then(|| r.reason.clone());
                s.message = (!r.message.is_empty()).then(|| r.message.clone());
                s.start_time = r.start_time.clone();
                s.completion_time = r.completion_time.clone();
            }
            None => {
                let pods = pods.get(&job.name_any()).map(Vec::as_slice).unwrap_or(&[]);
                let st = run_state(job, pods);
                s.phase = st.phase;
                s.reason = (!st.reason.is_empty()).then_some(st.reason);
                s.message = (!st.message.is_empty()).then_some(st.message);
                s.start_time = start_time(job).or_else(|| job.metadata.creation_timestamp.clone());
                s.completion_time = None;
            }
        }
    }

    let phase = run_phase(&known);
    if phase.is_terminal() && !run.phase.is_terminal() {
        run.completion_time = Some(now.clone());
        let label = format!("{phase:?}");
        ctx.metrics.runs.with_label_values(&[KIND, &label]).inc();
        if let Some(start) = &run.start_time {
            let secs = (now.0.as_millisecond() - start.0.as_millisecond()).max(0) as f64 / 1000.0;
            ctx.metrics.run_duration.with_label_values(&[KIND]).observe(secs);
        }
        let reused = run.steps.iter().filter(|s| s.reused).count();
        let ran = run.steps.iter().filter(|s| s.job.is_some()).count();
        let (type_, reason) = match phase {
            RunPhase::Succeeded => (EventType::Normal, "RunSucceeded"),
            _ => (EventType::Warning, "RunFailed"),
        };
        ctx.event(
            pl,
            type_,
            reason,
            "RunEnded",
            format!("run {} {label}: {ran} step(s) ran, {reused} reused", run.name),
        )
        .await;
    }
    run.phase = phase;
    Ok(())
}

/// Creates step `i`'s Job (AlreadyExists means found: it must be ours).
async fn start_step(
    pl: &Pipeline,
    ctx: &PipelineContext,
    jobs_api: &Api<CachedJob>,
    rc: &RunContext<'_>,
    i: usize,
) -> Result<CachedJob> {
    let rs = step::run_spec(rc, i).map_err(|e| Error::InvalidObject(e.message))?;
    let objs = build_run(&rs).map_err(|e| Error::InvalidObject(StepError::build(i, e).message))?;
    let step_name = &pl.spec.steps[i].name;
    let uid = pl.uid().unwrap_or_default();
    // The write that starts the step goes before status and Events (priority).
    let busy = ctx.foreground.begin();
    let created = crate::controllers::cached::create_job(&ctx.client, &rs.namespace, &objs.job).await;
    drop(busy);
    let job = match created {
        Ok(j) => {
            ctx.metrics.pipeline_steps.with_label_values(&["started"]).inc();
            ctx.event_related(
                pl,
                EventType::Normal,
                "StepStarted",
                "StartStep",
                format!(
                    "step {step_name} of run {} started as Job {} (cache key {})",
                    rc.run, rs.name, rc.keys[i]
                ),
                Some(job_ref(&rs.namespace, &rs.name)),
            )
            .await;
            j
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let found = jobs_api.get(&rs.name).await?;
            if !found.owner_references().iter().any(|o| o.uid == uid) {
                return Err(Error::InvalidObject(format!(
                    "Job {} belongs to another object (a deleted Pipeline of the same name?); waiting for it to go",
                    rs.name
                )));
            }
            found
        }
        Err(e) => return Err(e.into()),
    };
    ctx.caches.overlay.record(&job, Expect::Exists);
    Ok(job)
}

/// Records the end of step `i` (its Job finished): its outputs in the step
/// cache (when it succeeded and may be reused), then the result annotation,
/// the event and the metric.
#[allow(clippy::too_many_arguments)]
async fn record_step_end(
    pl: &Pipeline,
    ctx: &PipelineContext,
    tracking: &TrackingClient,
    jobs_api: &Api<CachedJob>,
    rc: &RunContext<'_>,
    i: usize,
    job: &mut CachedJob,
    salted: bool,
) -> Result<RunResult> {
    let ns = pl.namespace().unwrap_or_default();
    let job_name = job.name_any();
    let step_name = pl.spec.steps[i].name.clone();
    // The cause of a failure from the pods as they are now (recorded once).
    let pods: Api<CachedPod> = Api::namespaced(ctx.client.clone(), &ns);
    let listed = pods
        .list(&ListParams::default().labels(&format!("{RUN_LABEL}={job_name}")))
        .await?
        .items;
    let state = run_state(job, &listed);
    if state.phase == RunPhase::Succeeded && !salted {
        tracking
            .put_step_cache(
                &ns,
                &StepCacheJson {
                    cache_key: rc.keys[i].clone(),
                    pipeline: pl.name_any(),
                    run: rc.run.to_string(),
                    step: step_name.clone(),
                    job: job_name.clone(),
                    outputs: step::outputs_of(rc, i),
                    created_at: 0,
                },
            )
            .await?;
    }
    let result = RunResult {
        phase: state.phase,
        reason: state.reason.clone(),
        message: state.message.clone(),
        exit_code: state.exit_code,
        metrics: BTreeMap::new(),
        start_time: start_time(job).or_else(|| job.metadata.creation_timestamp.clone()),
        completion_time: Some(finish_time(job).unwrap_or_else(now_seconds)),
    };
    let patch = serde_json::json!({"metadata": {"annotations": {RESULT_ANNOTATION: serde_json::to_string(&result)?}}});
    *job = jobs_api
        .patch(&job_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    ctx.caches.overlay.record(job, Expect::Annotation(RESULT_ANNOTATION));
    let (outcome, type_, reason) = match state.phase {
        RunPhase::Succeeded => ("succeeded", EventType::Normal, "StepSucceeded"),
        RunPhase::Failed => ("failed", EventType::Warning, "StepFailed"),
        _ => ("cancelled", EventType::Normal, "StepCancelled"),
    };
    ctx.metrics.pipeline_steps.with_label_values(&[outcome]).inc();
    let detail = if state.message.is_empty() {
        state.reason.clone()
    } else {
        format!("{}: {}", state.reason, state.message)
    };
    ctx.event_related(
        pl,
        type_,
        reason,
        "StepEnded",
        format!("step {step_name} of run {} {outcome}: {detail}", rc.run),
        Some(job_ref(&ns, &job_name)),
    )
    .await;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, steps: usize) -> PipelineRunStatus {
        PipelineRunStatus {
            name: name.into(),
            steps: vec![StepStatus::default(); steps],
            ..Default::default()
        }
    }

    #[test]
    fn run_indices_come_from_names() {
        assert_eq!(run_index(&run("sales-12", 0)), Some(12));
        assert_eq!(run_index(&run("a-b-3", 0)), Some(3));
        assert_eq!(run_index(&run("x", 0)), None);
    }

    #[test]
    fn history_is_bounded_by_runs_and_steps() {
        let mut runs: Vec<_> = (0..15).map(|i| run(&format!("p-{i}"), 3)).collect();
        bound_runs(&mut runs);
        assert_eq!(runs.len(), HISTORY_LIMIT);
        let mut big: Vec<_> = (0..5).map(|i| run(&format!("p-{i}"), 400)).collect();
        bound_runs(&mut big);
        assert_eq!(big.len(), 2, "800 steps fit, 1200 do not");
        let mut huge = vec![run("p-1", 5000)];
        bound_runs(&mut huge);
        assert_eq!(huge.len(), 1, "the latest run is always kept");
    }
}
