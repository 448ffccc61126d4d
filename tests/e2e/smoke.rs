//! Smoke tests of the local control plane itself (issue: local control plane):
//! the scheduler places GPU pods on GPU nodes, KWOK runs and fails Job pods as
//! told by annotations, the Deployment controller works, namespace deletion
//! completes, and RBAC refuses a ServiceAccount without bindings.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use mlplane_test_support::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn job(name: &str, annotations: serde_json::Value, gpu: bool) -> Job {
    let mut resources = json!({"requests": {"cpu": "100m", "memory": "64Mi"}});
    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "containers": [{"name": "main", "image": "busybox:1.36", "command": ["true"]}],
    });
    if gpu {
        resources = json!({"requests": {"cpu": "1"}, "limits": {"nvidia.com/gpu": "1"}});
        pod_spec["tolerations"] = json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]);
    }
    pod_spec["containers"][0]["resources"] = resources;
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"metadata": {"annotations": annotations}, "spec": pod_spec},
        },
    }))
    .unwrap()
}

fn job_condition(j: &Job, ty: &str) -> bool {
    j.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == ty && c.status == "True"))
}

#[tokio::test]
async fn gpu_job_lands_on_gpu_node_and_completes() -> Result<()> {
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "smoke-gpu").await?;
    let jobs: Api<Job> = ns.api();
    jobs.create(
        &PostParams::default(),
        &job("train", json!({"sim.mlplane.io/duration": "1s"}), true),
    )
    .await?;
    wait_for(&jobs, "train", T, "Job Complete", |j| job_condition(j, "Complete")).await?;

    let pods: Api<Pod> = ns.api();
    let pod = list(&pods, Some("batch.kubernetes.io/job-name=train")).await?.remove(0);
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("pod was scheduled");
    let node = Api::<Node>::all(client.clone()).get(&node_name).await?;
    let gpus = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("nvidia.com/gpu"))
        .map(|q| q.0.clone());
    assert_eq!(
        gpus.as_deref(),
        Some("1"),
        "pod landed on {node_name}, which has no GPU"
    );
    assert_eq!(
        node.labels().get("nvidia.com/gpu.present").map(String::as_str),
        Some("true")
    );
    Ok(())
}

#[tokio::test]
async fn job_told_to_fail_ends_failed_with_its_exit_code() -> Result<()> {
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "smoke-fail").await?;
    let jobs: Api<Job> = ns.api();
    let annotations = json!({
        "sim.mlplane.io/duration": "500ms",
        "sim.mlplane.io/exit-code": "3",
        "sim.mlplane.io/termination-message": "loss diverged",
    });
    jobs.create(&PostParams::default(), &job("crash", annotations, false))
        .await?;
    let j = wait_for(&jobs, "crash", T, "Job Failed", |j| job_condition(j, "Failed")).await?;
    assert_eq!(j.status.and_then(|s| s.failed), Some(1));

    let pods: Api<Pod> = ns.api();
    let pod = list(&pods, Some("batch.kubernetes.io/job-name=crash")).await?.remove(0);
    let status = pod.status.expect("pod status");
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    let terminated = status.container_statuses.expect("container statuses")[0]
        .state
        .as_ref()
        .and_then(|s| s.terminated.clone())
        .expect("terminated state");
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(terminated.reason.as_deref(), Some("Error"));
    assert_eq!(terminated.message.as_deref(), Some("loss diverged"));
    Ok(())
}

#[tokio::test]
async fn deployment_becomes_available() -> Result<()> {
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "smoke-deploy").await?;
    let deployments: Api<Deployment> = ns.api();
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27",
                    "resources": {"requests": {"cpu": "100m"}}}]},
            },
        },
    }))?;
    deployments.create(&PostParams::default(), &d).await?;
    let d = wait_for(
        &deployments,
        "web",
        T,
        "Deployment Available with 2 ready replicas",
        |d| {
            let s = d.status.as_ref();
            s.and_then(|s| s.ready_replicas) == Some(2)
                && s.and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Available" && c.status == "True"))
        },
    )
    .await?;
    assert_eq!(d.status.and_then(|s| s.available_replicas), Some(2));
    Ok(())
}

#[tokio::test]
async fn namespace_deletion_completes() -> Result<()> {
    let client = admin_client().await?;
    let name = format!("smoke-del-{}", random_suffix());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await?;
    // Content that the namespace controller and KWOK have to clean up.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "c"}, "data": {"k": "v"}}))?,
    )
    .await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &name);
    jobs.create(
        &PostParams::default(),
        &job("long", json!({"sim.mlplane.io/duration": "1h"}), false),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &name);
    eventually(T, "the Job's pod to run", || async {
        let running = list(&pods, None)
            .await?
            .into_iter()
            .any(|p| p.status.and_then(|s| s.phase).as_deref() == Some("Running"));
        Ok(running.then_some(()))
    })
    .await?;
    namespaces.delete(&name, &DeleteParams::default()).await?;
    wait_deleted(&namespaces, &name, Duration::from_secs(90)).await?;
    Ok(())
}

#[tokio::test]
async fn service_account_without_rbac_is_forbidden() -> Result<()> {
    let client = admin_client().await?;
    let ns = TestNamespace::create(&client, "smoke-rbac").await?;
    let sas: Api<ServiceAccount> = ns.api();
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "nobody"}}))?,
    )
    .await?;
    let sa_client = service_account_client(&client, &ns.name, "nobody").await?;

    let err = Api::<Pod>::namespaced(sa_client.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .expect_err("a ServiceAccount without RBAC must not list pods");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(
                s.message.contains(&format!("system:serviceaccount:{}:nobody", ns.name)),
                "{}",
                s.message
            );
        }
        other => panic!("expected 403, got {other:?}"),
    }
    // The token itself is valid: the API server knows who is asking.
    let review = sa_client
        .request::<serde_json::Value>(
            http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"
                }))?)?,
        )
        .await?;
    assert_eq!(
        review["status"]["userInfo"]["username"].as_str(),
        Some(format!("system:serviceaccount:{}:nobody", ns.name).as_str())
    );
    Ok(())
}
