//! Run status from what Kubernetes reports: a run's Job and its pods become a
//! phase and a reason a user can act on.
//!
//! Owns: the mapping Job/Pod status -> [`RunPhase`] + reason + message, the
//! MLflow status of each phase, cancellation marks, the best run and the
//! bound on the run history. Must not touch the API server.
//!
//! Precedence (first match wins):
//! 1. Job condition `Complete` (or `SuccessCriteriaMet`) -> Succeeded.
//! 2. Job condition `Failed` (or `FailureTarget`) -> Failed, with the cause:
//!    `DeadlineExceeded` (the run's timeout); else, from the failed pods,
//!    `OOMKilled` (anywhere), a pod-level reason such as `Evicted`, or
//!    `ExitCode` (the first container to exit non-zero, with its exit code
//!    and termination message: run containers use
//!    `FallbackToLogsOnError`, so that is the log's tail); else the Job's own
//!    reason (`BackoffLimitExceeded`, ...).
//! 3. The Job carries [`CANCEL_ANNOTATION`] -> Cancelled, reason = its value
//!    (`Suspended`, `EarlyTerminated`, ...). The controller cancels a run by
//!    patching the Job with [`cancel_patch`]: `suspend: true` (Kubernetes
//!    stops its pods, the Job and its history stay) plus the annotation, so a
//!    restarted operator still knows the run was cancelled, not queued.
//! 4. `spec.suspend: true` without the annotation -> Queued: the
//!    ComputeCluster admission queue has not admitted it yet. The reason and
//!    message are the queue's (`mlplane.io/queue-reason`: `QuotaExceeded`,
//!    `WaitingForCapacity`, `ExceedsPoolMaximum`, `NotAllowedInWorkspace`,
//!    and `mlplane.io/queue-message`), `WaitingForAdmission` until the queue
//!    has looked at the Job.
//! 5. Otherwise, from the pods: any running -> Running; any unschedulable ->
//!    Queued (`Unschedulable`, with the scheduler's message: waiting for
//!    capacity); any container unable to start (`ImagePullBackOff`,
//!    `ErrImagePull`, `CreateContainerConfigError`, ...) -> Pending with that
//!    reason; else Pending (`Starting`).
use k8s_openapi::api::batch::v1::JobCondition;

use crate::controllers::cached::{CachedContainerStatus, CachedJob, CachedPod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::experiment::{BestRun, Goal, Objective, RunPhase, RunStatus};
use crate::autoscaler::admission::{QUEUE_MESSAGE_ANNOTATION, QUEUE_REASON_ANNOTATION, WAITING_FOR_ADMISSION};

/// Annotation on a run's Job marking it cancelled; its value is the reason.
pub const CANCEL_ANNOTATION: &str = "mlplane.io/cancel-reason";
/// Optional human-readable detail of a cancellation.
pub const CANCEL_MESSAGE_ANNOTATION: &str = "mlplane.io/cancel-message";
/// Cancel reason when `spec.suspend: true` stops an Experiment's runs.
pub const SUSPENDED: &str = "Suspended";
/// Runs kept in `status.runs` (the tracking store keeps all).
pub const HISTORY_LIMIT: usize = 20;
/// Longest termination message quoted in a run's message (its tail is kept).
pub const MAX_TERMINATION_MESSAGE: usize = 1024;
/// Waiting reasons of a container that will not start without a fix.
const STUCK_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// A run's phase with a CamelCase reason and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunState {
    /// Phase.
    pub phase: RunPhase,
    /// CamelCase reason (`ExitCode`, `OOMKilled`, `DeadlineExceeded`, ...).
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// Exit code of the failing container, when that is the cause.
    pub exit_code: Option<i32>,
}

impl RunState {
    fn new(phase: RunPhase, reason: &str, message: impl Into<String>) -> Self {
        Self {
            phase,
            reason: reason.into(),
            message: message.into(),
            exit_code: None,
        }
    }
}

/// The MLflow run status the operator sets for a phase (`RunStatus` of the
/// MLflow REST API).
pub fn mlflow_status(phase: RunPhase) -> &'static str {
    match phase {
        RunPhase::Pending | RunPhase::Queued => "SCHEDULED",
        RunPhase::Running => "RUNNING",
        RunPhase::Succeeded => "FINISHED",
        RunPhase::Failed => "FAILED",
        RunPhase::Cancelled => "KILLED",
    }
}

