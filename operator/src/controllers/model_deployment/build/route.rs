//! The Gateway API HTTPRoute `<md>` carrying the effective split.
//!
//! Owns: the route builder. Must not touch the API server.
//!
//! - Parents: the Gateway named by the operator's `--gateway
//!   <namespace>/<name>` (chart value `serving.gateway`), if any, and the
//!   endpoint Service `<md>` (port 80), so a GAMMA mesh applies the split to
//!   in-cluster requests for `http://<md>.<namespace>.svc` too.
//! - Host names: with `--gateway-domain <domain>`, `<md>-<namespace>.<domain>`
//!   (one DNS label under the domain, so a wildcard certificate covers every
//!   endpoint); without a domain the route matches every host of the
//!   Gateway's listeners.
//! - One rule for every path: a weighted backend per built deployment (its
//!   Service, port 80, weight = effective percent, 0 included so the route
//!   shows every deployment), a `RequestMirror` filter with `percent` for an
//!   effective mirror, and `timeouts.request` = the longest
//!   `requestSettings.timeout` of the deployments taking traffic (the request
//!   timeout of runtimes that have none of their own, e.g. Triton).
use super::{SERVICE_PORT, child_name, labels, metadata, with_spec_hash};
use crate::api::model_deployment::ModelDeployment;
use crate::controllers::model_deployment::gateway::{
    BackendObjectReference, GROUP, HTTPBackendRef, HTTPRequestMirrorFilter, HTTPRoute, HTTPRouteFilter, HTTPRouteRule,
    HTTPRouteSpec, HTTPRouteTimeouts, ParentReference,
};
use crate::controllers::model_deployment::traffic::Split;
use crate::controllers::run::names::{MAX_DNS_LABEL_LEN, short_hash};

/// The Gateway routes attach to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::str::FromStr for GatewayRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(Self {
                namespace: ns.into(),
                name: name.into(),
            }),
            _ => Err(format!("{s:?}: expected <namespace>/<name>")),
        }
    }
}

/// Where routes attach and which host names they claim.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteSettings {
    /// The Gateway parent, if any.
    pub gateway: Option<GatewayRef>,
    /// Domain of the host names.
    pub domain: Option<String>,
}

/// `<md>-<namespace>.<domain>`, the first label cut and hashed when longer
/// than a DNS label.
pub fn hostname(md: &str, namespace: &str, domain: &str) -> String {
    let mut label = format!("{md}-{namespace}");
    if label.len() > MAX_DNS_LABEL_LEN {
        let hash = short_hash(&format!("{namespace}/{md}"));
        label = format!("{}-{hash}", label[..MAX_DNS_LABEL_LEN - 9].trim_end_matches('-'));
    }
    format!("{label}.{}", domain.trim_start_matches('.'))
}

/// What the route routes: backends (deployment, weight) in spec order, the
/// mirror, and the request timeout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteInput {
    /// Every built deployment with its effective percent (0 included).
    pub backends: Vec<(String, i32)>,
    /// Effective mirror (deployment -> percent).
    pub mirror: Split,
    /// `timeouts.request` in whole seconds.
    pub timeout_seconds: Option<u64>,
}

fn service_ref(md: &str, d: &str) -> BackendObjectReference {
    BackendObjectReference {
        group: Some(String::new()),
        kind: Some("Service".into()),
        name: child_name(md, d),
        port: Some(SERVICE_PORT),
    }
}

