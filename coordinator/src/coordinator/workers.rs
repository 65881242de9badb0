//! Workers: admitting them, their sessions (opened, heartbeats, step reports, task results,
//! ended) and the periodic tick that sweeps the silent ones and expired leases.
//!
//! A heartbeat only records its time in [`Liveness`], behind its own small lock: the state
//! lock may be held across a journal write (a transition, a submission), and a heartbeat
//! must never wait on one. The tick folds the recorded beats into membership and the
//! running job's leases before it sweeps, which is the only place either is judged.

use std::collections::HashMap;
use std::sync::{MutexGuard, PoisonError};
use std::time::Instant;

use spin_common::ids::{JobId, WorkerId};
use spin_common::proto::v1;
use tokio::sync::mpsc;
use v1::job_event::Event;

use super::{now_ms, Coordinator, Session, SessionHandle, State};
use crate::error::ServiceError;
use crate::membership::{Device, Member};

/// The open sessions' numbers, and the latest heartbeat and the latest task progress of each
/// worker since the last tick.
#[derive(Debug, Default)]
pub(super) struct Liveness {
    sessions: HashMap<WorkerId, u64>,
    beats: HashMap<WorkerId, Instant>,
    progress: HashMap<WorkerId, Instant>,
}

impl Liveness {
    /// `worker`'s session `session` is now its open one.
    pub(super) fn open(&mut self, worker: WorkerId, session: u64) {
        self.sessions.insert(worker, session);
    }

    /// `worker` has no session any more.
    pub(super) fn forget(&mut self, worker: WorkerId) {
        self.sessions.remove(&worker);
        self.beats.remove(&worker);
        self.progress.remove(&worker);
    }

    /// No worker has a session.
    pub(super) fn clear(&mut self) {
        self.sessions.clear();
        self.beats.clear();
        self.progress.clear();
    }

    /// Records that `worker`'s session `session` showed progress on its task at `now` (a
    /// progress report or a step): it counts as a heartbeat too.
    pub(super) fn progressed(
        &mut self,
        worker: WorkerId,
        session: u64,
        now: Instant,
    ) -> Result<(), ServiceError> {
        self.beat(worker, session, now)?;
        let last = self.progress.entry(worker).or_insert(now);
        *last = (*last).max(now);
        Ok(())
    }

    /// Records a heartbeat of `worker`'s session `session` at `now`; refused, as the state
    /// would refuse it, for a replaced session or an unknown worker.
    pub(super) fn beat(
        &mut self,
        worker: WorkerId,
        session: u64,
        now: Instant,
    ) -> Result<(), ServiceError> {
        match self.sessions.get(&worker) {
            Some(s) if *s == session => {
                let last = self.beats.entry(worker).or_insert(now);
                *last = (*last).max(now);
                Ok(())
            }
            Some(_) => Err(ServiceError::Protocol(format!(
                "worker {worker} opened a newer session"
            ))),
            None => Err(ServiceError::UnknownWorker(worker)),
        }
    }

    /// The heartbeats and the progress recorded since the last call.
    fn take(&mut self) -> (HashMap<WorkerId, Instant>, HashMap<WorkerId, Instant>) {
        (
            std::mem::take(&mut self.beats),
            std::mem::take(&mut self.progress),
        )
    }
}

impl State {
    /// Folds what was recorded since the last tick into membership (heartbeats keep a worker
    /// a member) and the running job's leases (only progress renews a shard's lease: its
    /// deadline), each at the time it was received.
    fn absorb_heartbeats(&mut self) {
        let (beats, progress) = self.liveness().take();
        for (worker, at) in beats {
            let _ = self.membership.heartbeat(worker, at);
        }
        for (worker, at) in progress {
            if let Some(active) = &mut self.active {
                active.run.renew(worker, at);
            }
        }
    }
}

