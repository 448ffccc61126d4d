//! Pinning a run's data inputs when it starts, for Experiment runs and
//! Pipeline runs: each `{dataAsset, version}` input becomes one version with
//! its digest ([`crate::controllers::run::inputs::pin`]), read from the
//! DataAsset watch cache, and from the tracking server for a version older
//! than the asset's `status.versions`.
//!
//! Owns: the lookups. Must not write anything.
use std::collections::BTreeMap;

use crate::api::DataInput;
use crate::api::experiment::PinnedInput;
use crate::controllers::Result;
use crate::controllers::experiment::observe::Caches;
use crate::controllers::run::inputs::{OlderVersion, PinError, Pinned, pin, requested_version};
use crate::tracking::client::TrackingClient;

/// Pins every input of `inputs` (in `ns`; `field` is their place in the
/// spec). An input in `earlier` (the pins of another trial of the same run)
/// keeps its version. The outer error is a failed lookup (retried); the
/// inner one an input that cannot be pinned (yet).
pub async fn pin_inputs(
    ns: &str,
    field: &str,
    inputs: &BTreeMap<String, DataInput>,
    earlier: Option<&BTreeMap<String, PinnedInput>>,
    caches: &Caches,
    tracking: Option<&TrackingClient>,
) -> Result<std::result::Result<BTreeMap<String, Pinned>, PinError>> {
    let mut out = BTreeMap::new();
    for (name, input) in inputs {
        let field = format!("{field}.{name}");
        let asset = input.data_asset.as_deref().and_then(|a| caches.data_asset(ns, a));
        let mut input = input.clone();
        if let Some(prev) = earlier.and_then(|e| e.get(name))
            && prev.data_asset.is_some()
            && prev.data_asset == input.data_asset
        {
            input.version = prev.version.clone();
        }
        let listed = asset.as_ref().is_some_and(|a| {
            let versions = a.status.as_ref().map(|s| s.versions.as_slice()).unwrap_or_default();
            requested_version(&input).is_none_or(|v| versions.iter().any(|x| x.version == v))
        });
        let mut older = None;
        if let (Some(asset_name), Some(version), Some(tc), true) = (
            &input.data_asset,
            requested_version(&input),
            tracking,
            asset.is_some() && !listed,
        ) && let Some((v, _)) = tc.data_version(ns, asset_name, version).await?
        {
            older = Some(OlderVersion {
                digest: v.digest,
                source: v.source,
            });
        }
        match pin(&field, &input, asset.as_deref(), older.as_ref()) {
            Ok(p) => {
                out.insert(name.clone(), p);
            }
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(out))
}

/// The pins of a run as recorded on its Jobs (the inputs annotation).
pub fn recorded(annotations: &BTreeMap<String, String>) -> BTreeMap<String, PinnedInput> {
    annotations
        .get(crate::controllers::run::inputs::INPUTS_ANNOTATION)
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_default()
}