/// A JSON merge patch that cancels a run's Job (see the module docs).
pub fn cancel_patch(reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"annotations": {CANCEL_ANNOTATION: reason, CANCEL_MESSAGE_ANNOTATION: message}},
        "spec": {"suspend": true},
    })
}

fn true_condition<'a>(job: &'a CachedJob, types: &[&str]) -> Option<&'a JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.status == "True" && types.contains(&c.type_.as_str()))
}

/// Whether a run's Job has ended: `Complete` or `Failed`.
pub fn ended(job: &CachedJob) -> bool {
    true_condition(job, &["Complete", "Failed"]).is_some()
}

/// Whether a run's Job may still have pods holding resources: it is neither
/// suspended nor `Complete`/`Failed`. The outcome is known earlier (Kubernetes
/// sets `SuccessCriteriaMet`/`FailureTarget` first and the terminal condition
/// only once every pod has terminated), so a finished run can still hold its
/// GPUs for a moment: sweeps count it against `maxConcurrentTrials` until then.
pub fn holds_resources(job: &CachedJob) -> bool {
    let suspended = job.spec.as_ref().and_then(|s| s.suspend) == Some(true);
    !suspended && !ended(job)
}

/// When the run started (the Job's `startTime`, reset when it is resumed).
pub fn start_time(job: &CachedJob) -> Option<Time> {
    job.status.as_ref()?.start_time.clone()
}

/// When the run finished: `completionTime`, or the time the Job was marked
/// failed.
pub fn finish_time(job: &CachedJob) -> Option<Time> {
    if let Some(t) = job.status.as_ref().and_then(|s| s.completion_time.clone()) {
        return Some(t);
    }
    true_condition(job, &["Failed", "Complete"]).and_then(|c| c.last_transition_time.clone())
}

/// The tail of a termination message, at most [`MAX_TERMINATION_MESSAGE`]
/// bytes, cut on a character boundary.
fn tail(s: &str) -> &str {
    let s = s.trim();
    if s.len() <= MAX_TERMINATION_MESSAGE {
        return s;
    }
    let mut start = s.len() - MAX_TERMINATION_MESSAGE;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Why one failed pod failed.
enum Cause {
    OomKilled {
        container: String,
    },
    Pod {
        reason: String,
        message: String,
    },
    Exit {
        container: String,
        code: i32,
        message: Option<String>,
    },
}

/// Terminated containers of a pod, init containers first.
fn terminated(pod: &CachedPod) -> impl Iterator<Item = &CachedContainerStatus> {
    let status = pod.status.as_ref();
    let init = status
        .and_then(|s| s.init_container_statuses.as_deref())
        .unwrap_or_default();
    let main = status.and_then(|s| s.container_statuses.as_deref()).unwrap_or_default();
    init.iter()
        .chain(main)
        .filter(|c| c.state.as_ref().and_then(|s| s.terminated.as_ref()).is_some())
}

fn pod_failed(pod: &CachedPod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
}

/// When the pod's first failing container stopped (for ordering).
fn failed_at(pod: &CachedPod) -> Option<i64> {
    terminated(pod)
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .filter(|t| t.exit_code != 0)
        .filter_map(|t| t.finished_at.as_ref().map(|f| f.0.as_second()))
        .min()
}

fn pod_cause(pod: &CachedPod) -> Option<Cause> {
    let oom = terminated(pod).find(|c| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| t.reason.as_deref())
            == Some("OOMKilled")
    });
    if let Some(c) = oom {
        return Some(Cause::OomKilled {
            container: c.name.clone(),
        });
    }
    let status = pod.status.as_ref()?;
    if pod_failed(pod)
        && let Some(reason) = &status.reason
    {
        return Some(Cause::Pod {
            reason: reason.clone(),
            message: status.message.clone().unwrap_or_default(),
        });
    }
    terminated(pod).find_map(|c| {
        let t = c.state.as_ref()?.terminated.as_ref()?;
        (t.exit_code != 0).then(|| Cause::Exit {
            container: c.name.clone(),
            code: t.exit_code,
            message: t
                .message
                .as_deref()
                .map(tail)
                .filter(|m| !m.is_empty())
                .map(String::from),
        })
    })
}

