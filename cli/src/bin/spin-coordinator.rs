//! `spin-coordinator`: binds the listen address, reads the settings and runs the coordinator
//! until ctrl-c.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use spin_coordinator::CoordinatorConfig;

/// The spin-diffusion coordinator.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "SPIN_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Journal file (overrides the config's `journal_path`).
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Settings file (TOML); `SPIN_COORDINATOR__*` variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    json_logs: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if args.json_logs {
        logs.json().init();
    } else {
        logs.init();
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut config = CoordinatorConfig::load(args.config.as_deref(), &env)?;
    if let Some(journal) = args.journal {
        config.journal_path = journal;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let shutdown = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot wait for ctrl-c; shutting down");
        }
    };
    spin_coordinator::run(config, listener, shutdown).await?;
    Ok(())
}
