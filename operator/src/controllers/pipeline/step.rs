//! From one step of one Pipeline run to the [`RunSpec`] the shared builder
//! ([`crate::controllers::run::build::build_run`]) turns into its Job. Pure.
//!
//! Owns: how a step's inputs, outputs, placeholders, placement and labels
//! are resolved. Must not touch the API server.
//!
//! Per step Job: name `<pipeline>-<run>-<step>-<hash>` ([`step_name`]);
//! labels `mlplane.io/pipeline`, `mlplane.io/step` (the step name),
//! `mlplane.io/run-index`, `mlplane.io/run`; annotations
//! `mlplane.io/cache-key`, `mlplane.io/generation`, `mlplane.io/pipeline-run`
//! and `mlplane.io/inputs` (the pins of the pipeline inputs it reads);
//! outputs at `<artifacts>/cache/<cacheKey>/<output>`
//! (`MLPLANE_OUTPUTS_DIR` = `<artifacts>/cache/<cacheKey>`); an upstream
//! output is read where its producer's key puts it (Mount: the location,
//! or the mounted artifacts PVC path).
use std::collections::BTreeMap;

use kube::{Resource, ResourceExt};

use super::dag::{Dag, Source};
use crate::api::experiment::PinnedInput;
use crate::api::{InputMode, Pipeline, PodMetadata};
use crate::controllers::experiment::validate::{GENERATION_ANNOTATION, RUN_INDEX_LABEL};
use crate::controllers::run::artifacts::{cache_output, pvc_mount_path};
use crate::controllers::run::build::{BuildError, ParentKind, Placement, RunSpec};
use crate::controllers::run::inputs::{INPUTS_ANNOTATION, Pinned, PodData};
use crate::controllers::run::names::step_name;
use crate::controllers::run::substitute::{Values, substitute_all};

/// Label of a step Job: the step's name.
pub const STEP_LABEL: &str = "mlplane.io/step";
/// Job annotation: the step's cache key.
pub const CACHE_KEY_ANNOTATION: &str = "mlplane.io/cache-key";
/// Job annotation: the name of the pipeline run the step belongs to.
pub const PIPELINE_RUN_ANNOTATION: &str = "mlplane.io/pipeline-run";

/// What every step of one run is built from.
#[derive(Clone, Debug)]
pub struct RunContext<'a> {
    pub pipeline: &'a Pipeline,
    pub dag: &'a Dag,
    /// Run index (`<pipeline>-<index>`) and name.
    pub index: u64,
    pub run: &'a str,
    /// Cache key of each step.
    pub keys: &'a [String],
    /// Resolved image of each step.
    pub images: &'a [String],
    /// Pinned pipeline inputs.
    pub pins: &'a BTreeMap<String, PinnedInput>,
    /// DataAsset name -> the Secret of its source.
    pub secrets: &'a BTreeMap<String, String>,
    /// The workspace's artifact root and its Secret.
    pub root: Option<&'a str>,
    pub root_secret: Option<&'a str>,
    /// Image of download init containers (the operator's).
    pub fetch_image: &'a str,
}

/// A step that cannot be built: a Ready reason and a message naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    pub reason: &'static str,
    pub message: String,
}

impl StepError {
    /// From a builder error of step `i`.
    pub fn build(i: usize, e: BuildError) -> Self {
        let reason = match e {
            BuildError::UnsupportedDistribution(_) => "UnsupportedDistribution",
            _ => "InvalidEnv",
        };
        Self {
            reason,
            message: format!("spec.steps[{i}].{e}"),
        }
    }
}

/// Where output `output` of step `i` is (`None` without an artifact store).
pub fn output_location(c: &RunContext<'_>, i: usize, output: &str) -> Option<String> {
    c.root.map(|r| cache_output(r, &c.keys[i], output))
}

/// Every output of step `i` by name.
pub fn outputs_of(c: &RunContext<'_>, i: usize) -> BTreeMap<String, String> {
    let step = &c.pipeline.spec.steps[i];
    step.outputs
        .keys()
        .filter_map(|o| Some((o.clone(), output_location(c, i, o)?)))
        .collect()
}

fn merged_pod_metadata(a: Option<&PodMetadata>, b: Option<&PodMetadata>) -> Option<PodMetadata> {
    if a.is_none() && b.is_none() {
        return None;
    }
    let mut out = a.cloned().unwrap_or_default();
    if let Some(b) = b {
        out.labels.extend(b.labels.clone());
        out.annotations.extend(b.annotations.clone());
    }
    Some(out)
}

