//! The autoscaler of ComputeClusters: planning (pure) and node providers
//! (I/O).
//!
//! Owns: resource arithmetic ([`resources`]), placement and first-fit
//! bin packing ([`binpack`]), the admission queue's decisions
//! ([`admission`]), one planning pass of a cluster ([`plan`]), and the
//! providers that add and remove nodes ([`providers`]). Everything but
//! `providers` is pure: no API calls and no clock (callers pass `now`), so
//! the decisions are unit-tested and benchmarked without a cluster. Must not
//! read caches, write status, patch Jobs or drain nodes: the ComputeCluster
//! controller ([`crate::controllers::compute_cluster`]) observes, calls
//! [`plan::plan`] and carries the plan out.
pub mod admission;
pub mod binpack;
#[cfg(test)]
mod fixtures;
pub mod plan;
pub mod providers;
pub mod resources;
