//! The worker daemon: serves `CollectiveService` for its ring peers, registers with the
//! coordinator ([`session`]), keeps one session (heartbeats up, tasks down) and runs tasks on
//! one compute thread ([`compute`]) with a [`JobRunner`](crate::tasks::JobRunner). Wire
//! messages are decoded once, here at the session's edge: a `v1::Task` into a domain
//! [`Task`], an `AssignJob` into its `JobId` and the spec through
//! [`JobSpec::from_submitted`]. A broken session is re-opened as a new worker (the coordinator
//! has already counted the old one lost); the job's state is dropped with it. With a
//! certificate the collective port is TLS; the join token goes with every call, to the
//! coordinator and to ring peers, and the collective port requires it.

mod compute;
mod session;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use spin_common::ids::JobId;
use spin_common::proto::{parse_id, v1};
use spin_common::spec::JobSpec;
use spin_common::task::Task;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use v1::coordinator_message::Message as Down;
use v1::worker_message::Message as Up;

use crate::collective::grpc::CollectiveInbox;
use crate::device::parse_device;
use compute::{compute_loop, failed, task_result, Assignment, Command, ComputeLinks};
use session::{links, open_session, Session};

/// Commands queued for the compute thread at most (the coordinator sends one task at a time,
/// so a handful are ever waiting).
const COMMANDS_QUEUED: usize = 64;

/// What a worker daemon is told (from flags or `SPIN_WORKER__*`).
#[derive(Clone)]
pub struct WorkerConfig {
    /// The coordinator's URL, e.g. `http://10.0.0.1:7070`.
    pub coordinator: String,
    /// `host:port` peers dial for this worker's collective service (default: the bound
    /// address; required when listening on 0.0.0.0).
    pub advertise: Option<String>,
    /// Compute device: `flex`, `wgpu` or `cuda`.
    pub device: String,
    /// The coordinator's join token (empty when it requires none).
    pub join_token: String,
    /// How long to keep trying to reach the coordinator before giving up.
    pub connect_timeout: Duration,
    /// How long a ring may wait on a peer before the all-reduce is aborted.
    pub ring_timeout: Duration,
    /// The CA certificate (PEM) that verifies the coordinator and ring peers on `https://`.
    pub tls_ca: Option<PathBuf>,
    /// This worker's certificate (PEM): served on the collective port (then TLS only) and
    /// presented to a coordinator that requires client certificates.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM).
    pub tls_key: Option<PathBuf>,
}

