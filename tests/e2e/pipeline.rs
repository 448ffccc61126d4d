//! The Pipeline controller against the local control plane, a real
//! S3-compatible server (MinIO: the DataAsset source and the workspace's
//! artifact store) and the tracking server (the step cache): full runs,
//! re-running only what changed (code, data), forceRerun, failures with and
//! without continueOnStepFailure, refused specs, and a crash mid-run. KWOK
//! plays the step pods (`sim.mlplane.io/*` annotations through
//! `podMetadata`); the operator runs out of cluster with the chart's RBAC.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mlplane::api::{DataAsset, Pipeline, PipelineRunStatus, RunPhase};
use mlplane_test_support::*;
use serde_json::{Value, json};

struct Fixture {
    op: TrackedOperator,
    s3: S3Server,
}

fn fixture() -> &'static Fixture {
    static FIX: OnceLock<Fixture> = OnceLock::new();
    FIX.get_or_init(|| {
        block_on_thread(async {
            let s3 = S3Server::start(&["data"])?;
            let op = TrackedOperator::start("pipeline").await?;
            Ok(Fixture { op, s3 })
        })
        .expect("the pipeline fixture starts")
    })
}

/// A workspace with an S3 artifact store and a DataAsset `sales` (one
/// object) in it, ready at version 1.
async fn workspace_with_data(admin: &Client, prefix: &str) -> Result<(WorkspaceGuard, String)> {
    let f = fixture();
    let ws = s3_workspace(admin, &f.s3, "data", prefix).await?;
    let uri = format!("s3://data/{}/sales/", ws.0);
    f.s3.put(&uri, "jan.csv", b"a,b\n1,2\n").await?;
    let assets: Api<DataAsset> = Api::namespaced(admin.clone(), &ws.0);
    let da: DataAsset = serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "DataAsset", "metadata": {"name": "sales"},
        "spec": {"type": "UriFolder", "source": {"uri": uri, "secretRef": {"name": "s3"}}},
    }))?;
    assets.create(&PostParams::default(), &da).await?;
    wait_for(&assets, "sales", Duration::from_secs(60), "sales version 1", |d| {
        d.status.as_ref().and_then(|s| s.latest_version.as_deref()) == Some("1")
    })
    .await?;
    Ok((ws, uri))
}

fn sim(duration: &str) -> Value {
    json!({"annotations": {"sim.mlplane.io/duration": duration}})
}

/// prep (reads the DataAsset) -> train -> eval, and lint (independent).
fn four_steps() -> Value {
    json!([
        {"name": "prep", "command": ["python", "prep.py", "${{inputs.raw}}", "${{outputs.clean}}"],
         "outputs": {"clean": {}}},
        {"name": "train", "inputs": {"data": "${{steps.prep.outputs.clean}}"},
         "command": ["python", "train.py", "${{inputs.data}}", "${{outputs.model}}", "${{params.lr}}"],
         "params": {"lr": 0.1}, "outputs": {"model": {}}},
        {"name": "eval", "inputs": {"model": "${{steps.train.outputs.model}}", "data": "${{steps.prep.outputs.clean}}"},
         "command": ["python", "eval.py", "${{inputs.model}}", "${{inputs.data}}"]},
        {"name": "lint", "command": ["ruff", "check", "."]}
    ])
}

fn pipeline(name: &str, steps: Value, settings: Value) -> Result<Pipeline> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "Pipeline", "metadata": {"name": name},
        "spec": {
            "environment": {"image": "python:3.12"},
            "inputs": {"raw": {"dataAsset": "sales", "version": "latest"}},
            "steps": steps,
            "settings": settings,
            "podMetadata": sim("1s"),
        },
    }))?)
}

fn runs(p: &Pipeline) -> Vec<PipelineRunStatus> {
    p.status.as_ref().map(|s| s.runs.clone()).unwrap_or_default()
}

