//! Where runs keep what they produce: locations in a workspace's artifact
//! store (`spec.storage.artifacts` of its Workspace), the one place that
//! spells them out. Experiment run outputs, Pipeline step outputs (by cache
//! key) and the models a ModelDeployment takes from an Experiment all resolve
//! through these functions.
//!
//! Owns: the layout. Must not touch the API server.
//!
//! Layout under the root (DESIGN §3):
//! - `experiments/<experiment>/<run>/<output>`: an Experiment run's output
//!   (`<run>` is the run's Job name, `<exp>-<index>` or `<exp>-<index>-t<trial>`).
//! - `cache/<cacheKey>/<output>`: a Pipeline step's output, so a reused
//!   step's outputs are found from its cache key alone.
//!
//! The root is the store's URI as given (`s3://ml-artifacts/vision`, without a
//! trailing `/`), or `pvc://mlplane-artifacts` for a PVC workspace (the
//! workspace's artifacts PVC, mounted by pods that read or write it).
use crate::api::workspace::WorkspaceStorage;
use crate::controllers::workspace::build::ARTIFACTS_PVC;

/// URI scheme of locations on a workspace's artifacts PVC.
pub const PVC_SCHEME: &str = "pvc";
/// Where run pods (and `mlplane fetch`) mount a PVC `<claim>`:
/// `<PVC_MOUNT_ROOT>/<claim>`, so `pvc://<claim>/<path>` is read and written
/// at `<PVC_MOUNT_ROOT>/<claim>/<path>` ([`pvc_mount_path`]).
pub const PVC_MOUNT_ROOT: &str = "/mnt/pvc";

/// The root of a workspace's artifact store, if it has one.
pub fn artifacts_root(storage: Option<&WorkspaceStorage>) -> Option<String> {
    let artifacts = &storage?.artifacts;
    if let Some(uri) = &artifacts.uri {
        return Some(uri.trim_end_matches('/').to_string());
    }
    artifacts
        .pvc
        .as_ref()
        .map(|_| format!("{PVC_SCHEME}://{ARTIFACTS_PVC}"))
}

/// Location of output `output` of the Experiment run `run` (its Job name).
pub fn experiment_output(root: &str, experiment: &str, run: &str, output: &str) -> String {
    format!("{root}/experiments/{experiment}/{run}/{output}")
}

/// Location of output `output` of the Pipeline step with cache key `key`.
pub fn cache_output(root: &str, key: &str, output: &str) -> String {
    format!("{root}/cache/{key}/{output}")
}

/// For a `pvc://<claim>/<path>` location: the claim and the path inside it.
pub fn pvc_location(location: &str) -> Option<(&str, &str)> {
    let rest = location.strip_prefix(PVC_SCHEME)?.strip_prefix("://")?;
    Some(rest.split_once('/').unwrap_or((rest, "")))
}

/// The directory a pod mounts the PVC `claim` at.
pub fn pvc_mount_dir(claim: &str) -> String {
    format!("{PVC_MOUNT_ROOT}/{claim}")
}

/// For a `pvc://<claim>/<path>` location: the path a pod with the claim
/// mounted (at [`pvc_mount_dir`]) reads and writes it at.
pub fn pvc_mount_path(location: &str) -> Option<String> {
    let (claim, path) = pvc_location(location)?;
    Some(match path {
        "" => pvc_mount_dir(claim),
        p => format!("{}/{p}", pvc_mount_dir(claim)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::workspace::{ArtifactStorage, PvcStorage};

    fn storage(uri: Option<&str>, pvc: bool) -> WorkspaceStorage {
        WorkspaceStorage {
            artifacts: ArtifactStorage {
                uri: uri.map(String::from),
                secret_ref: None,
                pvc: pvc.then(|| PvcStorage {
                    size: k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into()),
                    storage_class_name: None,
                }),
            },
        }
    }

    #[test]
    fn roots_of_uri_and_pvc_workspaces() {
        assert_eq!(
            artifacts_root(Some(&storage(Some("s3://ml/vision/"), false))).as_deref(),
            Some("s3://ml/vision")
        );
        assert_eq!(
            artifacts_root(Some(&storage(None, true))).as_deref(),
            Some("pvc://mlplane-artifacts")
        );
        assert_eq!(artifacts_root(None), None);
    }

    #[test]
    fn layout_follows_the_design() {
        assert_eq!(
            experiment_output("s3://ml/vision", "resnet", "resnet-3", "model"),
            "s3://ml/vision/experiments/resnet/resnet-3/model"
        );
        assert_eq!(
            cache_output("s3://ml/vision", "ab12", "clean"),
            "s3://ml/vision/cache/ab12/clean"
        );
        let loc = experiment_output("pvc://mlplane-artifacts", "resnet", "resnet-3-t1", "model");
        assert_eq!(
            pvc_location(&loc),
            Some(("mlplane-artifacts", "experiments/resnet/resnet-3-t1/model"))
        );
        assert_eq!(pvc_location("s3://x/y"), None);
        assert_eq!(
            pvc_mount_path(&loc).as_deref(),
            Some("/mnt/pvc/mlplane-artifacts/experiments/resnet/resnet-3-t1/model")
        );
        assert_eq!(pvc_mount_path("pvc://c").as_deref(), Some("/mnt/pvc/c"));
        assert_eq!(pvc_mount_path("s3://x/y"), None);
    }
}
