//! The serving runtime catalog: a deployment's `model.format` picks the
//! container that serves it (ONNX: NVIDIA Triton; MLflow: MLflow's scoring
//! server), and `requestSettings` reach that container as the arguments or
//! variables the runtime understands.
//!
//! Owns: the catalog format, its built-in default, and resolving a
//! [`ServingDeployment`] to a [`Runtime`] with its settings applied. Must not
//! touch the API server. The chart ships the catalog as the value `runtimes`
//! (the file `runtimes.yaml` of the ConfigMap `<fullname>-catalogs`); the
//! operator reads it at start ([`RuntimeCatalog::from_yaml`]). A catalog file
//! replaces the built-in set entirely.
//!
//! Resolution:
//! - `format` in the catalog (matched without regard to case): that entry;
//!   `runtime.image` then replaces only its image (e.g. another Triton
//!   build), command, arguments, port and probes stay the entry's.
//! - `format` absent or not in the catalog, with `runtime.image`: a custom
//!   image, run with its own entrypoint; it must serve HTTP on port
//!   [`DEFAULT_PORT`] and read the model from [`MODEL_DIR`].
//! - `format` not in the catalog and no `runtime.image`: `UnknownModelFormat`.
//!
//! Every serving container gets `MLPLANE_MODEL_DIR=/mnt/models`, and for each
//! request setting that is set `MLPLANE_REQUEST_TIMEOUT_SECONDS` (the timeout
//! rounded up to whole seconds) and `MLPLANE_MAX_CONCURRENT_REQUESTS`; a
//! catalog entry may pass a setting on as an argument (`arg`, `{}` replaced
//! by the value) or a variable (`env`) of its own.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;
use serde::{Deserialize, Serialize};

use crate::api::model_deployment::{RequestSettings, ServingDeployment};

/// Where serving pods find the model (the init container fetches it there).
pub const MODEL_DIR: &str = "/mnt/models";
/// Port of a runtime that names none, and of custom images.
pub const DEFAULT_PORT: i32 = 8080;

/// The built-in catalog (the chart's `runtimes` value is the same). Tags are
/// pinned: a format must mean the same server tomorrow.
///
/// - ONNX: Triton's ONNX Runtime backend; the model directory is a Triton
///   model repository (`<model>/<version>/model.onnx`, `config.pbtxt`
///   optional), served over the Open Inference Protocol (KServe v2) on 8080,
///   gRPC on 9000, metrics on 8002. Triton has no server-wide request
///   timeout (requests time out at the HTTPRoute, see the controller); the
///   concurrency bounds its HTTP threads.
/// - MLflow: `mlflow models serve` of an MLflow Model directory with the
///   image's own Python environment (`--env-manager local`: no download at
///   start; build an image with the model's dependencies with `mlflow models
///   build-docker` and set `runtime.image`). `/invocations` scores, `/ping`
///   and `/health` answer once the model is loaded.
pub const BUILTIN_YAML: &str = r#"runtimes:
  ONNX:
    image: nvcr.io/nvidia/tritonserver:25.03-py3
    command: [tritonserver]
    args: [--model-repository=/mnt/models, --http-port=8080, --grpc-port=9000, --metrics-port=8002, --allow-http=true, --allow-grpc=true]
    port: 8080
    readinessPath: /v2/health/ready
    livenessPath: /v2/health/live
    requestSettings:
      maxConcurrentRequestsPerInstance: {arg: "--http-thread-count={}"}
  MLflow:
    image: ghcr.io/mlflow/mlflow:v3.17.2
    command: [mlflow, models, serve]
    args: [--model-uri=/mnt/models, --host=0.0.0.0, --port=8080, --env-manager=local]
    port: 8080
    readinessPath: /health
    livenessPath: /ping
    requestSettings:
      timeout: {env: MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT}
      maxConcurrentRequestsPerInstance: {env: MLFLOW_MODELS_WORKERS}
"#;

/// How a request setting reaches a runtime: as an argument and/or a
/// variable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Passing {
    /// An argument appended to `args`, `{}` replaced by the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arg: Option<String>,
    /// A variable set to the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

/// The request settings a runtime understands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SettingsMapping {
    /// `requestSettings.timeout`, in whole seconds (rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Passing>,
    /// `requestSettings.maxConcurrentRequestsPerInstance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests_per_instance: Option<Passing>,
}

