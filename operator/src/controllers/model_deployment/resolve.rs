//! Which model a deployment serves: a URI as written, or the output of an
//! Experiment's run (`{experiment, run: best | latest | <run name>,
//! output}`) resolved to its location in the workspace's artifact store
//! ([`experiment_output`], the one definition of that layout), and pinned.
//!
//! Owns: resolution and pinning. Must not touch the API server (the caller
//! passes the Experiment and the Workspace storage from its caches).
//!
//! Pinning: the result is kept (in `status.deployments[].model` and on the
//! Deployment as the annotation [`MODEL_ANNOTATION`]) with a hash of what it
//! was resolved from: the deployment's `model` (its format aside) and the
//! ModelDeployment's annotation [`RESOLVE_ANNOTATION`]. While that hash is
//! unchanged the pin stands, so a later best run never changes a serving
//! deployment by itself. To move to a newer run, name it (`run: <name>`) or
//! change the annotation (`kubectl annotate md <name> mlplane.io/resolve=$(date
//! +%s) --overwrite`), which resolves every Experiment model again.
//!
//! Run selection, from the Experiment's status: `best` (the default) is
//! `status.bestRun` once the sweep has ended (while trials run it is not
//! final), or for an Experiment without a sweep its newest succeeded run; `latest` is the newest succeeded run (trials included);
//! a run name must be a succeeded run in `status.runs`. The output (default
//! `model`) must be one of the Experiment's `spec.outputs`.
use crate::api::experiment::{Experiment, RunPhase};
use crate::api::model_deployment::{ModelSource, PinnedModel};
use crate::api::workspace::WorkspaceStorage;
use crate::controllers::run::artifacts::{artifacts_root, experiment_output};
use crate::controllers::run::names::short_hash;

/// Annotation of a ModelDeployment whose every change resolves its
/// Experiment models again.
pub const RESOLVE_ANNOTATION: &str = "mlplane.io/resolve";
/// Annotation of a serving Deployment: its pinned model (JSON).
pub const MODEL_ANNOTATION: &str = "mlplane.io/model";
/// The run output served when `model.output` is not set.
pub const DEFAULT_OUTPUT: &str = "model";

/// Why a model could not be resolved. `reason()` is the condition reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{field}.experiment: Experiment {name:?} does not exist in this namespace")]
    ExperimentNotFound { field: String, name: String },
    #[error("{field}.run: {detail}")]
    RunNotFound { field: String, detail: String },
    #[error("{field}.output: Experiment {experiment:?} has no output {output:?} (its outputs: {known})")]
    OutputNotFound {
        field: String,
        experiment: String,
        output: String,
        known: String,
    },
    #[error(
        "{field}.experiment: the namespace's Workspace has no artifact store (spec.storage.artifacts), so run outputs have no location"
    )]
    NoArtifactStore { field: String },
}

impl ResolveError {
    /// The `Ready` condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ExperimentNotFound { .. } => "ExperimentNotFound",
            Self::RunNotFound { .. } => "RunNotFound",
            Self::OutputNotFound { .. } => "OutputNotFound",
            Self::NoArtifactStore { .. } => "NoArtifactStore",
        }
    }
}

/// What a deployment serves after resolution.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Resolution {
    /// The model to serve: the new pin, or (when resolving failed) the
    /// previous one, which keeps serving; `None` when there is neither.
    pub pin: Option<PinnedModel>,
    /// Resolving failed (the deployment reports it; `pin` is then the old one).
    pub error: Option<ResolveError>,
    /// `pin` was resolved just now (not kept from before).
    pub resolved_now: bool,
}

/// Hash of what a model is resolved from: its source (the format picks the
/// runtime, not the model) and the resolve token.
pub fn source_hash(model: &ModelSource, token: &str) -> String {
    let source = serde_json::json!({
        "uri": model.uri, "experiment": model.experiment, "run": model.run, "output": model.output,
    });
    short_hash(&format!("{source}\n{token}"))
}

