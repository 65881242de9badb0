//! `spin-worker`: the worker daemon. Serves its collective service, registers with the
//! coordinator and runs the tasks it is given until ctrl-c, SIGTERM or the coordinator's
//! shutdown. Every flag has a `SPIN_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use spin_worker::daemon::{self, WorkerConfig};

/// A spin-diffusion worker.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "SPIN_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// Where to serve the collective service for ring peers (port 0: any free port).
    #[arg(long, env = "SPIN_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// `host:port` ring peers dial to reach this worker (default: the bound address; needed
    /// when listening on 0.0.0.0).
    #[arg(long, env = "SPIN_WORKER_ADVERTISE")]
    advertise: Option<String>,
    /// Compute device: flex (CPU), or wgpu / cuda when built with those features.
    #[arg(long, env = "SPIN_WORKER_DEVICE", default_value = "flex")]
    device: String,
    /// The coordinator's join token.
    #[arg(
        long,
        env = "SPIN_JOIN_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    join_token: String,
    /// Seconds to keep trying to reach the coordinator (at start and after a broken session).
    #[arg(long, env = "SPIN_WORKER_CONNECT_TIMEOUT_S", default_value_t = 60)]
    connect_timeout_s: u64,
    /// Seconds a gradient all-reduce waits on a silent peer before it is aborted.
    #[arg(long, env = "SPIN_WORKER_RING_TIMEOUT_S", default_value_t = 60)]
    ring_timeout_s: u64,
    /// CA certificate (PEM) that verifies the coordinator and ring peers over TLS (needed for
    /// an https:// coordinator URL).
    #[arg(long, env = "SPIN_WORKER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This worker's certificate (PEM): the collective port serves TLS with it, and it is the
    /// client certificate for a coordinator that requires one. Needs --tls-key.
    #[arg(long, env = "SPIN_WORKER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "SPIN_WORKER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    spin_common::process::init_tracing(&args.log_format);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!(
                "error: binding the collective service on {} (--listen): {err}",
                args.listen
            );
            return std::process::ExitCode::from(2);
        }
    };
    let config = WorkerConfig {
        coordinator: args.coordinator,
        advertise: args.advertise,
        device: args.device,
        join_token: args.join_token,
        connect_timeout: Duration::from_secs(args.connect_timeout_s),
        ring_timeout: Duration::from_secs(args.ring_timeout_s.max(1)),
        tls_ca: args.tls_ca,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
    };
    match daemon::run(config, listener, spin_common::process::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::from(2)
        }
    }
}
