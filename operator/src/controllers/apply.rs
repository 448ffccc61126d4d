//! Writing children without hot loops: a child is applied (server-side apply,
//! one field manager) only when the live object lacks some field of the
//! desired one, and status is patched only when it differs. The comparison
//! tolerates what the API server adds (defaults, metadata) and quantities it
//! canonicalises (`1000m` == `1`).
//!
//! A new child may be created by POST instead ([`create_new`]): the API
//! server's cheapest write of a new object. Its managedFields entry is then
//! an Update entry of the field manager, which owns every field the server
//! defaulted; before the first apply it becomes the apply entry
//! ([`adopt_created_fields`]), as kubectl's client-side to server-side
//! upgrade does, so that later applies remove what the desired object drops.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::quantity;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "mlplane";

/// True when every field set in `desired` is present in `live` with an equal
/// value (objects: recursively; arrays: same length, element-wise).
pub fn contains(live: &Value, desired: &Value) -> bool {
    match (live, desired) {
        (_, Value::Null) => true,
        (Value::Object(l), Value::Object(d)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => contains(lv, dv),
            None => dv.is_null() || is_empty_collection(dv),
        }),
        (Value::Array(l), Value::Array(d)) => l.len() == d.len() && l.iter().zip(d).all(|(lv, dv)| contains(lv, dv)),
        (Value::String(l), Value::String(d)) => l == d || quantity::same_value(l, d),
        (Value::Number(l), Value::Number(d)) => l.as_f64() == d.as_f64(),
        (l, d) => l == d,
    }
}

/// Whether `live` already has every field `desired` sets ([`contains`] of
/// their JSON): applying `desired` would change nothing.
pub fn up_to_date<K: Serialize>(live: &K, desired: &K) -> serde_json::Result<bool> {
    Ok(contains(&serde_json::to_value(live)?, &serde_json::to_value(desired)?))
}

fn is_empty_collection(v: &Value) -> bool {
    matches!(v, Value::Array(a) if a.is_empty()) || matches!(v, Value::Object(o) if o.is_empty())
}

/// Applies `desired` unless `live` already contains it. Returns whether a
/// write was made.
pub async fn apply_if_changed<K>(api: &Api<K>, live: Option<&K>, desired: &K) -> kube::Result<bool>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    Ok(apply_changed(api, live, desired).await?.is_some())
}

/// Like [`apply_if_changed`], returning the object the API server answered
/// with when a write was made.
pub async fn apply_changed<K>(api: &Api<K>, live: Option<&K>, desired: &K) -> kube::Result<Option<K>>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    if let Some(live) = live
        && up_to_date(live, desired).map_err(kube::Error::SerdeError)?
    {
        return Ok(None);
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Ok(Some(api.patch(&desired.name_any(), &pp, &Patch::Apply(desired)).await?))
}

