//! Planning one Pipeline run: each step's cache key, which steps' keys to
//! look up, and what to do with each step now (start its Job, reuse earlier
//! outputs, or skip it). Pure: the driver observes, looks up and acts.
//!
//! Owns: the cache key and the scheduling rules. Must not touch the API
//! server or the tracking server.
//!
//! Cache key of a step: the first 32 hex digits of the SHA-256 of a JSON
//! document (format `mlplane-step-cache/v1`) with the step's resolved image,
//! its command and args as written (before substitution: locations are
//! derived from keys), its env, params, output names, the workspace's
//! artifact root, and each input's identity: a DataAsset input's pinned
//! digest (content, never the asset's name or version number), a URI input's
//! URI, an upstream step's output as (that step's key, output name), plus the
//! input mode. Two steps anywhere in the workspace with the same key would
//! compute the same outputs, so one's outputs serve the other. A step with
//! `deterministic: false`, and every step of a run with
//! `settings.forceRerun`, also hashes the run (pipeline UID and run index)
//! and its own name: its key is new each run, so it runs, writes to a fresh
//! location, and everything downstream of it runs too.
//!
//! Scheduling, in topological order (as much parallelism as the DAG allows):
//! a step whose upstream steps all succeeded (ran or reused) is reused when
//! it may be (deterministic, no forceRerun) and its key is in the cache,
//! else started, unless a step with the same key is running in this run:
//! then it waits and reuses that step's outputs (one key is computed once,
//! and no two Jobs write the same location). When a step fails:
//! - `continueOnStepFailure: false` (default): no step starts any more; steps
//!   already running finish (their outputs are cached for the next run); the
//!   steps that never started are skipped (`Cancelled`, reason
//!   `UpstreamFailed` for those downstream of the failure, `PipelineStopped`
//!   for the others); the run is `Failed`.
//! - `continueOnStepFailure: true`: only the steps downstream of the failed
//!   step are skipped (`UpstreamFailed`); every other step runs; the run is
//!   `Failed` once nothing is left to run.
use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use sha2::{Digest, Sha256};

use super::dag::{Dag, Source};
use crate::api::experiment::PinnedInput;
use crate::api::{InputMode, PipelineSpec, RunPhase};

/// Format tag hashed into every key (a change of the key's definition
/// changes every key, so no old entry is misread).
pub const KEY_FORMAT: &str = "mlplane-step-cache/v1";
/// Skip reason: an upstream step failed or was skipped.
pub const UPSTREAM_FAILED: &str = "UpstreamFailed";
/// Skip reason: a step failed and `continueOnStepFailure` is false.
pub const PIPELINE_STOPPED: &str = "PipelineStopped";

/// What a key is computed from, besides the spec and the DAG.
#[derive(Clone, Debug)]
pub struct KeyInputs<'a> {
    /// Resolved image of each step.
    pub images: &'a [String],
    /// Pinned pipeline inputs.
    pub pins: &'a BTreeMap<String, PinnedInput>,
    /// The workspace's artifact root.
    pub root: Option<&'a str>,
    /// This run, for steps that must not be reused (`<uid>/<index>`).
    pub run: &'a str,
}

/// Whether a step's key is salted with the run (never reused).
pub fn run_salted(spec: &PipelineSpec, step: usize) -> bool {
    !spec.steps[step].deterministic || spec.settings.as_ref().is_some_and(|s| s.force_rerun)
}

