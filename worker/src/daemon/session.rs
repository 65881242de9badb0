//! The worker's side of the control plane: the links the daemon dials (the coordinator's
//! endpoint, the join token as bearer metadata, TLS for both ports) and registering with the
//! coordinator, retried until `connect_timeout`, into an open [`Session`].

use std::time::{Duration, Instant};

use spin_common::auth::{Bearer, Token};
use spin_common::ids::WorkerId;
use spin_common::proto::{parse_id, v1};
use spin_common::tls::{error_chain, status_text, TlsSettings};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use v1::control_service_client::ControlServiceClient;
use v1::worker_message::Message as Up;

use super::{DaemonError, WorkerConfig};
use crate::collective::grpc::GrpcOptions;

/// An open session with the coordinator.
pub(super) struct Session {
    /// The id the coordinator registered this worker under.
    pub worker: WorkerId,
    /// How often to send a heartbeat.
    pub heartbeat: Duration,
    /// Messages up to the coordinator.
    pub tx: mpsc::Sender<v1::WorkerMessage>,
    /// Messages down from it.
    pub inbound: tonic::Streaming<v1::CoordinatorMessage>,
}

/// The collective options (join token, TLS), the coordinator's endpoint and the join token as
/// bearer metadata. The PEM files are read here, so a bad one stops the start, named.
pub(super) fn links(config: &WorkerConfig) -> Result<(GrpcOptions, Endpoint, Bearer), DaemonError> {
    let tls = TlsSettings::load(
        config.tls_ca.as_deref(),
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
        ["--tls-cert", "--tls-key"],
    )
    .map_err(|e| DaemonError::Config(e.to_string()))?;
    let join_token = Token::from(config.join_token.as_str());
    let bearer =
        Bearer::new("--join-token", &join_token).map_err(|e| DaemonError::Config(e.to_string()))?;
    let coordinator = tls
        .endpoint(&config.coordinator)
        .map_err(|e| DaemonError::Config(format!("coordinator URL {e} (--tls-ca)")))?;
    let options = GrpcOptions {
        join_token,
        tls,
        // A peer's stream may come before this worker is given its rank of the ring (it may
        // still be loading the job): it waits as long as the ring would wait for a peer.
        accept_timeout: config.ring_timeout,
        ..GrpcOptions::default()
    };
    Ok((options, coordinator, bearer))
}

/// Whether a failed connection was a TLS refusal (an unverifiable certificate, a handshake
/// alert), which retrying will not change.
fn tls_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::InvalidData;
        }
        source = cause.source();
    }
    false
}

/// Said when a TLS coordinator drops the registration of a worker without a certificate.
const NO_CLIENT_CERTIFICATE: &str =
    " (a coordinator that requires client certificates needs --tls-cert and --tls-key)";

/// Registers (retrying until `connect_timeout`) and opens the session stream.
pub(super) async fn open_session(
    config: &WorkerConfig,
    coordinator: &Endpoint,
    bearer: &Bearer,
    advertise: &str,
) -> Result<Session, DaemonError> {
    let err = |message: String| DaemonError::Coordinator {
        url: config.coordinator.clone(),
        message,
    };
    let deadline = Instant::now() + config.connect_timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = coordinator.connect().await.map_err(|e| {
                let retry = !tls_refused(&e);
                (retry, format!("cannot connect: {}", error_chain(&e)))
            })?;
            let mut client = ControlServiceClient::with_interceptor(channel, bearer.clone());
            let registered = client
                .register_worker(v1::RegisterWorkerRequest {
                    join_token: config.join_token.clone(),
                    collective_address: advertise.to_string(),
                    device: Some(v1::DeviceInfo {
                        backend: config.device.clone(),
                        name: device_name(&config.device),
                        memory_bytes: 0,
                    }),
                })
                .await
                .map_err(|s| {
                    // Refusals other than "unavailable" will not change by retrying.
                    let retry = s.code() == tonic::Code::Unavailable;
                    let mut message = format!("registration refused: {}", status_text(&s));
                    // A TLS connection dropped under the call: most often a missing certificate.
                    let anonymous =
                        config.tls_cert.is_none() && config.coordinator.starts_with("https://");
                    if anonymous && std::error::Error::source(&s).is_some() {
                        message.push_str(NO_CLIENT_CERTIFICATE);
                    }
                    (retry, message)
                })?
                .into_inner();
            let (tx, rx) = mpsc::channel(256);
            tx.send(v1::WorkerMessage {
                message: Some(Up::Hello(v1::Hello {
                    worker_id: registered.worker_id.clone(),
                })),
            })
            .await
            .map_err(|_| (true, "session closed before hello".to_string()))?;
            let inbound = client
                .session(ReceiverStream::new(rx))
                .await
                .map_err(|s| {
                    let retry = s.code() != tonic::Code::Unauthenticated;
                    (retry, format!("session refused: {}", status_text(&s)))
                })?
                .into_inner();
            let heartbeat =
                Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(50)));
            let worker = parse_id("RegisterWorkerResponse.worker_id", &registered.worker_id)
                .map_err(|e| (false, format!("registration answered {e}")))?;
            Ok::<_, (bool, String)>(Session {
                worker,
                heartbeat,
                tx,
                inbound,
            })
        };
        match attempt.await {
            Ok(session) => return Ok(session),
            Err((false, message)) => return Err(err(message)),
            Err((true, message)) if Instant::now() >= deadline => {
                return Err(err(format!(
                    "{message} (gave up after {:?}; is the coordinator running at this address?)",
                    config.connect_timeout
                )))
            }
            Err((true, message)) => {
                tracing::debug!(%message, "coordinator not reachable yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn device_name(backend: &str) -> String {
    match backend {
        "flex" => "cpu (burn flex)".into(),
        other => other.to_string(),
    }
}