/// The HTTPRoute of `md`.
pub fn build(md: &ModelDeployment, settings: &RouteSettings, input: &RouteInput) -> HTTPRoute {
    let name = md.metadata.name.clone().unwrap_or_default();
    let ns = md.metadata.namespace.clone().unwrap_or_default();
    let mut parent_refs = vec![];
    if let Some(gw) = &settings.gateway {
        parent_refs.push(ParentReference {
            group: Some(GROUP.into()),
            kind: Some("Gateway".into()),
            namespace: Some(gw.namespace.clone()),
            name: gw.name.clone(),
            ..Default::default()
        });
    }
    parent_refs.push(ParentReference {
        group: Some(String::new()),
        kind: Some("Service".into()),
        name: name.clone(),
        port: Some(SERVICE_PORT),
        ..Default::default()
    });
    let backend_refs = input
        .backends
        .iter()
        .map(|(d, weight)| HTTPBackendRef {
            backend: service_ref(&name, d),
            weight: Some(*weight),
        })
        .collect();
    let filters = input
        .mirror
        .iter()
        .map(|(d, percent)| HTTPRouteFilter {
            type_: "RequestMirror".into(),
            request_mirror: Some(HTTPRequestMirrorFilter {
                backend_ref: service_ref(&name, d),
                percent: Some(*percent),
            }),
        })
        .collect();
    // Gateway API durations have at most 5 digits per unit.
    let timeouts = input.timeout_seconds.map(|s| HTTPRouteTimeouts {
        request: Some(format!("{}s", s.min(99_999))),
    });
    let mut route = HTTPRoute::new(
        &name,
        HTTPRouteSpec {
            parent_refs,
            hostnames: settings.domain.iter().map(|d| hostname(&name, &ns, d)).collect(),
            rules: vec![HTTPRouteRule {
                backend_refs,
                filters,
                timeouts,
            }],
        },
    );
    route.metadata = metadata(md, &name, labels(md));
    with_spec_hash(route)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::model_deployment::build::test_support::md;
    use serde_json::json;

    fn sample() -> ModelDeployment {
        md(
            json!({"deployments": [{"name": "blue", "model": {"uri": "s3://m/1", "format": "ONNX"}},
                                  {"name": "green", "model": {"uri": "s3://m/2", "format": "ONNX"}}],
                  "traffic": {"blue": 90, "green": 10}}),
        )
    }

    #[test]
    fn weights_mirror_and_timeout_are_those_given() {
        let input = RouteInput {
            backends: vec![("blue".into(), 90), ("green".into(), 10)],
            mirror: Split::from([("green".to_string(), 5)]),
            timeout_seconds: Some(5),
        };
        let settings = RouteSettings {
            gateway: Some("infra/public".parse().unwrap()),
            domain: Some("models.example.com".into()),
        };
        let r = build(&sample(), &settings, &input);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(v["kind"], "HTTPRoute");
        assert_eq!(v["metadata"]["name"], "resnet");
        assert_eq!(
            v["spec"]["parentRefs"],
            json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "infra", "name": "public"},
                   {"group": "", "kind": "Service", "name": "resnet", "port": 80}])
        );
        assert_eq!(v["spec"]["hostnames"], json!(["resnet-vision.models.example.com"]));
        let rule = &v["spec"]["rules"][0];
        assert_eq!(
            rule["backendRefs"],
            json!([{"group": "", "kind": "Service", "name": "resnet-blue", "port": 80, "weight": 90},
                   {"group": "", "kind": "Service", "name": "resnet-green", "port": 80, "weight": 10}])
        );
        assert_eq!(
            rule["filters"],
            json!([{"type": "RequestMirror", "requestMirror": {
                "backendRef": {"group": "", "kind": "Service", "name": "resnet-green", "port": 80}, "percent": 5}}])
        );
        assert_eq!(rule["timeouts"], json!({"request": "5s"}));
    }

    #[test]
    fn without_gateway_or_mirror_the_route_has_only_the_service_parent_and_no_filters() {
        let input = RouteInput {
            backends: vec![("blue".into(), 100), ("green".into(), 0)],
            ..Default::default()
        };
        let r = build(&sample(), &RouteSettings::default(), &input);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["spec"]["parentRefs"].as_array().unwrap().len(), 1);
        assert!(v["spec"].get("hostnames").is_none());
        assert!(v["spec"]["rules"][0].get("filters").is_none());
        assert!(v["spec"]["rules"][0].get("timeouts").is_none());
        assert_eq!(v["spec"]["rules"][0]["backendRefs"][1]["weight"], 0);
    }

    #[test]
    fn gateway_refs_and_hostnames() {
        assert_eq!(
            "infra/public".parse::<GatewayRef>(),
            Ok(GatewayRef {
                namespace: "infra".into(),
                name: "public".into()
            })
        );
        assert!("public".parse::<GatewayRef>().is_err());
        assert!("a/b/c".parse::<GatewayRef>().is_err());
        let h = hostname(&"m".repeat(63), &"n".repeat(63), "example.com");
        let label = h.split('.').next().unwrap();
        assert!(label.len() <= 63, "{h}");
        assert!(h.ends_with(".example.com"));
        assert_ne!(hostname(&"m".repeat(63), &"n".repeat(62), "x"), h);
    }
}
