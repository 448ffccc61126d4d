//! The `mlplane` binary: CLI wiring only.
//!
//! - `mlplane run`: controllers, /metrics, /healthz, /readyz, leader election.
//! - `mlplane crds [--dir DIR]`: print (or write) the CRD YAML generated from the types.
//! - `mlplane fetch --source URI --dest DIR [--digest sha256:...]`: copy data
//!   into a pod (init containers of DataAsset downloads and model fetches).
use clap::{Parser, Subcommand};
use mlplane::operator::RunArgs;
use mlplane::runtime::telemetry::{self, LogFormat};
use mlplane::storage::fetch::FetchArgs;
use mlplane::tracking::TrackingArgs;

#[derive(Parser)]
#[command(
    name = "mlplane",
    version,
    about = "Kubernetes operator for ML workspaces, compute, experiments, pipelines, data and models"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "MLPLANE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers and the HTTP endpoints.
    Run(Box<RunArgs>),
    /// Run the MLflow-compatible tracking server on its own (local use).
    Tracking(TrackingArgs),
    /// Copy one object, or every object under a prefix, into a directory
    /// (credentials from AWS_*, AZURE_*, GOOGLE_* variables).
    Fetch(FetchArgs),
    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crds {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[tokio::main]
async fn main() {
    // Both rustls providers are linked (kube: ring, object_store: aws-lc-rs),
    // so rustls cannot pick a default by itself.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli).await {
        // One clear line (with causes), not a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crds { dir: None } => {
            print!("{}", mlplane::api::crds_yaml());
            Ok(())
        }
        Command::Crds { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)?;
            for (file, yaml) in mlplane::api::crd_files() {
                std::fs::write(dir.join(file), yaml)?;
            }
            Ok(())
        }
        Command::Fetch(args) => {
            let done = mlplane::storage::fetch::fetch(&args).await?;
            println!(
                "fetched {} object(s), {} bytes, from {} into {} ({})",
                done.files,
                done.bytes,
                args.source,
                args.dest.display(),
                done.digest
            );
            Ok(())
        }
        Command::Tracking(args) => {
            telemetry::init(cli.log_format);
            mlplane::tracking::standalone(args).await
        }
        Command::Run(args) => {
            telemetry::init(cli.log_format);
            mlplane::operator::run(*args).await
        }
    }
}
