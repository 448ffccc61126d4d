//! Where a run's data is in its pod, shared by Experiment runs and Pipeline
//! steps: pinning a DataAsset version ([`pin`]), and turning pinned inputs
//! and output locations into pod parts ([`PodData`]).
//!
//! Owns: the in-pod layout of inputs and outputs. Must not touch the API
//! server: the caller looks DataAssets up (and older versions in the
//! tracking server) and passes what it found.
//!
//! - An input pinned from a DataAsset names the asset, the version (never
//!   `latest`: `latest` or no version is the asset's `status.latestVersion`
//!   when the run starts), its digest and the location read (the asset's
//!   `spec.source.uri`, or the source a version older than `status.versions`
//!   was recorded from). A `uri` input is pinned as just that URI.
//! - `mode: Mount` (default): `${{inputs.x}}` is the location itself (the
//!   code reads it with its own client); a `pvc://<claim>/<path>` location
//!   mounts the claim at `/mnt/pvc/<claim>` and is that path.
//! - `mode: Download`: an init container of the operator image runs
//!   `mlplane fetch --source <location> --dest /mnt/inputs/<x> [--digest
//!   <pinned digest>]` into an emptyDir (with the asset's Secret as
//!   `envFrom`); `${{inputs.x}}` is `/mnt/inputs/<x>`, mounted read-only in
//!   the run container. A single object lands as `/mnt/inputs/<x>/<name>`.
//!   With a digest, changed data fails the init container instead of being
//!   read silently.
//! - Outputs in a `pvc://` store are paths under the mounted claim; outputs
//!   in an object store are URIs, and the run container gets the
//!   workspace's artifact Secret as `envFrom` (the same keys the AWS, Azure
//!   and Google SDKs read).
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvFromSource, PersistentVolumeClaimVolumeSource, SecretEnvSource, Volume,
    VolumeMount,
};

use super::artifacts::{pvc_location, pvc_mount_dir, pvc_mount_path};
use super::names::dns_label_with_suffix;
use crate::api::experiment::PinnedInput;
use crate::api::{DataAsset, DataInput, InputMode};

/// Where Download inputs are placed: `/mnt/inputs/<input>`.
pub const INPUTS_DIR: &str = "/mnt/inputs";
/// Job annotation: the pinned inputs of the run (JSON, name -> pin).
pub const INPUTS_ANNOTATION: &str = "mlplane.io/inputs";

/// An input that cannot be pinned (yet). `reason` is a Ready reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PinError {
    /// `DataAssetNotFound`, `DataAssetNotReady`, `DataVersionNotFound`.
    pub reason: &'static str,
    /// Names the field.
    pub message: String,
}

/// Ready reasons of inputs that may still become pinnable (a run waits).
pub const WAITING_REASONS: [&str; 3] = ["DataAssetNotFound", "DataAssetNotReady", "DataVersionNotFound"];

/// An input pinned for one run, with what its pod needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinned {
    /// What the run records (annotation, status).
    pub pin: PinnedInput,
    /// Mount or Download.
    pub mode: InputMode,
    /// The Secret with the credentials of the location (Download's `envFrom`).
    pub secret: Option<String>,
}

impl Pinned {
    /// The location read.
    pub fn location(&self) -> &str {
        self.pin.uri.as_deref().unwrap_or_default()
    }
}

/// What [`pin`] needs to know about a version that is not in the asset's
/// status: its digest and where it was read from (tracking lookup).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OlderVersion {
    pub digest: String,
    pub source: String,
}

/// The version an input asks for: `None` for the latest.
pub fn requested_version(input: &DataInput) -> Option<&str> {
    input.version.as_deref().filter(|v| *v != "latest")
}

