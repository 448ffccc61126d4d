//! One watch, several controllers: the cluster-wide pod and run Job watches
//! fill one store each (read by the ComputeCluster, Workspace, Experiment
//! and Pipeline controllers), and every object they touch (applied or
//! deleted) is handed to each controller that subscribed for it, as that
//! controller's trigger stream. Each object is decoded once, not once per
//! controller, and cached once.
//!
//! kube's own shared reflector (`reflect_shared`) does not pass deletions
//! to subscribers, and a deleted run Job or pod must trigger its parent's
//! reconcile; hence this.
//!
//! Owns: the subscriptions and the task that polls the watch. Subscribers
//! register before [`Fanout::run`] starts (so none misses the first list)
//! and get their objects in watch order, over an unbounded channel: a
//! controller that stops polling holds only what was sent to it meanwhile,
//! and one that is gone is dropped.
use futures::channel::mpsc::{UnboundedSender, unbounded};
use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::Touched;

/// Subscribers of one watch (see the module docs).
pub struct Fanout<K> {
    subscribers: Vec<(Option<&'static str>, UnboundedSender<K>)>,
}

impl<K> Default for Fanout<K> {
    fn default() -> Self {
        Self { subscribers: vec![] }
    }
}

impl<K> Fanout<K>
where
    K: Resource + Clone + Send + 'static,
{
    /// The touched objects that carry `label` (any value), or all of them.
    pub fn subscribe(&mut self, label: Option<&'static str>) -> Touched<K> {
        let (tx, rx) = unbounded();
        self.subscribers.push((label, tx));
        rx.map(Ok).boxed()
    }

    /// Hands `obj` to every subscriber that wants it; forgets those gone.
    fn send(&mut self, obj: &K) {
        self.subscribers.retain(|(label, tx)| {
            if label.is_some_and(|l| !obj.labels().contains_key(l)) {
                return true;
            }
            tx.unbounded_send(obj.clone()).is_ok()
        });
    }

    /// Polls `source` (a reflector's touched objects) until it ends or
    /// `stop` fires, handing every object on. Errors are retried by the
    /// watcher's backoff and only logged.
    pub async fn run(
        mut self,
        source: impl Stream<Item = Result<K, watcher::Error>> + Send,
        stop: CancellationToken,
        what: &'static str,
    ) {
        super::drive_each(source, stop, what, |obj| self.send(&obj)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    fn pod(name: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    #[tokio::test]
    async fn every_subscriber_gets_what_it_asked_for_in_order() {
        let mut fanout = Fanout::<Pod>::default();
        let all = fanout.subscribe(None);
        let runs = fanout.subscribe(Some("mlplane.io/run"));
        let gone = fanout.subscribe(None);
        drop(gone);
        let source = futures::stream::iter([
            Ok(pod("a", json!({"mlplane.io/run": "r"}))),
            Ok(pod("b", json!({}))),
            Ok(pod("c", json!({"mlplane.io/run": "s"}))),
        ]);
        fanout.run(source, CancellationToken::new(), "pods").await;
        let names = |s: Touched<Pod>| async move { s.map(|p| p.unwrap().name_any()).collect::<Vec<_>>().await };
        assert_eq!(names(all).await, ["a", "b", "c"]);
        assert_eq!(names(runs).await, ["a", "c"]);
    }
}
