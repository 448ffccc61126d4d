//! Writing children without hot loops: a child is applied (server-side apply,
//! one field manager) only when the live object lacks some field of the
//! desired one, and status is patched only when it differs. The comparison
//! tolerates what the API server adds (defaults, metadata) and quantities it
//! canonicalises (`1000m` == `1`).
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

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
    use serde_json::json;

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
