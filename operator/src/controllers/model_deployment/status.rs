//! `status.phase` and the `Ready` condition of a ModelDeployment, from what
//! the plan found.
//!
//! Owns: reasons, their precedence and their phases. Must not touch the API
//! server.
//!
//! Precedence (the first that applies sets `Ready=False`; all of its kind
//! are named in the message):
//! 1. the spec cannot be served as written (phase `Failed`):
//!    `UnknownModelFormat`, `TrafficSplitUnsupported`, `NameConflict`;
//! 2. something it names is missing (phase `Pending` while no traffic is
//!    served, else `Degraded`): `ExperimentNotFound`, `RunNotFound`,
//!    `OutputNotFound`, `NoArtifactStore`, `ComputeClusterNotFound`;
//! 3. a rollout exceeded its progress deadline (`Degraded`): `RolloutStalled`
//!    (the previous version keeps serving);
//! 4. a rollout or traffic shift is in progress (`Updating`): `Progressing`;
//! 5. replicas of a deployment are not available (`Degraded`):
//!    `ReplicasUnavailable`;
//! 6. otherwise `Ready=True`, reason `Ready` (phase `Ready`), also when the
//!    spec sends no traffic at all (the message says so).
use crate::api::model_deployment::ModelDeploymentPhase;

/// Ready reasons.
pub const READY_REASON: &str = "Ready";
pub const UNKNOWN_MODEL_FORMAT: &str = "UnknownModelFormat";
pub const TRAFFIC_SPLIT_UNSUPPORTED: &str = "TrafficSplitUnsupported";
pub const NAME_CONFLICT: &str = "NameConflict";
pub const COMPUTE_CLUSTER_NOT_FOUND: &str = "ComputeClusterNotFound";
pub const ROLLOUT_STALLED: &str = "RolloutStalled";
pub const PROGRESSING: &str = "Progressing";
pub const REPLICAS_UNAVAILABLE: &str = "ReplicasUnavailable";

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The spec cannot be served as written.
    Invalid,
    /// Something the spec names is missing (may appear later).
    Missing,
    /// A rollout passed its deadline.
    Stalled,
    /// A rollout or traffic shift in progress.
    Progressing,
    /// Replicas unavailable.
    Degraded,
}

/// One thing keeping the ModelDeployment from Ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Its severity.
    pub severity: Severity,
    /// Condition reason.
    pub reason: &'static str,
    /// Message, starting with the field or deployment concerned.
    pub message: String,
}

impl Problem {
    /// A problem.
    pub fn new(severity: Severity, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity,
            reason,
            message: message.into(),
        }
    }
}

/// The Ready condition and phase: `(ready, reason, message, phase)`.
/// `serving` tells whether some traffic is effective; `ready_message`
/// describes the split when nothing is wrong.
pub fn summarize(
    problems: &[Problem],
    serving: bool,
    ready_message: String,
) -> (bool, &'static str, String, ModelDeploymentPhase) {
    let Some(worst) = problems.iter().map(|p| p.severity).min() else {
        return (true, READY_REASON, ready_message, ModelDeploymentPhase::Ready);
    };
    let of_kind: Vec<&Problem> = problems.iter().filter(|p| p.severity == worst).collect();
    let message = of_kind
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    let phase = match worst {
        Severity::Invalid => ModelDeploymentPhase::Failed,
        Severity::Missing if !serving => ModelDeploymentPhase::Pending,
        Severity::Progressing => ModelDeploymentPhase::Updating,
        Severity::Missing | Severity::Stalled | Severity::Degraded => ModelDeploymentPhase::Degraded,
    };
    (false, of_kind[0].reason, message, phase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_kind_decides_and_every_problem_of_it_is_named() {
        let problems = vec![
            Problem::new(Severity::Progressing, PROGRESSING, "waiting for green"),
            Problem::new(
                Severity::Missing,
                "RunNotFound",
                "spec.deployments[1].model.run: no best run",
            ),
            Problem::new(
                Severity::Missing,
                COMPUTE_CLUSTER_NOT_FOUND,
                "spec.deployments[0].compute: gpu",
            ),
        ];
        let (ready, reason, message, phase) = summarize(&problems, true, String::new());
        assert!(!ready);
        assert_eq!(reason, "RunNotFound");
        assert_eq!(
            message,
            "spec.deployments[1].model.run: no best run; spec.deployments[0].compute: gpu"
        );
        assert_eq!(phase, ModelDeploymentPhase::Degraded);
        assert_eq!(
            summarize(&problems, false, String::new()).3,
            ModelDeploymentPhase::Pending
        );
    }

    #[test]
    fn phases_by_severity() {
        let one = |s: Severity| summarize(&[Problem::new(s, "R", "m")], true, String::new()).3;
        assert_eq!(one(Severity::Invalid), ModelDeploymentPhase::Failed);
        assert_eq!(one(Severity::Stalled), ModelDeploymentPhase::Degraded);
        assert_eq!(one(Severity::Progressing), ModelDeploymentPhase::Updating);
        assert_eq!(one(Severity::Degraded), ModelDeploymentPhase::Degraded);
        let (ready, reason, message, phase) = summarize(&[], true, "effective traffic: blue 100".into());
        assert!(ready);
        assert_eq!(
            (reason, message.as_str(), phase),
            (READY_REASON, "effective traffic: blue 100", ModelDeploymentPhase::Ready)
        );
    }
}
