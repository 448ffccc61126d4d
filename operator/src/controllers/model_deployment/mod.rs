//! The ModelDeployment controller: an endpoint with named deployments of a
//! model, a traffic split between them, an optional mirror, and scaling.
//!
//! Pure parts: the runtime catalog ([`runtime`]), model resolution and
//! pinning ([`resolve`]), the split rules ([`traffic`]), the child builders
//! ([`build`]), the Gateway API types ([`gateway`]), status ([`status`]) and
//! the plan that ties them together ([`plan`]). I/O: the watch caches
//! ([`observe`]), the driver ([`reconcile`]) and the Service writes it hands
//! off ([`services`]).
pub mod build;
pub mod gateway;
pub mod observe;
pub mod plan;
pub mod reconcile;
pub mod resolve;
pub mod runtime;
pub mod services;
pub mod status;
pub mod traffic;

pub use reconcile::run;

/// Serving settings of the operator (from the `run` flags).
#[derive(Clone, Debug)]
pub struct ServingSettings {
    /// Use Gateway API HTTPRoutes when the API server serves them (detected
    /// when the controller starts); false: never.
    pub gateway_api: bool,
    /// Where HTTPRoutes attach and the host names they claim.
    pub routes: build::route::RouteSettings,
    /// `progressDeadlineSeconds` of serving Deployments: a rollout without
    /// progress for this long is `RolloutStalled`.
    pub progress_deadline_seconds: i32,
}

impl Default for ServingSettings {
    fn default() -> Self {
        Self {
            gateway_api: true,
            routes: build::route::RouteSettings::default(),
            progress_deadline_seconds: 600,
        }
    }
}
