//! The apps/v1 Deployment of one serving deployment.
//!
//! Owns: the serving pod. Must not touch the API server.
//!
//! - An init container `fetch-model` runs the operator's own image with
//!   `mlplane fetch --source <model> --dest /mnt/models` (the image's
//!   entrypoint is `mlplane`), filling the emptyDir `models` that the server
//!   container mounts read-only. Credentials: the workspace artifact store's
//!   Secret as `envFrom` (the variables object stores read, e.g.
//!   `AWS_ACCESS_KEY_ID`). A `pvc://<claim>/<path>` model (PVC workspaces)
//!   mounts the claim read-only at `/mnt/artifacts` and fetches
//!   `/mnt/artifacts/<path>`.
//! - The server container `server`: the runtime's image, command, arguments
//!   and variables ([`super::super::runtime`]), its port named `http`, the
//!   spec's resources (cpu a request; memory and GPUs requests and limits, as
//!   for runs), `/dev/shm` when `shmSize` is set, and readiness and liveness
//!   probes with the hosted service's defaults (initial delay 10 s, period
//!   10 s, timeout 2 s, failure threshold 30): HTTP GET of the spec's
//!   `probes` or the runtime's paths, else a TCP check of the port.
//! - Placement exactly as run pods ([`crate::controllers::run::build`]):
//!   nodeSelector `mlplane.io/compute-cluster` and the ComputeCluster's
//!   toleration; GPU pods also tolerate `nvidia.com/gpu`.
//! - Secure defaults as run pods (seccomp RuntimeDefault, no privilege
//!   escalation, every capability dropped), no ServiceAccount token, no
//!   Service links.
//! - Rollout: RollingUpdate with `maxUnavailable: 0` and `maxSurge: 25%`, so
//!   old pods serve until new ones are ready (a GPU pod is never stopped to
//!   make room for its replacement), and `progressDeadlineSeconds` from the
//!   operator's settings; past it the controller reports `RolloutStalled`.
//! - Replicas: `instanceCount` (default 1); with an autoscaler the field is
//!   left out, so the HorizontalPodAutoscaler owns it.
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, HTTPGetAction, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretEnvSource, TCPSocketAction, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{HTTP_PORT_NAME, child_name, deployment_labels, metadata, pod_selector, with_spec_hash};
use crate::api::model_deployment::{HttpProbe, ModelDeployment, PinnedModel, ServingDeployment};
use crate::controllers::model_deployment::resolve::MODEL_ANNOTATION;
use crate::controllers::model_deployment::runtime::{MODEL_DIR, ResolvedRuntime};
use crate::controllers::run::artifacts::pvc_location;
use crate::controllers::run::build::{
    Placement, Spot, gpus, node_selector, resources, secure_container_context, shm_volume, tolerations,
};

/// Name of the model-fetching init container.
pub const FETCH_CONTAINER: &str = "fetch-model";
/// Name of the serving container.
pub const SERVER_CONTAINER: &str = "server";
/// The emptyDir the model is fetched into.
pub const MODELS_VOLUME: &str = "models";
/// The artifacts PVC of a `pvc://` model.
pub const ARTIFACTS_VOLUME: &str = "artifacts";
/// Where that PVC is mounted.
pub const ARTIFACTS_MOUNT: &str = "/mnt/artifacts";
/// Probe timing of the hosted service's defaults.
pub const PROBE_INITIAL_DELAY_SECONDS: i32 = 10;
pub const PROBE_PERIOD_SECONDS: i32 = 10;
pub const PROBE_TIMEOUT_SECONDS: i32 = 2;
pub const PROBE_FAILURE_THRESHOLD: i32 = 30;

/// Everything one serving Deployment is built from, already resolved.
#[derive(Clone, Debug)]
pub struct ServingInput<'a> {
    /// The ModelDeployment.
    pub md: &'a ModelDeployment,
    /// The deployment.
    pub deployment: &'a ServingDeployment,
    /// Its runtime with settings applied.
    pub runtime: &'a ResolvedRuntime,
    /// The model it serves.
    pub model: &'a PinnedModel,
    /// Secret whose keys the fetch container gets as variables.
    pub credentials: Option<&'a str>,
    /// The operator's image (runs `mlplane fetch`).
    pub fetch_image: &'a str,
    /// `progressDeadlineSeconds`.
    pub progress_deadline_seconds: i32,
    /// Leave `replicas` to an autoscaler.
    pub autoscaled: bool,
}