/// The cache key of every step (by index).
pub fn cache_keys(spec: &PipelineSpec, dag: &Dag, k: &KeyInputs<'_>) -> Vec<String> {
    let mut keys = vec![String::new(); spec.steps.len()];
    for &i in &dag.order {
        let step = &spec.steps[i];
        let inputs: BTreeMap<&str, serde_json::Value> = dag.inputs[i]
            .iter()
            .map(|(name, source)| {
                let identity = match source {
                    Source::Pipeline(p) => {
                        let mode = spec.inputs.get(p).and_then(|d| d.mode).unwrap_or_default();
                        let mode = match mode {
                            InputMode::Mount => "Mount",
                            InputMode::Download => "Download",
                        };
                        match k.pins.get(p) {
                            Some(PinnedInput { digest: Some(d), .. }) => json!({"data": d, "mode": mode}),
                            Some(pin) => json!({"uri": pin.uri, "mode": mode}),
                            None => json!({"missing": p}),
                        }
                    }
                    Source::Step { step, output } => json!({"step": keys[*step], "output": output}),
                    Source::Uri(u) => json!({"uri": u}),
                };
                (name.as_str(), identity)
            })
            .collect();
        let doc = json!({
            "format": KEY_FORMAT,
            "image": k.images.get(i),
            "command": step.command,
            "args": step.args,
            "env": step.env,
            "params": step.params,
            "outputs": step.outputs.keys().collect::<Vec<_>>(),
            "inputs": inputs,
            "root": k.root,
            "run": run_salted(spec, i).then(|| format!("{}/{}", k.run, step.name)),
        });
        let digest = Sha256::digest(doc.to_string().as_bytes());
        keys[i] = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    }
    keys
}

/// What is known of one step of the current run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Known {
    /// Neither started nor decided.
    Undecided,
    /// Reused earlier outputs.
    Reused,
    /// Will not run, for this reason.
    Skipped(String),
    /// Its Job exists, in this phase.
    Job(RunPhase),
}

impl Known {
    fn succeeded(&self) -> bool {
        matches!(self, Known::Reused | Known::Job(RunPhase::Succeeded))
    }
    fn failed(&self) -> bool {
        matches!(
            self,
            Known::Skipped(_) | Known::Job(RunPhase::Failed) | Known::Job(RunPhase::Cancelled)
        )
    }
    fn active(&self) -> bool {
        matches!(
            self,
            Known::Job(RunPhase::Pending) | Known::Job(RunPhase::Queued) | Known::Job(RunPhase::Running)
        )
    }
}

/// What to do with a step now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create its Job.
    Start,
    /// Reuse the cached outputs of its key.
    Reuse,
    /// Never run it, for this reason.
    Skip(&'static str),
}

/// The steps whose keys are worth looking up now: undecided, reusable, and
/// not waiting on a step that is running or failed (only steps that may be
/// decided in this pass, so a reconcile that decides nothing asks nothing).
pub fn to_look_up(dag: &Dag, known: &[Known], reusable: &[bool], keys: &[String]) -> Vec<usize> {
    let mut prospective = vec![false; known.len()];
    let running = running_keys(known, keys);
    let mut out = vec![];
    for &i in &dag.order {
        let ups_ok = dag.upstream[i].iter().all(|&u| known[u].succeeded() || prospective[u]);
        if known[i] == Known::Undecided && reusable[i] && ups_ok && !running.contains(keys[i].as_str()) {
            prospective[i] = true;
            out.push(i);
        }
    }
    out
}

/// Keys of the steps whose Jobs are active.
fn running_keys<'a>(known: &[Known], keys: &'a [String]) -> BTreeSet<&'a str> {
    known
        .iter()
        .zip(keys)
        .filter(|(k, _)| k.active())
        .map(|(_, key)| key.as_str())
        .collect()
}

