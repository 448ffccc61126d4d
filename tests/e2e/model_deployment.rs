//! The ModelDeployment controller against the local control plane, with the
//! Gateway API CRDs installed from the published sigs.k8s.io/gateway-api
//! module (no Gateway implementation: the tests read the HTTPRoutes the
//! operator writes). The operator runs out of cluster with exactly the
//! chart's RBAC, attaching routes to the Gateway `infra/public` under the
//! domain `models.test`, with a short rollout deadline; a tracking server
//! gives Experiments their best runs. KWOK plays the serving pods (ready at
//! once, or never with `sim.mlplane.io/never-ready` through `podMetadata`).

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use mlplane::api::{Experiment, ModelDeployment};
use mlplane::controllers::model_deployment::runtime::RuntimeCatalog;
use mlplane_test_support::*;
use serde_json::{Value, json};

/// Seconds a serving rollout may stall before `RolloutStalled`.
const ROLLOUT_DEADLINE: &str = "20";
const TIMEOUT: Duration = Duration::from_secs(90);

struct Fixture {
    tracking: TrackingServer,
    operator: Operator,
}

fn fixture() -> &'static Fixture {
    static FIX: OnceLock<Fixture> = OnceLock::new();
    FIX.get_or_init(|| {
        block_on_thread(async {
            let admin = admin_client().await?;
            install_chart()?;
            install_gateway_api_crds()?;
            let tracking = authenticated_tracking_server(&admin, "md").await?;
            // A lease of its own: this operator leads at once.
            let lease = format!("mlplane-md-test-{}", random_suffix());
            let operator = Operator::start(
                &admin,
                &[
                    "--tracking-url",
                    &tracking.url(),
                    "--lease-name",
                    &lease,
                    "--resync-seconds",
                    "30",
                    "--gateway",
                    "infra/public",
                    "--gateway-domain",
                    "models.test",
                    "--rollout-deadline-seconds",
                    ROLLOUT_DEADLINE,
                ],
            )
            .await?;
            Ok(Fixture { tracking, operator })
        })
        .expect("the model deployment test fixture starts")
    })
}

/// A namespace with the operator running (and the Gateway API CRDs).
async fn namespace(admin: &Client, prefix: &str) -> Result<TestNamespace> {
    let _ = fixture();
    TestNamespace::create(admin, prefix).await
}

fn model_deployment(name: &str, spec: Value) -> Result<ModelDeployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name}, "spec": spec,
    }))?)
}

fn onnx(name: &str, extra: Value) -> Value {
    let mut d = json!({"name": name, "model": {"uri": format!("s3://models/resnet/{name}/"), "format": "ONNX"},
                       "resources": {"cpu": "100m", "memory": "128Mi"}});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        d[k] = v;
    }
    d
}

fn never_ready() -> Value {
    json!({"podMetadata": {"annotations": {"sim.mlplane.io/never-ready": "true"}}})
}

fn status(md: &ModelDeployment) -> Value {
    serde_json::to_value(&md.status).unwrap_or_default()
}

fn ready_reason(md: &ModelDeployment) -> String {
    condition(&status(md), "Ready")
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// `(desired, effective)` traffic of each deployment, in spec order.
fn traffic(md: &ModelDeployment) -> Vec<(String, i64, i64)> {
    status(md)["deployments"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap_or_default().to_string(),
                d["traffic"].as_i64().unwrap_or(0),
                d["effectiveTraffic"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

fn split(pairs: &[(&str, i64, i64)]) -> Vec<(String, i64, i64)> {
    pairs.iter().map(|(n, t, e)| (n.to_string(), *t, *e)).collect()
}

/// Whether status is of the current generation and Ready=True.
fn is_ready(md: &ModelDeployment) -> bool {
    md.status
        .as_ref()
        .is_some_and(|s| s.observed_generation == md.metadata.generation && mlplane::api::is_ready(&s.conditions))
}

async fn wait_md(
    api: &Api<ModelDeployment>,
    name: &str,
    what: &str,
    f: impl Fn(&ModelDeployment) -> bool,
) -> Result<ModelDeployment> {
    wait_for(api, name, TIMEOUT, what, f).await
}

fn routes_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    );
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// `(backend Service, weight)` of the route's first rule.
fn weights(route: &DynamicObject) -> Vec<(String, i64)> {
    route.data["spec"]["rules"][0]["backendRefs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or_default().to_string(),
                b["weight"].as_i64().unwrap_or(1),
            )
        })
        .collect()
}

fn pairs(p: &[(&str, i64)]) -> Vec<(String, i64)> {
    p.iter().map(|(n, w)| (n.to_string(), *w)).collect()
}

async fn merge(api: &Api<ModelDeployment>, name: &str, patch: Value) -> Result<()> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await?;
    Ok(())
}

