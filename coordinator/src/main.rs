//! `spin-coordinator`: binds the listen address, reads the settings and runs the coordinator
//! until ctrl-c or SIGTERM; `--address-file` tells scripts and tests the bound port. Tokens come
//! from the settings file or `SPIN_COORDINATOR__API_TOKEN` / `__JOIN_TOKEN` (never a flag, which
//! other users could read in the process list); TLS files from the settings or the flags.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use spin_coordinator::{Coordinator, CoordinatorConfig};

/// The spin-diffusion coordinator.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on (port 0: any free port; see --address-file).
    #[arg(long, env = "SPIN_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Journal file (overrides the config's `journal_path`).
    #[arg(long)]
    journal: Option<PathBuf>,
    /// The object store: a directory every worker sees (overrides the config's `store`).
    #[arg(long)]
    store: Option<String>,
    /// Workers a job waits for before it starts or resumes (overrides `min_workers`).
    #[arg(long)]
    min_workers: Option<usize>,
    /// Settings file (TOML); `SPIN_COORDINATOR__*` variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Once the journal is open and the port bound, write the bound address (`host:port`) to
    /// this file, atomically; it is removed on a clean exit.
    #[arg(long)]
    address_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key the port serves TLS only (overrides the
    /// config's `tls_cert`).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the TLS certificate (overrides `tls_key`).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM): every client must present a certificate it signed (mutual TLS;
    /// overrides `tls_client_ca`).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    spin_common::process::init_tracing(&args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut config = CoordinatorConfig::load(args.config.as_deref(), &env)?;
    if let Some(journal) = args.journal {
        config.journal_path = journal;
    }
    if let Some(store) = args.store {
        config.store = store;
    }
    if let Some(n) = args.min_workers {
        config.min_workers = n;
    }
    config.tls_cert = args.tls_cert.or(config.tls_cert);
    config.tls_key = args.tls_key.or(config.tls_key);
    config.tls_client_ca = args.tls_client_ca.or(config.tls_client_ca);
    let config = config.validate()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let coordinator = Coordinator::open(config)?;
    if let Some(path) = &args.address_file {
        let address = listener.local_addr().context("reading the bound address")?;
        write_atomically(path, &format!("{address}\n"))?;
    }
    let served = spin_coordinator::serve(
        coordinator,
        listener,
        spin_common::process::shutdown_signal(),
    )
    .await;
    if let Some(path) = &args.address_file {
        // A stale file would send the next reader to a dead port.
        let _ = std::fs::remove_file(path);
    }
    Ok(served?)
}

/// Writes `text` to a temporary file beside `path`, then renames it over `path`, so a reader
/// sees either no file or the whole address.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut name = path
        .file_name()
        .with_context(|| format!("address file {} names no file", path.display()))?
        .to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let temp = path.with_file_name(name);
    std::fs::write(&temp, text).with_context(|| format!("writing {}", temp.display()))?;
    std::fs::rename(&temp, path)
        .with_context(|| format!("renaming {} to {}", temp.display(), path.display()))
}