/// The actions of this pass, in topological order. `hits` are the steps
/// whose keys are in the cache.
pub fn decide(
    dag: &Dag,
    known: &[Known],
    reusable: &[bool],
    keys: &[String],
    hits: &BTreeSet<usize>,
    continue_on_failure: bool,
) -> Vec<(usize, Action)> {
    let mut running = running_keys(known, keys);
    let mut state = known.to_vec();
    let stopped = !continue_on_failure && known.iter().any(|k| matches!(k, Known::Job(RunPhase::Failed)));
    let mut actions = vec![];
    for &i in &dag.order {
        if state[i] != Known::Undecided {
            continue;
        }
        let ups = &dag.upstream[i];
        let action = if ups.iter().any(|&u| state[u].failed()) {
            Action::Skip(UPSTREAM_FAILED)
        } else if stopped {
            Action::Skip(PIPELINE_STOPPED)
        } else if ups.iter().all(|&u| state[u].succeeded()) {
            if reusable[i] && hits.contains(&i) {
                Action::Reuse
            } else if reusable[i] && running.contains(keys[i].as_str()) {
                // Its twin runs: wait for its outputs.
                continue;
            } else {
                running.insert(keys[i].as_str());
                Action::Start
            }
        } else {
            continue;
        };
        state[i] = match &action {
            Action::Start => Known::Job(RunPhase::Pending),
            Action::Reuse => Known::Reused,
            Action::Skip(r) => Known::Skipped(r.to_string()),
        };
        actions.push((i, action));
    }
    actions
}

