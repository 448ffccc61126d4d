//! Leader election on a coordination.k8s.io Lease (kube-lease-manager). Every
//! replica runs; only the Lease holder starts the controllers, so only it
//! writes. A holder that loses the Lease stops at once (the process exits and
//! is restarted as a standby), as controller-runtime does; a holder shutting
//! down releases the Lease, so no stale holder is left. Standbys check the
//! Lease when it is due to expire: takeover happens within the lease duration.
use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Leader election settings (from the `run` flags).
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    /// Seconds a Lease stays valid after its last renewal.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_seconds: u64,
}

/// A running election: `is_leader` follows the Lease.
pub struct Election {
    pub is_leader: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<LeaseManager>>,
}

impl Election {
    /// Joins the election (creating the Lease if it does not exist).
    pub async fn start(client: Client, cfg: &LeaderConfig) -> anyhow::Result<Self> {
        let manager = LeaseManagerBuilder::new(client, &cfg.lease_name)
            .with_namespace(&cfg.namespace)
            .with_identity(&cfg.identity)
            .with_duration(cfg.duration_seconds)
            .with_grace(cfg.grace_seconds)
            .with_field_manager("mlplane-leader-election")
            .build()
            .await?;
        let (is_leader, task) = manager.watch().await;
        Ok(Self { is_leader, task })
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquired(&mut self) -> anyhow::Result<()> {
        self.is_leader
            .wait_for(|held| *held)
            .await
            .map_err(|_| anyhow::anyhow!("leader election task ended"))?;
        Ok(())
    }

    /// Resolves when this replica no longer holds the Lease.
    pub async fn lost(&mut self) {
        let _ = self.is_leader.wait_for(|held| !*held).await;
    }

    /// Releases the Lease (if held) and ends the election task.
    pub async fn release(self) {
        drop(self.is_leader);
        match self.task.await {
            Ok(Ok(_)) => tracing::info!("released leader Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing leader Lease failed"),
            Err(e) => tracing::warn!(error = %e, "leader election task panicked"),
        }
    }
}
