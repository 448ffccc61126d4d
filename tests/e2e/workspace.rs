//! Workspace end to end, with the operator running out of cluster under
//! exactly the chart's RBAC: children, updates and orphans, member roles
//! (Contributor, Reader, Owner), both deletion policies, namespace conflicts.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{
    ConfigMap, LimitRange, Namespace, PersistentVolumeClaim, Pod, ResourceQuota, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use mlplane::api::Workspace;
use mlplane_test_support::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

fn workspace(name: &str, spec: serde_json::Value) -> Workspace {
    serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("valid Workspace")
}

async fn create_ready(client: &kube::Client, ws: Workspace) -> Result<Workspace> {
    create_ready_workspace(client, &ws.name_any(), serde_json::to_value(&ws.spec)?).await
}

/// Deletes a workspace at the end of a test; with Retain its namespace too.
async fn cleanup(client: &kube::Client, name: &str, ns: &str) {
    let _ = Api::<Workspace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn workspace_children_follow_the_spec() -> Result<()> {
    let client = admin_client().await?;
    let _op = shared_operator();
    let name = format!("ws-e2e-{}", random_suffix());
    let ws = create_ready(
        &client,
        workspace(
            &name,
            json!({
                "members": [
                    {"kind": "Group", "name": "vision-admins", "role": "Owner"},
                    {"kind": "User", "name": "alice@example.com", "role": "Contributor"},
                    {"kind": "User", "name": "bob@example.com", "role": "Reader"},
                ],
                "quota": {"cpu": "4", "memory": "8Gi", "gpu": 1, "maxActiveRuns": 3},
                "storage": {"artifacts": {"pvc": {"size": "1Gi"}}},
                "networkIsolation": true,
            }),
        ),
    )
    .await?;
    let status = ws.status.clone().expect("status");
    assert_eq!(status.namespace.as_deref(), Some(name.as_str()));
    assert_eq!(serde_json::to_value(status.phase)?, json!("Active"));
    assert!(status.usage.is_some(), "usage is reported");

    let ns = Api::<Namespace>::all(client.clone()).get(&name).await?;
    assert_eq!(ns.labels().get("mlplane.io/workspace"), Some(&name));
    assert_eq!(
        ns.labels().get("app.kubernetes.io/managed-by").map(String::as_str),
        Some("mlplane")
    );

    let rbs: Api<RoleBinding> = Api::namespaced(client.clone(), &name);
    let mut names: Vec<String> = list(&rbs, Some("mlplane.io/workspace"))
        .await?
        .iter()
        .map(|r| r.name_any())
        .collect();
    names.sort();
    assert_eq!(names, ["mlplane-contributor", "mlplane-owner", "mlplane-reader"]);
    let contributor = rbs.get("mlplane-contributor").await?;
    assert_eq!(contributor.role_ref.name, "mlplane-workspace-contributor");
    assert_eq!(contributor.subjects.unwrap()[0].name, "alice@example.com");

    let quota = Api::<ResourceQuota>::namespaced(client.clone(), &name)
        .get("mlplane-quota")
        .await?;
    let hard = quota.spec.unwrap().hard.unwrap();
    assert_eq!(hard["requests.cpu"].0, "4");
    assert_eq!(hard["requests.memory"].0, "8Gi");
    assert_eq!(hard["requests.nvidia.com/gpu"].0, "1");
    Api::<LimitRange>::namespaced(client.clone(), &name)
        .get("mlplane-defaults")
        .await?;
    Api::<ServiceAccount>::namespaced(client.clone(), &name)
        .get("mlplane-run")
        .await?;
    Api::<NetworkPolicy>::namespaced(client.clone(), &name)
        .get("mlplane-isolation")
        .await?;
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &name)
        .get("mlplane-artifacts")
        .await?;
    assert!(
        pvc.owner_references().is_empty(),
        "the artifacts PVC is not garbage-collected"
    );
    wait_for_event(&client, "default", T, "a Created event on the Workspace", |e| {
        e.involved_object.name.as_deref() == Some(name.as_str()) && e.reason.as_deref() == Some("Created")
    })
    .await?;

    // Change the spec: a role loses its members, isolation off, quota up.
    let api: Api<Workspace> = Api::all(client.clone());
    let patch = json!({"spec": {
        "members": [
            {"kind": "Group", "name": "vision-admins", "role": "Owner"},
            {"kind": "User", "name": "alice@example.com", "role": "Contributor"},
        ],
        "quota": {"cpu": "8", "memory": "8Gi", "gpu": 1, "maxActiveRuns": 3},
        "networkIsolation": false,
    }});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_for(&api, &name, T, "Workspace Ready at the new generation", workspace_ready).await?;
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), &name);
    eventually(T, "reader binding and network policy removed", || async {
        let gone = rbs.get_opt("mlplane-reader").await?.is_none() && nps.get_opt("mlplane-isolation").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    let quota = Api::<ResourceQuota>::namespaced(client.clone(), &name)
        .get("mlplane-quota")
        .await?;
    assert_eq!(quota.spec.unwrap().hard.unwrap()["requests.cpu"].0, "8");

    // A child deleted by hand comes back.
    Api::<ServiceAccount>::namespaced(client.clone(), &name)
        .delete("mlplane-run", &DeleteParams::default())
        .await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    eventually(T, "mlplane-run recreated", || async {
        Ok(sas.get_opt("mlplane-run").await?)
    })
    .await?;

    cleanup(&client, &name, &name).await;
    Ok(())
}

fn dynamic(client: &kube::Client, ns: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("mlplane.io", "v1alpha1", kind), plural);
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn experiment(name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1",
        "kind": "Experiment",
        "metadata": {"name": name},
        "spec": {
            "compute": "cpu",
            "environment": {"image": "python:3.12-slim"},
            "command": ["python", "train.py"],
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn member_roles_grant_what_they_promise() -> Result<()> {
    let client = admin_client().await?;
    let _op = shared_operator();
    let name = format!("ws-roles-{}", random_suffix());
    create_ready(
        &client,
        workspace(
            &name,
            json!({"members": [
                {"kind": "User", "name": "carol", "role": "Contributor"},
                {"kind": "User", "name": "rita", "role": "Reader"},
                {"kind": "Group", "name": "owners-of-roles", "role": "Owner"},
            ]}),
        ),
    )
    .await?;
    let carol = user_client("carol", &[]).await?;
    let rita = user_client("rita", &[]).await?;
    let owen = user_client("owen", &["owners-of-roles"]).await?;

    // A Contributor creates Experiments and reads pods and Jobs.
    let carol_exps = dynamic(&carol, &name, "Experiment", "experiments");
    let created = eventually(T, "Contributor may create an Experiment", || async {
        match carol_exps.create(&PostParams::default(), &experiment("by-carol")).await {
            Ok(o) => Ok(Some(o)),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    assert_eq!(created.name_any(), "by-carol");
    Api::<Pod>::namespaced(carol.clone(), &name)
        .list(&ListParams::default())
        .await?;
    Api::<k8s_openapi::api::batch::v1::Job>::namespaced(carol.clone(), &name)
        .list(&ListParams::default())
        .await?;
    // ...but neither Workspaces nor ComputeClusters.
    let cc: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "ComputeCluster",
        "metadata": {"name": format!("cc-{name}")},
        "spec": {"provider": {"kwok": {}}, "pools": [{"name": "cpu", "capacity": {"cpu": "8"}, "maxNodes": 1}]},
    }))?;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("mlplane.io", "v1alpha1", "ComputeCluster"),
        "computeclusters",
    );
    let r = Api::<DynamicObject>::all_with(carol.clone(), &ar)
        .create(&PostParams::default(), &cc)
        .await;
    assert_eq!(
        api_code(&r),
        403,
        "a Contributor must not create ComputeClusters: {r:?}"
    );
    let r = Api::<Workspace>::all(carol.clone())
        .create(&PostParams::default(), &workspace(&format!("{name}-x"), json!({})))
        .await;
    assert_eq!(api_code(&r), 403, "a Contributor must not create Workspaces: {r:?}");

    // A Reader reads but creates nothing.
    let rita_exps = dynamic(&rita, &name, "Experiment", "experiments");
    eventually(T, "Reader may list Experiments", || async {
        Ok(Some(rita_exps.list(&ListParams::default()).await?))
    })
    .await?;
    let r = rita_exps.create(&PostParams::default(), &experiment("by-rita")).await;
    assert_eq!(api_code(&r), 403, "a Reader must not create Experiments: {r:?}");
    let r = Api::<ConfigMap>::namespaced(rita.clone(), &name)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
        )
        .await;
    assert_eq!(api_code(&r), 403, "a Reader must not create anything: {r:?}");
    let r = Api::<Pod>::namespaced(rita.clone(), &name)
        .list(&ListParams::default())
        .await;
    assert!(r.is_ok(), "a Reader reads pods: {r:?}");

    // An Owner (through a group) creates and deletes; the Reader cannot delete.
    let owen_exps = dynamic(&owen, &name, "Experiment", "experiments");
    let r = rita_exps.delete("by-carol", &DeleteParams::default()).await;
    assert_eq!(api_code(&r), 403);
    eventually(T, "Owner may delete an Experiment", || async {
        Ok(Some(owen_exps.delete("by-carol", &DeleteParams::default()).await?))
    })
    .await?;
    // Nobody outside the workspace gets in.
    let eve = user_client("eve", &[]).await?;
    let r = dynamic(&eve, &name, "Experiment", "experiments")
        .list(&ListParams::default())
        .await;
    assert_eq!(api_code(&r), 403);

    cleanup(&client, &name, &name).await;
    Ok(())
}

#[tokio::test]
async fn retain_policy_keeps_namespace_and_data() -> Result<()> {
    let client = admin_client().await?;
    let _op = shared_operator();
    let name = format!("ws-retain-{}", random_suffix());
    let ws = create_ready(
        &client,
        workspace(&name, json!({"storage": {"artifacts": {"pvc": {"size": "1Gi"}}}})),
    )
    .await?;
    assert!(ws.finalizers().is_empty(), "Retain needs no finalizer");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "results"}, "data": {"acc": "0.93"}}))?,
    )
    .await?;

    let api: Api<Workspace> = Api::all(client.clone());
    api.delete(&name, &DeleteParams::default()).await?;
    wait_deleted(&api, &name, T).await?;
    // Give the garbage collector time to act on the owned children.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    eventually(T, "owned children garbage-collected", || async {
        Ok(sas.get_opt("mlplane-run").await?.is_none().then_some(()))
    })
    .await?;
    let ns = Api::<Namespace>::all(client.clone()).get(&name).await?;
    assert!(ns.metadata.deletion_timestamp.is_none(), "namespace kept");
    assert_eq!(cms.get("results").await?.data.unwrap()["acc"], "0.93");
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &name)
        .get("mlplane-artifacts")
        .await?;
    cleanup(&client, &name, &name).await;
    Ok(())
}

