//! mlplane: a Kubernetes operator giving a cluster the workflow of a hosted
//! machine-learning service. The binary in `main.rs` only wires these modules.
pub mod api;
pub mod autoscaler;
pub mod controllers;
pub mod operator;
pub mod quantity;
pub mod runtime;
pub mod storage;
pub mod tracking;
