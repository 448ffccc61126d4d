//! Workspace controller: keeps a tenant's namespace and its children (see
//! [`build`]) in line with the spec, reports usage, and applies the deletion
//! policy (Retain: namespace and data stay; Delete: a finalizer removes the
//! namespace first). Touches only objects labelled with its workspace.
pub mod build;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{LimitRange, Namespace, PersistentVolumeClaim, ResourceQuota, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use self::build::*;
use super::apply::{apply_if_changed, patch_status_if_changed};
use super::cached::{CachedJob, CachedPod};
use super::compute_cluster::observe::Caches as ClusterCaches;
use super::experiment::status::ended;
use super::{Context, Error, Result, error_policy, guarded_watch, watch_config};
use crate::api::{
    DeletionPolicy, NewCondition, READY, Workspace, WorkspacePhase, WorkspaceStatus, WorkspaceUsage, set_condition,
};
use crate::quantity;

const KIND: &str = "Workspace";
/// Finalizer that deletes the namespace under deletionPolicy Delete.
pub const FINALIZER: &str = "mlplane.io/workspace-cleanup";

/// The Workspace controller's context: the shared one plus the
/// cluster-wide pod and run Job caches that usage is counted from.
pub struct WorkspaceContext {
    pub base: Arc<Context>,
    pub cluster: Arc<ClusterCaches>,
}

impl std::ops::Deref for WorkspaceContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.base
    }
}

/// Runs the controller until `shutdown` resolves. `cluster`: the
/// ComputeCluster controller's caches (it polls their streams).
pub async fn run(
    ctx: Arc<Context>,
    cluster: Arc<ClusterCaches>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let wctx = Arc::new(WorkspaceContext { base: ctx, cluster });
    let (store, stream) = guarded_watch(Api::<DeserializeGuard<Workspace>>::all(client.clone()), watch_config());
    let children = watcher::Config::default().labels(WORKSPACE_LABEL).timeout(200);
    // Children live in the workspace namespace while the Workspace is
    // cluster-scoped, so they map back by label rather than ownerReference.
    fn by_label<K: Resource>(obj: K) -> Option<ObjectRef<DeserializeGuard<Workspace>>> {
        obj.labels().get(WORKSPACE_LABEL).map(|n| ObjectRef::new(n))
    }
    macro_rules! child_stream {
        ($k:ty) => {
            watcher(
                Api::<PartialObjectMeta<$k>>::all(client.clone()),
                children.clone(),
            )
            .default_backoff()
            .touched_objects()
        };
    }
    use kube::runtime::WatchStreamExt;
    Controller::for_stream(stream, store)
        .watches_stream(child_stream!(Namespace), by_label)
        .watches_stream(child_stream!(RoleBinding), by_label)
        .watches_stream(child_stream!(ResourceQuota), by_label)
        .watches_stream(child_stream!(LimitRange), by_label)
        .watches_stream(child_stream!(ServiceAccount), by_label)
        .watches_stream(child_stream!(Secret), by_label)
        .watches_stream(child_stream!(NetworkPolicy), by_label)
        .watches_stream(child_stream!(PersistentVolumeClaim), by_label)
        .with_config(kube::runtime::controller::Config::default().concurrency(wctx.settings.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile_guarded, guarded_error_policy, wctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "workspace controller stream error");
            }
        })
        .await;
}

async fn reconcile_guarded(obj: Arc<DeserializeGuard<Workspace>>, ctx: Arc<WorkspaceContext>) -> Result<Action> {
    match &obj.0 {
        Ok(ws) => reconcile(ws, &ctx).await,
        Err(invalid) => {
            // Reported once per change of the stored object; no retry loop.
            tracing::error!(name = ?invalid.metadata.name, error = %invalid.error, "stored Workspace cannot be read");
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[KIND, "invalid_object"])
                .inc();
            Ok(Action::await_change())
        }
    }
}

fn guarded_error_policy(obj: Arc<DeserializeGuard<Workspace>>, err: &Error, ctx: Arc<WorkspaceContext>) -> Action {
    match &obj.0 {
        Ok(ws) => error_policy(ws, err, &ctx),
        Err(_) => Action::await_change(),
    }
}

async fn get_opt<K>(api: &Api<K>, name: &str) -> Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?)
}

