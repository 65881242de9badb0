//! The coordinator's live state behind one mutex: the journal, membership, the running job's
//! dispatch state, per-job event logs and the worker sessions. Methods are synchronous and
//! hold the lock briefly; the tonic services and the tick call them off the async runtime
//! (they may write the journal). [`dispatch`](crate::dispatch) decides which task goes where;
//! this module carries its actions out.
//!
//! Job events are stored in the journal before anyone sees them: each log numbers an event
//! into its outbox, and `save_events` (called off the async runtime at the end of every
//! operation that pushes events) stores the outboxes in one journal transaction, then
//! publishes them. A restarted coordinator rebuilds every log from the journal, so sequence
//! numbers go on where they stopped, and it resumes the job that was running.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use spin_common::dataset::JobPrompts;
use spin_common::ids::{JobId, WorkerId};
use spin_common::proto::{unix_ms, v1};
use spin_common::spec::JobSpec;
use spin_common::store::{layout, Store};
use tokio::sync::{broadcast, mpsc, watch};
use v1::coordinator_message::Message as Down;
use v1::job_event::Event;

use crate::config::CoordinatorConfig;
use crate::convert::job_status;
use crate::dispatch::resume::{self, Found};
use crate::dispatch::{JobRun, Plan};
use crate::error::ServiceError;
use crate::events::EventLog;
use crate::journal::{JobRecord, Journal, JournalError, TransitionRecord};
use crate::membership::{Device, Member, Membership};
use crate::service::job::parse_spec;
use crate::state::{JobShape, JobState, Trigger};
use crate::CoordinatorError;

mod running;

/// A handle on the coordinator; clones share one state.
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

struct Shared {
    config: CoordinatorConfig,
    store: Store,
    state: Mutex<State>,
    closing: watch::Sender<bool>,
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
}