/// Pins input `name` (`field` is where it is in the spec, for messages).
/// `asset` is the DataAsset it names (if found), `older` what the tracking
/// server knows of a requested version missing from the asset's status.
pub fn pin(
    field: &str,
    input: &DataInput,
    asset: Option<&DataAsset>,
    older: Option<&OlderVersion>,
) -> Result<Pinned, PinError> {
    let mode = input.mode.unwrap_or_default();
    let Some(name) = &input.data_asset else {
        return Ok(Pinned {
            pin: PinnedInput {
                uri: input.uri.clone(),
                ..Default::default()
            },
            mode,
            secret: None,
        });
    };
    let Some(asset) = asset else {
        return Err(PinError {
            reason: "DataAssetNotFound",
            message: format!("{field}.dataAsset: DataAsset {name:?} not found in this namespace"),
        });
    };
    let status = asset.status.clone().unwrap_or_default();
    let secret = asset.spec.source.secret_ref.as_ref().map(|s| s.name.clone());
    let wanted = requested_version(input)
        .map(str::to_string)
        .or(status.latest_version.clone());
    let Some(version) = wanted else {
        return Err(PinError {
            reason: "DataAssetNotReady",
            message: format!("{field}.dataAsset: DataAsset {name:?} has no version yet"),
        });
    };
    let (digest, uri) = match status.versions.iter().find(|v| v.version == version) {
        Some(v) => (v.digest.clone(), asset.spec.source.uri.clone()),
        None => match older {
            Some(o) => (o.digest.clone(), o.source.clone()),
            None => {
                return Err(PinError {
                    reason: "DataVersionNotFound",
                    message: format!("{field}.version: DataAsset {name:?} has no version {version:?}"),
                });
            }
        },
    };
    Ok(Pinned {
        pin: PinnedInput {
            data_asset: Some(name.clone()),
            version: Some(version),
            digest: Some(digest),
            uri: Some(uri),
        },
        mode,
        secret,
    })
}

/// The short form of a pin for events and tags: `sales:3@sha256:...` or the URI.
pub fn describe(pin: &PinnedInput) -> String {
    match (&pin.data_asset, &pin.version, &pin.digest) {
        (Some(a), Some(v), Some(d)) => format!("{a}:{v}@{d}"),
        _ => pin.uri.clone().unwrap_or_default(),
    }
}

/// A name as one path segment: itself when it is `[A-Za-z0-9._-]+` (and not
/// `.`/`..`), else a DNS label with a hash.
fn segment(name: &str) -> String {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        name.to_string()
    } else {
        dns_label_with_suffix(name, "", 63)
    }
}

/// What a run pod needs for its inputs and outputs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodData {
    /// Input name -> location in the pod (`${{inputs.x}}`, `MLPLANE_INPUT_X`).
    pub inputs: BTreeMap<String, String>,
    /// Output name -> location in the pod (`${{outputs.x}}`, `MLPLANE_OUTPUT_X`).
    pub outputs: BTreeMap<String, String>,
    /// Volumes of the pod.
    pub volumes: Vec<Volume>,
    /// Mounts of the run container.
    pub volume_mounts: Vec<VolumeMount>,
    /// Init containers (downloads).
    pub init_containers: Vec<Container>,
    /// `envFrom` of the run container (artifact store credentials).
    pub env_from: Vec<EnvFromSource>,
}

impl PodData {
    fn pvc_volume_name(claim: &str) -> String {
        dns_label_with_suffix(&format!("pvc-{claim}"), "", 63)
    }

