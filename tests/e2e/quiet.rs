//! No hot loops: after convergence, an operator with a 5 s resync writes
//! nothing to the API server in 30 idle seconds (Lease renewals aside),
//! counted both by its own client metrics and by the API server's audit log.
//! Converged objects: Workspaces, Experiments with finished runs (a single
//! run, a failed run and a grid sweep), and a ComputeCluster with a node, a
//! finished run and a run that waits in its queue.

use std::time::Duration;

use anyhow::Result;
use kube::api::{Api, DeleteParams, PostParams};
use mlplane::api::{Experiment, Workspace};
use mlplane_test_support::*;
use serde_json::json;

#[tokio::test]
async fn converged_operator_writes_nothing_while_idle() -> Result<()> {
    let client = admin_client().await?;
    // A lease of its own, so this operator leads whatever else runs.
    let lease = format!("mlplane-quiet-{}", random_suffix());
    let op = Operator::start(&client, &["--resync-seconds", "5", "--lease-name", &lease]).await?;
    let api: Api<Workspace> = Api::all(client.clone());
    let mut names = vec![];
    for i in 0..3 {
        let name = format!("ws-quiet-{i}-{}", random_suffix());
        let ws: Workspace = serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "Workspace", "metadata": {"name": name},
            "spec": {
                "members": [{"kind": "User", "name": "alice", "role": "Contributor"}],
                "quota": {"cpu": "4", "memory": "8Gi", "gpu": 1},
                "storage": {"artifacts": {"pvc": {"size": "1Gi"}}},
                "networkIsolation": true,
                "deletionPolicy": if i == 0 { "Delete" } else { "Retain" },
            },
        }))?;
        api.create(&PostParams::default(), &ws).await?;
        names.push(name);
    }
    for name in &names {
        wait_for(&api, name, Duration::from_secs(60), "Workspace Ready", |w| {
            let s = serde_json::to_value(&w.status).unwrap_or_default();
            condition(&s, "Ready").is_some_and(|c| c["status"] == "True")
        })
        .await?;
    }
    // A ComputeCluster with a node (minNodes) that the first workspace uses.
    let cc_name = format!("cc-quiet-{}", random_suffix());
    let cc: mlplane::api::ComputeCluster = serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "ComputeCluster", "metadata": {"name": cc_name},
        "spec": {"provider": {"kwok": {}}, "idleTimeBeforeScaleDown": "1h",
                 "pools": [{"name": "cpu", "capacity": {"cpu": "4", "memory": "8Gi"}, "minNodes": 1, "maxNodes": 2}]},
    }))?;
    let ccs: Api<mlplane::api::ComputeCluster> = Api::all(client.clone());
    ccs.create(&PostParams::default(), &cc).await?;
    // Experiments in the first workspace, run to their end.
    let exps: Api<Experiment> = Api::namespaced(client.clone(), &names[0]);
    let base = json!({"environment": {"image": "python:3.12"}, "command": ["python", "train.py", "${{params.lr}}"],
                      "params": {"lr": 0.1}, "podMetadata": {"annotations": {"sim.mlplane.io/duration": "1s"}}});
    let mut failing = base.clone();
    failing["podMetadata"]["annotations"]["sim.mlplane.io/exit-code"] = json!("2");
    let mut sweep = base.clone();
    sweep["sweep"] = json!({"algorithm": "Grid", "searchSpace": {"lr": {"choice": [0.1, 0.2, 0.3]}},
                            "objective": {"metric": "accuracy", "goal": "Maximize"},
                            "limits": {"maxConcurrentTrials": 2}});
    // On the ComputeCluster: one run that ends, one that can never start
    // (it stays in the queue, which is looked at every few seconds).
    let mut on_cluster = base.clone();
    on_cluster["compute"] = json!(cc_name);
    let mut too_big = on_cluster.clone();
    too_big["distribution"] = json!({"type": "PyTorch", "nodes": 3});
    too_big["resources"] = json!({"cpu": "4", "memory": "1Gi"});
    for (name, spec, want) in [
        ("single", base, "Succeeded"),
        ("failing", failing, "Failed"),
        ("sweep", sweep, "Succeeded"),
        ("on-cluster", on_cluster, "Succeeded"),
        ("too-big", too_big, "Queued"),
    ] {
        let exp: Experiment = serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name}, "spec": spec,
        }))?;
        exps.create(&PostParams::default(), &exp).await?;
        wait_for(&exps, name, Duration::from_secs(90), want, |e| {
            serde_json::to_value(&e.status).unwrap_or_default()["phase"] == want
        })
        .await?;
    }
    // Objects that earlier test binaries deleted are this operator's work
    // too (their finalizers): wait until that cleanup is over, then let the
    // last status writes and their watch events settle.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let deleting = api
            .list(&Default::default())
            .await?
            .items
            .iter()
            .filter(|w| w.metadata.deletion_timestamp.is_some())
            .count()
            + ccs
                .list(&Default::default())
                .await?
                .items
                .iter()
                .filter(|c| c.metadata.deletion_timestamp.is_some())
                .count();
        if deleting == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let since = k8s_openapi::jiff::Timestamp::now();
    let before = op.writes_excluding_leases()?;
    let reconciles_before = op.metric("mlplane_reconcile_total", &[("kind", "Workspace")])?;
    let exp_reconciles_before = op.metric("mlplane_reconcile_total", &[("kind", "Experiment")])?;
    let cc_reconciles_before = op.metric("mlplane_reconcile_total", &[("kind", "ComputeCluster")])?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let cc_reconciles = op.metric("mlplane_reconcile_total", &[("kind", "ComputeCluster")])? - cc_reconciles_before;
    let after = op.writes_excluding_leases()?;
    let reconciles_after = op.metric("mlplane_reconcile_total", &[("kind", "Workspace")])?;
    let exp_reconciles = op.metric("mlplane_reconcile_total", &[("kind", "Experiment")])? - exp_reconciles_before;
    let audited = audited_writes(
        &format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"),
        since,
    )?;
    eprintln!(
        "idle 30 s: {} Workspace, {exp_reconciles} Experiment and {cc_reconciles} ComputeCluster reconciles, {} writes by client metrics, {} writes in the audit log",
        reconciles_after - reconciles_before,
        after - before,
        audited.len()
    );
    assert!(
        reconciles_after - reconciles_before >= 3.0,
        "resyncs happened during the window"
    );
    assert!(exp_reconciles >= 3.0, "Experiment resyncs happened during the window");
    assert!(cc_reconciles >= 3.0, "ComputeCluster passes happened during the window");
    assert_eq!(after - before, 0.0, "operator wrote while idle:\n{}", op.log_tail());
    assert!(audited.is_empty(), "audit log shows writes while idle: {audited:?}");
    let _ = ccs.delete(&cc_name, &DeleteParams::default()).await;
    for name in &names {
        let _ = api.delete(name, &DeleteParams::default()).await;
        let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .delete(name, &DeleteParams::default())
            .await;
    }
    Ok(())
}