#[tokio::test]
async fn two_deployments_at_90_10_give_an_httproute_with_those_weights() -> Result<()> {
    let admin = admin_client().await?;
    let ns = namespace(&admin, "md-split").await?;
    let api: Api<ModelDeployment> = ns.api();
    let spec = json!({"deployments": [onnx("blue", json!({})), onnx("green", json!({}))],
                      "traffic": {"blue": 90, "green": 10}});
    api.create(&PostParams::default(), &model_deployment("resnet", spec)?)
        .await?;
    let md = wait_md(&api, "resnet", "Ready at 90/10", is_ready).await?;
    assert_eq!(traffic(&md), split(&[("blue", 90, 90), ("green", 10, 10)]));
    let s = status(&md);
    assert_eq!(s["endpoint"], format!("http://resnet.{}.svc", ns.name));
    assert_eq!(s["phase"], "Ready");
    assert_eq!(s["deployments"][0]["readyReplicas"], 1);

    let route = routes_api(&admin, &ns.name).get("resnet").await?;
    assert_eq!(weights(&route), pairs(&[("resnet-blue", 90), ("resnet-green", 10)]));
    assert_eq!(
        route.data["spec"]["parentRefs"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "infra", "name": "public"},
               {"group": "", "kind": "Service", "name": "resnet", "port": 80}])
    );
    assert_eq!(
        route.data["spec"]["hostnames"],
        json!([format!("resnet-{}.models.test", ns.name)])
    );
    // One Deployment and Service per deployment, and the endpoint Service.
    let services: Api<Service> = ns.api();
    let names: BTreeSet<String> = list(&services, Some("mlplane.io/model-deployment=resnet"))
        .await?
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["resnet".into(), "resnet-blue".into(), "resnet-green".into()])
    );
    let endpoint = services.get("resnet").await?;
    assert_eq!(
        endpoint.spec.unwrap().selector.unwrap()["mlplane.io/deployment"],
        "blue"
    );
    let deployments: Api<Deployment> = ns.api();
    let blue = deployments.get("resnet-blue").await?;
    let pod = blue.spec.unwrap().template.spec.unwrap();
    let fetch = &pod.init_containers.unwrap()[0];
    assert_eq!(
        fetch.args.as_ref().unwrap(),
        &["fetch", "--source", "s3://models/resnet/blue/", "--dest", "/mnt/models"]
    );
    assert!(
        pod.containers[0]
            .image
            .as_ref()
            .unwrap()
            .starts_with("nvcr.io/nvidia/tritonserver:")
    );
    wait_for_event(&admin, &ns.name, TIMEOUT, "TrafficShifted", |e| {
        e.reason.as_deref() == Some("TrafficShifted")
            && e.message.as_deref().unwrap_or_default().contains("blue 90, green 10")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_mirror_gives_the_request_mirror_filter() -> Result<()> {
    let admin = admin_client().await?;
    let ns = namespace(&admin, "md-mirror").await?;
    let api: Api<ModelDeployment> = ns.api();
    let spec = json!({"deployments": [onnx("blue", json!({})), onnx("green", json!({}))],
                      "traffic": {"blue": 100, "green": 0}, "mirrorTraffic": {"green": 10}});
    api.create(&PostParams::default(), &model_deployment("resnet", spec)?)
        .await?;
    let md = wait_md(&api, "resnet", "Ready with the mirror", is_ready).await?;
    assert_eq!(status(&md)["deployments"][1]["mirrorTraffic"], 10);
    let route = routes_api(&admin, &ns.name).get("resnet").await?;
    assert_eq!(weights(&route), pairs(&[("resnet-blue", 100), ("resnet-green", 0)]));
    assert_eq!(
        route.data["spec"]["rules"][0]["filters"],
        json!([{"type": "RequestMirror", "requestMirror": {
            "backendRef": {"group": "", "kind": "Service", "name": "resnet-green", "port": 80}, "percent": 10}}])
    );
    // Mirror removed: the filter goes.
    api.patch(
        "resnet",
        &PatchParams::default(),
        &Patch::Json::<()>(serde_json::from_value(
            json!([{"op": "remove", "path": "/spec/mirrorTraffic"}]),
        )?),
    )
    .await?;
    wait_md(&api, "resnet", "Ready without the mirror", is_ready).await?;
    let routes = routes_api(&admin, &ns.name);
    eventually(TIMEOUT, "the RequestMirror filter removed", || async {
        let r = routes.get("resnet").await?;
        Ok(r.data["spec"]["rules"][0].get("filters").is_none().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn moving_traffic_to_a_deployment_whose_pods_are_not_ready_keeps_the_effective_split_until_they_are() -> Result<()>
{
    let admin = admin_client().await?;
    let ns = namespace(&admin, "md-rollout").await?;
    let api: Api<ModelDeployment> = ns.api();
    let routes = routes_api(&admin, &ns.name);
    let spec = json!({"deployments": [onnx("blue", json!({})), onnx("green", never_ready())],
                      "traffic": {"blue": 100, "green": 0}});
    api.create(&PostParams::default(), &model_deployment("resnet", spec)?)
        .await?;
    wait_md(&api, "resnet", "blue serving", |m| {
        traffic(m).first().is_some_and(|t| t.2 == 100)
    })
    .await?;

    // Move everything to green, whose pods never become ready.
    merge(&api, "resnet", json!({"spec": {"traffic": {"blue": 0, "green": 100}}})).await?;
    let md = wait_md(&api, "resnet", "generation 2 observed", |m| {
        m.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
    })
    .await?;
    assert_eq!(traffic(&md), split(&[("blue", 0, 100), ("green", 100, 0)]));
    assert!(!is_ready(&md));
    let route = routes.get("resnet").await?;
    assert_eq!(weights(&route), pairs(&[("resnet-blue", 100), ("resnet-green", 0)]));
    let endpoint: Service = ns.api().get("resnet").await?;
    assert_eq!(
        endpoint.spec.unwrap().selector.unwrap()["mlplane.io/deployment"],
        "blue"
    );

    // Past the progress deadline: RolloutStalled, and blue still serves.
    let t0 = Instant::now();
    let md = wait_md(&api, "resnet", "RolloutStalled", |m| {
        ready_reason(m) == "RolloutStalled"
    })
    .await?;
    eprintln!("RolloutStalled {:?} after the traffic change", t0.elapsed());
    assert_eq!(traffic(&md), split(&[("blue", 0, 100), ("green", 100, 0)]));
    assert_eq!(status(&md)["phase"], "Degraded");
    assert_eq!(
        weights(&routes.get("resnet").await?),
        pairs(&[("resnet-blue", 100), ("resnet-green", 0)])
    );
    wait_for_event(&admin, &ns.name, TIMEOUT, "RolloutStalled event", |e| {
        e.reason.as_deref() == Some("RolloutStalled")
    })
    .await?;

    // Green fixed (its pods now become ready): the traffic moves.
    merge(
        &api,
        "resnet",
        json!({"spec": {"deployments": [onnx("blue", json!({})), onnx("green", json!({}))]}}),
    )
    .await?;
    let md = wait_md(&api, "resnet", "green serving", is_ready).await?;
    assert_eq!(traffic(&md), split(&[("blue", 0, 0), ("green", 100, 100)]));
    // The annotation dropped from the spec left the Deployment.
    let green: Deployment = ns.api().get("resnet-green").await?;
    let template = green.spec.unwrap().template.metadata.unwrap_or_default();
    assert!(
        !template
            .annotations
            .unwrap_or_default()
            .contains_key("sim.mlplane.io/never-ready"),
        "the removed annotation is gone from the pod template"
    );
    assert_eq!(
        weights(&routes.get("resnet").await?),
        pairs(&[("resnet-blue", 0), ("resnet-green", 100)])
    );
    let endpoint: Service = ns.api().get("resnet").await?;
    assert_eq!(
        endpoint.spec.unwrap().selector.unwrap()["mlplane.io/deployment"],
        "green"
    );
    Ok(())
}

#[tokio::test]
async fn scale_settings_give_the_horizontal_pod_autoscaler() -> Result<()> {
    let admin = admin_client().await?;
    let ns = namespace(&admin, "md-scale").await?;
    let api: Api<ModelDeployment> = ns.api();
    let hpas: Api<HorizontalPodAutoscaler> = ns.api();
    let deployments: Api<Deployment> = ns.api();
    let scale = json!({"scale": {"minInstances": 2, "maxInstances": 5, "targetUtilization": 60}});
    api.create(
        &PostParams::default(),
        &model_deployment("resnet", json!({"deployments": [onnx("blue", scale)]}))?,
    )
    .await?;
    let hpa = wait_for(&hpas, "resnet-blue", TIMEOUT, "HPA", |_| true).await?;
    let spec = hpa.spec;
    assert_eq!(spec.scale_target_ref.kind, "Deployment");
    assert_eq!(spec.scale_target_ref.name, "resnet-blue");
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 5));
    let metric = &spec.metrics.unwrap()[0];
    let resource = metric.resource.as_ref().unwrap();
    assert_eq!(
        (resource.name.as_str(), resource.target.average_utilization),
        ("cpu", Some(60))
    );
    // The Deployment's replicas are the autoscaler's. Scaled as the HPA
    // would (the local cluster has no metrics), then updated by the operator
    // for a spec change: the count stays, and the operator's apply entry (its
    // creation entry, upgraded at that first update) does not own replicas.
    deployments
        .patch_scale(
            "resnet-blue",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await?;
    let annotated = json!({"scale": {"minInstances": 2, "maxInstances": 5, "targetUtilization": 60},
                           "podMetadata": {"annotations": {"example.com/note": "second"}}});
    merge(
        &api,
        "resnet",
        json!({"spec": {"deployments": [onnx("blue", annotated)]}}),
    )
    .await?;
    let d = wait_for(&deployments, "resnet-blue", TIMEOUT, "the new pod annotation", |d| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .is_some_and(|a| a.get("example.com/note").map(String::as_str) == Some("second"))
    })
    .await?;
    assert_eq!(
        d.spec.as_ref().and_then(|s| s.replicas),
        Some(4),
        "an update reset the autoscaler's replicas"
    );
    let ours: Vec<_> = d
        .managed_fields()
        .iter()
        .filter(|m| m.manager.as_deref() == Some("mlplane"))
        .collect();
    assert!(
        ours.iter().all(|m| m.operation.as_deref() == Some("Apply")),
        "the creation entry became the apply entry: {ours:?}"
    );
    let owns_replicas = ours.iter().any(|m| {
        m.fields_v1
            .as_ref()
            .is_some_and(|f| f.0.to_string().contains("\"f:replicas\""))
    });
    assert!(
        !owns_replicas,
        "mlplane must not apply spec.replicas of an autoscaled Deployment"
    );

    // A fixed instance count: the autoscaler goes, replicas are set.
    merge(
        &api,
        "resnet",
        json!({"spec": {"deployments": [onnx("blue", json!({"scale": {"instanceCount": 3}}))]}}),
    )
    .await?;
    wait_deleted(&hpas, "resnet-blue", TIMEOUT).await?;
    wait_for(&deployments, "resnet-blue", TIMEOUT, "3 replicas", |d| {
        d.spec.as_ref().and_then(|s| s.replicas) == Some(3)
    })
    .await?;
    let md = wait_md(&api, "resnet", "Ready with 3 replicas", |m| {
        is_ready(m) && status(m)["deployments"][0]["readyReplicas"] == 3
    })
    .await?;
    assert_eq!(status(&md)["deployments"][0]["replicas"], 3);
    Ok(())
}

/// Plays the training script of every trial of `exp`: logs its accuracy
/// (by learning rate) while it runs.
async fn log_trials(jobs: &Api<Job>, exp: &str, token: &str, accuracy: &[(&str, f64)]) -> Result<()> {
    let mlflow = Mlflow::new(fixture().tracking.url());
    let mut logged = BTreeSet::new();
    let t0 = Instant::now();
    while logged.len() < accuracy.len() {
        if t0.elapsed() > TIMEOUT {
            bail!("only {} trials started", logged.len());
        }
        let selector = format!("mlplane.io/experiment={exp}");
        for j in jobs.list(&ListParams::default().labels(&selector)).await?.items {
            if logged.contains(&j.name_any()) {
                continue;
            }
            let c = &j.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
            let lr = c.command.as_ref().unwrap()[3].clone();
            let run_id = c
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "MLFLOW_RUN_ID")
                .and_then(|e| e.value.clone())
                .context("MLFLOW_RUN_ID")?;
            let value = accuracy.iter().find(|(l, _)| *l == lr).context("lr")?.1;
            mlflow.log_metric(token, &run_id, "accuracy", value, 1).await?;
            logged.insert(j.name_any());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_model_taken_from_an_experiments_best_run_resolves_to_that_runs_output() -> Result<()> {
    let admin = admin_client().await?;
    let _ = fixture();
    let ws = format!("md-best-{}", random_suffix());
    create_ready_workspace(
        &admin,
        &ws,
        json!({"deletionPolicy": "Delete",
               "storage": {"artifacts": {"uri": "s3://ml-artifacts/vision", "secretRef": {"name": "s3-creds"}}}}),
    )
    .await?;
    let _ws = WorkspaceGuard(ws.clone());
    let token = workspace_run_token(&admin, &ws).await?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ws);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "s3-creds"},
                "stringData": {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}}))?,
        )
        .await?;
    let exps: Api<Experiment> = Api::namespaced(admin.clone(), &ws);
    let exp: Experiment = serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "resnet"},
        "spec": {
            "environment": {"image": "python:3.12"},
            "command": ["python", "train.py", "--lr", "${{params.lr}}", "--out", "${{outputs.model}}"],
            "outputs": {"model": {}},
            "podMetadata": {"annotations": {"sim.mlplane.io/duration": "4s"}},
            "sweep": {"algorithm": "Grid", "searchSpace": {"lr": {"choice": [0.1, 0.2]}},
                      "objective": {"metric": "accuracy", "goal": "Maximize"},
                      "limits": {"maxConcurrentTrials": 2}},
        },
    }))?;
    exps.create(&PostParams::default(), &exp).await?;
    // The ModelDeployment first: it waits for a best run.
    let api: Api<ModelDeployment> = Api::namespaced(admin.clone(), &ws);
    let spec = json!({"deployments": [{"name": "best", "resources": {"cpu": "100m", "memory": "128Mi"},
        "model": {"experiment": "resnet", "run": "best", "output": "model", "format": "ONNX"}}]});
    api.create(&PostParams::default(), &model_deployment("resnet", spec)?)
        .await?;
    let waiting = wait_md(&api, "resnet", "RunNotFound", |m| ready_reason(m) == "RunNotFound").await?;
    assert_eq!(status(&waiting)["phase"], "Pending");

    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ws);
    log_trials(&jobs, "resnet", &token, &[("0.1", 0.72), ("0.2", 0.91)]).await?;
    let done = wait_for(&exps, "resnet", TIMEOUT, "sweep Succeeded", |e| {
        serde_json::to_value(&e.status).unwrap_or_default()["phase"] == "Succeeded"
    })
    .await?;
    let best = serde_json::to_value(&done.status)?["bestRun"]["name"]
        .as_str()
        .context("bestRun")?
        .to_string();
    assert_eq!(best, "resnet-1-t1");

    let md = wait_md(&api, "resnet", "Ready on the best run", is_ready).await?;
    let location = format!("s3://ml-artifacts/vision/experiments/resnet/{best}/model");
    assert_eq!(
        status(&md)["deployments"][0]["model"],
        json!({"uri": location, "experiment": "resnet", "run": best, "output": "model",
               "sourceHash": status(&md)["deployments"][0]["model"]["sourceHash"]})
    );
    let d: Deployment = Api::namespaced(admin.clone(), &ws).get("resnet-best").await?;
    let fetch = &d.spec.unwrap().template.spec.unwrap().init_containers.unwrap()[0];
    assert_eq!(fetch.args.as_ref().unwrap()[2], location);
    assert_eq!(
        fetch.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name,
        "s3-creds"
    );
    wait_for_event(&admin, &ws, TIMEOUT, "ModelResolved", |e| {
        e.reason.as_deref() == Some("ModelResolved") && e.message.as_deref().unwrap_or_default().contains(&best)
    })
    .await?;
    Ok(())
}