/// The running job.
struct Active {
    run: JobRun,
    spec_toml: String,
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
        let state = State {
            journal,
            membership: Membership::new(config.heartbeat_timeout),
            store_root,
            events,
            last_step,
            sessions: HashMap::new(),
            next_session: 0,
            active: None,
        };
        let (closing, _) = watch::channel(false);
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                store,
                state: Mutex::new(state),
                closing,
                saving: Mutex::new(()),
                save_queued: AtomicBool::new(false),
            }),
        })
    }

    /// Stores the events waiting in every log's outbox in the journal (one transaction, the
    /// state lock not held meanwhile), then publishes them to the logs' watchers. Serialized,
    /// so each log publishes in sequence order. Call it off the async runtime, without the
    /// state lock. If the journal fails, the events are published all the same (a restart
    /// loses them) rather than held back from every watcher.
    fn save_events(&self) {
        let _order = self
            .shared
            .saving
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (journal, batch) = {
            let mut state = self.lock();
            let batch: Vec<(JobId, Vec<v1::JobEvent>)> = state
                .events
                .iter_mut()
                .filter_map(|(id, log)| {
                    let outbox = log.take_outbox();
                    (!outbox.is_empty()).then_some((*id, outbox))
                })
                .collect();
            (state.journal.clone(), batch)
        };
        if batch.is_empty() {
            return;
        }
        if let Err(err) = journal.append_events(&batch) {
            tracing::error!(error = %err, "could not store job events; publishing them unstored");
        }
        let mut state = self.lock();
        for (id, events) in batch {
            if let Some(log) = state.events.get_mut(&id) {
                log.publish(events);
            }
        }
    }

    /// Has the events pushed so far stored and published soon, on the blocking pool (at once
    /// when there is no runtime): for callers on the async runtime. One save is queued at a
    /// time; events pushed meanwhile go with it or with the next.
    fn save_events_soon(&self) {
        if self.shared.save_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let c = self.clone();
        let save = move || {
            c.shared.save_queued.store(false, Ordering::Release);
            c.save_events();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(save);
            }
            Err(_) => save(),
        }
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

    /// Journals a validated job (submitted as `spec_toml`) as pending and announces it.
    pub fn submit(&self, spec: &JobSpec, spec_toml: String) -> Result<JobId, ServiceError> {
        let id = JobId::new();
        let mut state = self.lock();
        // Submission times are strictly increasing, so "newest first" is the order of
        // acceptance even for jobs submitted within the same millisecond.
        let latest = state
            .journal
            .jobs()?
            .last()
            .map_or(i64::MIN, |j| j.submitted_at_ms);
        let at = now_ms().max(latest.saturating_add(1));
        let record = JobRecord::pending(id, spec.name.clone(), spec_toml, JobShape::of(spec), at);
        state.journal.accept(&record)?;
        let mut log = EventLog::new(id.to_string(), self.shared.config.event_history);
        log.push(at, submitted_event());
        state.events.insert(id, log);
        drop(state);
        self.save_events();
        tracing::info!(job = %id, name = %spec.name, "job accepted");
        Ok(id)
    }

    /// The wire status of job `id`.
    pub fn job(&self, id: JobId) -> Result<v1::JobStatus, ServiceError> {
        let state = self.lock();
        let job = state.journal.job(id)?.ok_or(ServiceError::UnknownJob(id))?;
        Ok(state.status(&job))
    }

    /// Every job, newest submission first.
    pub fn jobs(&self) -> Result<Vec<v1::JobStatus>, ServiceError> {
        let state = self.lock();
        let jobs = state.journal.jobs()?;
        Ok(jobs.iter().rev().map(|j| state.status(j)).collect())
    }

    /// Cancels job `id`; a finished job keeps its state. Returns the state after.
    pub fn cancel(&self, id: JobId) -> Result<JobState, ServiceError> {
        let mut state = self.lock();
        let job = state.journal.job(id)?.ok_or(ServiceError::UnknownJob(id))?;
        if job.state.is_terminal() {
            return Ok(job.state);
        }
        let record = state.apply(&job, Trigger::Cancel)?;
        drop(state);
        self.save_events();
        tracing::info!(job = %id, "job cancelled");
        Ok(record.to)
    }

    /// Starts watching job `id` from event `from`.
    pub fn watch(&self, id: JobId, from: u64) -> Result<Watch, ServiceError> {
        let state = self.lock();
        let log = state.events.get(&id).ok_or(ServiceError::UnknownJob(id))?;
        // Under one lock: nothing pushed between the backlog and the subscription is lost.
        Ok(Watch {
            backlog: log.since(from),
            live: log.subscribe(),
        })
    }

    /// Job `id`'s kept events from `from` on (a lagging watcher catching up).
    pub fn events_since(&self, id: JobId, from: u64) -> Vec<v1::JobEvent> {
        self.lock()
            .events
            .get(&id)
            .map(|log| log.since(from))
            .unwrap_or_default()
    }

    /// Admits a worker whose collective service is at `address`.
    pub fn register_worker(
        &self,
        address: String,
        device: Device,
        now: Instant,
    ) -> Result<WorkerId, ServiceError> {
        let id = WorkerId::new();
        self.lock()
            .membership
            .register(id, address.clone(), device, now)?;
        tracing::info!(worker = %id, %address, "worker registered");
        Ok(id)
    }

    /// A registered worker, if it is (still) a member.
    pub fn worker(&self, id: WorkerId) -> Option<Member> {
        self.lock().membership.get(id).cloned()
    }

    /// Opens `worker`'s session (replacing an older one) and assigns it the running job.
    pub fn open_session(
        &self,
        worker: WorkerId,
        now: Instant,
    ) -> Result<SessionHandle, ServiceError> {
        if *self.shared.closing.borrow() {
            return Err(ServiceError::ShuttingDown);
        }
        let mut state = self.lock();
        state.membership.heartbeat(worker, now)?;
        let (tx, outbound) = mpsc::channel(self.shared.config.session_buffer);
        let id = state.next_session;
        state.next_session += 1;
        let replaced = state.sessions.insert(worker, Session { id, tx, job: None });
        // A worker that opens a new session has dropped what the old one was running.
        let mut actions = Vec::new();
        if let (Some(_), Some(active)) = (replaced, state.active.as_mut()) {
            actions = active
                .run
                .on_lost(worker, "the worker opened a new session");
        }
        let device = state
            .membership
            .get(worker)
            .map(|m| m.device.clone().into());
        let world = state.world();
        state.broadcast_live(Event::WorkerJoined(v1::WorkerJoined {
            worker_id: worker.to_string(),
            device,
            world,
        }));
        if let Err(reason) = state.assign(worker) {
            actions.extend(state.forget(worker, &reason));
        }
        state.drive(actions, now);
        drop(state);
        self.save_events();
        tracing::info!(worker = %worker, session = id, "session opened");
        Ok(SessionHandle { id, outbound })
    }

    /// Records a heartbeat of `worker`'s session `session`; renews its leases.
    pub fn heartbeat(
        &self,
        worker: WorkerId,
        session: u64,
        now: Instant,
    ) -> Result<(), ServiceError> {
        let mut state = self.lock();
        state.check_session(worker, session)?;
        state.membership.heartbeat(worker, now)?;
        if let Some(active) = &mut state.active {
            active.run.renew(worker, now);
        }
        Ok(())
    }

    /// Records step metrics reported by `worker` for its assigned job. Called on the async
    /// runtime: the step event is stored and published from the blocking pool.
    pub fn report_step(
        &self,
        worker: WorkerId,
        session: u64,
        metrics: v1::StepMetrics,
    ) -> Result<(), ServiceError> {
        let mut state = self.lock();
        state.check_session(worker, session)?;
        let Some(job) = state.sessions.get(&worker).and_then(|s| s.job) else {
            return Err(ServiceError::Protocol(format!(
                "worker {worker} reported a step but has no job"
            )));
        };
        state.last_step.insert(job, metrics.clone());
        if let Some(log) = state.events.get_mut(&job) {
            log.push(now_ms(), Event::Step(metrics));
        }
        drop(state);
        self.save_events_soon();
        Ok(())
    }

    /// Applies the result of a task `worker` ran (and counts it as a heartbeat); the worker
    /// gets its next task. Results for a job that ended, or for unknown or stale tasks, are
    /// ignored. May write the journal: call it off the async runtime.
    pub fn task_result(
        &self,
        worker: WorkerId,
        session: u64,
        result: v1::TaskResult,
        now: Instant,
    ) -> Result<(), ServiceError> {
        let mut state = self.lock();
        state.check_session(worker, session)?;
        state.membership.heartbeat(worker, now)?;
        let job = state.sessions.get(&worker).and_then(|s| s.job);
        let actions = match state.active.as_mut() {
            Some(active) if job == Some(active.run.job()) => {
                active.run.renew(worker, now);
                active.run.on_result(worker, result)
            }
            _ => {
                tracing::debug!(worker = %worker, task = %result.task_id, "result for no running job ignored");
                return Ok(());
            }
        };
        state.drive(actions, now);
        drop(state);
        self.save_events();
        Ok(())
    }

    /// Ends `worker`'s session `session` (its stream broke or ended): the worker is lost. A
    /// session already replaced by a newer one ends quietly, and so does every session of a
    /// coordinator shutting down: it sent the workers away, and its job resumes on the next
    /// start as it was. May write the journal.
    pub fn end_session(&self, worker: WorkerId, session: u64, reason: &str) {
        if *self.shared.closing.borrow() {
            return;
        }
        let mut state = self.lock();
        if state.sessions.get(&worker).is_some_and(|s| s.id == session) {
            state.lose(worker, reason, Instant::now());
        }
        drop(state);
        self.save_events();
    }

    /// Sweeps workers silent past the heartbeat timeout and expired leases, hands idle workers
    /// tasks, restarts training from the store when every replica was lost, then starts (or
    /// resumes) a job if none is running and at least `min_workers` sessions are open. Runs on
    /// the blocking pool: it writes the journal and reads datasets and checkpoints.
    pub fn tick(&self, now: Instant) {
        {
            let mut state = self.lock();
            for member in state.membership.sweep(now) {
                state.lose(member.id, "missed heartbeats", now);
            }
            if let Some(active) = &mut state.active {
                let job = active.run.job();
                for (shard, worker) in active.run.expire(now) {
                    tracing::warn!(job = %job, shard, worker = %worker, "lease expired; shard reopened");
                }
            }
            state.drive(Vec::new(), now);
        }
        self.restore_training(now);
        self.start_next(now);
        self.save_events();
    }

    /// When every replica of the running job's ring was lost, and `min_workers` of its
    /// workers are connected again, finds the iteration's latest verified checkpoint (without
    /// the lock held: verifying hashes it) and restarts the ring from it.
    fn restore_training(&self, now: Instant) {
        let min_workers = self.shared.config.min_workers.max(1);
        let (job, k, job_dir) = {
            let state = self.lock();
            let Some(active) = &state.active else {
                return;
            };
            let Some(k) = active.run.checkpoint_wanted() else {
                return;
            };
            let job = active.run.job();
            if state.job_members(job).len() < min_workers {
                return;
            }
            (job, k, active.run.job_dir().to_path_buf())
        };
        let point = resume::survey_training(&job_dir, k);
        let mut state = self.lock();
        let Some(active) = state.active.as_mut().filter(|a| a.run.job() == job) else {
            return;
        };
        tracing::info!(job = %job, iteration = k, next_step = point.next_step(), "training restarts from the store");
        let actions = active.run.restore(&point);
        state.drive(actions, now);
    }

    /// Starts the oldest pending job, or resumes a job a restart interrupted, when it may
    /// start. The dataset and the store are read without the lock held; the job starts only
    /// if nothing changed meanwhile.
    fn start_next(&self, now: Instant) {
        let min_workers = self.shared.config.min_workers;
        let job = match self.lock().startable(min_workers) {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(err) => {
                tracing::error!(error = %err, "could not look for a job to start");
                return;
            }
        };
        let prepared = self.prepare(&job);
        let found = match &prepared {
            Ok(run) if job.state != JobState::Pending => resume::survey(run.plan(), job.state),
            _ => Found::Nothing,
        };
        let mut state = self.lock();
        match state.startable(min_workers) {
            Ok(Some(still)) if still.id == job.id && still.state == job.state => {}
            _ => return,
        }
        let started = if job.state == JobState::Pending {
            state.start(&job, prepared, now)
        } else {
            state.resume(&job, prepared, found, now)
        };
        if let Err(err) = started {
            tracing::error!(job = %job.id, error = %err, "could not start a job");
        }
    }

    /// The dispatch state of `job`: its spec parsed, its prompts read and cut into shards, its
    /// store directory made. `Err` says why the job cannot run.
    fn prepare(&self, job: &JobRecord) -> Result<JobRun, String> {
        let spec = parse_spec(&job.spec_toml).map_err(|e| format!("job spec: {e}"))?;
        let prompts = JobPrompts::read(&spec).map_err(|e| format!("dataset: {e}"))?;
        let dir = self
            .shared
            .store
            .sub(&format!("jobs/{}", job.id))
            .map_err(|e| format!("object store: {e}"))?;
        let plan = Plan::new(
            &spec,
            prompts.train.len(),
            prompts.held_out.len(),
            dir.root().to_path_buf(),
        )
        .map_err(|e| format!("shard plan (sampling.shard_size): {e}"))?;
        tracing::info!(job = %job.id, train = prompts.train.len(), held_out = prompts.held_out.len(), shards = plan.shards.len(), "job planned");
        Ok(JobRun::new(job.id, plan, self.shared.config.lease_duration))
    }

    /// Tells every worker to stop, ends every session and every watcher.
    pub fn close(&self, reason: &str) {
        self.shared.closing.send_replace(true);
        let mut state = self.lock();
        for (_, session) in state.sessions.drain() {
            let _ = session.tx.try_send(v1::CoordinatorMessage {
                message: Some(Down::Shutdown(v1::Shutdown {
                    reason: reason.to_string(),
                })),
            });
        }
    }

    /// Resolves once the coordinator shuts down.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shared.closing.subscribe();
        async move {
            loop {
                let closing = *rx.borrow_and_update();
                if closing || rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

impl State {
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

    /// Journals `trigger` on `job` and announces the transition. When the running job ends,
    /// its dispatch state is dropped and, if it failed or was cancelled, its workers are told
    /// to drop its tasks.
    fn apply(
        &mut self,
        job: &JobRecord,
        trigger: Trigger,
    ) -> Result<TransitionRecord, ServiceError> {
        let record = self.journal.apply(job.id, trigger, now_ms())?;
        let mut job = job.clone();
        if let Trigger::Fail { reason } = &record.trigger {
            job.error = Some(reason.clone());
        }
        if let Some(log) = self.events.get_mut(&job.id) {
            push_transition(log, &job, &record, &self.store_root);
        }
        if record.to.is_terminal() && self.active_job() == Some(job.id) {
            self.active = None;
            let cancel = match &record.trigger {
                Trigger::Fail { reason } => Some(reason.clone()),
                Trigger::Cancel => Some(CANCELLED.to_string()),
                _ => None,
            };
            for (worker, session) in &mut self.sessions {
                if session.job != Some(job.id) {
                    continue;
                }
                session.job = None;
                if let Some(reason) = &cancel {
                    let message = v1::CoordinatorMessage {
                        message: Some(Down::Cancel(v1::CancelTasks {
                            job_id: job.id.to_string(),
                            reason: reason.clone(),
                        })),
                    };
                    if let Err(err) = session.tx.try_send(message) {
                        tracing::warn!(worker = %worker, error = %err, "could not tell a worker to cancel its tasks");
                    }
                }
            }
        }
        Ok(record)
    }

    /// Journals `trigger` on job `id`; returns the state after.
    fn apply_to(&mut self, id: JobId, trigger: Trigger) -> Result<JobState, ServiceError> {
        let job = self.journal.job(id)?.ok_or(ServiceError::UnknownJob(id))?;
        Ok(self.apply(&job, trigger)?.to)
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

/// Job `job`'s event log from the journal: its stored events, then, in the outbox, those of
/// any transition journaled without its events (a crash between the two writes, or a journal
/// written before events were stored).
fn restore_log(
    journal: &Journal,
    job: &JobRecord,
    capacity: usize,
    store_root: &Path,
) -> Result<EventLog, JournalError> {
    let stored = journal.events(job.id)?;
    let phase_changes = stored
        .iter()
        .filter(|e| matches!(e.event, Some(Event::PhaseChanged(_))))
        .count();
    let mut log = EventLog::restore(job.id.to_string(), capacity, stored);
    if phase_changes == 0 {
        log.push(job.submitted_at_ms, submitted_event());
    }
    // The first phase change is the submission; each transition makes one more.
    let told = phase_changes.saturating_sub(1);
    for record in journal.transitions(job.id)?.iter().skip(told) {
        push_transition(&mut log, job, record, store_root);
    }
    Ok(log)
}

/// The first event of every job: it entered `PENDING`.
fn submitted_event() -> Event {
    Event::PhaseChanged(v1::PhaseChanged {
        from: None,
        to: Some(JobState::Pending.into()),
    })
}

/// The events of one transition: the phase change, then how the job ended if it did. A done
/// job's model is the last snapshot in its store directory under `store_root`.
fn push_transition(
    log: &mut EventLog,
    job: &JobRecord,
    record: &TransitionRecord,
    store_root: &Path,
) {
    log.push(
        record.at_ms,
        Event::PhaseChanged(v1::PhaseChanged {
            from: Some(record.from.into()),
            to: Some(record.to.into()),
        }),
    );
    let end = match record.to {
        JobState::Done => Some(Event::Done(v1::JobDone {
            model_path: job_dir(store_root, job.id)
                .join(layout::snapshot(job.shape.iterations))
                .display()
                .to_string(),
        })),
        JobState::Failed => Some(Event::Failed(v1::JobFailed {
            error: match &record.trigger {
                Trigger::Fail { reason } => reason.clone(),
                _ => job.error.clone().unwrap_or_default(),
            },
        })),
        JobState::Cancelled => Some(Event::Cancelled(v1::JobCancelled {
            reason: CANCELLED.into(),
        })),
        _ => None,
    };
    if let Some(event) = end {
        log.push(record.at_ms, event);
    }
}