fn ready(p: &Pipeline) -> (String, String, String) {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// Waits until run `n` (1-based) of the pipeline has ended.
async fn wait_run(api: &Api<Pipeline>, name: &str, n: usize) -> Result<PipelineRunStatus> {
    let p = wait_for(api, name, Duration::from_secs(120), &format!("run {n} ended"), |p| {
        let r = runs(p);
        r.len() == n
            && r[0].phase.is_terminal()
            && p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
    })
    .await?;
    Ok(runs(&p).remove(0))
}

/// `(step, reused, ran)` of a run, in spec order.
fn outcome(run: &PipelineRunStatus) -> BTreeMap<String, (RunPhase, bool, bool)> {
    run.steps
        .iter()
        .map(|s| (s.name.clone(), (s.phase, s.reused, s.job.is_some())))
        .collect()
}

fn ran(run: &PipelineRunStatus) -> Vec<&str> {
    run.steps
        .iter()
        .filter(|s| s.job.is_some())
        .map(|s| s.name.as_str())
        .collect()
}

fn reused(run: &PipelineRunStatus) -> Vec<&str> {
    run.steps.iter().filter(|s| s.reused).map(|s| s.name.as_str()).collect()
}

async fn step_jobs(api: &Api<Job>, pipeline: &str) -> Result<Vec<Job>> {
    Ok(api
        .list(&ListParams::default().labels(&format!("mlplane.io/pipeline={pipeline}")))
        .await?
        .items)
}

async fn rerun(api: &Api<Pipeline>, name: &str, token: &str) -> Result<()> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"mlplane.io/rerun": token}}})),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn reruns_run_only_what_changed_code_or_data_and_force_runs_all() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let (ws, uri) = workspace_with_data(&admin, "pl-reuse").await?;
    let ns = ws.0.as_str();
    let api: Api<Pipeline> = Api::namespaced(admin.clone(), ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), ns);
    api.create(&PostParams::default(), &pipeline("sales", four_steps(), json!({}))?)
        .await?;

    // Run 1: everything runs, once.
    let r1 = wait_run(&api, "sales", 1).await?;
    assert_eq!(r1.phase, RunPhase::Succeeded, "{r1:?}");
    assert_eq!(ran(&r1), ["prep", "train", "eval", "lint"]);
    assert!(reused(&r1).is_empty());
    assert_eq!(r1.inputs["raw"].version.as_deref(), Some("1"));
    assert_eq!(step_jobs(&jobs, "sales").await?.len(), 4);
    let p = api.get("sales").await?;
    assert_eq!(ready(&p).0, "True", "{:?}", ready(&p));
    // Steps ran in order: train after prep, eval after train.
    let start = |r: &PipelineRunStatus, s: &str| r.steps.iter().find(|x| x.name == s).unwrap().start_time.clone();
    let end = |r: &PipelineRunStatus, s: &str| r.steps.iter().find(|x| x.name == s).unwrap().completion_time.clone();
    assert!(start(&r1, "train") >= end(&r1, "prep"), "{r1:?}");
    assert!(start(&r1, "eval") >= end(&r1, "train"), "{r1:?}");
    // The train Job reads prep's output where prep's cache key put it.
    let keys: BTreeMap<String, String> = r1
        .steps
        .iter()
        .map(|s| (s.name.clone(), s.cache_key.clone().unwrap_or_default()))
        .collect();
    let train_job = jobs.get(r1.steps[1].job.as_deref().unwrap()).await?;
    let cmd = train_job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .command
        .clone()
        .unwrap();
    let store = format!("s3://data/{ns}/artifacts");
    assert_eq!(cmd[2], format!("{store}/cache/{}/clean", keys["prep"]));
    assert_eq!(cmd[3], format!("{store}/cache/{}/model", keys["train"]));

    // Changing only the last step re-runs only it.
    let mut steps = four_steps();
    steps[2]["command"] = json!(["python", "eval.py", "--strict", "${{inputs.model}}", "${{inputs.data}}"]);
    api.patch(
        "sales",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"steps": steps}})),
    )
    .await?;
    let r2 = wait_run(&api, "sales", 2).await?;
    assert_eq!(r2.phase, RunPhase::Succeeded, "{r2:?}");
    assert_eq!(ran(&r2), ["eval"], "{:?}", outcome(&r2));
    assert_eq!(reused(&r2), ["prep", "train", "lint"]);
    assert_eq!(step_jobs(&jobs, "sales").await?.len(), 5);

    // A new DataAsset version re-runs the first step and everything
    // downstream of it, and nothing else.
    f.s3.put(&uri, "feb.csv", b"a,b\n3,4\n").await?;
    let assets: Api<DataAsset> = Api::namespaced(admin.clone(), ns);
    assets
        .patch(
            "sales",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"mlplane.io/refresh": "feb"}}})),
        )
        .await?;
    wait_for(&assets, "sales", Duration::from_secs(60), "sales version 2", |d| {
        d.status.as_ref().and_then(|s| s.latest_version.as_deref()) == Some("2")
    })
    .await?;
    rerun(&api, "sales", "new-data").await?;
    let r3 = wait_run(&api, "sales", 3).await?;
    assert_eq!(r3.inputs["raw"].version.as_deref(), Some("2"));
    assert_eq!(ran(&r3), ["prep", "train", "eval"], "{:?}", outcome(&r3));
    assert_eq!(reused(&r3), ["lint"]);

    // The same content again (rerun, no change): everything is reused.
    rerun(&api, "sales", "same").await?;
    let r4 = wait_run(&api, "sales", 4).await?;
    assert!(ran(&r4).is_empty(), "{:?}", outcome(&r4));
    assert_eq!(r4.phase, RunPhase::Succeeded);

    // forceRerun runs all.
    api.patch(
        "sales",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"settings": {"forceRerun": true}}})),
    )
    .await?;
    let r5 = wait_run(&api, "sales", 5).await?;
    assert_eq!(ran(&r5), ["prep", "train", "eval", "lint"], "{:?}", outcome(&r5));
    assert_eq!(step_jobs(&jobs, "sales").await?.len(), 5 + 3 + 4);

    // The cache is the workspace's: another pipeline with the same steps
    // reuses run 3's outputs.
    api.create(&PostParams::default(), &pipeline("copy", four_steps(), json!({}))?)
        .await?;
    let c1 = wait_run(&api, "copy", 1).await?;
    assert_eq!(reused(&c1), ["prep", "train", "lint"], "{:?}", outcome(&c1));
    assert_eq!(ran(&c1), ["eval"], "the original eval ran with --strict only");

    wait_for_event(&admin, ns, Duration::from_secs(30), "StepReused", |e| {
        e.reason.as_deref() == Some("StepReused") && e.involved_object.name.as_deref() == Some("sales")
    })
    .await?;
    let reused_total = f.op.metric("mlplane_pipeline_steps_total", &[("outcome", "reused")]);
    assert!(reused_total.unwrap_or(0.0) >= 8.0, "{reused_total:?}");
    Ok(())
}

