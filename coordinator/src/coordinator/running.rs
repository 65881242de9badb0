//! The running job, carried out: starting it (or resuming it after a restart), assigning it to
//! workers, sending the tasks and pushing the events [`dispatch`](crate::dispatch) decides,
//! journaling its triggers, and losing workers.

use std::collections::VecDeque;
use std::time::Instant;

use spin_common::ids::{JobId, WorkerId};
use spin_common::proto::v1;
use spin_common::store::{layout, FenceRecord, Retry, Store};
use spin_common::task::Task;
use tokio::sync::mpsc::error::TrySendError;
use v1::coordinator_message::Message as Down;
use v1::job_event::Event;

use super::jobs::PrepareError;
use super::{now_ms, Active, State};
use crate::dispatch::resume::Found;
use crate::dispatch::{Action, JobRun};
use crate::error::ServiceError;
use crate::journal::JobRecord;
use crate::membership::Member;
use crate::state::{JobState, Trigger};

/// Why a worker cannot be given its job or its task (it is then forgotten).
#[derive(Debug, thiserror::Error)]
pub(super) enum Stuck {
    /// It has no session on the running job.
    #[error("no open session for its task")]
    NoSession,
    /// Its session's channel is full or closed.
    #[error("session channel refused {what}: {why}")]
    Refused {
        /// What was being sent.
        what: &'static str,
        /// "full" or "closed".
        why: &'static str,
    },
}

fn refusal<T>(e: &TrySendError<T>) -> &'static str {
    match e {
        TrySendError::Full(_) => "no available capacity",
        TrySendError::Closed(_) => "channel closed",
    }
}