/// One reconcile of a Workspace.
pub async fn reconcile(ws: &Workspace, ctx: &WorkspaceContext) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let client = &ctx.client;
    let name = ws.name_any();
    let ns_name = ws.target_namespace();
    let workspaces: Api<Workspace> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut status = ws.status.clone().unwrap_or_default();
    let generation = ws.metadata.generation;

    if ws.metadata.deletion_timestamp.is_some() {
        return finalize(ws, ctx, &workspaces, &namespaces, status, now).await;
    }

    // The finalizer exists exactly when the policy is Delete.
    let want_finalizer = ws.spec.deletion_policy == DeletionPolicy::Delete;
    if want_finalizer != ws.finalizers().iter().any(|f| f == FINALIZER) {
        set_finalizer(&workspaces, ws, want_finalizer).await?;
    }

    // Dereference: the namespace must be free or already ours.
    let live_ns = get_opt(&namespaces, &ns_name).await?;
    if let Some(owner) = live_ns.as_ref().and_then(|n| n.labels().get(WORKSPACE_LABEL).cloned())
        && owner != name
    {
        let msg = format!("spec.namespace {ns_name:?} belongs to Workspace {owner:?}");
        set_condition(
            &mut status.conditions,
            NewCondition::new(READY, false, "NamespaceConflict", msg.clone()).observed_generation(generation),
            &now,
        );
        status.phase = Some(WorkspacePhase::Failed);
        status.observed_generation = generation;
        if patch_status_if_changed(&workspaces, &name, ws.status.as_ref(), &status).await? {
            ctx.event(ws, EventType::Warning, "NamespaceConflict", "Reconcile", msg)
                .await;
        }
        return Ok(Action::await_change());
    }

    let desired = build(ws, &ctx.settings.operator_namespace);
    let mut changed: Vec<String> = vec![];

    // Namespace: a pre-existing namespace is adopted and marked so that the
    // Delete policy never deletes what mlplane did not create.
    let mut ns_obj = desired.namespace.clone();
    if let Some(live) = &live_ns
        && (live.labels().get(WORKSPACE_LABEL).is_none() || live.annotations().contains_key(ADOPTED_ANNOTATION))
    {
        ns_obj
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(ADOPTED_ANNOTATION.into(), "true".into());
    }
    if apply_if_changed(&namespaces, live_ns.as_ref(), &ns_obj).await? {
        changed.push(format!("Namespace/{ns_name}"));
    }

    let rbs: Api<RoleBinding> = Api::namespaced(client.clone(), &ns_name);
    for rb in &desired.role_bindings {
        let live = get_opt(&rbs, &rb.name_any()).await?;
        if apply_if_changed(&rbs, live.as_ref(), rb).await? {
            changed.push(format!("RoleBinding/{}", rb.name_any()));
        }
    }
    // Orphans: bindings of roles that no longer have members.
    let selector = format!("{WORKSPACE_LABEL}={name}");
    for rb in rbs.list_metadata(&ListParams::default().labels(&selector)).await?.items {
        let rb_name = rb.name_any();
        if !desired.role_bindings.iter().any(|d| d.name_any() == rb_name) {
            rbs.delete(&rb_name, &DeleteParams::default()).await?;
            changed.push(format!("-RoleBinding/{rb_name}"));
        }
    }

    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns_name);
    sync_optional(&quotas, QUOTA_NAME, desired.quota.as_ref(), &mut changed).await?;

    let lrs: Api<LimitRange> = Api::namespaced(client.clone(), &ns_name);
    let live = get_opt(&lrs, LIMIT_RANGE_NAME).await?;
    if apply_if_changed(&lrs, live.as_ref(), &desired.limit_range).await? {
        changed.push(format!("LimitRange/{LIMIT_RANGE_NAME}"));
    }

    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns_name);
    let live_sa = get_opt(&sas, RUN_SERVICE_ACCOUNT).await?;
    if apply_if_changed(&sas, live_sa.as_ref(), &desired.service_account).await? {
        changed.push(format!("ServiceAccount/{RUN_SERVICE_ACCOUNT}"));
    }
    // The token Secret only once the ServiceAccount existed before this
    // reconcile: the token controller deletes a token Secret whose
    // ServiceAccount is not in its cache yet (a race with a just-created one).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns_name);
    let mut token_pending = false;
    if live_sa.is_some() {
        let live = get_opt(&secrets, RUN_TOKEN_SECRET).await?;
        if apply_if_changed(&secrets, live.as_ref(), &desired.run_token).await? {
            changed.push(format!("Secret/{RUN_TOKEN_SECRET}"));
        }
    } else {
        token_pending = true;
    }

    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns_name);
    sync_optional(&nps, NETWORK_POLICY_NAME, desired.network_policy.as_ref(), &mut changed).await?;

    // The PVC holds data: it is created and grown, never deleted here (only
    // the Delete policy removes it, with the namespace).
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns_name);
    if let Some(pvc) = &desired.pvc {
        let live = get_opt(&pvcs, ARTIFACTS_PVC).await?;
        if apply_if_changed(&pvcs, live.as_ref(), pvc).await? {
            changed.push(format!("PersistentVolumeClaim/{ARTIFACTS_PVC}"));
        }
    }

    if !changed.is_empty() {
        let reason = if live_ns.is_none() { "Created" } else { "Updated" };
        ctx.event(
            ws,
            EventType::Normal,
            reason,
            "Reconcile",
            format!("applied {}", changed.join(", ")),
        )
        .await;
    }

    // Status from what was applied, plus usage of the namespace.
    // From the caches, once they have listed (before that, a namespace
    // would look empty).
    ctx.cluster.ready().await;
    status.usage = Some(usage(
        ctx.cluster.pods.state().iter().map(|p| &**p),
        ctx.cluster.jobs.state().iter().map(|j| &**j),
        &ns_name,
    ));
    status.namespace = Some(ns_name.clone());
    status.phase = Some(WorkspacePhase::Active);
    status.observed_generation = generation;
    set_condition(
        &mut status.conditions,
        NewCondition::new(
            READY,
            true,
            "Reconciled",
            format!("namespace {ns_name} and its members, quota and policies are in place"),
        )
        .observed_generation(generation),
        &now,
    );
    patch_status_if_changed(&workspaces, &name, ws.status.as_ref(), &status).await?;
    ctx.reset_failures(&ws.uid().unwrap_or_default());
    if token_pending {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    Ok(Action::requeue(ctx.settings.resync))
}