    /// Mounts the claim in the run container (read-write wins over read-only).
    fn mount_pvc(&mut self, claim: &str, read_only: bool) {
        let name = Self::pvc_volume_name(claim);
        if !self.volumes.iter().any(|v| v.name == name) {
            self.volumes.push(Volume {
                name: name.clone(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_string(),
                    read_only: None,
                }),
                ..Default::default()
            });
        }
        match self.volume_mounts.iter_mut().find(|m| m.name == name) {
            Some(m) => {
                if !read_only {
                    m.read_only = None;
                }
            }
            None => self.volume_mounts.push(VolumeMount {
                name,
                mount_path: pvc_mount_dir(claim),
                read_only: read_only.then_some(true),
                ..Default::default()
            }),
        }
    }

    /// Adds input `name`, pinned as `pinned`; `image` runs the downloads.
    pub fn input(&mut self, name: &str, pinned: &Pinned, image: &str) {
        let location = pinned.location().to_string();
        match pinned.mode {
            InputMode::Mount => {
                let in_pod = match pvc_location(&location) {
                    Some((claim, _)) => {
                        self.mount_pvc(claim, true);
                        pvc_mount_path(&location).unwrap_or(location.clone())
                    }
                    None => location.clone(),
                };
                self.inputs.insert(name.to_string(), in_pod);
            }
            InputMode::Download => {
                let dir = format!("{INPUTS_DIR}/{}", segment(name));
                let volume = dns_label_with_suffix(&format!("input-{name}"), "", 63);
                self.volumes.push(Volume {
                    name: volume.clone(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                });
                let mut command = vec![
                    "mlplane".to_string(),
                    "fetch".into(),
                    "--source".into(),
                    location.clone(),
                    "--dest".into(),
                    dir.clone(),
                ];
                if let Some(d) = &pinned.pin.digest {
                    command.extend(["--digest".to_string(), d.clone()]);
                }
                let mut mounts = vec![VolumeMount {
                    name: volume.clone(),
                    mount_path: dir.clone(),
                    ..Default::default()
                }];
                if let Some((claim, _)) = pvc_location(&location) {
                    let pvc = Self::pvc_volume_name(claim);
                    if !self.volumes.iter().any(|v| v.name == pvc) {
                        self.volumes.push(Volume {
                            name: pvc.clone(),
                            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                claim_name: claim.to_string(),
                                read_only: None,
                            }),
                            ..Default::default()
                        });
                    }
                    mounts.push(VolumeMount {
                        name: pvc,
                        mount_path: pvc_mount_dir(claim),
                        read_only: Some(true),
                        ..Default::default()
                    });
                }
                self.init_containers.push(Container {
                    name: dns_label_with_suffix(&format!("fetch-{name}"), "", 63),
                    image: Some(image.to_string()),
                    command: Some(command),
                    env_from: pinned.secret.as_ref().map(|s| vec![secret_env(s)]),
                    volume_mounts: Some(mounts),
                    ..Default::default()
                });
                self.volume_mounts.push(VolumeMount {
                    name: volume,
                    mount_path: dir.clone(),
                    read_only: Some(true),
                    ..Default::default()
                });
                self.inputs.insert(name.to_string(), dir);
            }
        }
    }

    /// Adds output `name` at `location` (in a `pvc://` or object store).
    pub fn output(&mut self, name: &str, location: &str) {
        let in_pod = match pvc_location(location) {
            Some((claim, _)) => {
                self.mount_pvc(claim, false);
                pvc_mount_path(location).unwrap_or_else(|| location.to_string())
            }
            None => location.to_string(),
        };
        self.outputs.insert(name.to_string(), in_pod);
    }

    /// Gives the run container the Secret `name` as `envFrom` (once).
    pub fn credentials(&mut self, name: &str) {
        let e = secret_env(name);
        if !self.env_from.contains(&e) {
            self.env_from.push(e);
        }
    }
}