/// Resolves `model` (at `field`, e.g. `spec.deployments[1].model`), keeping
/// `previous` when it was resolved from the same source. `experiment` is the
/// Experiment `model.experiment` names (when it exists), `storage` the
/// namespace Workspace's storage.
pub fn resolve(
    model: &ModelSource,
    field: &str,
    token: &str,
    previous: Option<&PinnedModel>,
    experiment: Option<&Experiment>,
    storage: Option<&WorkspaceStorage>,
) -> Resolution {
    let hash = source_hash(model, token);
    if let Some(p) = previous.filter(|p| p.source_hash == hash) {
        return Resolution {
            pin: Some(p.clone()),
            error: None,
            resolved_now: false,
        };
    }
    match resolve_fresh(model, field, hash, experiment, storage) {
        Ok(pin) => Resolution {
            pin: Some(pin),
            error: None,
            resolved_now: true,
        },
        Err(e) => Resolution {
            pin: previous.cloned(),
            error: Some(e),
            resolved_now: false,
        },
    }
}

fn resolve_fresh(
    model: &ModelSource,
    field: &str,
    source_hash: String,
    experiment: Option<&Experiment>,
    storage: Option<&WorkspaceStorage>,
) -> Result<PinnedModel, ResolveError> {
    let Some(exp_name) = &model.experiment else {
        return Ok(PinnedModel {
            uri: model.uri.clone().unwrap_or_default(),
            source_hash,
            ..Default::default()
        });
    };
    let field = field.to_string();
    let exp = experiment.ok_or_else(|| ResolveError::ExperimentNotFound {
        field: field.clone(),
        name: exp_name.clone(),
    })?;
    let run = select_run(exp, model.run.as_deref().unwrap_or("best")).map_err(|detail| ResolveError::RunNotFound {
        field: field.clone(),
        detail,
    })?;
    let output = model.output.clone().unwrap_or_else(|| DEFAULT_OUTPUT.into());
    if !exp.spec.outputs.contains_key(&output) {
        return Err(ResolveError::OutputNotFound {
            field,
            experiment: exp_name.clone(),
            output,
            known: exp.spec.outputs.keys().cloned().collect::<Vec<_>>().join(", "),
        });
    }
    let root = artifacts_root(storage).ok_or(ResolveError::NoArtifactStore { field })?;
    Ok(PinnedModel {
        uri: experiment_output(&root, exp_name, &run, &output),
        experiment: Some(exp_name.clone()),
        run: Some(run),
        output: Some(output),
        source_hash,
    })
}

