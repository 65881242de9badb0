//! The worker daemon: serves `CollectiveService` for its ring peers, registers with the
//! coordinator, keeps one session (heartbeats up, tasks down) and runs tasks on one compute
//! thread with a [`JobRunner`]. A broken session is re-opened as a new worker (the
//! coordinator has already counted the old one lost); the job's state is dropped with it.
//! With a certificate the collective port is TLS; the join token goes with every call, to the
//! coordinator and to ring peers, and the collective port requires it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use spin_common::auth::{Bearer, Token};
use spin_common::proto::v1;
use spin_common::shards::Shard;
use spin_common::spec::{JobSpec, RawJobSpec};
use spin_common::store::Store;
use spin_common::tls::{error_chain, status_text, TlsSettings};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use v1::control_service_client::ControlServiceClient;
use v1::coordinator_message::Message as Down;
use v1::worker_message::Message as Up;

use crate::collective::grpc::{CollectiveInbox, GrpcOptions};
use crate::collective::{Collective, RingCollective, RingConfig, Solo};
use crate::device::parse_device;
use crate::tasks::{JobRunner, Metrics, StepReport};
use crate::train::TrainError;

/// What a worker daemon is told (from flags or `SPIN_WORKER__*`).
#[derive(Clone)]
pub struct WorkerConfig {
    /// The coordinator's URL, e.g. `http://10.0.0.1:7070`.
    pub coordinator: String,
    /// Where to serve `CollectiveService` (port 0: any free port).
    pub collective_listen: SocketAddr,
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
            .field("collective_listen", &self.collective_listen)
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
            collective_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
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
    /// The collective listener could not be bound or served.
    #[error("collective service on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The coordinator could not be reached or refused the worker.
    #[error("coordinator {url}: {message}")]
    Coordinator {
        /// The coordinator URL.
        url: String,
        /// What happened.
        message: String,
    },
}

/// What the session side asks of the compute thread.
enum Command {
    Assign(v1::AssignJob),
    Task(v1::Task),
    Cancel(String),
    /// A new session (its number) or none (0): drop the job; tag results with it.
    Reset(u64),
}