fn fail(duration: &str) -> Value {
    json!({"annotations": {"sim.mlplane.io/duration": duration, "sim.mlplane.io/exit-code": "2",
                           "sim.mlplane.io/termination-message": "ValueError: bad batch"}})
}

/// a -> b (fails) -> c, and a -> slow -> d.
fn failing_steps() -> Value {
    json!([
        {"name": "a", "command": ["a", "${{outputs.o}}"], "outputs": {"o": {}}},
        {"name": "b", "inputs": {"x": "${{steps.a.outputs.o}}"}, "command": ["b", "${{outputs.o}}"], "outputs": {"o": {}},
         "podMetadata": fail("1s")},
        {"name": "c", "inputs": {"x": "${{steps.b.outputs.o}}"}, "command": ["c"]},
        {"name": "slow", "inputs": {"x": "${{steps.a.outputs.o}}"}, "command": ["slow", "${{outputs.o}}"],
         "outputs": {"o": {}}, "podMetadata": sim("6s")},
        {"name": "d", "inputs": {"x": "${{steps.slow.outputs.o}}"}, "command": ["d"]}
    ])
}

#[tokio::test]
async fn a_failing_step_stops_its_dependents_and_by_default_all_that_has_not_started() -> Result<()> {
    let _ = fixture();
    let admin = admin_client().await?;
    let (ws, _) = workspace_with_data(&admin, "pl-fail").await?;
    let api: Api<Pipeline> = Api::namespaced(admin.clone(), &ws.0);
    for (name, cont) in [("stop", false), ("go-on", true)] {
        api.create(
            &PostParams::default(),
            &pipeline(name, failing_steps(), json!({"continueOnStepFailure": cont}))?,
        )
        .await?;
    }
    // continueOnStepFailure false: b's failure stops c (downstream) and d
    // (not started yet); slow, already running, finishes.
    let r = wait_run(&api, "stop", 1).await?;
    let o = outcome(&r);
    assert_eq!(r.phase, RunPhase::Failed, "{o:?}");
    assert_eq!(o["a"].0, RunPhase::Succeeded);
    assert_eq!(o["b"].0, RunPhase::Failed);
    assert_eq!(o["slow"].0, RunPhase::Succeeded, "a running step is left to finish");
    let reason = |s: &str| r.steps.iter().find(|x| x.name == s).and_then(|x| x.reason.clone());
    assert_eq!(
        (o["c"].0, reason("c").as_deref(), o["c"].2),
        (RunPhase::Cancelled, Some("UpstreamFailed"), false)
    );
    assert_eq!(
        (o["d"].0, reason("d").as_deref(), o["d"].2),
        (RunPhase::Cancelled, Some("PipelineStopped"), false)
    );
    assert_eq!(reason("b").as_deref(), Some("ExitCode"));
    let p = api.get("stop").await?;
    let (status, why, message) = ready(&p);
    assert_eq!((status.as_str(), why.as_str()), ("False", "StepFailed"));
    assert!(
        message.contains("step b failed") && message.contains("exit"),
        "{message}"
    );

    // continueOnStepFailure true: only b's dependents stop.
    let r = wait_run(&api, "go-on", 1).await?;
    let o = outcome(&r);
    assert_eq!(r.phase, RunPhase::Failed, "{o:?}");
    assert_eq!(o["d"].0, RunPhase::Succeeded, "independent steps run");
    assert_eq!(o["c"].0, RunPhase::Cancelled);
    assert_eq!(
        r.steps.iter().find(|x| x.name == "c").and_then(|x| x.reason.as_deref()),
        Some("UpstreamFailed")
    );
    wait_for_event(&admin, &ws.0, Duration::from_secs(30), "StepFailed", |e| {
        e.reason.as_deref() == Some("StepFailed") && e.involved_object.name.as_deref() == Some("go-on")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn cycles_and_unknown_references_are_refused_naming_them() -> Result<()> {
    let _ = fixture();
    let admin = admin_client().await?;
    let (ws, _) = workspace_with_data(&admin, "pl-bad").await?;
    let api: Api<Pipeline> = Api::namespaced(admin.clone(), &ws.0);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.0);
    let cycle = json!([
        {"name": "a", "inputs": {"x": "${{steps.c.outputs.o}}"}, "command": ["a"], "outputs": {"o": {}}},
        {"name": "b", "inputs": {"x": "${{steps.a.outputs.o}}"}, "command": ["b"], "outputs": {"o": {}}},
        {"name": "c", "inputs": {"x": "${{steps.b.outputs.o}}"}, "command": ["c"], "outputs": {"o": {}}}
    ]);
    api.create(&PostParams::default(), &pipeline("loop", cycle, json!({}))?)
        .await?;
    let p = wait_for(&api, "loop", Duration::from_secs(60), "DependencyCycle", |p| {
        ready(p).1 == "DependencyCycle"
    })
    .await?;
    assert_eq!(
        ready(&p).2,
        "spec.steps: the steps depend on each other in a cycle: a -> b -> c -> a"
    );
    assert_eq!(p.status.as_ref().unwrap().phase, Some(RunPhase::Failed));
    assert!(runs(&p).is_empty());

    let mut steps = four_steps();
    steps[1]["inputs"]["data"] = json!("${{steps.prep.outputs.dirty}}");
    api.create(&PostParams::default(), &pipeline("typo", steps, json!({}))?)
        .await?;
    let p = wait_for(&api, "typo", Duration::from_secs(60), "InvalidReference", |p| {
        ready(p).1 == "InvalidReference"
    })
    .await?;
    assert!(
        ready(&p)
            .2
            .contains("spec.steps[1].inputs.data: step \"prep\" has no output \"dirty\""),
        "{:?}",
        ready(&p)
    );
    wait_for_event(&admin, &ws.0, Duration::from_secs(30), "DependencyCycle event", |e| {
        e.reason.as_deref() == Some("DependencyCycle") && e.involved_object.name.as_deref() == Some("loop")
    })
    .await?;
    assert!(step_jobs(&jobs, "loop").await?.is_empty() && step_jobs(&jobs, "typo").await?.is_empty());

    // Fixing the spec starts the run.
    api.patch(
        "typo",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"steps": four_steps()}})),
    )
    .await?;
    let r = wait_run(&api, "typo", 1).await?;
    assert_eq!(r.phase, RunPhase::Succeeded);
    Ok(())
}

