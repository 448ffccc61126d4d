//! Pipeline controller: runs a DAG of steps as Jobs built by the shared run
//! builder, in topological order with as much parallelism as the DAG
//! allows, and reuses a step's earlier outputs instead of running it when
//! its cache key (image, command, env, params, pinned input digests,
//! upstream keys) is in the workspace's step cache, which the tracking
//! server keeps across operator restarts.
//!
//! Pure: [`dag`] (references, cycles, order), [`plan`] (cache keys,
//! scheduling), [`step`] (a step's RunSpec). I/O: [`reconcile`].
pub mod dag;
pub mod plan;
pub mod reconcile;
pub mod step;

pub use reconcile::run;
