//! `mlplane run`: builds the client and metrics, checks the CRDs are
//! installed, serves probes, joins leader election, and runs the controllers
//! while this replica leads. SIGTERM/SIGINT stop the controllers gracefully and
//! release the Lease; losing the Lease stops the process (exit code 1).
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use kube::{Client, Config};
use tokio_util::sync::CancellationToken;

use crate::controllers::model_deployment::ServingSettings;
use crate::controllers::model_deployment::build::route::{GatewayRef, RouteSettings};
use crate::controllers::model_deployment::runtime::RuntimeCatalog;
use crate::controllers::run::environment::Catalog;
use crate::controllers::{self, Context, Settings};
use crate::runtime::client::counted_client;
use crate::runtime::leader::{Election, LeaderConfig};
use crate::runtime::metrics::Metrics;
use crate::runtime::server::{self, Probes};
use crate::tracking::client::{Token, TrackingClient};

/// The kinds whose CRDs must be installed before the operator starts.
const KINDS: [&str; 6] = [
    "Workspace",
    "ComputeCluster",
    "Experiment",
    "Pipeline",
    "DataAsset",
    "ModelDeployment",
];

/// Flags of `mlplane run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "MLPLANE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Take part in leader election (only the leader runs controllers).
    #[arg(long, env = "MLPLANE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the operator: holds the Lease; NetworkPolicies admit it.
    #[arg(long, env = "POD_NAMESPACE", default_value = "mlplane-system")]
    pub namespace: String,
    /// Name of the leader election Lease.
    #[arg(long, env = "MLPLANE_LEASE_NAME", default_value = "mlplane-operator")]
    pub lease_name: String,
    /// Identity in leader election (default: POD_NAME, else hostname and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a Lease stays valid after its last renewal.
    #[arg(long, env = "MLPLANE_LEASE_DURATION", default_value_t = 15)]
    pub lease_duration: u64,
    /// Seconds before expiry at which the leader renews the Lease.
    #[arg(long, env = "MLPLANE_LEASE_GRACE", default_value_t = 5)]
    pub lease_grace: u64,
    /// Reconciles of one kind running at once.
    #[arg(long, env = "MLPLANE_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    /// Seconds between periodic reconciles of a converged object.
    #[arg(long, env = "MLPLANE_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    /// URL of the tracking server that run pods log to (MLFLOW_TRACKING_URI),
    /// e.g. `http://mlplane-tracking.mlplane-system.svc:5000`.
    #[arg(long, env = "MLPLANE_TRACKING_URL")]
    pub tracking_url: Option<String>,
    /// URL the operator itself uses to reach the tracking server (default:
    /// --tracking-url).
    #[arg(long, env = "MLPLANE_TRACKING_OPERATOR_URL")]
    pub tracking_operator_url: Option<String>,
    /// File with the operator's bearer token for the tracking server (default:
    /// the in-cluster ServiceAccount token, else the kubeconfig's token).
    #[arg(long, env = "MLPLANE_TRACKING_TOKEN_FILE")]
    pub tracking_token_file: Option<std::path::PathBuf>,
    /// The operator's own image, run by init containers that fetch data and
    /// models (`mlplane fetch`). The chart sets it to the image it deploys.
    #[arg(long, env = "MLPLANE_IMAGE", default_value = concat!("ghcr.io/mlplane/mlplane:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// YAML file of curated environments (`environments: {name: image}`);
    /// default: the built-in catalog.
    #[arg(long, env = "MLPLANE_ENVIRONMENT_CATALOG")]
    pub environment_catalog: Option<std::path::PathBuf>,
    /// YAML file of serving runtimes by model format (`runtimes: {ONNX:
    /// {image, command, args, port, ...}}`); default: the built-in catalog.
    #[arg(long, env = "MLPLANE_RUNTIME_CATALOG")]
    pub runtime_catalog: Option<std::path::PathBuf>,
    /// Route ModelDeployment traffic through Gateway API HTTPRoutes when the
    /// API server serves them (checked at start); false: never (a split
    /// other than all-to-one deployment is then refused).
    #[arg(long, env = "MLPLANE_GATEWAY_API", default_value_t = true, action = clap::ArgAction::Set)]
    pub gateway_api: bool,
    /// The Gateway (`<namespace>/<name>`) that ModelDeployment HTTPRoutes
    /// attach to; without it they only name their endpoint Service (GAMMA).
    #[arg(long, env = "MLPLANE_GATEWAY")]
    pub gateway: Option<GatewayRef>,
    /// Domain of ModelDeployment host names on the Gateway:
    /// `<name>-<namespace>.<domain>`.
    #[arg(long, env = "MLPLANE_GATEWAY_DOMAIN")]
    pub gateway_domain: Option<String>,
    /// Seconds a serving rollout may go without progress before it is
    /// reported `RolloutStalled` (Deployment `progressDeadlineSeconds`).
    #[arg(long, env = "MLPLANE_ROLLOUT_DEADLINE_SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub rollout_deadline_seconds: i32,
}