/// Deletes a Workspace (and with it its namespace) when dropped.
struct WorkspaceGuard(String);

impl Drop for WorkspaceGuard {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "workspace", &self.0, "--wait=false"]);
    }
}

async fn refused(api: &Api<ModelDeployment>, spec: Value) -> Result<String> {
    let md = model_deployment("resnet", spec)?;
    match api
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &md,
        )
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 422 => Ok(s.message),
        other => bail!("expected 422, got {other:?}"),
    }
}

#[tokio::test]
async fn the_api_server_refuses_traffic_summing_to_110_a_mirror_above_50_and_a_mirror_on_live_traffic() -> Result<()> {
    install_crds()?;
    let admin = admin_client().await?;
    let ns = TestNamespace::create(&admin, "md-admission").await?;
    let api: Api<ModelDeployment> = ns.api();
    let two = json!([onnx("blue", json!({})), onnx("green", json!({}))]);
    let m = refused(&api, json!({"deployments": two, "traffic": {"blue": 90, "green": 20}})).await?;
    assert!(m.contains("spec.traffic values must sum to 0 or 100"), "{m}");
    let m = refused(
        &api,
        json!({"deployments": two, "traffic": {"blue": 100}, "mirrorTraffic": {"green": 51}}),
    )
    .await?;
    assert!(
        m.contains("spec.mirrorTraffic.green in body should be less than or equal to 50"),
        "{m}"
    );
    let m = refused(
        &api,
        json!({"deployments": two, "traffic": {"blue": 90, "green": 10}, "mirrorTraffic": {"green": 10}}),
    )
    .await?;
    assert!(
        m.contains("spec.mirrorTraffic must target a deployment with no live traffic"),
        "{m}"
    );
    let m = refused(
        &api,
        json!({"deployments": [onnx("blue", json!({"scale": {"minInstances": 0, "maxInstances": 2}}))]}),
    )
    .await?;
    assert!(
        m.contains("spec.deployments[0].scale.minInstances in body should be greater than or equal to 1"),
        "{m}"
    );
    Ok(())
}

