//! The `static` provider: existing nodes that an administrator labelled
//! `mlplane.io/compute-cluster=<cluster>` and `mlplane.io/pool=<pool>`
//! (and, to keep other pods off, tainted
//! `mlplane.io/compute-cluster=<cluster>:NoSchedule`). It only accounts:
//! the queue admits runs onto the capacity these nodes have, status reports
//! them, and nothing is ever added, cordoned or removed; `minNodes` and
//! `maxNodes` are informational.
//!
//! Owns: nothing in the cluster. Must not write anything.
use super::{NodeProvider, NodeRef};
use crate::api::Pool;

/// Accounting only: growing and removing do nothing.
pub struct StaticProvider;

impl NodeProvider for StaticProvider {
    async fn grow(&self, _pool: &Pool, _existing: &[String], _size: u32, _add: u32) -> kube::Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn remove(&self, _pool: &Pool, _size: u32, _nodes: &[NodeRef]) -> kube::Result<()> {
        Ok(())
    }
}
