//! The compute thread: the commands the session side sends it, the job it has loaded, and each
//! domain [`Task`] run on the job's [`JobRunner`] into the `TaskResult` sent back up, tagged
//! with the session it belongs to.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use spin_common::ids::JobId;
use spin_common::ids::WorkerId;
use spin_common::proto::v1;
use spin_common::spec::{JobSpec, SubmittedSpecError};
use spin_common::store::{Store, StoreError, StoreWarning};
use spin_common::task::{Task, TaskKind, TrainTask};
use tokio::sync::mpsc;
use v1::worker_message::Message as Up;

use crate::collective::grpc::{CollectiveInbox, GrpcOptions};
use crate::collective::{Collective, RingCollective, RingConfig, Solo};
use crate::tasks::{JobRunner, Metrics, StepReport};
use crate::train::TrainError;

/// What the session side asks of the compute thread.
pub(super) enum Command {
    /// Load this job (its spec already parsed); its tasks follow.
    Assign(Box<Assignment>),
    /// Run a task of the loaded job.
    Task(Task),
    /// The coordinator cancelled this job's tasks: drop it.
    Cancel(JobId),
    /// A new session (its number) or none (0): drop the job; tag results with it.
    Reset(u64),
}

/// A decoded `AssignJob`.
pub(super) struct Assignment {
    /// The job.
    pub job: JobId,
    /// Its spec, or why the submitted text was refused.
    pub spec: Result<JobSpec, SubmittedSpecError>,
    /// The job's prefix in the object store.
    pub store_prefix: String,
    /// This worker's registration: the store publishes its writes only while the job's
    /// fence lists it.
    pub writer: WorkerId,
}