#[tokio::test]
async fn deleting_the_model_deployment_removes_everything_it_made() -> Result<()> {
    let admin = admin_client().await?;
    let ns = namespace(&admin, "md-delete").await?;
    let api: Api<ModelDeployment> = ns.api();
    let spec = json!({"deployments": [onnx("blue", json!({"scale": {"maxInstances": 3}})), onnx("green", json!({}))],
                      "traffic": {"blue": 50, "green": 50}});
    api.create(&PostParams::default(), &model_deployment("resnet", spec)?)
        .await?;
    wait_md(&api, "resnet", "Ready", is_ready).await?;
    let selector = "mlplane.io/model-deployment=resnet";
    let deployments: Api<Deployment> = ns.api();
    let services: Api<Service> = ns.api();
    let hpas: Api<HorizontalPodAutoscaler> = ns.api();
    let routes = routes_api(&admin, &ns.name);
    assert_eq!(list(&deployments, Some(selector)).await?.len(), 2);
    assert_eq!(list(&services, Some(selector)).await?.len(), 3);
    assert_eq!(list(&hpas, Some(selector)).await?.len(), 1);
    assert_eq!(
        routes.list(&ListParams::default().labels(selector)).await?.items.len(),
        1
    );
    let pods: Api<k8s_openapi::api::core::v1::Pod> = ns.api();
    assert!(!list(&pods, Some(selector)).await?.is_empty());

    api.delete("resnet", &DeleteParams::foreground()).await?;
    wait_deleted(&api, "resnet", TIMEOUT).await?;
    eventually(TIMEOUT, "every child gone", || async {
        let left = list(&deployments, Some(selector)).await?.len()
            + list(&services, Some(selector)).await?.len()
            + list(&hpas, Some(selector)).await?.len()
            + routes.list(&ListParams::default().labels(selector)).await?.items.len()
            + list(&pods, Some(selector)).await?.len();
        Ok((left == 0).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_service_name_held_by_someone_else_is_a_name_conflict_until_it_is_freed() -> Result<()> {
    let admin = admin_client().await?;
    let ns = namespace(&admin, "md-conflict").await?;
    let services: Api<Service> = ns.api();
    // Someone else's Service (no mlplane label, no owner) where the
    // deployment's Service would go: the caches do not see it.
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "resnet-blue"},
        "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 8080}]},
    }))?;
    services.create(&PostParams::default(), &theirs).await?;
    let api: Api<ModelDeployment> = ns.api();
    api.create(
        &PostParams::default(),
        &model_deployment("resnet", json!({"deployments": [onnx("blue", json!({}))]}))?,
    )
    .await?;
    let md = wait_md(&api, "resnet", "NameConflict", |m| ready_reason(m) == "NameConflict").await?;
    let message = condition(&status(&md), "Ready").unwrap()["message"].clone();
    assert!(
        message
            .as_str()
            .unwrap_or_default()
            .contains("Service resnet-blue already exists"),
        "{message}"
    );
    assert_eq!(status(&md)["phase"], "Failed");
    // Theirs is left as it was.
    let live = services.get("resnet-blue").await?;
    assert!(live.owner_references().is_empty());
    assert_eq!(live.spec.unwrap().selector.unwrap()["app"], "theirs");

    // Freed: the ModelDeployment takes the name and becomes Ready.
    services.delete("resnet-blue", &DeleteParams::default()).await?;
    wait_md(&api, "resnet", "Ready once the name is free", is_ready).await?;
    let ours = services.get("resnet-blue").await?;
    assert_eq!(ours.owner_references()[0].name, "resnet");
    let deployments: Api<Deployment> = ns.api();
    assert!(deployments.get_opt("resnet-blue").await?.is_some());
    Ok(())
}