/// Every field but the join token, which shows only whether one is set.
impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("coordinator", &self.coordinator)
            .field("advertise", &self.advertise)
            .field("device", &self.device)
            .field(
                "join_token",
                &if self.join_token.is_empty() {
                    "(none)"
                } else {
                    "(set)"
                },
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("ring_timeout", &self.ring_timeout)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .finish()
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:7070".into(),
            advertise: None,
            device: "flex".into(),
            join_token: String::new(),
            connect_timeout: Duration::from_secs(60),
            ring_timeout: Duration::from_secs(60),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A setting is unusable.
    #[error("worker config: {0}")]
    Config(String),
    /// The compute device is not one this build has.
    #[error("worker config: {0}")]
    Device(#[from] crate::device::DeviceError),
    /// The collective listener's address could not be read.
    #[error("collective service listener: {0}")]
    Listen(#[source] std::io::Error),
    /// The coordinator could not be reached or refused the worker.
    #[error("coordinator {url}: {message}")]
    Coordinator {
        /// The coordinator URL.
        url: String,
        /// What happened.
        message: String,
    },
}

/// Serves the collective service on `listener` and runs the daemon until `shutdown` resolves
/// or the coordinator says `Shutdown`. Every task it starts hangs off one root cancellation
/// token and is awaited before it returns.
pub async fn run(
    config: WorkerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let device = parse_device(&config.device)?;
    let (options, coordinator, bearer) = links(&config)?;
    let bound = listener.local_addr().map_err(DaemonError::Listen)?;
    let advertise = match &config.advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            return Err(DaemonError::Config(format!(
                "listening on {bound}: set the advertised address peers should dial (--advertise)"
            )))
        }
        None => bound.to_string(),
    };
    // Peers dial TLS when this worker serves it.
    let advertise = if options.tls.identity.is_some() && !advertise.contains("://") {
        format!("https://{advertise}")
    } else {
        advertise
    };
    let root = CancellationToken::new();
    let tasks = TaskTracker::new();
    let inbox = CollectiveInbox::new(&options);
    tasks.spawn(
        inbox
            .clone()
            .serve(listener, root.clone().cancelled_owned()),
    );

    let cancel = Arc::new(AtomicBool::new(false));
    let (commands, command_rx) = mpsc::channel::<Command>(COMMANDS_QUEUED);
    let (up_tx, mut up_rx) = mpsc::channel::<(u64, Up)>(1024);
    let links = ComputeLinks {
        up: up_tx,
        cancel: cancel.clone(),
        inbox: inbox.clone(),
        ring_timeout: config.ring_timeout,
        device: device.clone(),
    };
    let compute = std::thread::Builder::new()
        .name("spin-compute".into())
        .spawn(move || compute_loop(command_rx, links))
        .map_err(|e| DaemonError::Config(format!("cannot start the compute thread: {e}")))?;

    tokio::pin!(shutdown);
    let mut generation: u64 = 0;
    let result = loop {
        let session = tokio::select! {
            s = open_session(&config, &coordinator, &bearer, &advertise) => s,
            () = &mut shutdown => break Ok(()),
        };
        let Session {
            worker: worker_id,
            heartbeat,
            tx,
            mut inbound,
        } = match session {
            Ok(s) => s,
            Err(e) => break Err(e),
        };
        generation += 1;
        let _ = commands.send(Command::Reset(generation)).await;
        tracing::info!(worker = %worker_id, coordinator = %config.coordinator, collective = %advertise, "session open");
        let mut ticker = tokio::time::interval(heartbeat);
        let ended = loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(message)) => match message.message {
                        Some(Down::AssignJob(assign)) => {
                            cancel.store(false, Ordering::Relaxed);
                            match parse_id::<JobId>("AssignJob.job_id", &assign.job_id) {
                                Ok(job) => {
                                    tracing::info!(worker = %worker_id, job = %job, "job assigned");
                                    let assignment = Assignment {
                                        job,
                                        spec: JobSpec::from_submitted(&assign.spec_toml),
                                        store_prefix: assign.store_prefix,
                                        writer: worker_id,
                                    };
                                    let _ = commands.send(Command::Assign(Box::new(assignment))).await;
                                }
                                Err(e) => break Some(format!("the coordinator sent {e}")),
                            }
                        }
                        Some(Down::Task(task)) => {
                            let task_id = task.task_id.clone();
                            match Task::try_from(task) {
                                Ok(task) => {
                                    let _ = commands.send(Command::Task(task)).await;
                                }
                                Err(e) => {
                                    tracing::warn!(task = %task_id, error = %e, "malformed task refused");
                                    let refused = task_result(task_id, Err(failed(e.to_string(), false, 0)));
                                    if tx.send(v1::WorkerMessage { message: Some(refused) }).await.is_err() {
                                        break Some("session send failed".to_string());
                                    }
                                }
                            }
                        }
                        Some(Down::Cancel(c)) => {
                            tracing::info!(worker = %worker_id, job = %c.job_id, reason = %c.reason, "job tasks cancelled");
                            cancel.store(true, Ordering::Relaxed);
                            if let Ok(job) = parse_id::<JobId>("CancelJob.job_id", &c.job_id) {
                                let _ = commands.send(Command::Cancel(job)).await;
                            }
                        }
                        Some(Down::AbortRing(a)) => {
                            // The compute thread is inside the ring's all-reduce: the inbox,
                            // shared with it, fails that ring's sends and receives at once.
                            let aborted = inbox.abort(&a.collective_id, &a.reason);
                            tracing::info!(worker = %worker_id, ring = %a.collective_id, reason = %a.reason, aborted, "ring aborted by the coordinator");
                        }
                        Some(Down::Shutdown(s)) => {
                            tracing::info!(worker = %worker_id, reason = %s.reason, "coordinator asked us to stop");
                            break None;
                        }
                        None => {}
                    },
                    Ok(None) => break Some("the coordinator closed the session".to_string()),
                    Err(status) => break Some(format!("session broke: {}", status.message())),
                },
                up = up_rx.recv() => {
                    let Some((session, message)) = up else {
                        break Some("the compute thread stopped".to_string());
                    };
                    // Results of an older session's tasks mean nothing to the coordinator now.
                    if session == generation {
                        let _ = tx.send(v1::WorkerMessage { message: Some(message) }).await;
                    }
                }
                _ = ticker.tick() => {
                    let beat = Up::Heartbeat(v1::Heartbeat {
                        sent_at_ms: spin_common::proto::unix_ms(std::time::SystemTime::now()),
                    });
                    if tx.send(v1::WorkerMessage { message: Some(beat) }).await.is_err() {
                        break Some("session send failed".to_string());
                    }
                }
                () = &mut shutdown => break None,
            }
        };
        // Whatever runs belongs to a session that is gone.
        cancel.store(true, Ordering::Relaxed);
        let _ = commands.send(Command::Reset(0)).await;
        match ended {
            None => break Ok(()),
            Some(reason) => {
                tracing::warn!(worker = %worker_id, %reason, "session ended; registering again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    drop(commands);
    root.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("the collective service did not stop within 5 s");
    }
    // The compute thread ends once its current task returns (cancel is set).
    let _ = tokio::task::spawn_blocking(move || compute.join()).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_join_token_never_shows_in_debug_output() {
        let config = WorkerConfig {
            join_token: "s3cret-join-token".into(),
            ..WorkerConfig::default()
        };
        let text = format!("{config:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("(set)") && text.contains("coordinator"),
            "{text}"
        );
    }
}
