//! The coordinator's live state behind one mutex: the journal, membership, the running job's
//! dispatch state, per-job event logs and the worker sessions. Methods are synchronous and
//! hold the lock briefly; the tonic services and the tick call them off the async runtime
//! (they may write the journal). [`dispatch`](crate::dispatch) decides which task goes where;
//! this module carries its actions out: [`jobs`] submits, cancels and starts jobs, [`workers`]
//! admits workers and takes their sessions' messages, [`running`] drives the running job, and
//! [`saving`] stores and publishes job events. Heartbeats never take the state lock (they
//! only touch [`workers::Liveness`]), so a journal write under the lock never delays one.
//!
//! Every task the coordinator starts (sessions, watch feeds, the tick) is spawned on its
//! [`TaskTracker`] and stops on its root [`CancellationToken`], cancelled by
//! [`Coordinator::close`].
//!
//! Job events are stored in the journal before anyone sees them: each log numbers an event
//! into its outbox, and `save_events` (called off the async runtime at the end of every
//! operation that pushes events) stores the outboxes in one journal transaction, then
//! publishes them. A restarted coordinator rebuilds every log from the journal, so sequence
//! numbers go on where they stopped, and it resumes the job that was running.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use spin_common::ids::{JobId, WorkerId};
use spin_common::proto::{unix_ms, v1};
use spin_common::spec::JobSpec;
use spin_common::store::Store;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use v1::coordinator_message::Message as Down;
use v1::job_event::Event;

use crate::config::CoordinatorConfig;
use crate::convert::job_status;
use crate::dispatch::JobRun;
use crate::error::ServiceError;
use crate::events::EventLog;
use crate::journal::{JobRecord, Journal};
use crate::membership::Membership;
use crate::CoordinatorError;
use saving::restore_log;
use workers::Liveness;

mod jobs;
mod running;
mod saving;
mod workers;

/// A handle on the coordinator; clones share one state.
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

struct Shared {
    config: CoordinatorConfig,
    store: Store,
    state: Mutex<State>,
    /// Heartbeats, apart from the state (the same `Arc` as [`State::liveness`]).
    liveness: Arc<Mutex<Liveness>>,
    /// The root token: cancelled when the coordinator closes; every task stops on it.
    closing: CancellationToken,
    /// Every task the coordinator spawned.
    tasks: TaskTracker,
    /// Held while events are stored and published, so they are published in order.
    saving: Mutex<()>,
    /// Whether a save of events is queued on the blocking pool.
    save_queued: AtomicBool,
}

struct State {
    /// Shared so events are stored without the state lock held.
    journal: Arc<Journal>,
    membership: Membership,
    /// The object store's directory (jobs live under `jobs/{id}`).
    store_root: PathBuf,
    events: HashMap<JobId, EventLog>,
    last_step: HashMap<JobId, v1::StepMetrics>,
    sessions: HashMap<WorkerId, Session>,
    next_session: u64,
    /// The job the workers are assigned to (one job at a time).
    active: Option<Active>,
    /// The validated specs of the jobs submitted since this coordinator started and not yet
    /// ended (a restarted one parses the journaled text when it starts a job).
    specs: HashMap<JobId, Arc<JobSpec>>,
    /// Kept in step with `sessions` (see [`Liveness`]).
    liveness: Arc<Mutex<Liveness>>,
}

/// The running job.
struct Active {
    run: JobRun,
    spec_toml: String,
    /// The generation of the job's fence last written (see `State::write_fence`).
    fence_generation: u64,
}

struct Session {
    id: u64,
    tx: mpsc::Sender<v1::CoordinatorMessage>,
    job: Option<JobId>,
}

/// What a new watcher gets: the kept events it asked for, then the live ones.
pub struct Watch {
    /// Kept events from the requested sequence on.
    pub backlog: Vec<v1::JobEvent>,
    /// Events pushed after the backlog was taken.
    pub live: broadcast::Receiver<v1::JobEvent>,
}

/// An open worker session, as the control service holds it.
pub struct SessionHandle {
    /// Tells this session from a later one of the same worker.
    pub id: u64,
    /// Messages for the worker.
    pub outbound: mpsc::Receiver<v1::CoordinatorMessage>,
}

fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