#[tokio::test]
async fn converged_model_deployments_cause_no_writes() -> Result<()> {
    let admin = admin_client().await?;
    let ns = namespace(&admin, "md-quiet").await?;
    let api: Api<ModelDeployment> = ns.api();
    let split = json!({"deployments": [onnx("blue", json!({"scale": {"maxInstances": 2}})), onnx("green", json!({}))],
                       "traffic": {"blue": 80, "green": 20}});
    let single = json!({"deployments": [onnx("only", json!({"requestSettings": {"timeout": "5s"}}))]});
    let stuck = json!({"deployments": [{"name": "x", "model": {"experiment": "missing", "format": "ONNX"}}]});
    for (name, spec) in [("split", split), ("single", single), ("stuck", stuck)] {
        api.create(&PostParams::default(), &model_deployment(name, spec)?)
            .await?;
    }
    wait_md(&api, "split", "Ready", is_ready).await?;
    wait_md(&api, "single", "Ready", is_ready).await?;
    wait_md(&api, "stuck", "ExperimentNotFound", |m| {
        ready_reason(m) == "ExperimentNotFound"
    })
    .await?;
    // Let the last writes and their watch events settle, then watch 20 s
    // (the stuck one is polled every 15 s meanwhile).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let since = k8s_openapi::jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let writes = audited_writes_in(
        &format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"),
        &ns.name,
        since,
    )?;
    assert!(
        writes.is_empty(),
        "writes while idle: {writes:?}\noperator log:\n{}",
        fixture().operator.log_tail()
    );
    Ok(())
}

#[tokio::test]
async fn installed_runtime_catalog_is_the_one_the_operator_reads() -> Result<()> {
    install_chart()?;
    let client = admin_client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let cm = cms.get(&format!("{RELEASE}-catalogs")).await?;
    let text = cm.data.unwrap_or_default().remove("runtimes.yaml").unwrap_or_default();
    // The operator parses the file with this same function at start.
    let catalog = RuntimeCatalog::from_yaml(&text)?;
    assert_eq!(
        catalog,
        RuntimeCatalog::builtin(),
        "the chart ships the built-in catalog by default"
    );
    let deployments: Api<Deployment> = Api::namespaced(client, OPERATOR_NAMESPACE);
    let spec = deployments.get(RELEASE).await?.spec.unwrap().template.spec.unwrap();
    let env = spec.containers[0].env.clone().unwrap_or_default();
    let path = env
        .iter()
        .find(|e| e.name == "MLPLANE_RUNTIME_CATALOG")
        .and_then(|e| e.value.clone())
        .context("MLPLANE_RUNTIME_CATALOG")?;
    assert_eq!(path, "/etc/mlplane/catalogs/runtimes.yaml");
    Ok(())
}