/// One catalog entry: how to serve a model format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Runtime {
    /// Container image (tag pinned).
    pub image: String,
    /// Command (empty: the image's entrypoint).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The HTTP port it serves on.
    #[serde(default = "default_port")]
    pub port: i32,
    /// HTTP path of its readiness check (absent: a TCP check of the port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_path: Option<String>,
    /// HTTP path of its liveness check (absent: a TCP check of the port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_path: Option<String>,
    /// How request settings reach it.
    #[serde(default)]
    pub request_settings: SettingsMapping,
}

fn default_port() -> i32 {
    DEFAULT_PORT
}

impl Runtime {
    /// A custom image: its own entrypoint, [`DEFAULT_PORT`], TCP checks.
    pub fn custom(image: &str) -> Self {
        Self {
            image: image.to_string(),
            command: vec![],
            args: vec![],
            port: DEFAULT_PORT,
            readiness_path: None,
            liveness_path: None,
            request_settings: SettingsMapping::default(),
        }
    }
}

/// Model format -> runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeCatalog {
    /// Format (as written in `model.format`) -> runtime.
    pub runtimes: BTreeMap<String, Runtime>,
}

impl Default for RuntimeCatalog {
    fn default() -> Self {
        Self::builtin()
    }
}

/// A catalog file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Not YAML of the expected shape.
    #[error("runtime catalog: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// Something an entry cannot mean.
    #[error("runtime catalog: {format}: {problem}")]
    Invalid {
        /// The entry.
        format: String,
        /// What is wrong.
        problem: String,
    },
}

/// A deployment whose runtime cannot be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{field}: model format {format:?} has no runtime in the catalog (known: {known}); set runtime.image to serve it with your own image"
)]
pub struct UnknownFormat {
    /// The field, e.g. `spec.deployments[1].model.format`.
    pub field: String,
    /// The format asked for.
    pub format: String,
    /// Known formats, comma-separated.
    pub known: String,
}

/// The serving container's runtime with a deployment's settings applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedRuntime {
    /// The runtime (image already replaced by `runtime.image`), its `args`
    /// extended by the settings passed as arguments.
    pub runtime: Runtime,
    /// Variables of the serving container, in a fixed order.
    pub env: Vec<EnvVar>,
}

fn var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

impl RuntimeCatalog {
    /// The built-in catalog ([`BUILTIN_YAML`]).
    pub fn builtin() -> Self {
        Self::from_yaml(BUILTIN_YAML).expect("the built-in runtime catalog is valid")
    }

    /// Parses and checks a catalog file.
    pub fn from_yaml(yaml: &str) -> Result<Self, CatalogError> {
        let catalog: Self = serde_yaml::from_str(yaml)?;
        let invalid = |format: &str, problem: &str| CatalogError::Invalid {
            format: format.to_string(),
            problem: problem.to_string(),
        };
        let mut seen = std::collections::BTreeSet::new();
        for (format, rt) in &catalog.runtimes {
            if format.is_empty() || !seen.insert(format.to_ascii_lowercase()) {
                return Err(invalid(format, "formats must be non-empty and unique (ignoring case)"));
            }
            if rt.image.trim().is_empty() {
                return Err(invalid(format, "empty image"));
            }
            if !(1..=65535).contains(&rt.port) {
                return Err(invalid(format, "port must be 1-65535"));
            }
            for path in [&rt.readiness_path, &rt.liveness_path].into_iter().flatten() {
                if !path.starts_with('/') {
                    return Err(invalid(format, "probe paths start with '/'"));
                }
            }
            let m = &rt.request_settings;
            for p in [&m.timeout, &m.max_concurrent_requests_per_instance]
                .into_iter()
                .flatten()
            {
                if p.arg.as_ref().is_some_and(|a| !a.contains("{}")) {
                    return Err(invalid(format, "a request setting's arg must contain {}"));
                }
            }
        }
        Ok(catalog)
    }

    /// The entry of `format`, matched without regard to case.
    pub fn get(&self, format: &str) -> Option<&Runtime> {
        self.runtimes
            .iter()
            .find(|(f, _)| f.eq_ignore_ascii_case(format))
            .map(|(_, r)| r)
    }

