//! Process runtime of the operator: logging, the metrics registry, the HTTP
//! server for /metrics, /healthz and /readyz, the kube client with request
//! accounting, and leader election. Nothing here knows about mlplane's kinds.
pub mod client;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod telemetry;