/// Creates `desired` by POST with the operator's field manager. `None` when
/// an object of that name exists already (whose it is, the caller finds out).
/// A server-side apply of a new Deployment costs the local API server 1.35 to
/// 1.8 times as much as this (`serving` benchmark).
pub async fn create_new<K>(api: &Api<K>, desired: &K) -> kube::Result<Option<K>>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, desired).await {
        Ok(created) => Ok(Some(created)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_ours(m: &ManagedFieldsEntry, operation: &str) -> bool {
    m.manager.as_deref() == Some(FIELD_MANAGER)
        && m.operation.as_deref() == Some(operation)
        && m.subresource.as_deref().unwrap_or_default().is_empty()
}

/// Whether `obj` still has the managedFields entry of the operator's create
/// ([`create_new`]), which must become the apply entry before an apply.
pub fn created_by_post<K: Resource>(obj: &K) -> bool {
    obj.meta()
        .managed_fields
        .as_ref()
        .is_some_and(|fields| fields.iter().any(|m| is_ours(m, "Update")))
}

/// The entry that stands for the full one in a cache that drops
/// managedFields: enough for [`created_by_post`].
pub fn created_by_post_marker() -> ManagedFieldsEntry {
    ManagedFieldsEntry {
        manager: Some(FIELD_MANAGER.into()),
        operation: Some("Update".into()),
        ..Default::default()
    }
}

/// `entries` with the operator's creation entry turned into its apply entry;
/// `None` when there is none. `spec.replicas` is left out of it when
/// `desired` leaves replicas to an autoscaler: the API server defaulted them
/// at creation, and an apply that owned them would reset the autoscaler's
/// count. Other defaulted fields may stay in it: an apply that drops them has
/// the API server default them again. If an apply entry exists already, the
/// creation entry is dropped.
pub fn upgraded_managed_fields(entries: &[ManagedFieldsEntry], desired: &Value) -> Option<Vec<ManagedFieldsEntry>> {
    let i = entries.iter().position(|m| is_ours(m, "Update"))?;
    let mut out = entries.to_vec();
    if entries.iter().any(|m| is_ours(m, "Apply")) {
        out.remove(i);
        return Some(out);
    }
    let entry = &mut out[i];
    entry.operation = Some("Apply".into());
    if desired.pointer("/spec/replicas").is_none()
        && let Some(FieldsV1(fields)) = entry.fields_v1.as_mut()
        && let Some(spec) = fields.get_mut("f:spec").and_then(Value::as_object_mut)
    {
        spec.remove("f:replicas");
    }
    Some(out)
}

/// Makes the operator's creation entry of `name` its apply entry on the API
/// server ([`upgraded_managed_fields`]): a GET, then a merge patch of
/// managedFields guarded by the resourceVersion (a conflict is retried by the
/// next reconcile). The patch changes no field, so it adds no entry.
pub async fn adopt_created_fields<K>(api: &Api<K>, name: &str, desired: &K) -> kube::Result<()>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let live = api.get(name).await?;
    let desired = serde_json::to_value(desired).map_err(kube::Error::SerdeError)?;
    let entries = live.meta().managed_fields.as_deref().unwrap_or_default();
    let Some(fields) = upgraded_managed_fields(entries, &desired) else {
        return Ok(());
    };
    let patch = json!({"metadata": {"resourceVersion": live.resource_version(), "managedFields": fields}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Patches the status subresource with `status` (server-side apply) when it
/// differs from `current`. `K`'s apiVersion/kind go into the body as SSA
/// requires. Returns whether a write was made.
pub async fn patch_status_if_changed<K, S>(
    api: &Api<K>,
    name: &str,
    current: Option<&S>,
    status: &S,
) -> kube::Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(false);
    }
    super::status_writer::write_status(api, name, status).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(manager: &str, operation: &str, fields: Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            api_version: Some("apps/v1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    #[test]
    fn the_creation_entry_becomes_the_apply_entry_without_autoscaled_replicas() {
        let created = json!({"f:metadata": {"f:labels": {"f:app": {}}},
                             "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"run\"}": {".": {}}}}}}});
        let hpa = entry("kube-controller-manager", "Update", json!({"f:status": {}}));
        let entries = vec![entry(FIELD_MANAGER, "Update", created.clone()), hpa.clone()];
        assert!(created_by_post(&k8s_openapi::api::apps::v1::Deployment {
            metadata: kube::api::ObjectMeta {
                managed_fields: Some(entries.clone()),
                ..Default::default()
            },
            ..Default::default()
        }));

        // Autoscaled: desired leaves replicas out, so the apply entry must not own them.
        let out = upgraded_managed_fields(&entries, &json!({"spec": {"template": {}}})).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].operation.as_deref(), Some("Apply"));
        let fields = &out[0].fields_v1.as_ref().unwrap().0;
        assert!(fields["f:spec"].get("f:replicas").is_none());
        assert_eq!(fields["f:spec"]["f:template"], created["f:spec"]["f:template"]);
        assert_eq!(out[1], hpa, "other managers' entries are kept as they are");

        // A fixed count: desired sets replicas, the apply entry keeps them.
        let out = upgraded_managed_fields(&entries, &json!({"spec": {"replicas": 3}})).unwrap();
        assert!(
            out[0].fields_v1.as_ref().unwrap().0["f:spec"]
                .get("f:replicas")
                .is_some()
        );
    }

    #[test]
    fn nothing_to_upgrade_without_a_creation_entry_and_a_stale_one_goes() {
        let applied = entry(FIELD_MANAGER, "Apply", json!({"f:spec": {}}));
        assert_eq!(
            upgraded_managed_fields(std::slice::from_ref(&applied), &json!({})),
            None
        );
        // An entry of a subresource (status) is not the creation entry.
        let mut status = entry(FIELD_MANAGER, "Update", json!({"f:status": {}}));
        status.subresource = Some("status".into());
        assert_eq!(upgraded_managed_fields(std::slice::from_ref(&status), &json!({})), None);
        // Both an Update and an Apply entry: the Update entry is dropped.
        let both = vec![entry(FIELD_MANAGER, "Update", json!({"f:spec": {}})), applied.clone()];
        assert_eq!(upgraded_managed_fields(&both, &json!({})), Some(vec![applied]));
    }

    #[test]
    fn live_with_server_defaults_contains_desired() {
        let live = json!({"metadata": {"name": "a", "uid": "u", "labels": {"x": "1", "y": "2"}},
                          "spec": {"hard": {"requests.cpu": "64", "requests.memory": "256Gi"}, "scopes": []}});
        let desired = json!({"metadata": {"name": "a", "labels": {"x": "1"}},
                             "spec": {"hard": {"requests.cpu": "64000m", "requests.memory": "256Gi"}}});
        assert!(contains(&live, &desired));
    }

    #[test]
    fn a_changed_or_missing_field_is_a_difference() {
        let live = json!({"spec": {"hard": {"requests.cpu": "64"}}});
        assert!(!contains(&live, &json!({"spec": {"hard": {"requests.cpu": "32"}}})));
        assert!(!contains(&live, &json!({"spec": {"hard": {"requests.memory": "1Gi"}}})));
        let live = json!({"subjects": [{"kind": "User", "name": "a"}]});
        assert!(!contains(
            &live,
            &json!({"subjects": [{"kind": "User", "name": "a"}, {"kind": "User", "name": "b"}]})
        ));
        assert!(contains(&live, &json!({"subjects": [{"kind": "User", "name": "a"}]})));
    }

    #[test]
    fn empty_desired_collections_match_absent_live_fields() {
        assert!(contains(&json!({"spec": {}}), &json!({"spec": {"taints": []}})));
        assert!(!contains(&json!({"spec": {}}), &json!({"spec": {"taints": [1]}})));
    }
}