#[tokio::test]
async fn killing_the_operator_mid_pipeline_duplicates_no_step_and_the_run_completes() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let (ws, _) = workspace_with_data(&admin, "pl-crash").await?;
    let api: Api<Pipeline> = Api::namespaced(admin.clone(), &ws.0);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.0);
    // Two layers of three parallel steps, 4 s each.
    let mut steps = vec![json!({"name": "first", "command": ["f", "${{outputs.o}}"], "outputs": {"o": {}}})];
    for i in 0..3 {
        steps.push(json!({"name": format!("mid{i}"), "inputs": {"x": "${{steps.first.outputs.o}}"},
                          "command": ["m", "${{params.i}}", "${{outputs.o}}"], "params": {"i": i}, "outputs": {"o": {}}}));
    }
    for i in 0..3 {
        steps.push(
            json!({"name": format!("last{i}"), "inputs": {"x": format!("${{{{steps.mid{i}.outputs.o}}}}")},
                          "command": ["l"]}),
        );
    }
    let mut p = pipeline("crash", json!(steps), json!({}))?;
    p.spec.pod_metadata = Some(serde_json::from_value(sim("4s"))?);
    api.create(&PostParams::default(), &p).await?;
    // Kill once the middle layer has started.
    eventually(Duration::from_secs(120), "middle layer started", || async {
        let n = step_jobs(&jobs, "crash").await?.len();
        Ok((n >= 2).then_some(n))
    })
    .await?;
    f.op.kill_operator();
    let made = step_jobs(&jobs, "crash").await?.len();
    eprintln!("killed the operator (-9) with {made} of 7 step Jobs made");
    tokio::time::sleep(Duration::from_secs(2)).await;
    f.op.restart_operator().await?;
    let r = wait_run(&api, "crash", 1).await?;
    assert_eq!(r.phase, RunPhase::Succeeded, "{:?}", outcome(&r));
    let all = step_jobs(&jobs, "crash").await?;
    let mut by_step: BTreeMap<String, usize> = BTreeMap::new();
    for j in &all {
        *by_step.entry(j.labels()["mlplane.io/step"].clone()).or_default() += 1;
    }
    assert_eq!(all.len(), 7, "{by_step:?}");
    assert!(by_step.values().all(|&n| n == 1), "{by_step:?}");
    // The cache outlived the operator: a rerun reuses every step.
    rerun(&api, "crash", "after-crash").await?;
    let r2 = wait_run(&api, "crash", 2).await?;
    assert!(ran(&r2).is_empty(), "{:?}", outcome(&r2));
    assert_eq!(reused(&r2).len(), 7);
    Ok(())
}