/// The cause of a failed run: OOMKilled anywhere wins; else the pod that
/// failed first (in a distributed run the other ranks fail because of it).
fn failure_cause(pods: &[CachedPod]) -> Option<(String, Cause)> {
    let mut failed: Vec<&CachedPod> = pods
        .iter()
        .filter(|p| pod_failed(p) || failed_at(p).is_some())
        .collect();
    failed.sort_by_key(|p| (failed_at(p).unwrap_or(i64::MAX), p.metadata.name.clone()));
    let causes: Vec<(String, Cause)> = failed
        .into_iter()
        .filter_map(|p| Some((p.metadata.name.clone().unwrap_or_default(), pod_cause(p)?)))
        .collect();
    let oom = causes.iter().position(|(_, c)| matches!(c, Cause::OomKilled { .. }));
    let mut causes = causes;
    match oom {
        Some(i) => Some(causes.swap_remove(i)),
        None => causes.into_iter().next(),
    }
}

fn memory_limit(job: &CachedJob, container: &str) -> Option<String> {
    let spec = job.spec.as_ref()?.template.spec.as_ref()?;
    let c = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == container)?;
    Some(c.resources.as_ref()?.limits.as_ref()?.get("memory")?.0.clone())
}

fn failed_state(job: &CachedJob, condition: &JobCondition, pods: &[CachedPod]) -> RunState {
    let job_reason = condition.reason.clone().unwrap_or_else(|| "Failed".into());
    let job_message = condition.message.clone().unwrap_or_default();
    if job_reason == "DeadlineExceeded" {
        let limit = job
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds)
            .map(|s| format!(" of {s}s"))
            .unwrap_or_default();
        return RunState::new(
            RunPhase::Failed,
            "DeadlineExceeded",
            format!("the run exceeded its timeout{limit} (limits.timeout) and was stopped"),
        );
    }
    let failures = job.status.as_ref().and_then(|s| s.failed).unwrap_or(0);
    let backoff = job.spec.as_ref().and_then(|s| s.backoff_limit).unwrap_or(0);
    let attempts = format!("{failures} failed pod(s), backoffLimit {backoff}");
    match failure_cause(pods) {
        Some((pod, Cause::OomKilled { container })) => {
            let limit = memory_limit(job, &container)
                .map(|l| format!(" of {l}"))
                .unwrap_or_default();
            RunState::new(
                RunPhase::Failed,
                "OOMKilled",
                format!(
                    "container {container} of pod {pod} ran out of memory: it exceeded its memory limit{limit} \
                     (raise resources.memory, or shmSize counts against it too) ({attempts})"
                ),
            )
        }
        Some((pod, Cause::Pod { reason, message })) => RunState::new(
            RunPhase::Failed,
            &reason,
            format!("pod {pod} failed: {reason}: {message} ({attempts})"),
        ),
        Some((
            pod,
            Cause::Exit {
                container,
                code,
                message,
            },
        )) => {
            let detail = message.map(|m| format!(": {m}")).unwrap_or_default();
            RunState {
                exit_code: Some(code),
                ..RunState::new(
                    RunPhase::Failed,
                    "ExitCode",
                    format!("container {container} of pod {pod} exited with code {code} ({attempts}){detail}"),
                )
            }
        }
        None => RunState::new(
            RunPhase::Failed,
            &job_reason,
            if job_message.is_empty() {
                attempts
            } else {
                format!("{job_message} ({attempts})")
            },
        ),
    }
}

