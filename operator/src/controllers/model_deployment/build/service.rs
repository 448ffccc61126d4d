//! The Services of a ModelDeployment: one per deployment (`<md>-<d>`, the
//! HTTPRoute's backends) and the endpoint `<md>` behind the URL
//! `http://<md>.<namespace>.svc`. All are ClusterIP Services on port 80 to
//! the serving container's `http` port.
//!
//! Owns: both Service builders. Must not touch the API server.
//!
//! What the endpoint Service selects: the pods of one deployment, the
//! *primary* ([`crate::controllers::model_deployment::traffic::primary`]):
//! the one with the largest effective share. Without Gateway API every split
//! is all-to-one, so the endpoint is exactly the split; a switch from blue to
//! green moves the selector once green is Available. With Gateway API the
//! HTTPRoute carries the split: through its Gateway, and for in-cluster
//! callers through a GAMMA mesh, for which the route names this Service as a
//! parent (a mesh then routes requests for it by the route's weights).
//! In-cluster callers without a mesh reach the primary only: a plain Service
//! cannot weigh backends, and mlplane does not approximate a split by pod
//! counts.
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    HTTP_PORT_NAME, SERVICE_PORT, child_name, deployment_labels, labels, metadata, pod_selector, with_spec_hash,
};
use crate::api::model_deployment::ModelDeployment;

fn spec(selector: std::collections::BTreeMap<String, String>) -> ServiceSpec {
    ServiceSpec {
        type_: Some("ClusterIP".into()),
        selector: Some(selector),
        ports: Some(vec![ServicePort {
            name: Some(HTTP_PORT_NAME.into()),
            port: SERVICE_PORT,
            target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The Service of deployment `d`.
pub fn deployment_service(md: &ModelDeployment, d: &str) -> Service {
    let name = child_name(&md.metadata.name.clone().unwrap_or_default(), d);
    with_spec_hash(Service {
        metadata: metadata(md, &name, deployment_labels(md, d)),
        spec: Some(spec(pod_selector(md, d))),
        status: None,
    })
}

/// The endpoint Service, selecting the pods of deployment `primary`.
pub fn endpoint_service(md: &ModelDeployment, primary: &str) -> Service {
    let name = md.metadata.name.clone().unwrap_or_default();
    with_spec_hash(Service {
        metadata: metadata(md, &name, labels(md)),
        spec: Some(spec(pod_selector(md, primary))),
        status: None,
    })
}

/// The endpoint URL of `md`.
pub fn endpoint_url(md: &ModelDeployment) -> String {
    format!(
        "http://{}.{}.svc",
        md.metadata.name.as_deref().unwrap_or_default(),
        md.metadata.namespace.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::model_deployment::build::test_support::md;
    use crate::controllers::model_deployment::build::{DEPLOYMENT_LABEL, MODEL_DEPLOYMENT_LABEL};
    use serde_json::json;

    fn sample() -> ModelDeployment {
        md(
            json!({"deployments": [{"name": "blue", "model": {"uri": "s3://m/1", "format": "ONNX"}},
                                  {"name": "green", "model": {"uri": "s3://m/2", "format": "ONNX"}}]}),
        )
    }

    #[test]
    fn per_deployment_services_select_their_pods() {
        let s = deployment_service(&sample(), "green");
        assert_eq!(s.metadata.name.as_deref(), Some("resnet-green"));
        let spec = s.spec.unwrap();
        let sel = spec.selector.unwrap();
        assert_eq!(
            (sel[MODEL_DEPLOYMENT_LABEL].as_str(), sel[DEPLOYMENT_LABEL].as_str()),
            ("resnet", "green")
        );
        let port = &spec.ports.unwrap()[0];
        assert_eq!(
            (port.port, &port.target_port),
            (80, &Some(IntOrString::String("http".into())))
        );
        assert_eq!(s.metadata.labels.unwrap()[DEPLOYMENT_LABEL], "green");
    }

    #[test]
    fn the_endpoint_service_selects_the_primary() {
        let md = sample();
        let s = endpoint_service(&md, "blue");
        assert_eq!(s.metadata.name.as_deref(), Some("resnet"));
        assert_eq!(
            s.spec.as_ref().unwrap().selector.as_ref().unwrap()[DEPLOYMENT_LABEL],
            "blue"
        );
        assert!(!s.metadata.labels.as_ref().unwrap().contains_key(DEPLOYMENT_LABEL));
        assert_ne!(endpoint_service(&md, "green"), s);
        assert_eq!(endpoint_url(&md), "http://resnet.vision.svc");
    }
}
