//! Leader election with two operator processes on one Lease: only the leader
//! reconciles; when it is killed the standby takes over within the lease
//! duration; a gracefully stopped leader releases the Lease before exiting.

use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};
use mlplane::api::Workspace;
use mlplane_test_support::*;
use serde_json::json;

const LEASE_SECONDS: u64 = 6;

async fn cleanup(client: &kube::Client, name: &str) {
    let _ = Api::<Workspace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn standby_takes_over_within_the_lease_duration() -> Result<()> {
    let client = admin_client().await?;
    let lease = format!("failover-{}", random_suffix());
    let args = ["--lease-name", &lease, "--lease-duration", "6", "--lease-grace", "2"];
    let mut a = Operator::start(&client, &args).await?;
    eventually(Duration::from_secs(20), "first operator leads", || async {
        Ok(a.is_leader().then_some(()))
    })
    .await?;
    let mut b = Operator::start(&client, &args).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(a.is_leader() && !b.is_leader(), "exactly one leader");
    assert_eq!(
        b.metric("mlplane_reconcile_total", &[])?,
        0.0,
        "the standby reconciles nothing"
    );

    let first = format!("ws-lead-a-{}", random_suffix());
    create_ready_workspace(&client, &first, json!({})).await?;
    assert_eq!(b.writes_excluding_leases()?, 0.0, "the standby writes nothing");

    // Crash the leader: the standby leads within the lease duration.
    let killed = Instant::now();
    a.kill();
    eventually(Duration::from_secs(LEASE_SECONDS * 3), "standby leads", || async {
        Ok(b.is_leader().then_some(()))
    })
    .await?;
    let takeover = killed.elapsed();
    eprintln!("takeover after SIGKILL of the leader: {takeover:?} (lease {LEASE_SECONDS}s)");
    assert!(
        takeover <= Duration::from_secs(LEASE_SECONDS + 2),
        "takeover took {takeover:?}"
    );
    let second = format!("ws-lead-b-{}", random_suffix());
    create_ready_workspace(&client, &second, json!({})).await?;

    // A graceful stop releases the Lease (no holder left behind); the new
    // replica takes it at its next check, within the lease duration.
    let mut c = Operator::start(&client, &args).await?;
    let stopped = Instant::now();
    let status = b.terminate()?;
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let holder = leases
        .get(&lease)
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert_ne!(holder, b.identity, "the stopped leader released the Lease");
    eventually(Duration::from_secs(LEASE_SECONDS * 3), "new replica leads", || async {
        Ok(c.is_leader().then_some(()))
    })
    .await?;
    eprintln!("takeover after SIGTERM of the leader: {:?}", stopped.elapsed());
    assert!(
        stopped.elapsed() <= Duration::from_secs(LEASE_SECONDS + 2),
        "took {:?}",
        stopped.elapsed()
    );
    c.kill();
    cleanup(&client, &first).await;
    cleanup(&client, &second).await;
    Ok(())
}