/// A child the spec may or may not ask for: applied when desired (and
/// changed), deleted when not desired but present with the workspace label.
async fn sync_optional<K>(api: &Api<K>, name: &str, desired: Option<&K>, changed: &mut Vec<String>) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let live = get_opt(api, name).await?;
    let kind = K::kind(&());
    match desired {
        Some(d) => {
            if apply_if_changed(api, live.as_ref(), d).await? {
                changed.push(format!("{kind}/{name}"));
            }
        }
        None => {
            if live.as_ref().is_some_and(|l| l.labels().contains_key(WORKSPACE_LABEL)) {
                api.delete(name, &DeleteParams::default()).await?;
                changed.push(format!("-{kind}/{name}"));
            }
        }
    }
    Ok(())
}

/// Adds or removes the cleanup finalizer with a JSON patch that touches only
/// that entry (other controllers' finalizers stay; a `test` op makes the
/// removal fail rather than remove the wrong entry if the list changed).
async fn set_finalizer(api: &Api<Workspace>, ws: &Workspace, present: bool) -> Result<()> {
    let current = ws.finalizers();
    let ops = match (present, current.iter().position(|f| f == FINALIZER)) {
        (true, Some(_)) | (false, None) => return Ok(()),
        (true, None) if current.is_empty() => serde_json::json!([
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]),
        (true, None) => serde_json::json!([{"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}]),
        (false, Some(i)) => serde_json::json!([
            {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
            {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
        ]),
    };
    let patch: json_patch::Patch = serde_json::from_value(ops)?;
    api.patch(&ws.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    Ok(())
}

/// Deletion: under Delete, remove the namespace (if mlplane created it; an
/// adopted one only loses the artifacts PVC) and wait for it to go before
/// releasing the finalizer. Under Retain nothing is held back.
async fn finalize(
    ws: &Workspace,
    ctx: &Context,
    workspaces: &Api<Workspace>,
    namespaces: &Api<Namespace>,
    mut status: WorkspaceStatus,
    now: Time,
) -> Result<Action> {
    let name = ws.name_any();
    if !ws.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    status.phase = Some(WorkspacePhase::Terminating);
    set_condition(
        &mut status.conditions,
        NewCondition::new(
            READY,
            false,
            "Deleting",
            "deletionPolicy Delete: removing the namespace",
        )
        .observed_generation(ws.metadata.generation),
        &now,
    );
    patch_status_if_changed(workspaces, &name, ws.status.as_ref(), &status).await?;

    let ns_name = ws.target_namespace();
    if let Some(ns) = namespaces.get_opt(&ns_name).await? {
        let ours = ns.labels().get(WORKSPACE_LABEL) == Some(&name);
        let adopted = ns.annotations().contains_key(ADOPTED_ANNOTATION);
        if ours && !adopted {
            if ns.metadata.deletion_timestamp.is_none() {
                namespaces.delete(&ns_name, &DeleteParams::background()).await?;
                ctx.event(
                    ws,
                    EventType::Normal,
                    "Deleting",
                    "Delete",
                    format!("deleting namespace {ns_name}"),
                )
                .await;
            }
            // Namespace termination is observed through the namespace watch.
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        if ours {
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns_name);
            if pvcs.get_opt(ARTIFACTS_PVC).await?.is_some() {
                pvcs.delete(ARTIFACTS_PVC, &DeleteParams::background()).await?;
            }
        }
    }
    set_finalizer(workspaces, ws, false).await?;
    Ok(Action::await_change())
}

/// Requests of the namespace's unfinished pods and its active run Jobs
/// (neither Complete nor Failed). `pods` and `jobs` may span namespaces.
fn usage<'a>(
    pods: impl Iterator<Item = &'a CachedPod>,
    jobs: impl Iterator<Item = &'a CachedJob>,
    ns: &str,
) -> WorkspaceUsage {
    let (mut cpu, mut mem, mut gpu) = (0.0, 0.0, 0.0);
    for p in pods.filter(|p| p.metadata.namespace.as_deref() == Some(ns)) {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        for c in p.spec.iter().flat_map(|s| s.containers.iter()) {
            let Some(res) = &c.resources else { continue };
            let req = res.requests.as_ref();
            let lim = res.limits.as_ref();
            let get = |k: &str| req.and_then(|r| r.get(k)).or_else(|| lim.and_then(|l| l.get(k)));
            cpu += get("cpu").map(quantity::value).unwrap_or(0.0);
            mem += get("memory").map(quantity::value).unwrap_or(0.0);
            gpu += get("nvidia.com/gpu").map(quantity::value).unwrap_or(0.0);
        }
    }
    let active_runs = jobs
        .filter(|j| j.metadata.namespace.as_deref() == Some(ns))
        .filter(|j| !ended(j))
        .count();
    WorkspaceUsage {
        cpu: Some(quantity::format_cpu(cpu)),
        memory: Some(quantity::format_bytes(mem)),
        gpu: gpu.round() as i64,
        active_runs: active_runs as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, phase: &str, cpu: &str, gpu: Option<&str>) -> CachedPod {
        let mut requests = json!({"cpu": cpu, "memory": "1Gi"});
        if let Some(g) = gpu {
            requests["nvidia.com/gpu"] = json!(g);
        }
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": ns},
            "spec": {"containers": [{"name": "c", "resources": {"requests": requests}}]},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn job(ns: &str, condition: Option<&str>) -> CachedJob {
        let conditions: Vec<_> = condition
            .into_iter()
            .map(|t| json!({"type": t, "status": "True"}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "j", "namespace": ns},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    #[test]
    fn usage_counts_unfinished_pods_and_active_runs_of_the_namespace_only() {
        let pods = [
            pod("team", "Running", "500m", Some("1")),
            pod("team", "Pending", "1", None),
            pod("team", "Succeeded", "4", Some("2")),
            pod("team", "Failed", "4", None),
            pod("other", "Running", "8", Some("4")),
        ];
        let jobs = [
            job("team", None),
            job("team", Some("Complete")),
            job("team", Some("Failed")),
            job("team", Some("Suspended")),
            job("other", None),
        ];
        let u = usage(pods.iter(), jobs.iter(), "team");
        assert_eq!(u.cpu.map(|q| q.0).as_deref(), Some("1500m"));
        assert_eq!(u.memory.map(|q| q.0).as_deref(), Some("2Gi"));
        assert_eq!(u.gpu, 1);
        assert_eq!(u.active_runs, 2, "the plain and the suspended Job");
    }
}