fn active_state(job: &CachedJob, pods: &[CachedPod]) -> RunState {
    let live: Vec<&CachedPod> = pods
        .iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ) && p.metadata.deletion_timestamp.is_none()
        })
        .collect();
    let failures = job.status.as_ref().and_then(|s| s.failed).unwrap_or(0);
    let retry = if failures > 0 {
        format!(" (after {failures} failed pod(s))")
    } else {
        String::new()
    };
    let running = live
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count();
    let want = job.spec.as_ref().and_then(|s| s.parallelism).unwrap_or(1).max(1) as usize;
    if running > 0 {
        return RunState::new(
            RunPhase::Running,
            "Running",
            format!("{running}/{want} pod(s) running{retry}"),
        );
    }
    for p in &live {
        let unschedulable = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled" && c.status == "False"))
            .filter(|c| c.reason.as_deref() == Some("Unschedulable"));
        if let Some(c) = unschedulable {
            return RunState::new(
                RunPhase::Queued,
                "Unschedulable",
                format!(
                    "waiting for capacity: {}",
                    c.message.as_deref().unwrap_or("no node fits the pod")
                ),
            );
        }
    }
    for p in &live {
        let status = p.status.as_ref();
        let containers = status
            .and_then(|s| s.init_container_statuses.as_deref())
            .unwrap_or_default()
            .iter()
            .chain(status.and_then(|s| s.container_statuses.as_deref()).unwrap_or_default());
        for c in containers {
            if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref())
                && let Some(reason) = w.reason.as_deref().filter(|r| STUCK_REASONS.contains(r))
            {
                return RunState::new(
                    RunPhase::Pending,
                    reason,
                    format!(
                        "container {} of pod {} cannot start: {}",
                        c.name,
                        p.metadata.name.as_deref().unwrap_or_default(),
                        w.message.as_deref().unwrap_or(reason)
                    ),
                );
            }
        }
    }
    RunState::new(RunPhase::Pending, "Starting", format!("starting {want} pod(s){retry}"))
}

/// The state of a run from its Job and the Job's pods (any order; pods of
/// other Jobs must not be passed).
pub fn run_state(job: &CachedJob, pods: &[CachedPod]) -> RunState {
    if true_condition(job, &["Complete", "SuccessCriteriaMet"]).is_some() {
        return RunState::new(RunPhase::Succeeded, "Completed", "the run completed successfully");
    }
    if let Some(c) = true_condition(job, &["Failed", "FailureTarget"]) {
        return failed_state(job, c, pods);
    }
    let annotations = job.metadata.annotations.as_ref();
    if let Some(reason) = annotations.and_then(|a| a.get(CANCEL_ANNOTATION)) {
        let message = annotations
            .and_then(|a| a.get(CANCEL_MESSAGE_ANNOTATION))
            .filter(|m| !m.is_empty())
            .cloned()
            .unwrap_or_else(|| "the run was cancelled".into());
        return RunState::new(RunPhase::Cancelled, reason, message);
    }
    if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
        let reason = annotations.and_then(|a| a.get(QUEUE_REASON_ANNOTATION));
        let message = annotations
            .and_then(|a| a.get(QUEUE_MESSAGE_ANNOTATION))
            .filter(|m| !m.is_empty());
        return match reason {
            Some(reason) => RunState::new(
                RunPhase::Queued,
                reason,
                message
                    .cloned()
                    .unwrap_or_else(|| "waiting in the ComputeCluster's admission queue".into()),
            ),
            None => RunState::new(
                RunPhase::Queued,
                WAITING_FOR_ADMISSION,
                "waiting for the ComputeCluster's admission queue (quota and capacity for every pod)",
            ),
        };
    }
    active_state(job, pods)
}

/// Bounds the run history (newest first): keeps every run that has not
/// finished, then the newest finished ones while the total stays within
/// `limit`; order is kept. Returns the dropped runs (the tracking store still
/// has them). When more than `limit` runs are active, all of them are kept.
pub fn bound_history(runs: Vec<RunStatus>, limit: usize) -> (Vec<RunStatus>, Vec<RunStatus>) {
    let active = runs.iter().filter(|r| !r.phase.is_terminal()).count();
    let mut budget = limit.saturating_sub(active);
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for r in runs {
        if !r.phase.is_terminal() {
            kept.push(r);
        } else if budget > 0 {
            budget -= 1;
            kept.push(r);
        } else {
            dropped.push(r);
        }
    }
    (kept, dropped)
}

/// The best Succeeded run by the objective among `runs`, or `current` if it
/// is at least as good (the history is bounded, so the controller carries
/// the best forward). Runs without a finite value of the metric are skipped.
pub fn best_run(current: Option<&BestRun>, runs: &[RunStatus], objective: &Objective) -> Option<BestRun> {
    let better = |a: f64, b: f64| match objective.goal {
        Goal::Maximize => a > b,
        Goal::Minimize => a < b,
    };
    let mut best = current.filter(|b| b.metric == objective.metric).cloned();
    for r in runs.iter().filter(|r| r.phase == RunPhase::Succeeded) {
        let Some(v) = r.metrics.get(&objective.metric).copied().filter(|v| v.is_finite()) else {
            continue;
        };
        if best.as_ref().is_none_or(|b| better(v, b.value)) {
            best = Some(BestRun {
                name: r.name.clone(),
                metric: objective.metric.clone(),
                value: v,
            });
        }
    }
    best
}