/// The run `selector` (`best`, `latest` or a run name) picks, or why none.
pub fn select_run(exp: &Experiment, selector: &str) -> Result<String, String> {
    let name = exp.metadata.name.as_deref().unwrap_or_default();
    let status = exp.status.clone().unwrap_or_default();
    let newest_succeeded = || {
        status
            .runs
            .iter()
            .find(|r| r.phase == RunPhase::Succeeded)
            .map(|r| r.name.clone())
    };
    match selector {
        "best" if exp.spec.sweep.is_some() => {
            // A sweep's best run is final only once its trials have ended.
            if !status.phase.is_some_and(RunPhase::is_terminal) {
                return Err(format!(
                    "Experiment {name:?} is still running its sweep: its best run is not final yet"
                ));
            }
            status.best_run.map(|b| b.name).ok_or_else(|| {
                format!("Experiment {name:?} has no best run (no trial succeeded with its objective metric)")
            })
        }
        "best" | "latest" => newest_succeeded().ok_or_else(|| format!("Experiment {name:?} has no succeeded run yet")),
        run => match status.runs.iter().find(|r| r.name == run) {
            Some(r) if r.phase == RunPhase::Succeeded => Ok(run.to_string()),
            Some(r) => Err(format!(
                "run {run:?} of Experiment {name:?} is {:?}, not Succeeded",
                r.phase
            )),
            None => Err(format!("Experiment {name:?} has no run {run:?} in its status")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn experiment(sweep: bool, status: serde_json::Value) -> Experiment {
        let mut spec = json!({"environment": {"image": "python:3.12"}, "command": ["python"],
                              "outputs": {"model": {}, "metrics": {}}});
        if sweep {
            spec["sweep"] = json!({"algorithm": "Grid", "searchSpace": {"lr": {"choice": [0.1, 0.2]}},
                                   "objective": {"metric": "accuracy", "goal": "Maximize"}});
        }
        serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": "resnet", "namespace": "vision"}, "spec": spec, "status": status,
        }))
        .unwrap()
    }

    fn runs() -> serde_json::Value {
        json!([
            {"name": "resnet-2-t1", "generation": 2, "phase": "Running"},
            {"name": "resnet-2-t0", "generation": 2, "phase": "Succeeded"},
            {"name": "resnet-1-t1", "generation": 1, "phase": "Succeeded"},
            {"name": "resnet-1-t0", "generation": 1, "phase": "Failed"},
        ])
    }

    fn storage() -> WorkspaceStorage {
        serde_json::from_value(json!({"artifacts": {"uri": "s3://ml/vision/", "secretRef": {"name": "s3"}}})).unwrap()
    }

    fn from_exp(run: Option<&str>, output: Option<&str>) -> ModelSource {
        ModelSource {
            experiment: Some("resnet".into()),
            run: run.map(String::from),
            output: output.map(String::from),
            format: Some("ONNX".into()),
            ..Default::default()
        }
    }

    const FIELD: &str = "spec.deployments[0].model";

    #[test]
    fn best_run_of_a_sweep_resolves_to_its_output_in_the_artifact_store() {
        let exp = experiment(
            true,
            json!({"phase": "Succeeded", "runs": runs(), "bestRun": {"name": "resnet-1-t1", "metric": "accuracy", "value": 0.9}}),
        );
        let r = resolve(&from_exp(None, None), FIELD, "", None, Some(&exp), Some(&storage()));
        assert!(r.resolved_now && r.error.is_none());
        let pin = r.pin.unwrap();
        assert_eq!(pin.uri, "s3://ml/vision/experiments/resnet/resnet-1-t1/model");
        assert_eq!(pin.run.as_deref(), Some("resnet-1-t1"));
        assert_eq!(pin.output.as_deref(), Some("model"));
        assert_eq!(pin.experiment.as_deref(), Some("resnet"));
        assert_eq!(pin.source_hash, source_hash(&from_exp(None, None), ""));
    }

    #[test]
    fn latest_and_named_runs_and_best_without_a_sweep() {
        let exp = experiment(false, json!({"runs": runs()}));
        let st = storage();
        let uri = |m: &ModelSource| resolve(m, FIELD, "", None, Some(&exp), Some(&st)).pin.map(|p| p.uri);
        let at = |run: &str| Some(format!("s3://ml/vision/experiments/resnet/{run}/model"));
        assert_eq!(uri(&from_exp(Some("latest"), None)), at("resnet-2-t0"));
        assert_eq!(uri(&from_exp(Some("best"), None)), at("resnet-2-t0"));
        assert_eq!(uri(&from_exp(Some("resnet-1-t1"), Some("model"))), at("resnet-1-t1"));
        let pvc: WorkspaceStorage = serde_json::from_value(json!({"artifacts": {"pvc": {"size": "1Gi"}}})).unwrap();
        let r = resolve(
            &from_exp(Some("latest"), Some("metrics")),
            FIELD,
            "",
            None,
            Some(&exp),
            Some(&pvc),
        );
        assert_eq!(
            r.pin.unwrap().uri,
            "pvc://mlplane-artifacts/experiments/resnet/resnet-2-t0/metrics"
        );
    }

    #[test]
    fn missing_pieces_are_named() {
        let st = storage();
        let err = |m: &ModelSource, exp: Option<&Experiment>, st: Option<&WorkspaceStorage>| {
            let r = resolve(m, FIELD, "", None, exp, st);
            assert!(r.pin.is_none());
            r.error.unwrap()
        };
        let e = err(&from_exp(None, None), None, Some(&st));
        assert_eq!(e.reason(), "ExperimentNotFound");
        assert_eq!(
            e.to_string(),
            "spec.deployments[0].model.experiment: Experiment \"resnet\" does not exist in this namespace"
        );
        let running = experiment(
            true,
            json!({"phase": "Running", "runs": runs(),
            "bestRun": {"name": "resnet-1-t1", "metric": "accuracy", "value": 0.9}}),
        );
        let e = err(&from_exp(None, None), Some(&running), Some(&st));
        assert_eq!(e.reason(), "RunNotFound");
        assert!(
            e.to_string()
                .contains("is still running its sweep: its best run is not final yet"),
            "{e}"
        );
        let sweep = experiment(true, json!({"phase": "Failed", "runs": runs()}));
        let e = err(&from_exp(None, None), Some(&sweep), Some(&st));
        assert!(e.to_string().contains("has no best run (no trial succeeded"), "{e}");
        let e = err(&from_exp(Some("resnet-2-t1"), None), Some(&sweep), Some(&st));
        assert!(e.to_string().contains("is Running, not Succeeded"), "{e}");
        let e = err(&from_exp(Some("resnet-9"), None), Some(&sweep), Some(&st));
        assert!(e.to_string().contains("has no run \"resnet-9\""), "{e}");
        let e = err(
            &from_exp(Some("latest"), None),
            Some(&experiment(false, json!({}))),
            Some(&st),
        );
        assert!(e.to_string().contains("has no succeeded run yet"), "{e}");
        let e = err(&from_exp(Some("latest"), Some("weights")), Some(&sweep), Some(&st));
        assert_eq!(e.reason(), "OutputNotFound");
        assert!(
            e.to_string()
                .ends_with("has no output \"weights\" (its outputs: metrics, model)"),
            "{e}"
        );
        let e = err(&from_exp(Some("latest"), None), Some(&sweep), None);
        assert_eq!(e.reason(), "NoArtifactStore");
    }

    #[test]
    fn a_pin_stands_until_its_source_or_the_resolve_token_changes() {
        let mut exp = experiment(
            true,
            json!({"phase": "Succeeded", "runs": runs(), "bestRun": {"name": "resnet-1-t1", "metric": "accuracy", "value": 0.9}}),
        );
        let st = storage();
        let first = resolve(&from_exp(None, None), FIELD, "", None, Some(&exp), Some(&st))
            .pin
            .unwrap();
        // A better run later: the pin stays.
        exp.status.as_mut().unwrap().best_run.as_mut().unwrap().name = "resnet-2-t0".into();
        let again = resolve(&from_exp(None, None), FIELD, "", Some(&first), Some(&exp), Some(&st));
        assert_eq!(again.pin.as_ref(), Some(&first));
        assert!(!again.resolved_now);
        // The format is not part of the source.
        let mut onnx = from_exp(None, None);
        onnx.format = Some("MLflow".into());
        assert_eq!(
            resolve(&onnx, FIELD, "", Some(&first), Some(&exp), Some(&st))
                .pin
                .as_ref(),
            Some(&first)
        );
        // A new resolve token moves it to the new best run.
        let moved = resolve(&from_exp(None, None), FIELD, "1", Some(&first), Some(&exp), Some(&st));
        assert!(moved.resolved_now);
        assert_eq!(moved.pin.unwrap().run.as_deref(), Some("resnet-2-t0"));
    }

    #[test]
    fn a_failed_resolution_keeps_serving_the_previous_pin() {
        let exp = experiment(
            true,
            json!({"phase": "Succeeded", "runs": runs(), "bestRun": {"name": "resnet-1-t1", "metric": "accuracy", "value": 0.9}}),
        );
        let st = storage();
        let first = resolve(&from_exp(None, None), FIELD, "", None, Some(&exp), Some(&st))
            .pin
            .unwrap();
        let r = resolve(
            &from_exp(Some("resnet-9"), None),
            FIELD,
            "",
            Some(&first),
            Some(&exp),
            Some(&st),
        );
        assert_eq!(r.pin, Some(first));
        assert_eq!(r.error.unwrap().reason(), "RunNotFound");
    }

    #[test]
    fn uri_models_are_pinned_as_written() {
        let m = ModelSource {
            uri: Some("s3://models/resnet/3/".into()),
            format: Some("ONNX".into()),
            ..Default::default()
        };
        let r = resolve(&m, FIELD, "", None, None, None);
        let pin = r.pin.unwrap();
        assert_eq!(pin.uri, "s3://models/resnet/3/");
        assert_eq!(pin.run, None);
    }
}
