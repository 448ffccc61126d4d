//! From an Experiment to the [`RunSpec`] of one of its runs, and the checks
//! that make a bad spec a `Ready=False` condition instead of a failed Job.
//!
//! Owns: [`validate`] (what CEL cannot check: curated names, placeholders,
//! durations, reserved variables, the sweep space) and [`run_spec`] (the
//! resolved input of the shared run builder). Must not touch the API server;
//! the caller resolves input and output locations and tracking ids first.
//!
//! Per run:
//! - name `<exp>-<index>` (trial `<exp>-<index>-t<trial>`, see
//!   [`crate::controllers::run::names`]); labels `mlplane.io/run-index` and,
//!   for trials, `mlplane.io/trial` (so the controller can count a sweep's
//!   trials from its Jobs); annotation `mlplane.io/generation`;
//! - timeout: `limits.timeout`, for trials the smaller of it and
//!   `sweep.limits.trialTimeout`; retries `limits.maxRetries`;
//! - placement `compute` / `instanceType` (the pool).
use std::collections::BTreeMap;

use kube::{Resource, ResourceExt};

use crate::api::experiment::Experiment;
use crate::api::shared::{Duration, ParamValue, Params};
use crate::controllers::experiment::sweep::trial_limits;
use crate::controllers::run::build::{BuildError, ParentKind, Placement, RunSpec, Tracking, build_run};
use crate::controllers::run::environment::Catalog;
use crate::controllers::run::names::{run_name, trial_name};
use crate::controllers::run::substitute::{Values, substitute_all};

/// Label with the run index a Job belongs to.
pub const RUN_INDEX_LABEL: &str = "mlplane.io/run-index";
/// Label with the trial number of a sweep trial's Job.
pub const TRIAL_LABEL: &str = "mlplane.io/trial";
/// Annotation with the Experiment generation a run was started from.
pub const GENERATION_ANNOTATION: &str = "mlplane.io/generation";

/// A spec that cannot run. `reason` is a CamelCase condition reason from a
/// small fixed set; `message` names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// `UnknownEnvironment`, `InvalidPlaceholder`, `InvalidDuration`,
    /// `InvalidSweep`, `InvalidEnv`, `UnsupportedDistribution`.
    pub reason: &'static str,
    /// What is wrong, starting with the field.
    pub message: String,
}

impl ValidationError {
    fn new(reason: &'static str, message: impl ToString) -> Self {
        Self {
            reason,
            message: message.to_string(),
        }
    }
}

impl From<BuildError> for ValidationError {
    fn from(e: BuildError) -> Self {
        let reason = match e {
            BuildError::UnsupportedDistribution(_) => "UnsupportedDistribution",
            BuildError::ReservedEnv { .. } | BuildError::DuplicateEnv { .. } | BuildError::EnvNameCollision { .. } => {
                "InvalidEnv"
            }
        };
        Self::new(reason, format!("spec.{e}"))
    }
}

/// What one run needs beyond the Experiment.
#[derive(Clone, Debug, Default)]
pub struct RunInputs {
    /// Run index (`<exp>-<index>`).
    pub index: u64,
    /// Trial number within the sweep (0-based), for sweep trials.
    pub trial: Option<u32>,
    /// Parameters: `spec.params`, with a trial's sampled ones merged in.
    pub params: Params,
    /// Input name -> pinned location in the pod.
    pub inputs: BTreeMap<String, String>,
    /// Output name -> location in the pod.
    pub outputs: BTreeMap<String, String>,
    /// Common parent of the outputs.
    pub outputs_dir: Option<String>,
    /// Tracking coordinates.
    pub tracking: Option<Tracking>,
    /// Create the Job suspended (admission queue).
    pub suspend: bool,
    /// Volumes, mounts, download init containers and `envFrom` of the
    /// inputs and outputs ([`crate::controllers::run::inputs::PodData`]).
    pub volumes: Vec<k8s_openapi::api::core::v1::Volume>,
    pub volume_mounts: Vec<k8s_openapi::api::core::v1::VolumeMount>,
    pub init_containers: Vec<k8s_openapi::api::core::v1::Container>,
    pub env_from: Vec<k8s_openapi::api::core::v1::EnvFromSource>,
}