/// Runs the daemon until `shutdown` resolves or the coordinator says `Shutdown`.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let device = parse_device(&config.device).map_err(DaemonError::Config)?;
    let (options, coordinator, bearer) = links(&config)?;
    let listener = tokio::net::TcpListener::bind(config.collective_listen)
        .await
        .map_err(|source| DaemonError::Listen {
            address: config.collective_listen,
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            address: config.collective_listen,
            source,
        })?;
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
    let inbox = CollectiveInbox::new(&options);
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(inbox.clone().serve(listener, async {
        let _ = server_stopped.await;
    }));

    let cancel = Arc::new(AtomicBool::new(false));
    let (commands, command_rx) = std_mpsc::channel::<Command>();
    let (up_tx, mut up_rx) = mpsc::channel::<(u64, Up)>(1024);
    let compute = {
        let cancel = cancel.clone();
        let inbox = inbox.clone();
        let ring_timeout = config.ring_timeout;
        let device = device.clone();
        std::thread::Builder::new()
            .name("spin-compute".into())
            .spawn(move || compute_loop(command_rx, up_tx, cancel, inbox, ring_timeout, device))
            .map_err(|e| DaemonError::Config(format!("cannot start the compute thread: {e}")))?
    };

    tokio::pin!(shutdown);
    let mut generation: u64 = 0;
    let result = loop {
        let session = tokio::select! {
            s = open_session(&config, &coordinator, &bearer, &advertise) => s,
            () = &mut shutdown => break Ok(()),
        };
        let (worker_id, heartbeat, tx, mut inbound) = match session {
            Ok(s) => s,
            Err(e) => break Err(e),
        };
        generation += 1;
        let _ = commands.send(Command::Reset(generation));
        tracing::info!(worker = %worker_id, coordinator = %config.coordinator, collective = %advertise, "session open");
        let mut ticker = tokio::time::interval(heartbeat);
        let ended = loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(message)) => match message.message {
                        Some(Down::AssignJob(assign)) => {
                            cancel.store(false, Ordering::Relaxed);
                            tracing::info!(worker = %worker_id, job = %assign.job_id, "job assigned");
                            let _ = commands.send(Command::Assign(assign));
                        }
                        Some(Down::Task(task)) => {
                            let _ = commands.send(Command::Task(task));
                        }
                        Some(Down::Cancel(c)) => {
                            tracing::info!(worker = %worker_id, job = %c.job_id, reason = %c.reason, "job tasks cancelled");
                            cancel.store(true, Ordering::Relaxed);
                            let _ = commands.send(Command::Cancel(c.job_id));
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
        let _ = commands.send(Command::Reset(0));
        match ended {
            None => break Ok(()),
            Some(reason) => {
                tracing::warn!(worker = %worker_id, %reason, "session ended; registering again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    drop(commands);
    let _ = stop_server.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    // The compute thread ends once its current task returns (cancel is set).
    let _ = tokio::task::spawn_blocking(move || compute.join()).await;
    result
}

type Session = (
    String,
    Duration,
    mpsc::Sender<v1::WorkerMessage>,
    tonic::Streaming<v1::CoordinatorMessage>,
);

/// The collective options (join token, TLS), the coordinator's endpoint and the join token as
/// bearer metadata. The PEM files are read here, so a bad one stops the start, named.
fn links(config: &WorkerConfig) -> Result<(GrpcOptions, Endpoint, Bearer), DaemonError> {
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
async fn open_session(
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
            Ok::<_, (bool, String)>((registered.worker_id, heartbeat, tx, inbound))
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

/// The loaded job, or why it could not be loaded.
struct Loaded {
    job_id: String,
    runner: Result<JobRunner, String>,
}

/// The compute thread: one task at a time, results sent up tagged with the session they
/// belong to.
fn compute_loop(
    commands: std_mpsc::Receiver<Command>,
    up: mpsc::Sender<(u64, Up)>,
    cancel: Arc<AtomicBool>,
    inbox: CollectiveInbox,
    ring_timeout: Duration,
    device: Device,
) {
    let mut loaded: Option<Loaded> = None;
    let mut session: u64 = 0;
    while let Ok(command) = commands.recv() {
        match command {
            Command::Reset(next) => {
                loaded = None;
                session = next;
            }
            Command::Cancel(job) => {
                if loaded.as_ref().is_some_and(|l| l.job_id == job) {
                    loaded = None;
                }
            }
            Command::Assign(assign) => {
                let started = Instant::now();
                let runner = load_job(&assign, &device);
                match &runner {
                    Ok(_) => {
                        tracing::info!(job = %assign.job_id, secs = started.elapsed().as_secs_f64(), "job loaded")
                    }
                    Err(e) => {
                        tracing::error!(job = %assign.job_id, error = %e, "job could not be loaded")
                    }
                }
                loaded = Some(Loaded {
                    job_id: assign.job_id,
                    runner,
                });
            }
            Command::Task(task) => {
                let tag = session;
                let send = |message: Up| {
                    let _ = up.blocking_send((tag, message));
                };
                let outcome = match loaded.as_mut() {
                    Some(l) if l.job_id == task.job_id => match l.runner.as_mut() {
                        Ok(runner) => run_task(runner, &task, &cancel, &inbox, ring_timeout, &send),
                        Err(e) => Err(failed(
                            format!("the job could not be loaded: {e}"),
                            false,
                            0,
                        )),
                    },
                    _ => Err(failed(
                        format!(
                            "task for job {} but no such job is assigned here",
                            task.job_id
                        ),
                        true,
                        0,
                    )),
                };
                let outcome = match outcome {
                    Ok(ok) => v1::task_result::Outcome::Succeeded(ok),
                    Err(f) => {
                        tracing::warn!(job = %task.job_id, task = %task.task_id, error = %f.error, "task failed");
                        v1::task_result::Outcome::Failed(f)
                    }
                };
                send(Up::Result(v1::TaskResult {
                    task_id: task.task_id.clone(),
                    outcome: Some(outcome),
                }));
            }
        }
    }
}

fn load_job(assign: &v1::AssignJob, device: &Device) -> Result<JobRunner, String> {
    let raw = RawJobSpec::parse(
        &assign.spec_toml,
        Path::new("AssignJob.spec_toml"),
        &Default::default(),
    )
    .map_err(|e| e.to_string())?;
    let spec: JobSpec = raw.validate(Path::new("")).map_err(|e| e.to_string())?;
    let store = Store::open(&assign.store_prefix).map_err(|e| e.to_string())?;
    JobRunner::open(spec, store, device).map_err(|e| e.to_string())
}

fn failed(error: String, retryable: bool, completed_steps: u64) -> v1::TaskFailed {
    v1::TaskFailed {
        error,
        retryable,
        completed_steps,
    }
}

fn retryable(e: &TrainError) -> bool {
    matches!(e, TrainError::Collective(_) | TrainError::Io { .. })
}

fn eval_metrics(m: &Metrics) -> v1::EvalMetrics {
    v1::EvalMetrics {
        iteration: u32::try_from(m.iteration).unwrap_or(u32::MAX),
        held_out_loss: m.held_out_loss,
        mmd: m.mmd,
        grid_path: m.grid.display().to_string(),
    }
}

fn succeeded(outputs: Vec<String>, metrics: Vec<v1::EvalMetrics>, steps: u64) -> v1::TaskSucceeded {
    v1::TaskSucceeded {
        outputs,
        metrics,
        completed_steps: steps,
    }
}

fn run_task(
    runner: &mut JobRunner,
    task: &v1::Task,
    cancel: &AtomicBool,
    inbox: &CollectiveInbox,
    ring_timeout: Duration,
    send: &impl Fn(Up),
) -> Result<v1::TaskSucceeded, v1::TaskFailed> {
    let train_error = |e: TrainError| failed(e.to_string(), retryable(&e), 0);
    let root = runner.store().root().to_path_buf();
    let progress = |done: usize, total: usize| {
        send(Up::Progress(v1::TaskProgress {
            task_id: task.task_id.clone(),
            done: done as u64,
            total: total as u64,
        }));
    };
    let span = tracing::info_span!("task", job = %task.job_id, task = %task.task_id);
    let _entered = span.enter();
    match &task.kind {
        Some(v1::task::Kind::Encode(e)) if e.held_out => {
            let (key, metrics) = runner.encode_held_out().map_err(train_error)?;
            tracing::info!(
                held_out_loss = metrics.held_out_loss,
                mmd = metrics.mmd,
                "held-out prompts encoded; base model evaluated"
            );
            Ok(succeeded(
                vec![root.join(key).display().to_string()],
                vec![eval_metrics(&metrics)],
                0,
            ))
        }
        Some(v1::task::Kind::Encode(e)) => {
            let shard = Shard {
                index: e.shard,
                first: e.first_pair,
                end: e.end_pair,
            };
            let (key, report) = runner.encode_shard(&shard).map_err(train_error)?;
            for (row, reason) in report.skipped.iter().take(5) {
                tracing::warn!(row = %row, %reason, "row skipped");
            }
            tracing::info!(
                shard = e.shard,
                skipped = report.skipped.len(),
                "encode shard written"
            );
            Ok(succeeded(
                vec![root.join(key).display().to_string()],
                Vec::new(),
                0,
            ))
        }
        Some(v1::task::Kind::Sample(s)) => {
            let key = runner
                .sample_shard(s.iteration, s.shard, progress)
                .map_err(train_error)?;
            tracing::info!(
                iteration = s.iteration,
                shard = s.shard,
                "opponent shard written"
            );
            Ok(succeeded(
                vec![root.join(key).display().to_string()],
                Vec::new(),
                0,
            ))
        }
        Some(v1::task::Kind::Train(t)) => train(runner, task, t, cancel, inbox, ring_timeout, send),
        Some(v1::task::Kind::Snapshot(s)) => {
            let (dir, metrics) = runner.snapshot(s.iteration).map_err(train_error)?;
            tracing::info!(iteration = s.iteration, dir = %dir.display(), held_out_loss = metrics.held_out_loss, mmd = metrics.mmd, "snapshot published");
            Ok(succeeded(
                vec![dir.display().to_string()],
                vec![eval_metrics(&metrics)],
                0,
            ))
        }
        None => Err(failed("task without a kind".into(), false, 0)),
    }
}

fn train(
    runner: &mut JobRunner,
    task: &v1::Task,
    t: &v1::TrainSteps,
    cancel: &AtomicBool,
    inbox: &CollectiveInbox,
    ring_timeout: Duration,
    send: &impl Fn(Up),
) -> Result<v1::TaskSucceeded, v1::TaskFailed> {
    let (rank, world) = (t.rank as usize, t.world as usize);
    if world == 0 || rank >= world || t.peer_addresses.len() != world {
        return Err(failed(
            format!(
                "TrainSteps: rank {rank} of world {world} with {} peer addresses",
                t.peer_addresses.len()
            ),
            false,
            0,
        ));
    }
    let mut collective: Box<dyn Collective> = if world == 1 {
        Box::new(Solo)
    } else {
        let config = RingConfig {
            timeout: ring_timeout,
            ..RingConfig::default()
        };
        let right = &t.peer_addresses[(rank + 1) % world];
        match RingCollective::connect_grpc(
            rank,
            world,
            &t.collective_id,
            right,
            inbox,
            config,
            &GrpcOptions {
                connect_timeout: ring_timeout,
                ..inbox.options().clone()
            },
        ) {
            Ok(ring) => Box::new(ring),
            Err(e) => {
                return Err(failed(
                    format!("joining ring {} as rank {rank}: {e}", t.collective_id),
                    true,
                    0,
                ))
            }
        }
    };
    tracing::info!(iteration = t.iteration, first = t.first_step, last = t.last_step, rank, world, ring = %t.collective_id, "training");
    let report = |r: &StepReport| {
        tracing::info!(
            job = %task.job_id,
            iteration = r.iteration,
            step = r.step,
            loss = r.loss,
            lr = r.lr,
            grad_norm = r.grad_norm,
            step_time_s = r.step_time_s,
            skipped = r.skipped.as_deref().unwrap_or(""),
            "step"
        );
        if rank == 0 {
            send(Up::Step(v1::StepMetrics {
                iteration: u32::try_from(r.iteration).unwrap_or(u32::MAX),
                step: r.step,
                steps: r.steps,
                loss: r.loss,
                lr: r.lr,
                grad_norm: r.grad_norm,
                images_per_sec: r.images_per_sec,
                step_time_s: r.step_time_s,
                skipped: r.skipped.clone().unwrap_or_default(),
            }));
        }
    };
    match runner.train_steps(
        t.iteration,
        t.first_step,
        t.last_step,
        collective.as_mut(),
        cancel,
        report,
    ) {
        Ok(done) => Ok(succeeded(Vec::new(), Vec::new(), done)),
        Err(f) => Err(failed(f.error.to_string(), f.retryable, f.completed)),
    }
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