fn secret_env(name: &str) -> EnvFromSource {
    EnvFromSource {
        secret_ref: Some(SecretEnvSource {
            name: name.to_string(),
            optional: None,
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn asset(status: serde_json::Value) -> DataAsset {
        serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "DataAsset",
            "metadata": {"name": "sales", "namespace": "n"},
            "spec": {"type": "UriFolder", "source": {"uri": "s3://b/sales/", "secretRef": {"name": "s3"}}},
            "status": status,
        }))
        .unwrap()
    }

    fn input(v: serde_json::Value) -> DataInput {
        serde_json::from_value(v).unwrap()
    }

    fn versions() -> serde_json::Value {
        json!({"latestVersion": "2", "versions": [
            {"version": "2", "digest": "sha256:two", "files": 3, "bytes": 30},
            {"version": "1", "digest": "sha256:one", "files": 2, "bytes": 20}]})
    }

    #[test]
    fn latest_is_pinned_to_the_newest_version() {
        let a = asset(versions());
        for v in [
            json!({"dataAsset": "sales"}),
            json!({"dataAsset": "sales", "version": "latest"}),
        ] {
            let p = pin("spec.inputs.raw", &input(v), Some(&a), None).unwrap();
            assert_eq!(p.pin.version.as_deref(), Some("2"));
            assert_eq!(p.pin.digest.as_deref(), Some("sha256:two"));
            assert_eq!(p.location(), "s3://b/sales/");
            assert_eq!(p.secret.as_deref(), Some("s3"));
            assert_eq!(describe(&p.pin), "sales:2@sha256:two");
        }
        let p = pin(
            "f",
            &input(json!({"dataAsset": "sales", "version": "1"})),
            Some(&a),
            None,
        )
        .unwrap();
        assert_eq!(p.pin.digest.as_deref(), Some("sha256:one"));
    }

    #[test]
    fn what_cannot_be_pinned_says_why() {
        let e = pin("spec.inputs.raw", &input(json!({"dataAsset": "sales"})), None, None).unwrap_err();
        assert_eq!(e.reason, "DataAssetNotFound");
        assert!(e.message.starts_with("spec.inputs.raw.dataAsset: "), "{e}");
        let e = pin(
            "f",
            &input(json!({"dataAsset": "sales"})),
            Some(&asset(json!({}))),
            None,
        )
        .unwrap_err();
        assert_eq!(e.reason, "DataAssetNotReady");
        let v7 = input(json!({"dataAsset": "sales", "version": "7"}));
        let e = pin("f", &v7, Some(&asset(versions())), None).unwrap_err();
        assert_eq!(e.reason, "DataVersionNotFound");
        // An older version the tracking server knows: its own source.
        let older = OlderVersion {
            digest: "sha256:seven".into(),
            source: "s3://old/".into(),
        };
        let p = pin("f", &v7, Some(&asset(versions())), Some(&older)).unwrap();
        assert_eq!(
            (p.location(), p.pin.digest.as_deref()),
            ("s3://old/", Some("sha256:seven"))
        );
        assert!(WAITING_REASONS.contains(&e.reason));
    }

    #[test]
    fn mount_passes_locations_and_mounts_pvcs() {
        let mut pod = PodData::default();
        let uri = pin("f", &input(json!({"uri": "s3://x/y/"})), None, None).unwrap();
        pod.input("raw", &uri, "mlplane:1");
        let pvc = Pinned {
            pin: PinnedInput {
                uri: Some("pvc://mlplane-artifacts/cache/k1/clean".into()),
                ..Default::default()
            },
            mode: InputMode::Mount,
            secret: None,
        };
        pod.input("clean", &pvc, "mlplane:1");
        pod.output("model", "pvc://mlplane-artifacts/cache/k2/model");
        assert_eq!(pod.inputs["raw"], "s3://x/y/");
        assert_eq!(pod.inputs["clean"], "/mnt/pvc/mlplane-artifacts/cache/k1/clean");
        assert_eq!(pod.outputs["model"], "/mnt/pvc/mlplane-artifacts/cache/k2/model");
        assert_eq!(pod.volumes.len(), 1, "one volume per claim");
        assert_eq!(pod.volume_mounts.len(), 1);
        assert_eq!(pod.volume_mounts[0].mount_path, "/mnt/pvc/mlplane-artifacts");
        assert_eq!(pod.volume_mounts[0].read_only, None, "outputs make it writable");
        assert!(pod.init_containers.is_empty());
    }

    #[test]
    fn download_fetches_into_an_empty_dir_with_the_digest_and_secret() {
        let a = asset(versions());
        let p = pin(
            "f",
            &input(json!({"dataAsset": "sales", "mode": "Download"})),
            Some(&a),
            None,
        )
        .unwrap();
        let mut pod = PodData::default();
        pod.input("train data", &p, "ghcr.io/mlplane/mlplane:0.1.0");
        let dir = &pod.inputs["train data"];
        assert!(dir.starts_with("/mnt/inputs/train-data-"), "{dir}");
        let init = &pod.init_containers[0];
        assert_eq!(init.image.as_deref(), Some("ghcr.io/mlplane/mlplane:0.1.0"));
        assert_eq!(
            init.command.as_ref().unwrap(),
            &[
                "mlplane",
                "fetch",
                "--source",
                "s3://b/sales/",
                "--dest",
                dir.as_str(),
                "--digest",
                "sha256:two"
            ]
        );
        assert_eq!(
            init.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name,
            "s3"
        );
        assert!(init.name.starts_with("fetch-train-data-") && init.name.len() <= 63);
        assert_eq!(pod.volume_mounts[0].read_only, Some(true));
        assert_eq!(pod.volumes[0].empty_dir, Some(EmptyDirVolumeSource::default()));

        let mut pod = PodData::default();
        pod.input("raw", &p, "img");
        assert_eq!(pod.inputs["raw"], "/mnt/inputs/raw");
        assert_eq!(pod.init_containers[0].name, "fetch-raw");
        pod.credentials("s3");
        pod.credentials("s3");
        assert_eq!(pod.env_from.len(), 1);
    }
}