fn parse(d: Option<&Duration>, field: &str) -> Result<Option<std::time::Duration>, ValidationError> {
    d.map(|d| {
        d.to_std()
            .map_err(|e| ValidationError::new("InvalidDuration", format!("{field}: {e}")))
    })
    .transpose()
}

/// The resolved spec of one run of `exp`.
pub fn run_spec(exp: &Experiment, catalog: &Catalog, run: RunInputs) -> Result<RunSpec, ValidationError> {
    let spec = &exp.spec;
    let exp_name = exp.name_any();
    let image = catalog
        .resolve(&spec.environment, "spec.environment")
        .map_err(|e| ValidationError::new("UnknownEnvironment", e))?;
    let values = Values {
        params: &run.params,
        inputs: &run.inputs,
        outputs: &run.outputs,
    };
    let command = substitute_all("spec.command", &spec.command, &values)
        .map_err(|e| ValidationError::new("InvalidPlaceholder", e))?;

    let limits = spec.limits.clone().unwrap_or_default();
    let mut timeout = parse(limits.timeout.as_ref(), "spec.limits.timeout")?;
    if run.trial.is_some() {
        let trial_timeout = parse(
            spec.sweep
                .as_ref()
                .and_then(|s| s.limits.as_ref())
                .and_then(|l| l.trial_timeout.as_ref()),
            "spec.sweep.limits.trialTimeout",
        )?;
        timeout = match (timeout, trial_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    let name = match run.trial {
        Some(t) => trial_name(&exp_name, run.index, t),
        None => run_name(&exp_name, run.index),
    };
    let mut extra_labels = BTreeMap::from([(RUN_INDEX_LABEL.to_string(), run.index.to_string())]);
    if let Some(t) = run.trial {
        extra_labels.insert(TRIAL_LABEL.to_string(), t.to_string());
    }
    let annotations = exp
        .metadata
        .generation
        .map(|g| BTreeMap::from([(GENERATION_ANNOTATION.to_string(), g.to_string())]))
        .unwrap_or_default();

    Ok(RunSpec {
        name,
        namespace: exp.namespace().unwrap_or_default(),
        owner: exp.controller_owner_ref(&()).unwrap_or_default(),
        parent_kind: ParentKind::Experiment,
        parent_name: exp_name,
        extra_labels,
        annotations,
        image,
        command,
        args: Vec::new(),
        env: spec.env.clone(),
        resources: spec.resources.clone(),
        pod_metadata: spec.pod_metadata.clone(),
        placement: Placement {
            compute_cluster: spec.compute.clone(),
            pool: spec.instance_type.clone(),
        },
        timeout,
        max_retries: limits.max_retries,
        distribution: spec.distribution.clone(),
        tracking: run.tracking,
        inputs: run.inputs,
        outputs: run.outputs,
        outputs_dir: run.outputs_dir,
        volumes: run.volumes,
        volume_mounts: run.volume_mounts,
        init_containers: run.init_containers,
        env_from: run.env_from,
        suspend: run.suspend,
    })
}

/// Everything about `exp` that can be checked before any run starts: the
/// first problem, naming its field. Placeholders may use `spec.params`, the
/// sweep's parameters, `spec.inputs` and `spec.outputs`.
pub fn validate(exp: &Experiment, catalog: &Catalog) -> Result<(), ValidationError> {
    let spec = &exp.spec;
    let mut params = spec.params.clone();
    let mut trial = None;
    if let Some(sweep) = &spec.sweep {
        trial_limits(sweep).map_err(|e| ValidationError::new("InvalidSweep", e))?;
        for name in sweep.search_space.keys() {
            params.insert(name.clone(), ParamValue(serde_json::json!(0)));
        }
        trial = Some(0);
    }
    let run = RunInputs {
        trial,
        params,
        inputs: spec
            .inputs
            .keys()
            .map(|k| (k.clone(), format!("/inputs/{k}")))
            .collect(),
        outputs: spec
            .outputs
            .keys()
            .map(|k| (k.clone(), format!("/outputs/{k}")))
            .collect(),
        outputs_dir: Some("/outputs".into()),
        tracking: Some(Tracking::default()),
        ..Default::default()
    };
    build_run(&run_spec(exp, catalog, run)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::experiment::sweep::{merge_params, seed, trial_params};
    use crate::controllers::run::build::{EXPERIMENT_LABEL, RUN_LABEL};
    use serde_json::json;

    fn experiment(spec: serde_json::Value) -> Experiment {
        serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1",
            "kind": "Experiment",
            "metadata": {"name": "resnet", "namespace": "vision", "uid": "uid-1", "generation": 4},
            "spec": spec,
        }))
        .unwrap()
    }

    fn design_example() -> Experiment {
        experiment(json!({
            "compute": "gpu",
            "instanceType": "a100",
            "environment": {"name": "pytorch-2-5-cuda12"},
            "command": ["python", "train.py", "--lr", "${{params.lr}}", "--data", "${{inputs.train}}",
                        "--out", "${{outputs.model}}"],
            "params": {"lr": 0.01, "epochs": 10},
            "inputs": {"train": {"dataAsset": "imagenet-mini", "version": "3"}},
            "outputs": {"model": {}},
            "resources": {"cpu": "8", "memory": "32Gi", "gpu": 1, "shmSize": "2Gi"},
            "limits": {"timeout": "2h", "maxRetries": 2},
        }))
    }

    fn inputs(exp: &Experiment) -> RunInputs {
        RunInputs {
            index: 5,
            params: exp.spec.params.clone(),
            inputs: [("train".to_string(), "/mnt/inputs/train".to_string())].into(),
            outputs: [("model".to_string(), "/mnt/outputs/model".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn design_example_builds() {
        let exp = design_example();
        validate(&exp, &Catalog::builtin()).unwrap();
        let spec = run_spec(&exp, &Catalog::builtin(), inputs(&exp)).unwrap();
        assert_eq!(spec.name, "resnet-5");
        assert_eq!(spec.image, "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime");
        assert_eq!(
            spec.command,
            [
                "python",
                "train.py",
                "--lr",
                "0.01",
                "--data",
                "/mnt/inputs/train",
                "--out",
                "/mnt/outputs/model"
            ]
        );
        assert_eq!(spec.timeout, Some(std::time::Duration::from_secs(7200)));
        assert_eq!(spec.max_retries, Some(2));
        assert_eq!(spec.placement.pool.as_deref(), Some("a100"));
        let job = build_run(&spec).unwrap().job;
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[EXPERIMENT_LABEL], "resnet");
        assert_eq!(labels[RUN_LABEL], "resnet-5");
        assert_eq!(labels[RUN_INDEX_LABEL], "5");
        assert!(!labels.contains_key(TRIAL_LABEL));
        assert_eq!(job.metadata.annotations.as_ref().unwrap()[GENERATION_ANNOTATION], "4");
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Experiment", "uid-1"));
        let js = job.spec.unwrap();
        assert_eq!((js.backoff_limit, js.active_deadline_seconds), (Some(2), Some(7200)));
    }

    #[test]
    fn unknown_placeholder_is_invalid_placeholder() {
        let mut exp = design_example();
        exp.spec.command[3] = "${{params.lrr}}".into();
        let e = validate(&exp, &Catalog::builtin()).unwrap_err();
        assert_eq!(e.reason, "InvalidPlaceholder");
        assert_eq!(e.message, "spec.command[3]: unknown placeholder ${{params.lrr}}");
        exp.spec.command[3] = "${{foo.x}}".into();
        assert!(
            validate(&exp, &Catalog::builtin())
                .unwrap_err()
                .message
                .starts_with("spec.command[3]: unknown placeholder ${{foo.x}}")
        );
        // An output that the spec does not declare.
        let mut exp = design_example();
        exp.spec.command.push("${{outputs.logs}}".into());
        assert_eq!(
            validate(&exp, &Catalog::builtin()).unwrap_err().message,
            "spec.command[8]: unknown placeholder ${{outputs.logs}}"
        );
    }

    #[test]
    fn other_field_errors() {
        let mut exp = design_example();
        exp.spec.environment.name = Some("jax".into());
        let e = validate(&exp, &Catalog::builtin()).unwrap_err();
        assert_eq!(e.reason, "UnknownEnvironment");
        assert!(
            e.message
                .starts_with("spec.environment.name: curated environment \"jax\"")
        );

        let mut exp = design_example();
        exp.spec.env.push(k8s_openapi::api::core::v1::EnvVar {
            name: "MLFLOW_RUN_ID".into(),
            value: Some("x".into()),
            value_from: None,
        });
        let e = validate(&exp, &Catalog::builtin()).unwrap_err();
        assert_eq!(
            (e.reason, e.message.as_str()),
            (
                "InvalidEnv",
                "spec.env[0]: MLFLOW_RUN_ID is set by mlplane and cannot be overridden"
            )
        );

        let mut exp = design_example();
        exp.spec.distribution = Some(serde_json::from_value(json!({"type": "MPI", "nodes": 2})).unwrap());
        let e = validate(&exp, &Catalog::builtin()).unwrap_err();
        assert_eq!(e.reason, "UnsupportedDistribution");
        assert!(e.message.starts_with("spec.distribution.type: MPI"));

        let mut exp = design_example();
        exp.spec.limits.as_mut().unwrap().timeout = Some(Duration::from("soon"));
        let e = validate(&exp, &Catalog::builtin()).unwrap_err();
        assert_eq!(e.reason, "InvalidDuration");
        assert!(
            e.message.starts_with("spec.limits.timeout: invalid duration \"soon\""),
            "{}",
            e.message
        );
    }

    #[test]
    fn sweep_trials_use_sampled_params_and_trial_timeout() {
        let mut exp = design_example();
        exp.spec.sweep = Some(
            serde_json::from_value(json!({
                "algorithm": "Grid",
                "searchSpace": {"lr": {"choice": [0.1, 0.001]}, "bs": {"randint": {"min": 1, "max": 3}}},
                "objective": {"metric": "val_accuracy", "goal": "Maximize"},
                "limits": {"maxTrials": 4, "maxConcurrentTrials": 2, "trialTimeout": "30m"},
            }))
            .unwrap(),
        );
        exp.spec.command.push("--bs=${{params.bs}}".into());
        validate(&exp, &Catalog::builtin()).unwrap();
        let sweep = exp.spec.sweep.as_ref().unwrap();
        let sampled = trial_params(sweep, seed(sweep, "uid-1"), 3).unwrap().unwrap();
        let run = RunInputs {
            trial: Some(3),
            params: merge_params(&exp.spec.params, &sampled),
            ..inputs(&exp)
        };
        let spec = run_spec(&exp, &Catalog::builtin(), run).unwrap();
        assert_eq!(spec.name, "resnet-5-t3");
        // Trial 3 of bs x lr (bs first by name): (2, 0.001).
        assert_eq!(spec.command[3], "0.001");
        assert_eq!(spec.command[8], "--bs=2");
        assert_eq!(spec.timeout, Some(std::time::Duration::from_secs(1800)));
        assert_eq!(spec.extra_labels[TRIAL_LABEL], "3");

        // A sweep space the grid cannot enumerate.
        exp.spec.sweep.as_mut().unwrap().search_space.insert(
            "wd".into(),
            serde_json::from_value(json!({"uniform": {"min": 0.0, "max": 1.0}})).unwrap(),
        );
        let e = validate(&exp, &Catalog::builtin()).unwrap_err();
        assert_eq!(e.reason, "InvalidSweep");
    }
}