#[tokio::test]
async fn delete_policy_removes_the_namespace() -> Result<()> {
    let client = admin_client().await?;
    let _op = shared_operator();
    let name = format!("ws-delete-{}", random_suffix());
    let api: Api<Workspace> = Api::all(client.clone());
    create_ready(&client, workspace(&name, json!({"deletionPolicy": "Delete"}))).await?;
    let ws = wait_for(&api, &name, T, "cleanup finalizer", |w| {
        w.finalizers().iter().any(|f| f == "mlplane.io/workspace-cleanup")
    })
    .await?;
    assert!(workspace_ready(&ws));
    api.delete(&name, &DeleteParams::default()).await?;
    wait_deleted(&api, &name, Duration::from_secs(90)).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    wait_deleted(&namespaces, &name, Duration::from_secs(90)).await?;
    Ok(())
}

#[tokio::test]
async fn a_namespace_of_another_workspace_is_refused() -> Result<()> {
    let client = admin_client().await?;
    let _op = shared_operator();
    let first = format!("ws-first-{}", random_suffix());
    create_ready(&client, workspace(&first, json!({}))).await?;
    let second = format!("ws-second-{}", random_suffix());
    let api: Api<Workspace> = Api::all(client.clone());
    api.create(&PostParams::default(), &workspace(&second, json!({"namespace": first})))
        .await?;
    let ws = wait_for(&api, &second, T, "Ready=False NamespaceConflict", |w| {
        let s = serde_json::to_value(&w.status).unwrap_or_default();
        condition(&s, "Ready").is_some_and(|c| c["status"] == "False" && c["reason"] == "NamespaceConflict")
    })
    .await?;
    let msg = serde_json::to_value(&ws.status)?;
    let msg = condition(&msg, "Ready").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("spec.namespace") && msg.contains(&first), "{msg}");
    let _ = api.delete(&second, &DeleteParams::default()).await;
    cleanup(&client, &first, &first).await;
    Ok(())
}
