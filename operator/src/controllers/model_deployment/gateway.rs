//! Gateway API types (`gateway.networking.k8s.io/v1`, standard channel),
//! limited to the HTTPRoute fields the controller sets and reads.
//!
//! Owns: nothing but types. k8s-openapi has no Gateway API types, and the
//! `gateway-api` crate (kube-rs/gateway-api-rs 0.22) is built on kube 4 and
//! k8s-openapi 0.28, whose `Resource` trait our kube 5 client cannot use; so
//! the few fields needed are declared here (names and shapes as in
//! sigs.k8s.io/gateway-api v1.6's `apis/v1/httproute_types.go`). Fields not
//! declared are dropped when a live HTTPRoute is read, which the
//! write-when-changed comparison tolerates (it compares only fields set here).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// API group of the Gateway API.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// `group/version` of HTTPRoute v1.
pub const API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// An HTTPRoute: how HTTP requests reaching its parents (Gateways, or a
/// Service for a GAMMA mesh) are routed to backends.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    namespaced,
    status = "HTTPRouteStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteSpec {
    /// Gateways (or Services) the route attaches to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentReference>,
    /// Host names matched (empty: every host of the listener).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<HTTPRouteRule>,
}

/// A parent of a route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    /// `gateway.networking.k8s.io` for a Gateway, `""` for a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Gateway` or `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Namespace (default: the route's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Listener name of a Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// Port of a Service parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// One rule: its backends, filters and timeouts (no matches: every path).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteRule {
    /// Weighted backends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HTTPBackendRef>,
    /// Filters applied to every request of the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HTTPRouteFilter>,
    /// Timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HTTPRouteTimeouts>,
}

/// A Service backend and its weight.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPBackendRef {
    /// The backend.
    #[serde(flatten)]
    pub backend: BackendObjectReference,
    /// Share of the rule's requests, relative to the other backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}

/// A route filter (only `RequestMirror` is used).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteFilter {
    /// Filter type, e.g. `RequestMirror`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The mirror, for `RequestMirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<HTTPRequestMirrorFilter>,
}

/// Copies requests to another backend; its responses are dropped.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRequestMirrorFilter {
    /// The backend receiving the copies.
    pub backend_ref: BackendObjectReference,
    /// Percent of requests copied (standard channel since v1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i32>,
}

/// A backend without weight.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendObjectReference {
    /// `""` (core) for a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Service name.
    pub name: String,
    /// Service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// Timeouts of a rule (Gateway API durations such as `5s`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteTimeouts {
    /// Time from the gateway receiving a request to it sending the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// What the route's parents report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteStatus {
    /// One entry per parent that has seen the route.
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

/// A parent's view of the route (`Accepted`, `ResolvedRefs`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    /// The parent.
    pub parent_ref: ParentReference,
    /// The implementation that wrote this entry.
    #[serde(default)]
    pub controller_name: String,
    /// Its conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