/// The RunSpec of step `i` of the run.
pub fn run_spec(c: &RunContext<'_>, i: usize) -> Result<RunSpec, StepError> {
    let pl = c.pipeline;
    let spec = &pl.spec;
    let step = &spec.steps[i];
    let missing_store = || StepError {
        reason: "ArtifactStoreNotConfigured",
        message: format!(
            "spec.steps[{i}]: step outputs need the workspace's artifact store (Workspace spec.storage.artifacts)"
        ),
    };
    let mut data = PodData::default();
    let mut pins = BTreeMap::new();
    let mut reads_store = false;
    for (name, source) in &c.dag.inputs[i] {
        let pinned = match source {
            Source::Pipeline(p) => {
                let pin = c.pins.get(p).cloned().unwrap_or_default();
                let secret = pin.data_asset.as_ref().and_then(|a| c.secrets.get(a).cloned());
                pins.insert(p.clone(), pin.clone());
                Pinned {
                    pin,
                    mode: spec.inputs.get(p).and_then(|d| d.mode).unwrap_or_default(),
                    secret,
                }
            }
            Source::Step { step: j, output } => {
                reads_store = true;
                Pinned {
                    pin: PinnedInput {
                        uri: Some(output_location(c, *j, output).ok_or_else(missing_store)?),
                        ..Default::default()
                    },
                    mode: InputMode::Mount,
                    secret: None,
                }
            }
            Source::Uri(u) => Pinned {
                pin: PinnedInput {
                    uri: Some(u.clone()),
                    ..Default::default()
                },
                mode: InputMode::Mount,
                secret: None,
            },
        };
        data.input(name, &pinned, c.fetch_image);
    }
    for o in step.outputs.keys() {
        data.output(o, &output_location(c, i, o).ok_or_else(missing_store)?);
    }
    if (reads_store || !step.outputs.is_empty())
        && let Some(secret) = c.root_secret
    {
        data.credentials(secret);
    }
    let outputs_dir = (!step.outputs.is_empty())
        .then(|| output_location(c, i, ""))
        .flatten()
        .map(|d| pvc_mount_path(&d).unwrap_or(d).trim_end_matches('/').to_string());
    let values = Values {
        params: &step.params,
        inputs: &data.inputs,
        outputs: &data.outputs,
    };
    let placeholder = |e: crate::controllers::run::substitute::SubstituteError| StepError {
        reason: "InvalidPlaceholder",
        message: e.to_string(),
    };
    let command = substitute_all(&format!("spec.steps[{i}].command"), &step.command, &values).map_err(placeholder)?;
    let args = substitute_all(&format!("spec.steps[{i}].args"), &step.args, &values).map_err(placeholder)?;

    let extra_labels = BTreeMap::from([
        (STEP_LABEL.to_string(), step.name.clone()),
        (RUN_INDEX_LABEL.to_string(), c.index.to_string()),
    ]);
    let mut annotations = BTreeMap::from([
        (CACHE_KEY_ANNOTATION.to_string(), c.keys[i].clone()),
        (PIPELINE_RUN_ANNOTATION.to_string(), c.run.to_string()),
    ]);
    if let Some(g) = pl.metadata.generation {
        annotations.insert(GENERATION_ANNOTATION.to_string(), g.to_string());
    }
    if !pins.is_empty() {
        annotations.insert(
            INPUTS_ANNOTATION.to_string(),
            serde_json::to_string(&pins).unwrap_or_default(),
        );
    }
    Ok(RunSpec {
        name: step_name(&pl.name_any(), c.index, &step.name),
        namespace: pl.namespace().unwrap_or_default(),
        owner: pl.controller_owner_ref(&()).unwrap_or_default(),
        parent_kind: ParentKind::Pipeline,
        parent_name: pl.name_any(),
        extra_labels,
        annotations,
        image: c.images[i].clone(),
        command,
        args,
        env: step.env.clone(),
        resources: step.resources.clone(),
        pod_metadata: merged_pod_metadata(spec.pod_metadata.as_ref(), step.pod_metadata.as_ref()),
        placement: Placement {
            compute_cluster: step.compute.clone().or_else(|| spec.compute.clone()),
            pool: None,
        },
        timeout: None,
        max_retries: None,
        distribution: None,
        tracking: None,
        inputs: data.inputs,
        outputs: data.outputs,
        outputs_dir,
        volumes: data.volumes,
        volume_mounts: data.volume_mounts,
        init_containers: data.init_containers,
        env_from: data.env_from,
        suspend: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::pipeline::dag::build;
    use crate::controllers::run::build::build_run;
    use serde_json::json;

    fn pipeline() -> Pipeline {
        serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "Pipeline",
            "metadata": {"name": "sales", "namespace": "ws", "uid": "u1", "generation": 3},
            "spec": {
                "environment": {"image": "python:3.12"},
                "inputs": {"raw": {"dataAsset": "sales-data", "mode": "Download"}},
                "podMetadata": {"annotations": {"team": "x", "sim": "1s"}},
                "steps": [
                    {"name": "prep", "command": ["prep", "${{inputs.raw}}", "${{outputs.clean}}"], "outputs": {"clean": {}}},
                    {"name": "train", "inputs": {"d": "${{steps.prep.outputs.clean}}"},
                     "command": ["train", "${{inputs.d}}", "${{outputs.model}}", "--lr", "${{params.lr}}"],
                     "params": {"lr": 0.1}, "outputs": {"model": {}}, "compute": "gpu",
                     "podMetadata": {"annotations": {"sim": "5s"}}}
                ]
            }
        }))
        .unwrap()
    }

    #[test]
    fn steps_read_pins_and_upstream_outputs_and_write_under_their_keys() {
        let pl = pipeline();
        let dag = build(&pl.spec).unwrap();
        let keys = vec!["k0".to_string(), "k1".to_string()];
        let images = vec!["python:3.12".to_string(); 2];
        let pins = BTreeMap::from([(
            "raw".to_string(),
            PinnedInput {
                data_asset: Some("sales-data".into()),
                version: Some("4".into()),
                digest: Some("sha256:d".into()),
                uri: Some("s3://data/sales/".into()),
            },
        )]);
        let secrets = BTreeMap::from([("sales-data".to_string(), "data-creds".to_string())]);
        let c = RunContext {
            pipeline: &pl,
            dag: &dag,
            index: 2,
            run: "sales-2",
            keys: &keys,
            images: &images,
            pins: &pins,
            secrets: &secrets,
            root: Some("s3://art/ws"),
            root_secret: Some("art-creds"),
            fetch_image: "mlplane:1",
        };
        let prep = run_spec(&c, 0).unwrap();
        assert_eq!(prep.command, ["prep", "/mnt/inputs/raw", "s3://art/ws/cache/k0/clean"]);
        assert_eq!(prep.init_containers.len(), 1);
        assert_eq!(prep.annotations[CACHE_KEY_ANNOTATION], "k0");
        assert_eq!(prep.extra_labels[STEP_LABEL], "prep");
        assert_eq!(prep.extra_labels[RUN_INDEX_LABEL], "2");
        assert_eq!(prep.outputs_dir.as_deref(), Some("s3://art/ws/cache/k0"));
        let pinned: BTreeMap<String, PinnedInput> = serde_json::from_str(&prep.annotations[INPUTS_ANNOTATION]).unwrap();
        assert_eq!(pinned["raw"].version.as_deref(), Some("4"));
        let train = run_spec(&c, 1).unwrap();
        assert_eq!(
            train.command,
            [
                "train",
                "s3://art/ws/cache/k0/clean",
                "s3://art/ws/cache/k1/model",
                "--lr",
                "0.1"
            ]
        );
        assert_eq!(train.placement.compute_cluster.as_deref(), Some("gpu"));
        assert_eq!(train.env_from[0].secret_ref.as_ref().unwrap().name, "art-creds");
        let md = train.pod_metadata.as_ref().unwrap();
        assert_eq!(
            (md.annotations["team"].as_str(), md.annotations["sim"].as_str()),
            ("x", "5s")
        );
        let job = build_run(&train).unwrap().job;
        assert_eq!(job.metadata.labels.as_ref().unwrap()["mlplane.io/pipeline"], "sales");
        assert!(job.metadata.name.as_ref().unwrap().starts_with("sales-2-train-"));
        assert_eq!(job.metadata.owner_references.as_ref().unwrap()[0].uid, "u1");

        // Without an artifact store, outputs cannot be placed.
        let c = RunContext { root: None, ..c };
        assert_eq!(run_spec(&c, 0).unwrap_err().reason, "ArtifactStoreNotConfigured");
    }
}