fn probe(spec: Option<&HttpProbe>, default_path: Option<&str>, port: i32) -> Probe {
    let (path, port) = match spec {
        Some(p) => (Some(p.path.as_str()), p.port),
        None => (default_path, port),
    };
    let (http_get, tcp_socket) = match path {
        Some(path) => (
            Some(HTTPGetAction {
                path: Some(path.to_string()),
                port: IntOrString::Int(port),
                ..Default::default()
            }),
            None,
        ),
        None => (
            None,
            Some(TCPSocketAction {
                port: IntOrString::Int(port),
                host: None,
            }),
        ),
    };
    Probe {
        http_get,
        tcp_socket,
        initial_delay_seconds: Some(PROBE_INITIAL_DELAY_SECONDS),
        period_seconds: Some(PROBE_PERIOD_SECONDS),
        timeout_seconds: Some(PROBE_TIMEOUT_SECONDS),
        failure_threshold: Some(PROBE_FAILURE_THRESHOLD),
        success_threshold: Some(1),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

/// The Deployment of one serving deployment.
pub fn build(input: &ServingInput<'_>) -> Deployment {
    let md = input.md;
    let d = input.deployment;
    let rt = &input.runtime.runtime;
    let name = child_name(&md.metadata.name.clone().unwrap_or_default(), &d.name);

    // The fetch container: from the object store, or from the mounted PVC.
    let mut volumes = vec![Volume {
        name: MODELS_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    let mut fetch_mounts = vec![mount(MODELS_VOLUME, MODEL_DIR, false)];
    let source = match pvc_location(&input.model.uri) {
        Some((claim, path)) => {
            volumes.push(Volume {
                name: ARTIFACTS_VOLUME.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_string(),
                    read_only: Some(true),
                }),
                ..Default::default()
            });
            fetch_mounts.push(mount(ARTIFACTS_VOLUME, ARTIFACTS_MOUNT, true));
            format!("{ARTIFACTS_MOUNT}/{path}")
        }
        None => input.model.uri.clone(),
    };
    let fetch = Container {
        name: FETCH_CONTAINER.into(),
        image: Some(input.fetch_image.to_string()),
        args: Some(
            ["fetch", "--source", &source, "--dest", MODEL_DIR]
                .map(String::from)
                .to_vec(),
        ),
        env_from: input.credentials.map(|s| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: s.to_string(),
                    optional: None,
                }),
                ..Default::default()
            }]
        }),
        volume_mounts: Some(fetch_mounts),
        security_context: Some(secure_container_context()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };

    let mut server_mounts = vec![mount(MODELS_VOLUME, MODEL_DIR, true)];
    if let Some((volume, m)) = shm_volume(d.resources.as_ref()) {
        volumes.push(volume);
        server_mounts.push(m);
    }
    let probes = d.probes.clone().unwrap_or_default();
    let server = Container {
        name: SERVER_CONTAINER.into(),
        image: Some(rt.image.clone()),
        command: (!rt.command.is_empty()).then(|| rt.command.clone()),
        args: (!rt.args.is_empty()).then(|| rt.args.clone()),
        ports: Some(vec![ContainerPort {
            name: Some(HTTP_PORT_NAME.into()),
            container_port: rt.port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        env: (!input.runtime.env.is_empty()).then(|| input.runtime.env.clone()),
        resources: resources(d.resources.as_ref()),
        readiness_probe: Some(probe(probes.readiness.as_ref(), rt.readiness_path.as_deref(), rt.port)),
        liveness_probe: Some(probe(probes.liveness.as_ref(), rt.liveness_path.as_deref(), rt.port)),
        volume_mounts: Some(server_mounts),
        security_context: Some(secure_container_context()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };

    let placement = Placement {
        compute_cluster: d.compute.clone(),
        pool: None,
    };
    let tolerations = tolerations(&placement, gpus(d.resources.as_ref()), Spot::Avoid);
    // User pod labels first, so they cannot override mlplane's.
    let pod_md = d.pod_metadata.clone().unwrap_or_default();
    let mut pod_labels = pod_md.labels;
    pod_labels.extend(deployment_labels(md, &d.name));
    let mut pod_annotations = pod_md.annotations;
    pod_annotations.insert(
        "kubectl.kubernetes.io/default-container".into(),
        SERVER_CONTAINER.into(),
    );

    let replicas = if input.autoscaled {
        None
    } else {
        Some(d.scale.as_ref().and_then(|s| s.instance_count).unwrap_or(1))
    };
    let mut meta = metadata(md, &name, deployment_labels(md, &d.name));
    meta.annotations = Some(
        [(
            MODEL_ANNOTATION.to_string(),
            serde_json::to_string(input.model).unwrap_or_default(),
        )]
        .into(),
    );
    with_spec_hash(Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(pod_selector(md, &d.name)),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            progress_deadline_seconds: Some(input.progress_deadline_seconds),
            revision_history_limit: Some(5),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    init_containers: Some(vec![fetch]),
                    containers: vec![server],
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..Default::default()
                    }),
                    node_selector: node_selector(&placement),
                    tolerations: (!tolerations.is_empty()).then_some(tolerations),
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model_deployment::ModelDeployment;
    use crate::controllers::model_deployment::build::test_support::md;
    use crate::controllers::model_deployment::build::{DEPLOYMENT_LABEL, SPEC_HASH_ANNOTATION, spec_hash};
    use crate::controllers::model_deployment::runtime::RuntimeCatalog;
    use crate::controllers::run::build::{COMPUTE_CLUSTER_LABEL, GPU_RESOURCE};
    use serde_json::json;

    fn sample() -> ModelDeployment {
        md(json!({"deployments": [{
            "name": "blue",
            "model": {"uri": "s3://models/resnet/3/", "format": "ONNX"},
            "resources": {"cpu": "2", "memory": "4Gi", "gpu": 1, "shmSize": "1Gi"},
            "compute": "gpu",
            "requestSettings": {"timeout": "5s", "maxConcurrentRequestsPerInstance": 2},
            "scale": {"instanceCount": 3},
            "podMetadata": {"labels": {"team": "vision", "mlplane.io/deployment": "x"},
                            "annotations": {"sim.mlplane.io/never-ready": "true"}},
        }]}))
    }

    fn built(md: &ModelDeployment, model: &PinnedModel, credentials: Option<&str>, autoscaled: bool) -> Deployment {
        let d = &md.spec.deployments[0];
        let runtime = RuntimeCatalog::builtin().resolve(d, 0).unwrap();
        build(&ServingInput {
            md,
            deployment: d,
            runtime: &runtime,
            model,
            credentials,
            fetch_image: "ghcr.io/mlplane/mlplane:0.1.0",
            progress_deadline_seconds: 600,
            autoscaled,
        })
    }

    fn pin(uri: &str) -> PinnedModel {
        PinnedModel {
            uri: uri.into(),
            source_hash: "h".into(),
            ..Default::default()
        }
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn the_init_container_fetches_the_model_with_the_operator_image() {
        let md = sample();
        let d = built(&md, &pin("s3://models/resnet/3/"), Some("s3-creds"), false);
        let fetch = &pod(&d).init_containers.as_ref().unwrap()[0];
        assert_eq!(fetch.image.as_deref(), Some("ghcr.io/mlplane/mlplane:0.1.0"));
        assert_eq!(
            fetch.args.as_ref().unwrap(),
            &["fetch", "--source", "s3://models/resnet/3/", "--dest", "/mnt/models"]
        );
        assert_eq!(
            fetch.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name,
            "s3-creds"
        );
        let server = &pod(&d).containers[0];
        let m = &server.volume_mounts.as_ref().unwrap()[0];
        assert_eq!((m.mount_path.as_str(), m.read_only), ("/mnt/models", Some(true)));
        assert_eq!(
            pod(&d).volumes.as_ref().unwrap()[0].empty_dir,
            Some(EmptyDirVolumeSource::default())
        );
        // The pin is recorded on the Deployment.
        let recorded: PinnedModel =
            serde_json::from_str(&d.metadata.annotations.as_ref().unwrap()[MODEL_ANNOTATION]).unwrap();
        assert_eq!(recorded.uri, "s3://models/resnet/3/");
    }

    #[test]
    fn a_pvc_model_is_fetched_from_the_claim_mounted_read_only() {
        let md = sample();
        let d = built(
            &md,
            &pin("pvc://mlplane-artifacts/experiments/resnet/resnet-1/model"),
            None,
            false,
        );
        let fetch = &pod(&d).init_containers.as_ref().unwrap()[0];
        assert_eq!(
            fetch.args.as_ref().unwrap()[2],
            "/mnt/artifacts/experiments/resnet/resnet-1/model"
        );
        assert!(fetch.env_from.is_none());
        let vol = pod(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == ARTIFACTS_VOLUME)
            .unwrap();
        let claim = vol.persistent_volume_claim.as_ref().unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("mlplane-artifacts", Some(true))
        );
        let m = fetch
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == ARTIFACTS_VOLUME)
            .unwrap();
        assert_eq!(m.read_only, Some(true));
    }

    #[test]
    fn the_server_runs_the_runtime_with_probes_resources_and_placement() {
        let md = sample();
        let d = built(&md, &pin("s3://m/"), None, false);
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(d.metadata.name.as_deref(), Some("resnet-blue"));
        let p = pod(&d);
        let server = &p.containers[0];
        assert_eq!(server.name, SERVER_CONTAINER);
        assert!(
            server
                .image
                .as_ref()
                .unwrap()
                .starts_with("nvcr.io/nvidia/tritonserver:")
        );
        assert!(
            server
                .args
                .as_ref()
                .unwrap()
                .contains(&"--http-thread-count=2".to_string())
        );
        assert_eq!(server.ports.as_ref().unwrap()[0].container_port, 8080);
        for probe in [&server.readiness_probe, &server.liveness_probe] {
            let probe = probe.as_ref().unwrap();
            assert_eq!(
                (
                    probe.initial_delay_seconds,
                    probe.period_seconds,
                    probe.timeout_seconds,
                    probe.failure_threshold
                ),
                (Some(10), Some(10), Some(2), Some(30))
            );
        }
        let ready = server.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(ready.path.as_deref(), Some("/v2/health/ready"));
        let res = server.resources.as_ref().unwrap();
        assert_eq!(res.limits.as_ref().unwrap()[GPU_RESOURCE].0, "1");
        assert!(!res.limits.as_ref().unwrap().contains_key("cpu"));
        assert!(
            server
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == "/dev/shm")
        );
        assert_eq!(p.node_selector.as_ref().unwrap()[COMPUTE_CLUSTER_LABEL], "gpu");
        let tol: Vec<_> = p
            .tolerations
            .as_ref()
            .unwrap()
            .iter()
            .map(|t| t.key.clone().unwrap())
            .collect();
        assert_eq!(tol, [COMPUTE_CLUSTER_LABEL, GPU_RESOURCE]);
        assert_eq!(p.automount_service_account_token, Some(false));
        assert_eq!(server.security_context, Some(secure_container_context()));
        // Pod metadata: the user's, without overriding mlplane's labels.
        let tmpl = spec.template.metadata.as_ref().unwrap();
        assert_eq!(tmpl.labels.as_ref().unwrap()["team"], "vision");
        assert_eq!(tmpl.labels.as_ref().unwrap()[DEPLOYMENT_LABEL], "blue");
        assert_eq!(tmpl.annotations.as_ref().unwrap()["sim.mlplane.io/never-ready"], "true");
        assert_eq!(spec.selector.match_labels.as_ref().unwrap()[DEPLOYMENT_LABEL], "blue");
        // Safe rollout.
        let ru = spec.strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
        assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(spec.progress_deadline_seconds, Some(600));
    }

    #[test]
    fn spec_probes_override_the_runtime_and_custom_images_get_tcp_checks() {
        let mut md = sample();
        md.spec.deployments[0].probes =
            Some(serde_json::from_value(json!({"readiness": {"path": "/ready", "port": 9000}})).unwrap());
        let d = built(&md, &pin("s3://m/"), None, false);
        let server = &pod(&d).containers[0];
        let ready = server.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(
            (ready.path.as_deref(), &ready.port),
            (Some("/ready"), &IntOrString::Int(9000))
        );
        let live = server.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(live.path.as_deref(), Some("/v2/health/live"));

        md.spec.deployments[0].model.format = None;
        md.spec.deployments[0].probes = None;
        md.spec.deployments[0].runtime =
            Some(serde_json::from_value(json!({"image": "ghcr.io/acme/serve:1"})).unwrap());
        let d = built(&md, &pin("s3://m/"), None, false);
        let server = &pod(&d).containers[0];
        assert!(server.command.is_none() && server.args.is_none());
        let tcp = server.readiness_probe.as_ref().unwrap().tcp_socket.as_ref().unwrap();
        assert_eq!(tcp.port, IntOrString::Int(8080));
    }

    #[test]
    fn autoscaled_deployments_leave_replicas_to_the_autoscaler() {
        let md = sample();
        let fixed = built(&md, &pin("s3://m/"), None, false);
        let scaled = built(&md, &pin("s3://m/"), None, true);
        assert_eq!(scaled.spec.as_ref().unwrap().replicas, None);
        assert_ne!(spec_hash(&fixed), spec_hash(&scaled));
        assert!(
            fixed
                .metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(SPEC_HASH_ANNOTATION)
        );
        // Deterministic.
        assert_eq!(built(&md, &pin("s3://m/"), None, false), fixed);
    }
}