    /// The runtime of deployment `d` (at `spec.deployments[index]`) with its
    /// request settings applied.
    pub fn resolve(&self, d: &ServingDeployment, index: usize) -> Result<ResolvedRuntime, UnknownFormat> {
        let image = d.runtime.as_ref().map(|r| r.image.as_str());
        let format = d.model.format.as_deref();
        let mut runtime = match (format.and_then(|f| self.get(f)), image) {
            (Some(entry), image) => {
                let mut rt = entry.clone();
                if let Some(image) = image {
                    rt.image = image.to_string();
                }
                rt
            }
            (None, Some(image)) => Runtime::custom(image),
            (None, None) => {
                return Err(UnknownFormat {
                    field: format!("spec.deployments[{index}].model.format"),
                    format: format.unwrap_or_default().to_string(),
                    known: self.runtimes.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        };
        let env = apply_settings(&mut runtime, d.request_settings.as_ref());
        Ok(ResolvedRuntime { runtime, env })
    }
}

/// Adds the deployment's request settings to `rt`'s arguments and returns the
/// container's variables.
fn apply_settings(rt: &mut Runtime, settings: Option<&RequestSettings>) -> Vec<EnvVar> {
    let mut env = vec![var("MLPLANE_MODEL_DIR", MODEL_DIR)];
    let Some(s) = settings else { return env };
    let mut pass = |common: &str, mapping: Option<Passing>, value: String| {
        env.push(var(common, value.clone()));
        if let Some(p) = mapping {
            if let Some(arg) = p.arg {
                rt.args.push(arg.replace("{}", &value));
            }
            if let Some(name) = p.env {
                env.push(var(&name, value));
            }
        }
    };
    // The API server checks the duration's syntax; a value that still does
    // not parse is left out rather than passed on wrong.
    if let Some(secs) = s.timeout.as_ref().and_then(|t| t.to_std().ok()).map(ceil_seconds) {
        let mapping = rt.request_settings.timeout.clone();
        pass("MLPLANE_REQUEST_TIMEOUT_SECONDS", mapping, secs.to_string());
    }
    if let Some(n) = s.max_concurrent_requests_per_instance {
        let mapping = rt.request_settings.max_concurrent_requests_per_instance.clone();
        pass("MLPLANE_MAX_CONCURRENT_REQUESTS", mapping, n.to_string());
    }
    env
}

/// Whole seconds, rounded up, at least 1.
pub fn ceil_seconds(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model_deployment::{ModelSource, ServingRuntime};
    use crate::api::shared::Duration;

    fn deployment(format: Option<&str>, image: Option<&str>) -> ServingDeployment {
        ServingDeployment {
            name: "blue".into(),
            model: ModelSource {
                uri: Some("s3://models/resnet/3/".into()),
                format: format.map(String::from),
                ..Default::default()
            },
            runtime: image.map(|i| ServingRuntime { image: i.into() }),
            ..Default::default()
        }
    }

    fn env_of(r: &ResolvedRuntime) -> BTreeMap<String, String> {
        r.env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn onnx_is_served_by_triton_with_kserve_v2_health() {
        let r = RuntimeCatalog::builtin()
            .resolve(&deployment(Some("onnx"), None), 0)
            .unwrap();
        assert!(
            r.runtime.image.starts_with("nvcr.io/nvidia/tritonserver:"),
            "{}",
            r.runtime.image
        );
        assert!(!r.runtime.image.ends_with(":latest"));
        assert_eq!(r.runtime.command, ["tritonserver"]);
        assert!(r.runtime.args.contains(&"--model-repository=/mnt/models".to_string()));
        assert!(r.runtime.args.contains(&"--http-port=8080".to_string()));
        assert_eq!(r.runtime.port, 8080);
        assert_eq!(r.runtime.readiness_path.as_deref(), Some("/v2/health/ready"));
        assert_eq!(r.runtime.liveness_path.as_deref(), Some("/v2/health/live"));
        assert_eq!(env_of(&r)["MLPLANE_MODEL_DIR"], "/mnt/models");
    }

    #[test]
    fn mlflow_models_are_served_by_mlflow() {
        let r = RuntimeCatalog::builtin()
            .resolve(&deployment(Some("MLflow"), None), 0)
            .unwrap();
        assert!(
            r.runtime.image.starts_with("ghcr.io/mlflow/mlflow:v"),
            "{}",
            r.runtime.image
        );
        assert_eq!(r.runtime.command, ["mlflow", "models", "serve"]);
        assert!(r.runtime.args.contains(&"--port=8080".to_string()));
        assert_eq!(r.runtime.readiness_path.as_deref(), Some("/health"));
    }

    #[test]
    fn request_settings_reach_each_runtime_its_own_way() {
        let mut d = deployment(Some("ONNX"), None);
        d.request_settings = Some(RequestSettings {
            timeout: Some(Duration::from("1500ms")),
            max_concurrent_requests_per_instance: Some(4),
        });
        let triton = RuntimeCatalog::builtin().resolve(&d, 0).unwrap();
        assert!(triton.runtime.args.contains(&"--http-thread-count=4".to_string()));
        let env = env_of(&triton);
        assert_eq!(env["MLPLANE_REQUEST_TIMEOUT_SECONDS"], "2");
        assert_eq!(env["MLPLANE_MAX_CONCURRENT_REQUESTS"], "4");

        d.model.format = Some("MLflow".into());
        let mlflow = RuntimeCatalog::builtin().resolve(&d, 0).unwrap();
        let env = env_of(&mlflow);
        assert_eq!(env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"], "2");
        assert_eq!(env["MLFLOW_MODELS_WORKERS"], "4");
        assert!(!mlflow.runtime.args.iter().any(|a| a.contains("thread")));

        // A custom image only gets the common variables.
        let mut custom = deployment(None, Some("ghcr.io/acme/serve:1"));
        custom.request_settings = d.request_settings.clone();
        let c = RuntimeCatalog::builtin().resolve(&custom, 0).unwrap();
        assert!(c.runtime.args.is_empty() && c.runtime.command.is_empty());
        assert_eq!(env_of(&c).len(), 3);
    }

    #[test]
    fn runtime_image_replaces_only_the_image_of_a_known_format() {
        let r = RuntimeCatalog::builtin()
            .resolve(
                &deployment(Some("ONNX"), Some("nvcr.io/nvidia/tritonserver:24.08-py3")),
                0,
            )
            .unwrap();
        assert_eq!(r.runtime.image, "nvcr.io/nvidia/tritonserver:24.08-py3");
        assert_eq!(r.runtime.command, ["tritonserver"]);
        // Unknown format with an image: custom, TCP checks on 8080.
        let r = RuntimeCatalog::builtin()
            .resolve(&deployment(Some("TorchScript"), Some("ghcr.io/acme/serve:1")), 0)
            .unwrap();
        assert_eq!(r.runtime, Runtime::custom("ghcr.io/acme/serve:1"));
        assert_eq!(r.runtime.readiness_path, None);
    }

    #[test]
    fn unknown_format_without_image_names_the_field_and_the_known_formats() {
        let e = RuntimeCatalog::builtin()
            .resolve(&deployment(Some("TorchScript"), None), 2)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.deployments[2].model.format: model format \"TorchScript\" has no runtime in the catalog \
             (known: MLflow, ONNX); set runtime.image to serve it with your own image"
        );
    }

    #[test]
    fn catalog_files_replace_the_builtin_set_and_bad_ones_are_refused() {
        let c = RuntimeCatalog::from_yaml("runtimes:\n  sklearn:\n    image: ghcr.io/acme/sk:1\n").unwrap();
        assert_eq!(c.runtimes.len(), 1);
        assert_eq!(c.get("SKLEARN").unwrap().port, DEFAULT_PORT);
        assert!(c.get("ONNX").is_none());
        for bad in [
            "runtimes:\n  a: {image: ''}\n",
            "runtimes:\n  a: {image: x, port: 0}\n",
            "runtimes:\n  a: {image: x, readinessPath: health}\n",
            "runtimes:\n  a: {image: x, requestSettings: {timeout: {arg: --timeout}}}\n",
            "runtimes:\n  a: {image: x}\n  A: {image: y}\n",
            "runtimes:\n  a: {image: x, ports: [1]}\n",
            "formats: {}\n",
        ] {
            assert!(RuntimeCatalog::from_yaml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timeouts_round_up_to_seconds() {
        assert_eq!(ceil_seconds(std::time::Duration::from_millis(1)), 1);
        assert_eq!(ceil_seconds(std::time::Duration::from_secs(5)), 5);
        assert_eq!(ceil_seconds(std::time::Duration::from_millis(5001)), 6);
        assert_eq!(ceil_seconds(std::time::Duration::ZERO), 1);
    }
}