/// The phase of a sweep from its trials' phases. Any trial running ->
/// Running. While trials remain to be started (`all_started` false): Running
/// once some trial finished, else Queued or Pending like its trials. Once
/// all started: Pending, then Queued, while any trial is; when all finished,
/// Succeeded if any trial succeeded, Cancelled if all were cancelled, else
/// Failed.
pub fn sweep_phase(trials: &[RunPhase], all_started: bool) -> RunPhase {
    let any = |p: RunPhase| trials.contains(&p);
    if any(RunPhase::Running) {
        return RunPhase::Running;
    }
    if !all_started {
        // More trials will start: in progress between trials.
        return if trials.iter().any(|p| p.is_terminal()) {
            RunPhase::Running
        } else if any(RunPhase::Queued) {
            RunPhase::Queued
        } else {
            RunPhase::Pending
        };
    }
    if any(RunPhase::Pending) {
        RunPhase::Pending
    } else if any(RunPhase::Queued) {
        RunPhase::Queued
    } else if any(RunPhase::Succeeded) {
        RunPhase::Succeeded
    } else if !trials.is_empty() && trials.iter().all(|p| *p == RunPhase::Cancelled) {
        RunPhase::Cancelled
    } else {
        RunPhase::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn job(status: Value) -> CachedJob {
        serde_json::from_value(json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "resnet-3", "namespace": "vision"},
            "spec": {
                "backoffLimit": 2,
                "parallelism": 1,
                "activeDeadlineSeconds": 7200,
                "suspend": false,
                "template": {"spec": {"restartPolicy": "Never", "containers": [
                    {"name": "run", "image": "x", "resources": {"limits": {"memory": "32Gi"}}}
                ]}}
            },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_run_holds_resources_until_its_job_is_complete_or_failed() {
        let cond = |t: &str| json!({"conditions": [{"type": t, "status": "True"}]});
        assert!(holds_resources(&job(json!({"active": 1}))));
        // Outcome known, pods still terminating.
        assert!(holds_resources(&job(cond("SuccessCriteriaMet"))));
        assert!(holds_resources(&job(cond("FailureTarget"))));
        assert!(!holds_resources(&job(cond("Complete"))));
        assert!(!holds_resources(&job(cond("Failed"))));
        let mut suspended = job(json!({}));
        suspended.spec.as_mut().unwrap().suspend = Some(true);
        assert!(!holds_resources(&suspended));
    }

    fn with(mut j: CachedJob, f: impl FnOnce(&mut CachedJob)) -> CachedJob {
        f(&mut j);
        j
    }

    fn pod(name: &str, status: Value) -> CachedPod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "vision", "labels": {"batch.kubernetes.io/job-name": "resnet-3"}},
            "spec": {"containers": [{"name": "run", "image": "x"}]},
            "status": status,
        }))
        .unwrap()
    }

    const BACKOFF_MESSAGE: &str = "Job has reached the specified backoff limit";

    fn failed_job(reason: &str, failed: i32) -> CachedJob {
        job(json!({
            "failed": failed,
            "startTime": "2026-01-01T00:00:00Z",
            "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason, "message": BACKOFF_MESSAGE},
                {"type": "Failed", "status": "True", "reason": reason, "message": BACKOFF_MESSAGE,
                 "lastTransitionTime": "2026-01-01T00:10:00Z"}
            ]
        }))
    }

    fn exited(name: &str, code: i32, reason: &str, message: Option<&str>, finished: &str) -> CachedPod {
        let mut terminated = json!({"exitCode": code, "reason": reason, "finishedAt": finished});
        if let Some(m) = message {
            terminated["message"] = json!(m);
        }
        pod(
            name,
            json!({"phase": "Failed", "containerStatuses": [
                {"name": "run", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": terminated}}
            ]}),
        )
    }

    #[test]
    fn succeeded() {
        let j = job(json!({
            "succeeded": 1,
            "startTime": "2026-01-01T00:00:00Z",
            "completionTime": "2026-01-01T00:05:00Z",
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True"},
                {"type": "Complete", "status": "True"}
            ]
        }));
        let s = run_state(&j, &[]);
        assert_eq!((s.phase, s.reason.as_str()), (RunPhase::Succeeded, "Completed"));
        assert_eq!(mlflow_status(s.phase), "FINISHED");
        assert_eq!(start_time(&j).unwrap().0.as_second(), 1_767_225_600);
        assert_eq!(finish_time(&j).unwrap().0.as_second(), 1_767_225_900);
    }

    #[test]
    fn failed_with_exit_code_and_termination_message() {
        let j = failed_job("BackoffLimitExceeded", 3);
        let pods = [
            exited(
                "resnet-3-b",
                3,
                "Error",
                Some("ValueError: bad lr"),
                "2026-01-01T00:06:00Z",
            ),
            exited(
                "resnet-3-a",
                3,
                "Error",
                Some("Traceback...\nValueError: bad lr\n"),
                "2026-01-01T00:02:00Z",
            ),
            exited("resnet-3-c", 3, "Error", None, "2026-01-01T00:09:00Z"),
        ];
        let s = run_state(&j, &pods);
        assert_eq!(
            (s.phase, s.reason.as_str(), s.exit_code),
            (RunPhase::Failed, "ExitCode", Some(3))
        );
        assert_eq!(
            s.message,
            "container run of pod resnet-3-a exited with code 3 (3 failed pod(s), backoffLimit 2): Traceback...\n\
             ValueError: bad lr"
        );
        assert_eq!(mlflow_status(s.phase), "FAILED");
        assert_eq!(finish_time(&j).unwrap().0.as_second(), 1_767_226_200);
    }

    #[test]
    fn oom_killed_wins_and_names_the_limit() {
        let j = failed_job("BackoffLimitExceeded", 2);
        let pods = [
            exited("resnet-3-a", 1, "Error", Some("NCCL error"), "2026-01-01T00:01:00Z"),
            exited("resnet-3-b", 137, "OOMKilled", None, "2026-01-01T00:02:00Z"),
        ];
        let s = run_state(&j, &pods);
        assert_eq!((s.phase, s.reason.as_str()), (RunPhase::Failed, "OOMKilled"));
        assert!(
            s.message
                .starts_with("container run of pod resnet-3-b ran out of memory"),
            "{}",
            s.message
        );
        assert!(s.message.contains("memory limit of 32Gi"), "{}", s.message);
        assert_eq!(s.exit_code, None);
    }

    #[test]
    fn deadline_exceeded_from_job_condition() {
        let j = failed_job("DeadlineExceeded", 1);
        let pods = [exited("resnet-3-a", 143, "Error", None, "2026-01-01T02:00:00Z")];
        let s = run_state(&j, &pods);
        assert_eq!((s.phase, s.reason.as_str()), (RunPhase::Failed, "DeadlineExceeded"));
        assert_eq!(
            s.message,
            "the run exceeded its timeout of 7200s (limits.timeout) and was stopped"
        );
    }

    #[test]
    fn backoff_limit_exceeded_without_pods() {
        let s = run_state(&failed_job("BackoffLimitExceeded", 3), &[]);
        assert_eq!((s.phase, s.reason.as_str()), (RunPhase::Failed, "BackoffLimitExceeded"));
        assert_eq!(
            s.message,
            "Job has reached the specified backoff limit (3 failed pod(s), backoffLimit 2)"
        );
    }

    #[test]
    fn evicted_pod_reason_and_init_container_exit() {
        let j = failed_job("BackoffLimitExceeded", 1);
        let evicted = pod(
            "resnet-3-a",
            json!({"phase": "Failed", "reason": "Evicted",
                   "message": "The node was low on resource: ephemeral-storage."}),
        );
        let s = run_state(&j, &[evicted]);
        assert_eq!((s.phase, s.reason.as_str()), (RunPhase::Failed, "Evicted"));
        assert!(s.message.contains("low on resource"), "{}", s.message);

        let init_failed = pod(
            "resnet-3-a",
            json!({"phase": "Failed", "initContainerStatuses": [
                {"name": "fetch-train", "image": "mlplane", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": "403 Forbidden",
                                          "finishedAt": "2026-01-01T00:00:30Z"}}}
            ]}),
        );
        let s = run_state(&j, &[init_failed]);
        assert_eq!((s.reason.as_str(), s.exit_code), ("ExitCode", Some(2)));
        assert!(
            s.message
                .starts_with("container fetch-train of pod resnet-3-a exited with code 2")
        );
        assert!(s.message.ends_with(": 403 Forbidden"), "{}", s.message);
    }

    #[test]
    fn long_termination_messages_keep_the_tail() {
        let long = format!("{}END", "é".repeat(2000));
        let j = failed_job("BackoffLimitExceeded", 1);
        let s = run_state(&j, &[exited("p", 1, "Error", Some(&long), "2026-01-01T00:00:00Z")]);
        assert!(s.message.ends_with("END"));
        assert!(s.message.len() < MAX_TERMINATION_MESSAGE + 100);
    }

    #[test]
    fn suspended_is_queued_and_cancel_annotation_is_cancelled() {
        let queued = with(job(json!({})), |j| j.spec.as_mut().unwrap().suspend = Some(true));
        let s = run_state(&queued, &[]);
        assert_eq!((s.phase, s.reason.as_str()), (RunPhase::Queued, "WaitingForAdmission"));
        assert_eq!(mlflow_status(s.phase), "SCHEDULED");
        // Once the queue has looked at it: its reason and message.
        let waiting = with(queued.clone(), |j| {
            j.metadata.annotations = Some(
                [
                    (QUEUE_REASON_ANNOTATION.to_string(), "ExceedsPoolMaximum".to_string()),
                    (
                        QUEUE_MESSAGE_ANNOTATION.to_string(),
                        "the run needs 3 pod(s)".to_string(),
                    ),
                ]
                .into(),
            );
        });
        let s = run_state(&waiting, &[]);
        assert_eq!(
            (s.phase, s.reason.as_str(), s.message.as_str()),
            (RunPhase::Queued, "ExceedsPoolMaximum", "the run needs 3 pod(s)")
        );

        let patch = cancel_patch("EarlyTerminated", "MedianStopping at report 5: ...");
        assert_eq!(patch["spec"]["suspend"], json!(true));
        let cancelled = with(queued.clone(), |j| {
            j.metadata.annotations = Some(
                [
                    (CANCEL_ANNOTATION.to_string(), "EarlyTerminated".to_string()),
                    (
                        CANCEL_MESSAGE_ANNOTATION.to_string(),
                        "MedianStopping at report 5: ...".to_string(),
                    ),
                ]
                .into(),
            );
        });
        let s = run_state(&cancelled, &[]);
        assert_eq!(
            (s.phase, s.reason.as_str(), s.message.as_str()),
            (
                RunPhase::Cancelled,
                "EarlyTerminated",
                "MedianStopping at report 5: ..."
            )
        );
        assert_eq!(mlflow_status(s.phase), "KILLED");
        // A run that completed before the cancel took effect stays Succeeded.
        let done = with(cancelled, |j| {
            j.status =
                Some(serde_json::from_value(json!({"conditions": [{"type": "Complete", "status": "True"}]})).unwrap())
        });
        assert_eq!(run_state(&done, &[]).phase, RunPhase::Succeeded);
    }

    #[test]
    fn active_job_phases_from_pods() {
        let j = job(json!({"active": 2, "startTime": "2026-01-01T00:00:00Z"}));
        let j = with(j, |j| j.spec.as_mut().unwrap().parallelism = Some(2));
        let running = pod("a", json!({"phase": "Running"}));
        let pending = pod("b", json!({"phase": "Pending"}));
        let s = run_state(&j, &[running.clone(), pending.clone()]);
        assert_eq!((s.phase, s.message.as_str()), (RunPhase::Running, "1/2 pod(s) running"));
        assert_eq!(mlflow_status(s.phase), "RUNNING");

        let unschedulable = pod(
            "b",
            json!({"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}),
        );
        let s = run_state(&j, &[unschedulable]);
        assert_eq!((s.phase, s.reason.as_str()), (RunPhase::Queued, "Unschedulable"));
        assert_eq!(
            s.message,
            "waiting for capacity: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        );

        let pull = pod(
            "b",
            json!({"phase": "Pending", "containerStatuses": [{
                "name": "run", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}),
        );
        let s = run_state(&j, &[pull]);
        assert_eq!((s.phase, s.reason.as_str()), (RunPhase::Pending, "ImagePullBackOff"));
        assert_eq!(
            s.message,
            "container run of pod b cannot start: Back-off pulling image \"x\""
        );

        let s = run_state(&j, &[pending]);
        assert_eq!((s.phase, s.reason.as_str()), (RunPhase::Pending, "Starting"));
        // A retry in progress says so.
        let retrying = job(json!({"active": 1, "failed": 1}));
        let s = run_state(
            &retrying,
            &[exited("a", 1, "Error", None, "2026-01-01T00:00:00Z"), running],
        );
        assert_eq!(
            (s.phase, s.message.as_str()),
            (RunPhase::Running, "1/1 pod(s) running (after 1 failed pod(s))")
        );
        // No pods yet.
        let s = run_state(&job(json!({})), &[]);
        assert_eq!(s.phase, RunPhase::Pending);
    }

    fn run(name: &str, phase: RunPhase, metric: Option<f64>) -> RunStatus {
        RunStatus {
            name: name.into(),
            phase,
            metrics: metric
                .map(|v| [("val_accuracy".to_string(), v)].into())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    #[test]
    fn history_keeps_newest_twenty_and_every_active_run() {
        let runs: Vec<RunStatus> = (0..30)
            .rev()
            .map(|i| {
                run(
                    &format!("e-{i}"),
                    if i == 2 { RunPhase::Running } else { RunPhase::Succeeded },
                    None,
                )
            })
            .collect();
        let (kept, dropped) = bound_history(runs, HISTORY_LIMIT);
        assert_eq!(kept.len(), 20);
        assert_eq!(kept[0].name, "e-29");
        assert_eq!(kept[18].name, "e-11");
        assert_eq!(kept[19].name, "e-2", "the active run is kept");
        assert_eq!(dropped.len(), 10);
        assert!(dropped.iter().all(|r| r.phase.is_terminal()));
        let (kept, dropped) = bound_history(vec![run("a", RunPhase::Failed, None)], 20);
        assert_eq!((kept.len(), dropped.len()), (1, 0));
        let many_active: Vec<_> = (0..25).map(|i| run(&i.to_string(), RunPhase::Queued, None)).collect();
        assert_eq!(bound_history(many_active, 20).0.len(), 25);
    }

    #[test]
    fn best_run_by_goal_carried_forward() {
        let objective = Objective {
            metric: "val_accuracy".into(),
            goal: Goal::Maximize,
        };
        let runs = [
            run("t0", RunPhase::Succeeded, Some(0.7)),
            run("t1", RunPhase::Succeeded, Some(0.9)),
            run("t2", RunPhase::Running, Some(0.95)),
            run("t3", RunPhase::Failed, Some(0.99)),
            run("t4", RunPhase::Succeeded, Some(f64::NAN)),
            run("t5", RunPhase::Succeeded, None),
        ];
        let best = best_run(None, &runs, &objective).unwrap();
        assert_eq!((best.name.as_str(), best.value), ("t1", 0.9));
        // An earlier best outside the bounded history is kept if better.
        let earlier = BestRun {
            name: "t-old".into(),
            metric: "val_accuracy".into(),
            value: 0.92,
        };
        assert_eq!(best_run(Some(&earlier), &runs, &objective).unwrap().name, "t-old");
        let min = Objective {
            goal: Goal::Minimize,
            ..objective.clone()
        };
        assert_eq!(best_run(None, &runs, &min).unwrap().name, "t0");
        // A best for another metric (the objective changed) is discarded.
        let other = BestRun {
            metric: "loss".into(),
            ..earlier
        };
        assert_eq!(best_run(Some(&other), &runs, &objective).unwrap().name, "t1");
        assert_eq!(best_run(None, &[], &objective), None);
    }

    #[test]
    fn sweep_phases() {
        use RunPhase::*;
        assert_eq!(sweep_phase(&[Running, Succeeded], true), Running);
        assert_eq!(
            sweep_phase(&[Succeeded, Succeeded], false),
            Running,
            "more trials to start"
        );
        assert_eq!(sweep_phase(&[], false), Pending);
        assert_eq!(sweep_phase(&[Queued, Queued], false), Queued);
        assert_eq!(sweep_phase(&[Queued, Succeeded], true), Queued);
        assert_eq!(sweep_phase(&[Succeeded, Failed, Cancelled], true), Succeeded);
        assert_eq!(sweep_phase(&[Failed, Cancelled], true), Failed);
        assert_eq!(sweep_phase(&[Cancelled, Cancelled], true), Cancelled);
    }
}