impl State {
    /// Sends `worker` the running job (if any) and marks it assigned; `Err` names why the
    /// worker is stuck.
    pub(super) fn assign(&mut self, worker: WorkerId) -> Result<(), Stuck> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        let job = active.run.job();
        let message = v1::CoordinatorMessage {
            message: Some(Down::AssignJob(v1::AssignJob {
                job_id: job.to_string(),
                spec_toml: active.spec_toml.clone(),
                store_prefix: active.run.job_dir().display().to_string(),
            })),
        };
        let Some(session) = self.sessions.get_mut(&worker) else {
            return Ok(());
        };
        // The fence lists the worker before it can write anything.
        session.job = Some(job);
        self.write_fence();
        let Some(session) = self.sessions.get_mut(&worker) else {
            return Ok(());
        };
        session.tx.try_send(message).map_err(|e| Stuck::Refused {
            what: "the job assignment",
            why: refusal(&e),
        })
    }

    /// Rewrites the running job's fence in its store: the registrations assigned to it now,
    /// the only ones whose writes the store publishes. Called whenever they change, before a
    /// lost worker's work is handed to another, so a dropped worker's late writes are refused.
    /// A fence that cannot be written is logged: the workers' writes then fail naming it.
    fn write_fence(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let job = active.run.job();
        active.fence_generation += 1;
        let record = FenceRecord {
            generation: active.fence_generation,
            writers: self
                .sessions
                .iter()
                .filter(|(_, s)| s.job == Some(job))
                .map(|(w, _)| w.to_string())
                .collect(),
        };
        let dir = active.run.job_dir();
        let written = serde_json::to_vec_pretty(&record)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                // No retry with backoff here: the state lock is held.
                let once = Retry {
                    attempts: 1,
                    ..Retry::default()
                };
                Store::open(&dir.display().to_string())
                    .and_then(|store| store.with_retry(once).put(&layout::fence(), &text))
                    .map_err(|e| e.to_string())
            });
        match written {
            Ok(()) => {
                tracing::debug!(job = %job, generation = record.generation, writers = ?record.writers, "fence written");
            }
            Err(error) => {
                tracing::error!(job = %job, dir = %dir.display(), %error, "could not write the job's fence");
            }
        }
    }

    /// When no job is running and enough sessions are open: the oldest job a restart
    /// interrupted (neither pending nor ended), else the oldest pending one.
    pub(super) fn startable(&self, min_workers: usize) -> Result<Option<JobRecord>, ServiceError> {
        if self.active.is_some() || self.sessions.len() < min_workers.max(1) {
            return Ok(None);
        }
        let live = self.journal.live_jobs()?;
        let interrupted = live.iter().find(|j| j.state != JobState::Pending);
        let pending = || live.iter().find(|j| j.state == JobState::Pending);
        Ok(interrupted.or_else(pending).cloned())
    }

    /// Starts pending `job` with its dispatch state, or fails it with the reason it cannot run.
    pub(super) fn start(
        &mut self,
        job: &JobRecord,
        prepared: Result<JobRun, PrepareError>,
        now: Instant,
    ) -> Result<(), ServiceError> {
        let to = self.apply(job, Trigger::Start)?.to;
        let run = match prepared {
            Ok(run) => run,
            Err(err) => {
                let reason = err.to_string();
                tracing::warn!(job = %job.id, %reason, "job cannot run");
                self.apply_to(job.id, Trigger::Fail { reason })?;
                return Ok(());
            }
        };
        tracing::info!(job = %job.id, workers = self.sessions.len(), "job started");
        let mut actions = self.activate(job, run);
        if let Some(active) = &mut self.active {
            actions.extend(active.run.enter(to));
        }
        self.drive(actions, now);
        Ok(())
    }

    /// Resumes `job`, interrupted in its journaled state by a coordinator restart, with its
    /// dispatch state and what its store holds (`found`); fails it if it cannot run any more.
    pub(super) fn resume(
        &mut self,
        job: &JobRecord,
        prepared: Result<JobRun, PrepareError>,
        found: Found,
        now: Instant,
    ) -> Result<(), ServiceError> {
        let run = match prepared {
            Ok(run) => run,
            Err(reason) => {
                let reason = format!(
                    "the job cannot go on in {} (after a coordinator restart or a resume): {reason}",
                    job.state
                );
                tracing::warn!(job = %job.id, %reason, "job cannot resume");
                self.apply(job, Trigger::Fail { reason })?;
                return Ok(());
            }
        };
        tracing::info!(job = %job.id, state = %job.state, workers = self.sessions.len(), "job resumed");
        let mut actions = self.activate(job, run);
        if let Some(active) = &mut self.active {
            actions.extend(active.run.resume(job.state, found));
        }
        self.drive(actions, now);
        Ok(())
    }

    /// Makes `job` the running job with dispatch state `run` and assigns it to every worker
    /// with a session; returns the dispatcher's actions for workers that could not take it.
    fn activate(&mut self, job: &JobRecord, run: JobRun) -> Vec<Action> {
        // The fence's generation goes on from what an earlier coordinator wrote.
        let fence_generation =
            FenceRecord::read(&run.job_dir().join(layout::fence())).map_or(0, |f| f.generation);
        self.active = Some(Active {
            run,
            spec_toml: job.spec_toml.clone(),
            fence_generation,
        });
        let workers: Vec<WorkerId> = self.sessions.keys().copied().collect();
        let mut actions = Vec::new();
        for worker in workers {
            if let Err(reason) = self.assign(worker) {
                actions.extend(self.forget(worker, &reason.to_string()));
            }
        }
        actions
    }

    /// The running job's members with an open session.
    pub(super) fn job_members(&self, job: JobId) -> Vec<Member> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.job == Some(job))
            .filter_map(|(w, _)| self.membership.get(*w).cloned())
            .collect()
    }

    /// Carries out the dispatcher's `actions` for the running job in order (a journaled
    /// trigger enters the next phase, whose actions follow), then hands idle workers tasks,
    /// until nothing is left to do.
    pub(super) fn drive(&mut self, actions: Vec<Action>, now: Instant) {
        let mut queue: VecDeque<Action> = actions.into();
        loop {
            while let Some(action) = queue.pop_front() {
                let Some(job) = self.active_job() else {
                    return;
                };
                match action {
                    Action::Send { worker, task } => {
                        if let Err(reason) = self.send_task(worker, job, task) {
                            queue.extend(self.forget(worker, &reason.to_string()));
                        }
                    }
                    Action::AbortRing {
                        worker,
                        collective_id,
                        reason,
                    } => self.abort_ring(worker, job, collective_id, reason),
                    Action::Event(event) => {
                        if let Some(log) = self.events.get_mut(&job) {
                            log.push(now_ms(), event);
                        }
                    }
                    Action::Apply(trigger) => match self.apply_to(job, trigger) {
                        Ok(to) if to.is_terminal() => return,
                        Ok(to) => {
                            if let Some(active) = &mut self.active {
                                queue.extend(active.run.enter(to));
                            }
                        }
                        Err(err) => {
                            tracing::error!(job = %job, error = %err, "could not journal a transition");
                        }
                    },
                }
            }
            let Some(job) = self.active_job() else {
                return;
            };
            let workers = self.job_members(job);
            let generation = self.membership.generation();
            let Some(active) = &mut self.active else {
                return;
            };
            queue.extend(active.run.dispatch(&workers, generation, now));
            if queue.is_empty() {
                return;
            }
        }
    }

    /// Sends `task` of `job` on `worker`'s session; `Err` names why the worker is stuck.
    pub(super) fn send_task(
        &mut self,
        worker: WorkerId,
        job: JobId,
        task: Task,
    ) -> Result<(), Stuck> {
        let Some(session) = self.sessions.get(&worker).filter(|s| s.job == Some(job)) else {
            return Err(Stuck::NoSession);
        };
        tracing::debug!(job = %job, worker = %worker, task = %task.id, "task sent");
        session
            .tx
            .try_send(v1::CoordinatorMessage {
                message: Some(Down::Task(task.into())),
            })
            .map_err(|e| Stuck::Refused {
                what: "a task",
                why: refusal(&e),
            })
    }

    /// Tells `worker` to abort its rank of ring `collective_id` of `job`. A session that cannot
    /// take it changes nothing: its rank then fails at the ring timeout as before.
    fn abort_ring(&mut self, worker: WorkerId, job: JobId, collective_id: String, reason: String) {
        let Some(session) = self.sessions.get(&worker) else {
            return;
        };
        tracing::info!(job = %job, worker = %worker, ring = %collective_id, %reason, "ring aborted");
        let message = v1::CoordinatorMessage {
            message: Some(Down::AbortRing(v1::AbortRing {
                job_id: job.to_string(),
                collective_id,
                reason,
            })),
        };
        if let Err(err) = session.tx.try_send(message) {
            tracing::warn!(worker = %worker, error = %err, "could not tell a worker to abort its ring");
        }
    }

    /// Forgets `worker` and carries out what that changes for the running job.
    pub(super) fn lose(&mut self, worker: WorkerId, reason: &str, now: Instant) {
        let actions = self.forget(worker, reason);
        self.drive(actions, now);
    }

    /// Forgets `worker`: its session ends, live jobs hear of it, and the running job drops
    /// its task and reopens its leases. Returns the dispatcher's actions.
    pub(super) fn forget(&mut self, worker: WorkerId, reason: &str) -> Vec<Action> {
        let assigned = self
            .sessions
            .remove(&worker)
            .is_some_and(|s| s.job.is_some());
        if assigned {
            self.write_fence();
        }
        self.liveness().forget(worker);
        let _ = self.membership.remove(worker);
        tracing::warn!(worker = %worker, reason, "worker lost");
        let world = self.world();
        self.broadcast_live(Event::WorkerLost(v1::WorkerLost {
            worker_id: worker.to_string(),
            reason: reason.to_string(),
            world,
        }));
        match &mut self.active {
            Some(active) => active.run.on_lost(worker, reason),
            None => Vec::new(),
        }
    }
}