impl Coordinator {
    /// Opens the journal and the object store named by `config` and rebuilds each job's
    /// event log from the journal. A job that was running when the coordinator stopped is
    /// resumed once `min_workers` sessions are open (see [`Coordinator::tick`]).
    pub fn open(config: CoordinatorConfig) -> Result<Self, CoordinatorError> {
        let journal = Arc::new(Journal::open(&config.journal_path)?);
        let store = Store::open(&config.store)?;
        let store_root = store.root().to_path_buf();
        let mut events = HashMap::new();
        let mut last_step = HashMap::new();
        let mut missing = Vec::new();
        for job in journal.jobs()? {
            let mut log = restore_log(&journal, &job, config.event_history, &store_root)?;
            let outbox = log.take_outbox();
            if !outbox.is_empty() {
                missing.push((job.id, outbox));
            }
            if let Some(step) = log.last_step() {
                last_step.insert(job.id, step);
            }
            events.insert(job.id, log);
        }
        // Events of transitions journaled without them (a crash between the two writes, or a
        // journal from before events were stored) are stored now, before anyone sees them.
        journal.append_events(&missing)?;
        for (id, outbox) in missing {
            if let Some(log) = events.get_mut(&id) {
                log.publish(outbox);
            }
        }
        let liveness = Arc::new(Mutex::new(Liveness::default()));
        let state = State {
            liveness: liveness.clone(),
            journal,
            membership: Membership::new(config.heartbeat_timeout),
            store_root,
            events,
            last_step,
            sessions: HashMap::new(),
            next_session: 0,
            active: None,
            specs: HashMap::new(),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                store,
                state: Mutex::new(state),
                liveness,
                closing: CancellationToken::new(),
                tasks: TaskTracker::new(),
                saving: Mutex::new(()),
                save_queued: AtomicBool::new(false),
            }),
        })
    }

    /// The settings it runs with.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.shared.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves plain data behind; going on is safer than a cascade.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells every worker to stop, ends every session and every watcher, and cancels the
    /// root token every task of the coordinator stops on.
    pub fn close(&self, reason: &str) {
        self.shared.closing.cancel();
        let mut state = self.lock();
        for (_, session) in state.sessions.drain() {
            let _ = session.tx.try_send(v1::CoordinatorMessage {
                message: Some(Down::Shutdown(v1::Shutdown {
                    reason: reason.to_string(),
                })),
            });
        }
        state.liveness().clear();
    }

    /// Whether [`Coordinator::close`] was called.
    pub fn is_closing(&self) -> bool {
        self.shared.closing.is_cancelled()
    }

    /// Resolves once the coordinator shuts down.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.shared.closing.clone().cancelled_owned()
    }

    /// Runs `task` on the runtime, tracked: [`Coordinator::stopped`] waits for it.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.shared.tasks.spawn(task)
    }

    /// Cancels the root token (without the workers' goodbye when [`Coordinator::close`] did
    /// not run) and waits up to `timeout` for every spawned task to end; `false` if some
    /// did not.
    pub async fn stopped(&self, timeout: std::time::Duration) -> bool {
        self.shared.closing.cancel();
        self.shared.tasks.close();
        tokio::time::timeout(timeout, self.shared.tasks.wait())
            .await
            .is_ok()
    }
}

impl State {
    fn liveness(&self) -> MutexGuard<'_, Liveness> {
        self.liveness.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn status(&self, job: &JobRecord) -> v1::JobStatus {
        let workers = self
            .sessions
            .values()
            .filter(|s| s.job == Some(job.id))
            .count();
        job_status(
            job,
            u32::try_from(workers).unwrap_or(u32::MAX),
            self.last_step.get(&job.id).cloned(),
        )
    }

    /// Workers with an open session.
    fn world(&self) -> u32 {
        u32::try_from(self.sessions.len()).unwrap_or(u32::MAX)
    }

    /// The running job's id.
    fn active_job(&self) -> Option<JobId> {
        self.active.as_ref().map(|a| a.run.job())
    }

    fn check_session(&self, worker: WorkerId, session: u64) -> Result<(), ServiceError> {
        match self.sessions.get(&worker) {
            Some(s) if s.id == session => Ok(()),
            Some(_) => Err(ServiceError::Protocol(format!(
                "worker {worker} opened a newer session"
            ))),
            None => Err(ServiceError::UnknownWorker(worker)),
        }
    }

    /// Pushes `event` to every job that has not ended.
    fn broadcast_live(&mut self, event: Event) {
        let live: Vec<JobId> = match self.journal.live_jobs() {
            Ok(jobs) => jobs.into_iter().map(|j| j.id).collect(),
            Err(err) => {
                tracing::error!(error = %err, "journal read failed; event not announced");
                return;
            }
        };
        let at = now_ms();
        for id in live {
            if let Some(log) = self.events.get_mut(&id) {
                log.push(at, event.clone());
            }
        }
    }
}

/// Why a cancelled job's tasks are dropped.
const CANCELLED: &str = "cancelled on request";

/// The store directory of `job` under the store at `store_root`.
fn job_dir(store_root: &Path, job: JobId) -> PathBuf {
    store_root.join("jobs").join(job.to_string())
}
