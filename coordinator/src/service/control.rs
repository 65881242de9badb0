//! `ControlService`: workers register, then hold one bidirectional session: the first message
//! is `hello`, heartbeats keep the worker a member, tasks come down a bounded per-worker
//! channel, results go to the coordinator's dispatch, and a broken or finished stream loses
//! the worker. Both calls need the join token (see [`auth`](super::auth)).

use std::time::{Duration, Instant};

use spin_common::ids::WorkerId;
use spin_common::proto::{parse_id, v1};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use v1::worker_message::Message;

use super::auth::TokenGate;
use super::{blocking, non_empty};
use crate::coordinator::Coordinator;
use crate::error::ServiceError;

/// The `spin.v1.ControlService` implementation: a handle on the coordinator and the gate of
/// its join token.
#[derive(Clone)]
pub struct ControlApi {
    coordinator: Coordinator,
    join: TokenGate,
}

impl ControlApi {
    /// A service over `coordinator`, requiring its configured join token.
    pub fn new(coordinator: Coordinator) -> Self {
        let join = TokenGate::join(coordinator.config());
        Self { coordinator, join }
    }

    /// How often workers are asked to send heartbeats: three per timeout.
    fn heartbeat_interval(&self) -> Duration {
        self.coordinator.config().heartbeat_timeout / 3
    }
}

/// A worker's collective address as its peers will dial it: `host:port`, optionally with an
/// `http://` or `https://` scheme, at most 255 bytes.
fn collective_address(value: &str) -> Result<String, ServiceError> {
    const FIELD: &str = "RegisterWorkerRequest.collective_address";
    let invalid = |reason: String| ServiceError::InvalidArgument {
        field: FIELD,
        reason,
    };
    non_empty(FIELD, value)?;
    if value.len() > 255 {
        return Err(invalid(format!(
            "{} bytes is longer than a host:port can be (255)",
            value.len()
        )));
    }
    let authority = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .unwrap_or(value);
    let port_ok = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || authority.contains(char::is_whitespace) || authority.contains('/') {
        return Err(invalid(format!(
            "{:?} is not host:port (e.g. 10.0.0.5:7171)",
            spin_common::ids::shorten(value)
        )));
    }
    Ok(value.to_string())
}

/// The worker id of a session's first message.
fn hello(first: Option<v1::WorkerMessage>) -> Result<WorkerId, ServiceError> {
    match first.and_then(|m| m.message) {
        Some(Message::Hello(hello)) => {
            non_empty("Hello.worker_id", &hello.worker_id)?;
            Ok(parse_id("Hello.worker_id", &hello.worker_id)?)
        }
        Some(_) => Err(ServiceError::Protocol(
            "the first message of a session must be `hello`".into(),
        )),
        None => Err(ServiceError::Protocol(
            "the stream ended before `hello`".into(),
        )),
    }
}