const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Runs the operator until a signal or the loss of leadership.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let config = Config::infer()
        .await
        .context("no Kubernetes configuration (in-cluster or kubeconfig)")?;
    let catalog = match &args.environment_catalog {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Catalog::from_yaml(&text).with_context(|| format!("environment catalog {}", path.display()))?
        }
        None => Catalog::builtin(),
    };
    let runtimes = match &args.runtime_catalog {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            RuntimeCatalog::from_yaml(&text).with_context(|| format!("runtime catalog {}", path.display()))?
        }
        None => RuntimeCatalog::builtin(),
    };
    let tracking = args.tracking_url.as_ref().map(|url| {
        let token = match &args.tracking_token_file {
            Some(f) => Token::File(f.clone()),
            None if std::path::Path::new(IN_CLUSTER_TOKEN).exists() => Token::File(IN_CLUSTER_TOKEN.into()),
            None => match config.auth_info.token.as_ref() {
                Some(t) => Token::Static(secrecy::ExposeSecret::expose_secret(t).to_string()),
                None => Token::None,
            },
        };
        let operator_url = args.tracking_operator_url.clone().unwrap_or_else(|| url.clone());
        TrackingClient::new(operator_url, token).with_run_url(url.clone())
    });
    let client = counted_client(
        config,
        metrics.kube_requests.clone(),
        metrics.kube_request_duration.clone(),
    )?;
    check_crds(&client).await?;

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let ready = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        args.metrics_addr,
        server::router(Probes {
            metrics: metrics.clone(),
            ready: ready.clone(),
        }),
        stop.clone().cancelled_owned(),
    ));
    tokio::spawn(forward_signals(stop.clone()));
    ready.store(true, Ordering::Relaxed);

    let mut election = None;
    if args.leader_elect {
        let cfg = LeaderConfig {
            namespace: args.namespace.clone(),
            lease_name: args.lease_name.clone(),
            identity: identity.clone(),
            duration_seconds: args.lease_duration,
            grace_seconds: args.lease_grace,
        };
        let mut e = Election::start(client.clone(), &cfg).await?;
        tracing::info!(%identity, lease = %cfg.lease_name, namespace = %cfg.namespace, "waiting for leadership");
        tokio::select! {
            r = e.acquired() => r?,
            _ = stop.cancelled() => {
                e.release().await;
                let _ = server.await;
                return Ok(());
            }
        }
        tracing::info!(%identity, "acquired leadership; starting controllers");
        election = Some(e);
    }
    metrics.leader.set(1);

    let settings = Settings {
        operator_namespace: args.namespace.clone(),
        concurrency: args.concurrency,
        resync: Duration::from_secs(args.resync_seconds),
        tracking,
        catalog,
        image: args.image.clone(),
        runtimes,
        serving: ServingSettings {
            gateway_api: args.gateway_api,
            routes: RouteSettings {
                gateway: args.gateway.clone(),
                domain: args.gateway_domain.clone(),
            },
            progress_deadline_seconds: args.rollout_deadline_seconds,
        },
    };
    let ctx = Context::new(client.clone(), metrics.clone(), settings, identity);
    let controllers = tokio::spawn(controllers::run_all(ctx, stop.clone()));

    let mut lost = false;
    match election.as_mut() {
        Some(e) => tokio::select! {
            _ = e.lost() => { lost = true; }
            _ = stop.cancelled() => {}
        },
        None => stop.cancelled().await,
    }
    stop.cancel();
    metrics.leader.set(0);
    let _ = controllers.await;
    if let Some(e) = election {
        if lost {
            tracing::error!("lost leadership; exiting so a standby can lead");
        }
        e.release().await;
    }
    let _ = server.await;
    if lost {
        bail!("lost the leader Lease");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Exits with an install hint when the API server does not serve every kind
/// (after a few seconds, so CRDs applied just before are established).
async fn check_crds(client: &Client) -> anyhow::Result<()> {
    let mut missing = vec![];
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let served = match client.list_api_group_resources("mlplane.io/v1alpha1").await {
            Ok(list) => list.resources.into_iter().map(|r| r.kind).collect::<Vec<_>>(),
            Err(kube::Error::Api(s)) if s.code == 404 => vec![],
            Err(e) => return Err(e).context("discovering the mlplane.io/v1alpha1 API"),
        };
        missing = KINDS
            .iter()
            .copied()
            .filter(|k| !served.iter().any(|s| s == k))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
    }
    bail!(
        "the mlplane CRDs are not installed (missing: {}). Install them with \
         `kubectl apply --server-side -f crds/` or `helm install mlplane charts/mlplane`",
        missing.join(", ")
    )
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "mlplane".into());
    format!("{host}-{}", std::process::id())
}

async fn forward_signals(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    stop.cancel();
}