impl Coordinator {
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
        if self.is_closing() {
            return Err(ServiceError::ShuttingDown);
        }
        let mut state = self.lock();
        state.membership.heartbeat(worker, now)?;
        let (tx, outbound) = mpsc::channel(self.shared.config.session_buffer);
        let id = state.next_session;
        state.next_session += 1;
        let replaced = state.sessions.insert(worker, Session { id, tx, job: None });
        state.liveness().open(worker, id);
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
            actions.extend(state.forget(worker, &reason.to_string()));
        }
        state.drive(actions, now);
        drop(state);
        self.save_events();
        tracing::info!(worker = %worker, session = id, "session opened");
        Ok(SessionHandle { id, outbound })
    }

    fn liveness(&self) -> MutexGuard<'_, Liveness> {
        self.shared
            .liveness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a heartbeat of `worker`'s session `session` (it keeps the worker a member;
    /// only progress renews a lease).
    pub fn heartbeat(
        &self,
        worker: WorkerId,
        session: u64,
        now: Instant,
    ) -> Result<(), ServiceError> {
        self.liveness().beat(worker, session, now)
    }

    /// Records that `worker`'s session `session` made progress on its task at `now` (a
    /// progress report or a step): a heartbeat that also renews its shard's lease. Like a
    /// heartbeat, it never takes the state lock.
    pub fn progress(
        &self,
        worker: WorkerId,
        session: u64,
        now: Instant,
    ) -> Result<(), ServiceError> {
        self.liveness().progressed(worker, session, now)
    }

    /// Records step metrics reported by `worker` for its assigned job. Called on the async
    /// runtime: the step event is stored and published from the blocking pool.
    pub fn report_step(
        &self,
        worker: WorkerId,
        session: u64,
        metrics: v1::StepMetrics,
    ) -> Result<(), ServiceError> {
        self.push_reported(worker, session, "a step", |state, job| {
            state.last_step.insert(job, metrics.clone());
            Ok(Event::Step(metrics))
        })
    }

    /// Publishes a warning `worker` reported about its assigned job (a write it is retrying,
    /// naming the path) as a job warning event; it counts as progress of its task.
    pub fn report_warning(
        &self,
        worker: WorkerId,
        session: u64,
        warning: v1::WorkerWarning,
    ) -> Result<(), ServiceError> {
        self.progress(worker, session, Instant::now())?;
        self.push_reported(worker, session, "a warning", |_, job| {
            if warning.job_id != job.to_string() {
                return Err(ServiceError::Protocol(format!(
                    "worker {worker} reported a warning for job {} but is assigned {job}",
                    warning.job_id
                )));
            }
            tracing::warn!(job = %job, worker = %worker, message = %warning.message, "worker warning");
            Ok(Event::Warning(v1::Warning {
                message: format!("worker {worker}: {}", warning.message),
            }))
        })
    }

    /// Pushes the event `make` draws from what `worker`'s session `session` reported
    /// (`what`) onto its assigned job's log, and has it stored and published from the
    /// blocking pool. Refused for a stale session or a worker with no job.
    fn push_reported(
        &self,
        worker: WorkerId,
        session: u64,
        what: &str,
        make: impl FnOnce(&mut State, JobId) -> Result<Event, ServiceError>,
    ) -> Result<(), ServiceError> {
        let mut state = self.lock();
        state.check_session(worker, session)?;
        let Some(job) = state.sessions.get(&worker).and_then(|s| s.job) else {
            return Err(ServiceError::Protocol(format!(
                "worker {worker} reported {what} but has no job"
            )));
        };
        let event = make(&mut state, job)?;
        if let Some(log) = state.events.get_mut(&job) {
            log.push(now_ms(), event);
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
        if self.is_closing() {
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
            state.absorb_heartbeats();
            for member in state.membership.sweep(now) {
                state.lose(member.id, "missed heartbeats", now);
            }
            let expired = match &mut state.active {
                Some(active) => active.run.expire(now),
                None => Vec::new(),
            };
            let deadline = self.shared.config.lease_duration;
            for (shard, worker) in expired {
                // A worker that shows no progress within the deadline is silent or stuck
                // (heartbeats alone do not count): its shard goes to another worker and it is
                // dropped, so its task in flight holds nothing back. A real worker registers
                // again as a new one.
                let reason = format!(
                    "no progress on shard {shard} within its {deadline:?} task deadline; the \
                     shard was handed back"
                );
                tracing::warn!(shard, worker = %worker, %reason, "task deadline missed");
                state.lose(worker, &reason, now);
            }
            state.drive(Vec::new(), now);
        }
        self.restore_training(now);
        self.start_next(now);
        self.save_events();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::CoordinatorConfig;

    #[test]
    fn beats_are_kept_for_the_open_session_only() {
        let mut live = Liveness::default();
        let (w, t0) = (WorkerId::new(), Instant::now());
        assert!(matches!(
            live.beat(w, 1, t0),
            Err(ServiceError::UnknownWorker(id)) if id == w
        ));
        live.open(w, 1);
        live.beat(w, 1, t0 + Duration::from_secs(2)).unwrap();
        // A late, older beat does not move the time back.
        live.beat(w, 1, t0 + Duration::from_secs(1)).unwrap();
        live.open(w, 2);
        let err = live.beat(w, 1, t0).unwrap_err().to_string();
        assert!(err.contains("newer session"), "{err}");
        let (beats, progress) = live.take();
        assert_eq!(beats[&w], t0 + Duration::from_secs(2));
        assert!(progress.is_empty(), "a heartbeat is not progress");
        assert!(live.take().0.is_empty(), "taken once");
        live.progressed(w, 2, t0 + Duration::from_secs(3)).unwrap();
        let (beats, progress) = live.take();
        assert_eq!(
            beats[&w],
            t0 + Duration::from_secs(3),
            "progress is a heartbeat too"
        );
        assert_eq!(progress[&w], t0 + Duration::from_secs(3));
        assert!(
            live.progressed(w, 1, t0).is_err(),
            "not from a replaced session"
        );
        live.forget(w);
        assert!(live.beat(w, 2, t0).is_err());
    }

    #[test]
    fn a_heartbeat_does_not_wait_for_the_state_lock_and_the_tick_folds_it_in() {
        let dir = std::env::temp_dir().join(format!("spin-liveness-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = CoordinatorConfig {
            journal_path: dir.join("journal.redb"),
            store: dir.join("store").display().to_string(),
            heartbeat_timeout: Duration::from_secs(5),
            ..CoordinatorConfig::default()
        }
        .validate()
        .unwrap();
        let c = Coordinator::open(config).unwrap();
        let t0 = Instant::now();
        let w = c
            .register_worker("w:1".into(), Device::default(), t0)
            .unwrap();
        let session = c.open_session(w, t0).unwrap();
        let late = t0 + Duration::from_secs(4);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            // The state lock held, as across a slow journal write.
            let held = c.lock();
            scope.spawn(|| done_tx.send(c.heartbeat(w, session.id, late)).unwrap());
            let beat = done_rx.recv_timeout(Duration::from_secs(10));
            drop(held);
            beat.expect("the heartbeat waited for the state lock")
                .unwrap();
        });
        // Silent since t0 but for the beat at t0 + 4 s: past t0 + 5 s it is still a member.
        c.tick(t0 + Duration::from_secs(6));
        assert!(c.worker(w).is_some(), "the recorded beat kept the worker");
        c.tick(t0 + Duration::from_secs(10));
        assert!(c.worker(w).is_none(), "no beat since: swept");
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