#[tonic::async_trait]
impl v1::control_service_server::ControlService for ControlApi {
    async fn register_worker(
        &self,
        request: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerResponse>, Status> {
        let request = request.into_inner();
        self.join
            .check_field("RegisterWorkerRequest.join_token", &request.join_token)?;
        let address = collective_address(&request.collective_address)?;
        let device = request.device.map(Into::into).unwrap_or_default();
        let id = self
            .coordinator
            .register_worker(address, device, Instant::now())?;
        Ok(Response::new(v1::RegisterWorkerResponse {
            worker_id: id.to_string(),
            heartbeat_interval_ms: u32::try_from(self.heartbeat_interval().as_millis())
                .unwrap_or(u32::MAX),
        }))
    }

    type SessionStream = ReceiverStream<Result<v1::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.join.check_metadata("Session", request.metadata())?;
        let mut inbound = request.into_inner();
        // A worker that connects but never says hello is dropped after a heartbeat timeout.
        let first = tokio::time::timeout(
            self.coordinator.config().heartbeat_timeout,
            inbound.message(),
        )
        .await
        .map_err(|_| ServiceError::Protocol("no `hello` within the heartbeat timeout".into()))?
        .map_err(|status| {
            ServiceError::Protocol(format!("stream broke before `hello`: {status}"))
        })?;
        let worker = hello(first)?;
        let c = self.coordinator.clone();
        let session = blocking(move || c.open_session(worker, Instant::now())).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(self.coordinator.config().session_buffer);
        let coordinator = self.coordinator.clone();
        self.coordinator.spawn(async move {
            let mut outbound = session.outbound;
            let closing = coordinator.closed();
            tokio::pin!(closing);
            let reason = loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(message)) => {
                            if let Err(err) = handle(&coordinator, worker, session.id, message).await {
                                let _ = tx.send(Err(err.into())).await;
                                break "session protocol error".to_string();
                            }
                        }
                        Ok(None) => break "session closed by the worker".to_string(),
                        Err(status) => break format!("session broke: {}", status.message()),
                    },
                    down = outbound.recv() => match down {
                        Some(message) => {
                            if tx.send(Ok(message)).await.is_err() {
                                break "session closed by the worker".to_string();
                            }
                        }
                        // The coordinator dropped the session (lost, replaced or shutting down).
                        None => break "session ended by the coordinator".to_string(),
                    },
                    () = &mut closing => {
                        // Deliver the goodbye already queued, then end.
                        while let Ok(message) = outbound.try_recv() {
                            let _ = tx.send(Ok(message)).await;
                        }
                        break "the coordinator is shutting down".to_string();
                    }
                }
            };
            // Losing a worker may fail its job: the journal is written off the runtime.
            let c = coordinator.clone();
            let ended =
                tokio::task::spawn_blocking(move || c.end_session(worker, session.id, &reason));
            if let Err(err) = ended.await {
                tracing::error!(worker = %worker, error = %err, "ending a session panicked");
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Applies one message of `worker`'s session; a task result (which may write the journal) is
/// applied on the blocking pool.
async fn handle(
    coordinator: &Coordinator,
    worker: WorkerId,
    session: u64,
    message: v1::WorkerMessage,
) -> Result<(), ServiceError> {
    match message.message {
        Some(Message::Heartbeat(_)) => coordinator.heartbeat(worker, session, Instant::now()),
        Some(Message::Step(metrics)) => {
            coordinator.progress(worker, session, Instant::now())?;
            coordinator.report_step(worker, session, metrics)
        }
        Some(Message::Progress(p)) => {
            tracing::debug!(worker = %worker, task = %p.task_id, done = p.done, total = p.total, "task progress");
            coordinator.progress(worker, session, Instant::now())
        }
        Some(Message::Warning(warning)) => coordinator.report_warning(worker, session, warning),
        Some(Message::Result(result)) => {
            tracing::debug!(worker = %worker, task = %result.task_id, "task result");
            let c = coordinator.clone();
            blocking(move || c.task_result(worker, session, result, Instant::now())).await
        }
        Some(Message::Hello(_)) => Err(ServiceError::Protocol(
            "`hello` may only open a session".into(),
        )),
        None => Err(ServiceError::Protocol("empty worker message".into())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn collective_addresses_must_be_host_and_port() {
        for ok in [
            "127.0.0.1:7171",
            "worker-3:1",
            "https://gpu7.lan:7171",
            "[::1]:9000",
        ] {
            assert_eq!(collective_address(ok).unwrap(), ok);
        }
        for bad in [
            "",
            "not an address",
            "host",
            "host:0",
            ":80",
            "host:99999",
            "a b:1",
        ] {
            let err = collective_address(bad).unwrap_err().to_string();
            assert!(err.contains("collective_address"), "{bad}: {err}");
        }
        let huge = "h".repeat(1 << 20) + ":1";
        let err = collective_address(&huge).unwrap_err().to_string();
        assert!(err.contains("255") && err.len() < 300, "{}", err.len());
    }

    #[test]
    fn sessions_must_open_with_a_well_formed_hello() {
        let id = WorkerId::new();
        let msg = |m| Some(v1::WorkerMessage { message: Some(m) });
        let ok = hello(msg(Message::Hello(v1::Hello {
            worker_id: id.to_string(),
        })));
        assert_eq!(ok.unwrap(), id);
        let err = hello(msg(Message::Hello(v1::Hello::default())))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Hello.worker_id"), "{err}");
        let err = hello(msg(Message::Heartbeat(v1::Heartbeat::default())))
            .unwrap_err()
            .to_string();
        assert!(err.contains("hello"), "{err}");
        assert!(hello(None).is_err());
    }
}