/// Why an assigned job could not be loaded.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("AssignJob.spec_toml {0}")]
    Spec(#[source] SubmittedSpecError),
    #[error("object store {prefix}: {source}")]
    Store {
        prefix: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Runner(TrainError),
}

/// The loaded job, or why it could not be loaded.
struct Loaded {
    job: JobId,
    runner: Result<JobRunner, LoadError>,
}

/// How the compute thread reaches the rest of the daemon.
pub(super) struct ComputeLinks {
    pub up: mpsc::Sender<(u64, Up)>,
    pub cancel: std::sync::Arc<AtomicBool>,
    pub inbox: CollectiveInbox,
    pub ring_timeout: Duration,
    pub device: Device,
}

/// The compute thread: one task at a time, results sent up tagged with the session they
/// belong to, until the command channel closes.
pub(super) fn compute_loop(mut commands: mpsc::Receiver<Command>, links: ComputeLinks) {
    let mut loaded: Option<Loaded> = None;
    let mut session: u64 = 0;
    while let Some(command) = commands.blocking_recv() {
        match command {
            Command::Reset(next) => {
                loaded = None;
                session = next;
            }
            Command::Cancel(job) => {
                if loaded.as_ref().is_some_and(|l| l.job == job) {
                    loaded = None;
                }
            }
            Command::Assign(assign) => {
                let started = Instant::now();
                let job = assign.job;
                let runner = load_job(*assign, &links, session);
                match &runner {
                    Ok(_) => {
                        tracing::info!(job = %job, secs = started.elapsed().as_secs_f64(), "job loaded")
                    }
                    Err(e) => tracing::error!(job = %job, error = %e, "job could not be loaded"),
                }
                loaded = Some(Loaded { job, runner });
            }
            Command::Task(task) => {
                let tag = session;
                let send = |message: Up| {
                    let _ = links.up.blocking_send((tag, message));
                };
                let outcome = match loaded.as_mut() {
                    Some(l) if l.job == task.job => match l.runner.as_mut() {
                        Ok(runner) => run_task(runner, &task, &links, &send),
                        Err(e) => Err(failed(
                            format!("the job could not be loaded: {e}"),
                            false,
                            0,
                        )),
                    },
                    _ => Err(failed(
                        format!("task for job {} but no such job is assigned here", task.job),
                        true,
                        0,
                    )),
                };
                if let Err(f) = &outcome {
                    tracing::warn!(job = %task.job, task = %task.id, error = %f.error, "task failed");
                }
                send(task_result(task.id, outcome));
            }
        }
    }
}

/// The `TaskResult` message of task `task_id`.
pub(super) fn task_result(
    task_id: String,
    outcome: Result<v1::TaskSucceeded, v1::TaskFailed>,
) -> Up {
    let outcome = match outcome {
        Ok(ok) => v1::task_result::Outcome::Succeeded(ok),
        Err(f) => v1::task_result::Outcome::Failed(f),
    };
    Up::Result(v1::TaskResult {
        task_id,
        outcome: Some(outcome),
    })
}

/// Opens the assigned job: its store fenced with this worker's registration, each retried
/// write reported up (tagged with `session`) as a job warning.
fn load_job(
    assign: Assignment,
    links: &ComputeLinks,
    session: u64,
) -> Result<JobRunner, LoadError> {
    let spec = assign.spec.map_err(LoadError::Spec)?;
    let up = links.up.clone();
    let job = assign.job.to_string();
    let warn = move |w: &StoreWarning| {
        let warning = Up::Warning(v1::WorkerWarning {
            job_id: job.clone(),
            message: w.to_string(),
        });
        let _ = up.blocking_send((session, warning));
    };
    let store = Store::open(&assign.store_prefix)
        .map_err(|source| LoadError::Store {
            prefix: assign.store_prefix.clone(),
            source,
        })?
        .fenced(&assign.writer.to_string())
        .on_warning(std::sync::Arc::new(warn));
    JobRunner::open(spec, store, &links.device).map_err(LoadError::Runner)
}

pub(super) fn failed(error: String, retryable: bool, completed_steps: u64) -> v1::TaskFailed {
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
    task: &Task,
    links: &ComputeLinks,
    send: &impl Fn(Up),
) -> Result<v1::TaskSucceeded, v1::TaskFailed> {
    let train_error = |e: TrainError| failed(e.to_string(), retryable(&e), 0);
    let root = runner.store().root().to_path_buf();
    let written = |key: String| vec![root.join(key).display().to_string()];
    // Progress is what keeps a shard task's lease: the coordinator takes back a shard that
    // reports none within its deadline (heartbeats do not extend it).
    let progress = |done: usize, total: usize| {
        send(Up::Progress(v1::TaskProgress {
            task_id: task.id.clone(),
            done: done as u64,
            total: total as u64,
        }));
    };
    let span = tracing::info_span!("task", job = %task.job, task = %task.id);
    let _entered = span.enter();
    // The task starts now (the job may have taken a while to load): that is progress too.
    progress(0, 0);
    match &task.kind {
        TaskKind::EncodeHeldOut { .. } => {
            let (key, metrics) = runner.encode_held_out(progress).map_err(train_error)?;
            tracing::info!(
                held_out_loss = metrics.held_out_loss,
                mmd = metrics.mmd,
                "held-out prompts encoded; base model evaluated"
            );
            Ok(succeeded(written(key), vec![eval_metrics(&metrics)], 0))
        }
        TaskKind::Encode(shard) => {
            let (key, report) = runner.encode_shard(shard, progress).map_err(train_error)?;
            for (row, reason) in report.skipped.iter().take(5) {
                tracing::warn!(row = %row, %reason, "row skipped");
            }
            tracing::info!(
                shard = shard.index,
                skipped = report.skipped.len(),
                "encode shard written"
            );
            Ok(succeeded(written(key), Vec::new(), 0))
        }
        TaskKind::Sample(s) => {
            let key = runner
                .sample_shard(s.iteration, s.shard.index, progress)
                .map_err(train_error)?;
            tracing::info!(
                iteration = s.iteration,
                shard = s.shard.index,
                "opponent shard written"
            );
            Ok(succeeded(written(key), Vec::new(), 0))
        }
        TaskKind::Train(t) => train(runner, task.job, t, links, send),
        TaskKind::Snapshot { iteration } => {
            let (dir, metrics) = runner.snapshot(*iteration).map_err(train_error)?;
            tracing::info!(iteration, dir = %dir.display(), held_out_loss = metrics.held_out_loss, mmd = metrics.mmd, "snapshot published");
            Ok(succeeded(
                vec![dir.display().to_string()],
                vec![eval_metrics(&metrics)],
                0,
            ))
        }
    }
}

/// Joins the task's ring (or runs alone in a world of one) and runs its steps; rank 0
/// reports each step up.
fn train(
    runner: &mut JobRunner,
    job: JobId,
    t: &TrainTask,
    links: &ComputeLinks,
    send: &impl Fn(Up),
) -> Result<v1::TaskSucceeded, v1::TaskFailed> {
    let (rank, world) = (t.rank as usize, t.world as usize);
    let mut collective: Box<dyn Collective> = if world == 1 {
        Box::new(Solo)
    } else {
        let config = RingConfig {
            timeout: links.ring_timeout,
            ..RingConfig::default()
        };
        let options = GrpcOptions {
            connect_timeout: links.ring_timeout,
            ..links.inbox.options().clone()
        };
        let ring = RingCollective::connect_grpc(
            rank,
            world,
            &t.collective_id,
            &t.secret,
            t.right_peer(),
            &links.inbox,
            config,
            &options,
        );
        match ring {
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
            job = %job,
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
        &links.cancel,
        report,
    ) {
        Ok(done) => Ok(succeeded(Vec::new(), Vec::new(), done)),
        Err(f) => Err(failed(f.error.to_string(), f.retryable, f.completed)),
    }
}
