//! Jobs: submitting (journaled as pending), reading their status, cancelling, resuming (a
//! failed one, on request) and watching them, and starting the next one (or resuming one a
//! restart interrupted or a request resumed) with its shard plan, or restarting training from
//! the store when every replica was lost.

use std::sync::Arc;
use std::time::Instant;

use spin_common::dataset::DatasetError;
use spin_common::dataset::JobPrompts;
use spin_common::ids::JobId;
use spin_common::proto::v1;
use spin_common::shards::PlanError;
use spin_common::spec::{JobSpec, SubmittedSpecError};
use spin_common::store::StoreError;
use v1::coordinator_message::Message as Down;
use v1::job_event::Event;

use super::saving::{push_transition, submitted_event};
use super::{now_ms, Coordinator, State, Watch, CANCELLED};
use crate::dispatch::resume::{self, Found};
use crate::dispatch::{JobRun, Plan};
use crate::error::ServiceError;
use crate::events::EventLog;
use crate::journal::{failed_in, JobRecord, JournalError, TransitionRecord};
use crate::state::{JobShape, JobState, TransitionError, Trigger};

/// Why a job cannot run: its spec, dataset, store directory or shard plan.
#[derive(Debug, thiserror::Error)]
pub(super) enum PrepareError {
    #[error("job spec: {0}")]
    Spec(SubmittedSpecError),
    #[error("dataset: {0}")]
    Dataset(DatasetError),
    #[error("object store: {0}")]
    Store(StoreError),
    #[error("shard plan (sampling.shard_size): {0}")]
    Plan(PlanError),
}

/// What resuming a failed job did ([`Coordinator::resume`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The phase the job is back in: the one it failed in.
    pub phase: JobState,
    /// The sequence number of the job's first event after the resume (its phase change).
    pub from_sequence: u64,
    /// The job running now if another one is: the resumed one starts once it ends.
    pub behind: Option<JobId>,
}

impl Coordinator {
    /// Journals a validated job (submitted as `spec_toml`) as pending and announces it.
    pub fn submit(&self, spec: JobSpec, spec_toml: String) -> Result<JobId, ServiceError> {
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
        let record = JobRecord::pending(id, spec.name.clone(), spec_toml, JobShape::of(&spec), at);
        state.journal.accept(&record)?;
        let name = spec.name.clone();
        state.specs.insert(id, Arc::new(spec));
        let mut log = EventLog::new(id.to_string(), self.shared.config.event_history);
        log.push(at, submitted_event());
        state.events.insert(id, log);
        drop(state);
        self.save_events();
        tracing::info!(job = %id, %name, "job accepted");
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

    /// Resumes failed job `id`, asked for by `by` (who or what asked, for its event), once the
    /// cause of its failure is gone.
    ///
    /// The job goes back to the phase it failed in (the `from` of its journaled transition
    /// into failed; see [`Trigger::Resume`] for why that phase and not an earlier one): the
    /// transition is journaled, so a coordinator restarted from here on goes on with the job
    /// as with any job it finds in that phase, and an event says who resumed it and from
    /// what. The job then starts the way a restarted coordinator starts a job it finds
    /// interrupted ([`Coordinator::start_next`]): its shards found written in the store are
    /// done, training goes on after the newest verified checkpoint, a verified snapshot is
    /// published, and every worker loads the weights from the store. That happens now if no
    /// other job runs and `min_workers` workers are connected, else at a later tick: a resumed
    /// job waits for the running one to end, and then starts before the pending ones (as an
    /// interrupted job does). If the cause is still there, the job fails again, saying why.
    ///
    /// Refused for an unknown job, and for a job that is not failed (done, cancelled, pending
    /// or running), naming its phase.
    pub fn resume(&self, id: JobId, by: &str) -> Result<Resumed, ServiceError> {
        let mut state = self.lock();
        let job = state.journal.job(id)?.ok_or(ServiceError::UnknownJob(id))?;
        if job.state != JobState::Failed {
            return Err(ServiceError::Journal(JournalError::Transition {
                job: id,
                source: TransitionError::Illegal {
                    state: job.state,
                    trigger: "resume",
                },
            }));
        }
        let phase = failed_in(&state.journal.transitions(id)?).ok_or_else(|| {
            ServiceError::Internal(format!(
                "job {id} is failed but its journal holds no transition into failed"
            ))
        })?;
        let from_sequence = state.events.get(&id).map_or(0, EventLog::next_sequence);
        state.apply(&job, Trigger::Resume { phase })?;
        let behind = state.active_job();
        let error = job.error.as_deref().unwrap_or("no reason recorded");
        let then = match behind {
            Some(other) => format!("it starts once job {other} ends"),
            None => "it starts as soon as enough workers are connected".to_string(),
        };
        let message = format!(
            "job resumed by {by} after it failed in {phase} ({error}): it goes on in {phase} \
             from what its store holds; {then}"
        );
        if let Some(log) = state.events.get_mut(&id) {
            log.push(now_ms(), Event::Warning(v1::Warning { message }));
        }
        drop(state);
        tracing::info!(job = %id, %phase, %by, "failed job resumed");
        self.start_next(Instant::now());
        self.save_events();
        Ok(Resumed {
            phase,
            from_sequence,
            behind,
        })
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

    /// When every replica of the running job's ring was lost, and `min_workers` of its
    /// workers are connected again, finds the iteration's latest verified checkpoint (without
    /// the lock held: verifying hashes it) and restarts the ring from it.
    pub(super) fn restore_training(&self, now: Instant) {
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

    /// Starts the oldest pending job, or resumes a job a restart interrupted or a request
    /// resumed (one neither pending nor ended), when it may start. The dataset and the store
    /// are read without the lock held; the job starts only if nothing changed meanwhile.
    pub(super) fn start_next(&self, now: Instant) {
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
    fn prepare(&self, job: &JobRecord) -> Result<JobRun, PrepareError> {
        // Validated when it was submitted; only a restarted coordinator reads the text again.
        let kept = self.lock().specs.get(&job.id).cloned();
        let spec = match kept {
            Some(spec) => spec,
            None => Arc::new(JobSpec::from_submitted(&job.spec_toml).map_err(PrepareError::Spec)?),
        };
        let prompts = JobPrompts::read(&spec).map_err(PrepareError::Dataset)?;
        let dir = self
            .shared
            .store
            .sub(&format!("jobs/{}", job.id))
            .map_err(PrepareError::Store)?;
        let plan = Plan::new(
            &spec,
            prompts.train.len(),
            prompts.held_out.len(),
            dir.root().to_path_buf(),
        )
        .map_err(PrepareError::Plan)?;
        tracing::info!(job = %job.id, train = prompts.train.len(), held_out = prompts.held_out.len(), shards = plan.shards.len(), "job planned");
        Ok(JobRun::new(job.id, plan, self.shared.config.lease_duration))
    }
}

impl State {
    /// Journals `trigger` on `job` and announces the transition. When the running job ends,
    /// its dispatch state is dropped and, if it failed or was cancelled, its workers are told
    /// to drop its tasks.
    pub(super) fn apply(
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
        if record.to.is_terminal() {
            self.specs.remove(&job.id);
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
    pub(super) fn apply_to(
        &mut self,
        id: JobId,
        trigger: Trigger,
    ) -> Result<JobState, ServiceError> {
        let job = self.journal.job(id)?.ok_or(ServiceError::UnknownJob(id))?;
        Ok(self.apply(&job, trigger)?.to)
    }
}
