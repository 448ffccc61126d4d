//! Taking an idle node out of service, for every provider: cordon it (and
//! mark it, so a restarted operator goes on draining it and never uncordons
//! what someone else cordoned), evict its pods through the Eviction API (a
//! PodDisruptionBudget refusing, HTTP 429, means wait and try again), and
//! only then ask the provider to remove it. A draining node that gets a
//! pod, or that its pool needs again, is uncordoned.
//!
//! Owns: the cordon/uncordon patches and the evictions. Must not decide
//! which node goes (the planner does) nor remove nodes (the providers do).
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, EvictParams, Patch, PatchParams};
use serde_json::json;

use super::observe::SCALE_DOWN_ANNOTATION;

/// What evicting a node's pods came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every pod was evicted (or was gone).
    Done,
    /// An eviction was refused (a PodDisruptionBudget): why.
    Blocked(String),
}

/// Cordons `node` and marks it as draining since `now`.
pub async fn cordon(client: &Client, node: &str, now: Timestamp) -> kube::Result<Node> {
    let patch = json!({
        "metadata": {"annotations": {SCALE_DOWN_ANNOTATION: now.to_string()}},
        "spec": {"unschedulable": true},
    });
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
}

/// Puts a node the autoscaler was draining back into service.
pub async fn uncordon(client: &Client, node: &str) -> kube::Result<()> {
    let patch = json!({
        "metadata": {"annotations": {SCALE_DOWN_ANNOTATION: null}},
        "spec": {"unschedulable": null},
    });
    match Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Evicts `pods` (namespace, name) through the Eviction API.
pub async fn evict(client: &Client, pods: &[(String, String)]) -> kube::Result<Drained> {
    for (ns, name) in pods {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        match api.evict(name, &EvictParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(kube::Error::Api(s)) if s.code == 429 => {
                return Ok(Drained::Blocked(format!(
                    "eviction of pod {ns}/{name} refused: {}",
                    s.message
                )));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Drained::Done)
}