#[tokio::test]
async fn a_missing_data_asset_waits_and_starts_when_it_appears() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let ws = s3_workspace(&admin, &f.s3, "data", "pl-wait").await?;
    let api: Api<Pipeline> = Api::namespaced(admin.clone(), &ws.0);
    api.create(&PostParams::default(), &pipeline("early", four_steps(), json!({}))?)
        .await?;
    let p = wait_for(&api, "early", Duration::from_secs(60), "DataAssetNotFound", |p| {
        ready(p).1 == "DataAssetNotFound"
    })
    .await?;
    assert!(ready(&p).2.contains("spec.inputs.raw.dataAsset"), "{:?}", ready(&p));
    assert_eq!(p.status.as_ref().unwrap().phase, Some(RunPhase::Pending));
    let uri = format!("s3://data/{}/sales/", ws.0);
    f.s3.put(&uri, "jan.csv", b"a\n").await?;
    let da: DataAsset = serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "DataAsset", "metadata": {"name": "sales"},
        "spec": {"type": "UriFolder", "source": {"uri": uri, "secretRef": {"name": "s3"}}},
    }))?;
    Api::<DataAsset>::namespaced(admin.clone(), &ws.0)
        .create(&PostParams::default(), &da)
        .await?;
    let r = wait_run(&api, "early", 1).await?;
    assert_eq!(r.phase, RunPhase::Succeeded);
    let _ = r.inputs.get("raw").context("pinned")?;
    Ok(())
}

/// No hot loop: once a run has ended and a DataAsset has its version, a
/// reconcile (the fixture resyncs every 30 s) writes nothing to them.
#[tokio::test]
async fn converged_pipelines_and_data_assets_are_left_alone() -> Result<()> {
    let _ = fixture();
    let admin = admin_client().await?;
    let (ws, _) = workspace_with_data(&admin, "pl-quiet").await?;
    let api: Api<Pipeline> = Api::namespaced(admin.clone(), &ws.0);
    let assets: Api<DataAsset> = Api::namespaced(admin.clone(), &ws.0);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws.0);
    let steps = json!([
        {"name": "prep", "command": ["prep", "${{inputs.raw}}", "${{outputs.o}}"], "outputs": {"o": {}}},
        {"name": "fit", "inputs": {"x": "${{steps.prep.outputs.o}}"}, "command": ["fit", "${{inputs.x}}"]}
    ]);
    api.create(&PostParams::default(), &pipeline("quiet", steps, json!({}))?)
        .await?;
    let r = wait_run(&api, "quiet", 1).await?;
    assert_eq!(r.phase, RunPhase::Succeeded);
    // Let the last events settle, then take every resourceVersion.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let versions = || async {
        let mut v = vec![
            api.get("quiet").await?.resource_version(),
            assets.get("sales").await?.resource_version(),
        ];
        for j in step_jobs(&jobs, "quiet").await? {
            v.push(j.resource_version());
        }
        Ok::<_, anyhow::Error>(v)
    };
    let before = versions().await?;
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert_eq!(versions().await?, before, "a converged object was written");
    Ok(())
}
