//! The spin-diffusion coordinator: drives jobs through their phases over a cluster of workers.
//!
//! The core is pure and tested without a network: [`state`] is the job state machine,
//! [`shards`] cuts prompts into shards, [`lease`] hands shards out with expiring leases,
//! [`membership`] tracks workers and forms the ring, [`journal`] makes jobs survive a restart,
//! [`dispatch`] decides which worker runs which task of the running job and what each result
//! changes, and [`convert`] maps the core's types to the `spin.v1` wire messages.
//! [`coordinator`] holds the live state and carries dispatch out, [`service`] adapts it to
//! gRPC, and [`run`] serves it on a listener the caller bound: over TLS when the settings name a
//! certificate, with the tokens of [`service::auth`] checked.

pub mod config;
pub mod convert;
pub mod coordinator;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod journal;
pub mod lease;
pub mod membership;
pub mod service;
pub mod shards;
pub mod state;

use std::future::Future;
use std::time::Instant;

use spin_common::proto::v1::control_service_server::ControlServiceServer;
use spin_common::proto::v1::job_service_server::JobServiceServer;
use spin_common::tls::{self, KeyPair, PemFile, TlsError};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use crate::config::CoordinatorConfig;
pub use crate::coordinator::Coordinator;
use crate::journal::JournalError;
use crate::service::auth::TokenGate;
use crate::service::control::ControlApi;
use crate::service::job::JobApi;

/// Why the coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The journal could not be opened or read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The settings were refused.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The object store could not be opened.
    #[error(transparent)]
    Store(#[from] spin_common::store::StoreError),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS certificate, key or client CA could not be used.
    #[error("coordinator TLS: {0}")]
    Tls(#[from] TlsError),
}

/// Opens the journal named by `config`, then serves on `listener` until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    let config = config.validate()?;
    let coordinator = Coordinator::open(config)?;
    serve(coordinator, listener, shutdown).await
}

/// Serves `JobService`, `ControlService` and `grpc.health.v1` for `coordinator` on `listener`
/// until `shutdown` resolves; a background tick sweeps lost workers and expired leases. With
/// `tls_cert` and `tls_key` set the port is TLS only (with `tls_client_ca`, clients need a
/// certificate); `JobService` needs `api_token`, `ControlService` `join_token` (when set).
pub async fn serve(
    coordinator: Coordinator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    // Read the PEM files before anything runs: a bad one is named and nothing starts.
    let mut server = tonic::transport::Server::builder();
    let tls = server_tls(coordinator.config())?;
    if let Some((identity, client_ca)) = &tls {
        server = tls::serve_tls(server, identity, client_ca.as_ref())?;
    }
    let api = TokenGate::api(coordinator.config());
    let join = TokenGate::join(coordinator.config());
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<JobServiceServer<JobApi>>().await;
    reporter
        .set_serving::<ControlServiceServer<ControlApi>>()
        .await;

    coordinator.spawn(tick_loop(coordinator.clone()));
    let stopping = coordinator.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("coordinator shutting down");
        reporter.set_not_serving::<JobServiceServer<JobApi>>().await;
        stopping.close("coordinator shutting down");
    };
    let address = listener.local_addr().ok();
    tracing::info!(
        ?address,
        tls = tls.is_some(),
        client_certificates = tls.as_ref().is_some_and(|(_, ca)| ca.is_some()),
        api_token = api.is_required(),
        join_token = join.is_required(),
        "coordinator serving"
    );
    if address.is_some_and(|a| !a.ip().is_loopback()) {
        let missing: Vec<&str> = [
            (tls.is_none(), "TLS"),
            (!api.is_required(), "api_token"),
            (!join.is_required(), "join_token"),
        ]
        .into_iter()
        .filter_map(|(missing, name)| missing.then_some(name))
        .collect();
        if !missing.is_empty() {
            let missing = missing.join(", ");
            tracing::warn!(%missing, "serving beyond localhost without every safeguard (see docs/security.md)");
        }
    }
    let served = server
        .add_service(health)
        .add_service(JobServiceServer::with_interceptor(
            JobApi::new(coordinator.clone()),
            api,
        ))
        .add_service(ControlServiceServer::new(ControlApi::new(
            coordinator.clone(),
        )))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
        .await;
    // Sessions, watch feeds and the tick stop on the root token; wait for them.
    if !coordinator.stopped(std::time::Duration::from_secs(5)).await {
        tracing::warn!("some coordinator tasks did not stop within 5 s");
    }
    served.map_err(Into::into)
}

/// The identity and client CA named by `config`, read and checked; `None` without TLS.
fn server_tls(config: &CoordinatorConfig) -> Result<Option<(KeyPair, Option<PemFile>)>, TlsError> {
    let identity = KeyPair::load(
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
        "tls_cert",
        "tls_key",
    )?;
    let Some(identity) = identity else {
        return Ok(None);
    };
    let client_ca = config
        .tls_client_ca
        .as_deref()
        .map(|path| PemFile::certificates("TLS client CA certificate (tls_client_ca)", path))
        .transpose()?;
    Ok(Some((identity, client_ca)))
}

/// Calls [`Coordinator::tick`] every `tick_interval`, on the blocking pool (it may write the
/// journal), until the coordinator closes.
async fn tick_loop(coordinator: Coordinator) {
    let mut interval = tokio::time::interval(coordinator.config().tick_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let closing = coordinator.closed();
    tokio::pin!(closing);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = &mut closing => return,
        }
        let c = coordinator.clone();
        if let Err(err) = tokio::task::spawn_blocking(move || c.tick(Instant::now())).await {
            tracing::error!(error = %err, "coordinator tick panicked");
        }
    }
}