/// The phase of a run from what is known of its steps.
pub fn run_phase(known: &[Known]) -> RunPhase {
    if known.iter().any(|k| k.active() || *k == Known::Undecided) {
        if known.iter().any(|k| !matches!(k, Known::Undecided)) {
            RunPhase::Running
        } else {
            RunPhase::Pending
        }
    } else if known.iter().any(Known::failed) {
        RunPhase::Failed
    } else {
        RunPhase::Succeeded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::pipeline::dag::build;
    use serde_json::json;

    fn spec(steps: serde_json::Value, settings: serde_json::Value) -> PipelineSpec {
        serde_json::from_value(json!({
            "environment": {"image": "python:3.12"},
            "inputs": {"raw": {"dataAsset": "sales"}},
            "steps": steps,
            "settings": settings,
        }))
        .unwrap()
    }

    /// prep -> train -> eval, and prep -> report (independent of train).
    fn steps() -> serde_json::Value {
        json!([
            {"name": "prep", "command": ["prep", "${{inputs.raw}}", "${{outputs.clean}}"], "outputs": {"clean": {}}},
            {"name": "train", "inputs": {"d": "${{steps.prep.outputs.clean}}"}, "command": ["train", "${{inputs.d}}", "${{outputs.m}}"],
             "outputs": {"m": {}}},
            {"name": "eval", "inputs": {"m": "${{steps.train.outputs.m}}"}, "command": ["eval", "${{inputs.m}}"]},
            {"name": "report", "inputs": {"d": "${{steps.prep.outputs.clean}}"}, "command": ["report", "${{inputs.d}}"]}
        ])
    }

    fn pins(digest: &str) -> BTreeMap<String, PinnedInput> {
        BTreeMap::from([(
            "raw".to_string(),
            PinnedInput {
                data_asset: Some("sales".into()),
                version: Some("1".into()),
                digest: Some(digest.into()),
                uri: Some("s3://b/sales/".into()),
            },
        )])
    }

    fn keys_of(spec: &PipelineSpec, digest: &str, run: &str) -> Vec<String> {
        let dag = build(spec).unwrap();
        let images = vec!["python:3.12".to_string(); spec.steps.len()];
        let pins = pins(digest);
        cache_keys(
            spec,
            &dag,
            &KeyInputs {
                images: &images,
                pins: &pins,
                root: Some("s3://art/ws"),
                run,
            },
        )
    }

    #[test]
    fn keys_change_with_content_and_propagate_downstream_only() {
        let s = spec(steps(), json!({}));
        let base = keys_of(&s, "sha256:a", "u/1");
        assert_eq!(base.len(), 4);
        assert!(base.iter().all(|k| k.len() == 32));
        assert_eq!(
            base,
            keys_of(&s, "sha256:a", "u/2"),
            "deterministic steps ignore the run"
        );
        // New data: every step that reads it, directly or not, changes.
        let data = keys_of(&s, "sha256:b", "u/1");
        assert!(base.iter().zip(&data).all(|(a, b)| a != b));
        // A change to the last step only changes its key.
        let mut changed = steps();
        changed[2]["command"] = json!(["eval", "--fast", "${{inputs.m}}"]);
        let last = keys_of(&spec(changed, json!({})), "sha256:a", "u/1");
        assert_eq!(&last[..2], &base[..2]);
        assert_eq!(last[3], base[3]);
        assert_ne!(last[2], base[2]);
        // A param of train changes train and eval, not prep or report.
        let mut p = steps();
        p[1]["params"] = json!({"lr": 0.5});
        let k = keys_of(&spec(p, json!({})), "sha256:a", "u/1");
        assert_eq!(
            (k[0] == base[0], k[1] == base[1], k[2] == base[2], k[3] == base[3]),
            (true, false, false, true)
        );
        // The data set's name is not in the key, only its content.
        let mut renamed = pins("sha256:a");
        renamed.get_mut("raw").unwrap().data_asset = Some("other".into());
        let dag = build(&s).unwrap();
        let images = vec!["python:3.12".to_string(); 4];
        let k = cache_keys(
            &s,
            &dag,
            &KeyInputs {
                images: &images,
                pins: &renamed,
                root: Some("s3://art/ws"),
                run: "u/1",
            },
        );
        assert_eq!(k, base);
    }

    #[test]
    fn non_deterministic_steps_and_force_rerun_are_keyed_by_run() {
        let mut st = steps();
        st[1]["deterministic"] = json!(false);
        let s = spec(st, json!({}));
        let (a, b) = (keys_of(&s, "sha256:a", "u/1"), keys_of(&s, "sha256:a", "u/2"));
        assert_eq!(
            (a[0] == b[0], a[1] == b[1], a[2] == b[2], a[3] == b[3]),
            (true, false, false, true)
        );
        let forced = spec(steps(), json!({"forceRerun": true}));
        let (a, b) = (keys_of(&forced, "sha256:a", "u/1"), keys_of(&forced, "sha256:a", "u/2"));
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
    }

    fn keys4() -> Vec<String> {
        (0..4).map(|i| format!("k{i}")).collect()
    }

    fn run(known: &[Known], reusable: &[bool], hits: &[usize], cont: bool) -> Vec<(usize, Action)> {
        let dag = build(&spec(steps(), json!({}))).unwrap();
        decide(&dag, known, reusable, &keys4(), &hits.iter().copied().collect(), cont)
    }

    #[test]
    fn twins_with_one_key_run_once() {
        use Known::*;
        let dag = build(&spec(steps(), json!({}))).unwrap();
        // train and report read the same thing the same way: one key.
        let keys = vec!["k0".to_string(), "same".into(), "k2".into(), "same".into()];
        let known = [Job(RunPhase::Succeeded), Undecided, Undecided, Undecided];
        let acts = decide(&dag, &known, &[true; 4], &keys, &BTreeSet::new(), false);
        assert_eq!(acts, vec![(1, Action::Start)], "report waits for train");
        let known = [Job(RunPhase::Succeeded), Job(RunPhase::Running), Undecided, Undecided];
        assert!(
            to_look_up(&dag, &known, &[true; 4], &keys).is_empty(),
            "nothing to ask while the twin runs"
        );
        let known = [Job(RunPhase::Succeeded), Job(RunPhase::Succeeded), Undecided, Undecided];
        let acts = decide(&dag, &known, &[true; 4], &keys, &BTreeSet::from([3]), false);
        assert_eq!(acts, vec![(2, Action::Start), (3, Action::Reuse)]);
    }

    #[test]
    fn a_fresh_run_starts_only_what_is_ready_and_reuses_chains() {
        use Known::*;
        let all = [true; 4];
        assert_eq!(
            run(&[Undecided, Undecided, Undecided, Undecided], &all, &[], false),
            vec![(0, Action::Start)]
        );
        // Everything cached: the whole chain is reused in one pass.
        let acts = run(
            &[Undecided, Undecided, Undecided, Undecided],
            &all,
            &[0, 1, 2, 3],
            false,
        );
        assert_eq!(acts.iter().filter(|(_, a)| *a == Action::Reuse).count(), 4);
        // prep cached, train not: train starts, report is reused, eval waits.
        let acts = run(&[Undecided, Undecided, Undecided, Undecided], &all, &[0, 3], false);
        assert_eq!(acts, vec![(0, Action::Reuse), (1, Action::Start), (3, Action::Reuse)]);
        // Parallel branches start together.
        let acts = run(
            &[Job(RunPhase::Succeeded), Undecided, Undecided, Undecided],
            &all,
            &[],
            false,
        );
        assert_eq!(acts, vec![(1, Action::Start), (3, Action::Start)]);
        // Not reusable: started even on a hit.
        let acts = run(
            &[Undecided, Undecided, Undecided, Undecided],
            &[false, true, true, true],
            &[0],
            false,
        );
        assert_eq!(acts, vec![(0, Action::Start)]);
    }

    #[test]
    fn lookups_cover_only_what_can_be_decided_now() {
        use Known::*;
        let dag = build(&spec(steps(), json!({}))).unwrap();
        assert_eq!(
            to_look_up(
                &dag,
                &[Undecided, Undecided, Undecided, Undecided],
                &[true; 4],
                &keys4()
            ),
            vec![0, 1, 2, 3]
        );
        // Waiting for prep to finish: nothing to ask.
        let known = [Job(RunPhase::Running), Undecided, Undecided, Undecided];
        assert!(to_look_up(&dag, &known, &[true; 4], &keys4()).is_empty());
        // train not reusable: eval cannot be decided before train runs.
        let known = [Job(RunPhase::Succeeded), Undecided, Undecided, Undecided];
        assert_eq!(to_look_up(&dag, &known, &[true, false, true, true], &keys4()), vec![3]);
    }

    #[test]
    fn failures_stop_dependents_and_by_default_everything_not_started() {
        use Known::*;
        let all = [true; 4];
        // train failed while report was still to start.
        let known = [Job(RunPhase::Succeeded), Job(RunPhase::Failed), Undecided, Undecided];
        assert_eq!(
            run(&known, &all, &[], false),
            vec![(2, Action::Skip(UPSTREAM_FAILED)), (3, Action::Skip(PIPELINE_STOPPED))]
        );
        assert_eq!(
            run(&known, &all, &[], true),
            vec![(2, Action::Skip(UPSTREAM_FAILED)), (3, Action::Start)]
        );
        // A running independent step is left to finish.
        let known = [
            Job(RunPhase::Succeeded),
            Job(RunPhase::Failed),
            Undecided,
            Job(RunPhase::Running),
        ];
        assert_eq!(run(&known, &all, &[], false), vec![(2, Action::Skip(UPSTREAM_FAILED))]);
        let after = [
            Job(RunPhase::Succeeded),
            Job(RunPhase::Failed),
            Skipped(UPSTREAM_FAILED.into()),
            Job(RunPhase::Running),
        ];
        assert_eq!(run_phase(&after), RunPhase::Running);
        let done = [
            Job(RunPhase::Succeeded),
            Job(RunPhase::Failed),
            Skipped(UPSTREAM_FAILED.into()),
            Job(RunPhase::Succeeded),
        ];
        assert_eq!(run_phase(&done), RunPhase::Failed);
    }

    #[test]
    fn run_phases() {
        use Known::*;
        assert_eq!(run_phase(&[Undecided, Undecided]), RunPhase::Pending);
        assert_eq!(run_phase(&[Reused, Undecided]), RunPhase::Running);
        assert_eq!(run_phase(&[Reused, Job(RunPhase::Succeeded)]), RunPhase::Succeeded);
    }
}
