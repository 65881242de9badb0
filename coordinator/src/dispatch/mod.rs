//! Task dispatch for the running job: which worker gets which task in each phase, and what each
//! result changes. It is pure: the job's workers and the time are passed in, and every decision
//! comes back as [`Action`]s (send a task, push an event, apply a trigger) that the
//! [`Coordinator`](crate::coordinator::Coordinator) carries out in order. A worker runs one task
//! at a time; its task in flight is remembered until its result arrives or the worker is lost.
//!
//! - Preparing and sampling hand out shards by lease ([`shards`]), one per idle worker.
//! - Training forms a ring of the job's workers once none has a task in flight, and re-forms it
//!   from the survivors at the step they agree on when a member is lost ([`training`]).
//! - A snapshot is written by one replica of the last ring ([`snapshot`]).
//! - A job interrupted by a coordinator restart re-enters its phase with what the store holds,
//!   and training whose every replica was lost goes on from the latest checkpoint
//!   ([`resume`]).

pub mod resume;
mod shards;
mod snapshot;
mod training;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spin_common::ids::{JobId, WorkerId};
use spin_common::proto::v1;
use spin_common::shards::{plan_shards, PlanError, Shard};
use spin_common::spec::JobSpec;
use spin_common::task::{Task, TaskKind};
use v1::job_event::Event;

use crate::membership::Member;
use crate::state::{JobState, Trigger};
use resume::{Found, TrainingPoint};
use shards::ShardPhase;
use snapshot::SnapshotPhase;
use training::Training;

/// Reported failures of one shard, one snapshot or one training step after which the job fails.
pub const MAX_ATTEMPTS: u32 = 3;

/// One decision of the dispatcher, carried out by the coordinator in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send `task` on `worker`'s session.
    Send {
        /// The worker.
        worker: WorkerId,
        /// The task; the worker answers it with exactly one `TaskResult`.
        task: Task,
    },
    /// Tell `worker` to abort its rank of ring `collective_id` at once: a member was lost, so
    /// its all-reduce would otherwise wait for the ring timeout.
    AbortRing {
        /// A surviving member.
        worker: WorkerId,
        /// The ring.
        collective_id: String,
        /// Which member was lost, and why.
        reason: String,
    },
    /// Push `event` to the job's event log.
    Event(Event),
    /// Journal `trigger` on the job, then [`JobRun::enter`] the state it leads to.
    Apply(Trigger),
}

/// What dispatch needs of a job's spec and dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The job seed (sampling seeds derive from it).
    pub seed: u64,
    /// Optimizer steps of each iteration.
    pub steps: Vec<u64>,
    /// The training prompts cut into encode and sampling shards.
    pub shards: Vec<Shard>,
    /// Whether there are held-out prompts: then preparing has one more encode shard for them.
    pub held_out: bool,
    /// The job's directory in the object store.
    pub job_dir: PathBuf,
    /// The largest ring: `training.gradient_accumulation` (each rank needs a micro-batch).
    pub max_world: usize,
}

impl Plan {
    /// The plan of `spec` over `train` training prompts and `held_out` held-out prompts.
    pub fn new(
        spec: &JobSpec,
        train: usize,
        held_out: usize,
        job_dir: PathBuf,
    ) -> Result<Self, PlanError> {
        let count = u64::try_from(train).unwrap_or(u64::MAX);
        let size = u64::try_from(spec.sampling.shard_size).unwrap_or(u64::MAX);
        Ok(Self {
            seed: spec.seed,
            steps: spec.iterations.iter().map(|i| i.steps).collect(),
            shards: plan_shards(count, size)?,
            held_out: held_out > 0,
            job_dir,
            max_world: spec.training.gradient_accumulation.max(1),
        })
    }

    /// Training shards.
    fn train_shards(&self) -> u32 {
        u32::try_from(self.shards.len()).unwrap_or(u32::MAX)
    }

    /// Encode shards: the training shards, then the held-out one if there is one.
    fn encode_shards(&self) -> u32 {
        self.train_shards() + u32::from(self.held_out)
    }
}

/// What a task in flight is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// Shard `shard` of the shard phase `state` (preparing or sampling k).
    Shard { state: JobState, shard: u32 },
    /// A rank of the `ring`-th ring the job formed.
    Train { ring: u64 },
    /// The snapshot of iteration `iteration`.
    Snapshot { iteration: u32 },
}

/// The tasks a job has sent: ids and the one task in flight per worker.
#[derive(Debug)]
struct Tasks {
    job: JobId,
    /// Random, per `JobRun`: names its rings apart from an earlier run's (see
    /// [`collective_id`](crate::convert::collective_id)).
    run: u32,
    sent: u64,
    in_flight: HashMap<WorkerId, (String, Work)>,
}

impl Tasks {
    fn busy(&self, worker: WorkerId) -> bool {
        self.in_flight.contains_key(&worker)
    }

    fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// A task of `kind` for `worker`, remembered as its task in flight.
    fn issue(&mut self, worker: WorkerId, work: Work, label: &str, kind: TaskKind) -> Action {
        self.sent += 1;
        let task_id = format!("{}/{label}/{}", self.job, self.sent);
        self.in_flight.insert(worker, (task_id.clone(), work));
        Action::Send {
            worker,
            task: Task {
                id: task_id,
                job: self.job,
                kind,
            },
        }
    }

    /// Forgets `worker`'s task in flight if it is `task_id`, returning what it was for.
    fn take(&mut self, worker: WorkerId, task_id: &str) -> Option<Work> {
        match self.in_flight.get(&worker) {
            Some((id, work)) if id == task_id => {
                let work = *work;
                self.in_flight.remove(&worker);
                Some(work)
            }
            _ => None,
        }
    }
}

/// The phase-specific state of the running job.
#[derive(Debug)]
enum Phase {
    /// Nothing to hand out (pending or ended).
    Idle,
    /// Preparing or sampling: shards by lease.
    Shards(ShardPhase),
    /// Training: a ring of replicas.
    Training(Training),
    /// Publishing a snapshot.
    Snapshot(SnapshotPhase),
}

/// The dispatch state of the one running job.
#[derive(Debug)]
pub struct JobRun {
    plan: Plan,
    lease_duration: Duration,
    phase: Phase,
    tasks: Tasks,
    /// Rings formed so far over the whole job (every ring gets a new collective id).
    rings_formed: u64,
}

impl JobRun {
    /// A job about to be started, its shard leases lasting `lease_duration`.
    pub fn new(job: JobId, plan: Plan, lease_duration: Duration) -> Self {
        Self {
            plan,
            lease_duration,
            phase: Phase::Idle,
            tasks: Tasks {
                job,
                run: rand::random(),
                sent: 0,
                in_flight: HashMap::new(),
            },
            rings_formed: 0,
        }
    }

    /// The job.
    pub fn job(&self) -> JobId {
        self.tasks.job
    }

    /// The job's directory in the object store.
    pub fn job_dir(&self) -> &Path {
        &self.plan.job_dir
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether `worker` has a task in flight.
    pub fn busy(&self, worker: WorkerId) -> bool {
        self.tasks.busy(worker)
    }

    /// Sets up the job's new state `state` (after a journaled transition).
    pub fn enter(&mut self, state: JobState) -> Vec<Action> {
        let duration = self.lease_duration;
        let phase = match state {
            JobState::Preparing => {
                Phase::Shards(ShardPhase::new(state, self.plan.encode_shards(), duration))
            }
            JobState::Sampling(_) => {
                Phase::Shards(ShardPhase::new(state, self.plan.train_shards(), duration))
            }
            JobState::Training(k) => {
                let steps = self.plan.steps.get(k as usize).copied().unwrap_or(0);
                Phase::Training(Training::new(k, steps).with_max_world(self.plan.max_world))
            }
            JobState::Snapshot(k) => {
                let replicas = match &self.phase {
                    Phase::Training(t) => t.replicas(),
                    _ => None,
                };
                Phase::Snapshot(SnapshotPhase::new(k, replicas))
            }
            JobState::Pending | JobState::Done | JobState::Failed | JobState::Cancelled => {
                Phase::Idle
            }
        };
        self.phase = phase;
        match &self.phase {
            Phase::Shards(p) => p.finished_already(),
            Phase::Training(t) => t.finished_already(),
            _ => Vec::new(),
        }
    }

    /// Re-enters journaled state `state` of a job interrupted by a coordinator restart, with
    /// what the store holds (`found`, from [`resume::survey`]): shards found written are done,
    /// training goes on after the newest verified checkpoint, a verified snapshot is
    /// published. Nobody holds any weights in memory, so every task loads them from the store.
    pub fn resume(&mut self, state: JobState, found: Found) -> Vec<Action> {
        let mut actions = self.enter(state);
        if actions.iter().any(|a| matches!(a, Action::Apply(_))) {
            // Nothing to do in the phase (no shard, no step).
            return actions;
        }
        match (&mut self.phase, found) {
            (Phase::Shards(p), Found::Shards { done }) => {
                actions.push(warning(format!(
                    "resuming {state} from the store (a coordinator restart or a resume): {} of {} shard(s) found written \
                     in the store, the others are handed out again",
                    done.len(),
                    p.total()
                )));
                actions.extend(p.found_written(&done));
            }
            (Phase::Training(_), Found::Training(point)) => {
                let steps = self.plan.steps.get(point.iteration as usize).copied();
                let (training, more) =
                    Training::resumed(point.iteration, steps.unwrap_or(0), &point);
                self.phase = Phase::Training(training.with_max_world(self.plan.max_world));
                actions.extend(more);
            }
            (Phase::Snapshot(s), Found::Snapshot { dir, verified }) => {
                let k = s.iteration();
                match verified {
                    Ok(()) => {
                        actions.push(Action::Event(Event::SnapshotPublished(
                            v1::SnapshotPublished {
                                iteration: k,
                                path: dir.display().to_string(),
                            },
                        )));
                        actions.push(Action::Apply(Trigger::SnapshotPublished { iteration: k }));
                    }
                    Err(None) => actions.push(warning(format!(
                        "resuming {state} from the store (a coordinator restart or a resume): {} is written from the \
                         iteration's last checkpoint",
                        dir.display()
                    ))),
                    Err(Some(reason)) => actions.push(warning(format!(
                        "resuming {state} from the store (a coordinator restart or a resume): {} does not verify and is \
                         written again from the iteration's last checkpoint: {reason}",
                        dir.display()
                    ))),
                }
            }
            (_, found) => {
                tracing::debug!(job = %self.job(), %state, ?found, "nothing found to resume from");
            }
        }
        actions
    }

    /// The iteration whose every replica was lost, when training waits for the coordinator to
    /// find where the store lets it go on ([`resume::survey_training`], then
    /// [`JobRun::restore`]).
    pub fn checkpoint_wanted(&self) -> Option<u32> {
        match &self.phase {
            Phase::Training(t) if t.checkpoint_wanted() => Some(t.iteration()),
            _ => None,
        }
    }

    /// Goes on with training from `point` after every replica was lost; the ring re-forms
    /// with every connected worker. Stale points (another iteration, or nothing lost) are
    /// ignored.
    pub fn restore(&mut self, point: &TrainingPoint) -> Vec<Action> {
        match &mut self.phase {
            Phase::Training(t) if t.iteration() == point.iteration => t.restore(point),
            _ => Vec::new(),
        }
    }

    /// Hands tasks to idle `workers` (the job's members with an open session) at `now`;
    /// `generation` is the membership's ring generation, for naming a new ring.
    pub fn dispatch(&mut self, workers: &[Member], generation: u64, now: Instant) -> Vec<Action> {
        let mut workers: Vec<&Member> = workers.iter().collect();
        workers.sort_by_key(|m| (m.joined, m.id));
        match &mut self.phase {
            Phase::Idle => Vec::new(),
            Phase::Shards(p) => p.dispatch(&workers, now, &self.plan, &mut self.tasks),
            Phase::Training(t) => {
                if !self.tasks.is_empty() {
                    // Stale shard tasks still running: the ring forms once they answer.
                    return Vec::new();
                }
                t.dispatch(
                    &workers,
                    generation,
                    &mut self.rings_formed,
                    &mut self.tasks,
                )
            }
            Phase::Snapshot(s) => s.dispatch(&workers, &mut self.tasks),
        }
    }

    /// Applies `worker`'s `result`; results of unknown or stale tasks are ignored.
    pub fn on_result(&mut self, worker: WorkerId, result: v1::TaskResult) -> Vec<Action> {
        let job = self.job();
        let Some(work) = self.tasks.take(worker, &result.task_id) else {
            tracing::debug!(job = %job, worker = %worker, task = %result.task_id, "result of an unknown task ignored");
            return Vec::new();
        };
        let outcome = result.outcome;
        match (work, &mut self.phase) {
            (Work::Shard { state, shard }, Phase::Shards(p)) if p.state() == state => {
                p.on_result(worker, shard, outcome, &self.plan)
            }
            (Work::Train { ring }, Phase::Training(t)) => t.on_result(worker, ring, outcome),
            (Work::Snapshot { iteration }, Phase::Snapshot(s)) if s.iteration() == iteration => {
                s.on_result(worker, outcome, &self.plan)
            }
            _ => {
                tracing::debug!(job = %job, worker = %worker, task = %result.task_id, "result of a task of an earlier phase ignored");
                Vec::new()
            }
        }
    }

    /// Forgets lost `worker` (its session ended or it missed heartbeats): its task in flight
    /// is dropped and its leases reopen; a ring it was in breaks.
    pub fn on_lost(&mut self, worker: WorkerId, reason: &str) -> Vec<Action> {
        self.tasks.in_flight.remove(&worker);
        match &mut self.phase {
            Phase::Idle => Vec::new(),
            Phase::Shards(p) => {
                p.on_lost(worker);
                Vec::new()
            }
            Phase::Training(t) => t.on_lost(worker, reason),
            Phase::Snapshot(s) => s.on_lost(worker, reason),
        }
    }

    /// Renews `worker`'s leases (a heartbeat at `now`).
    pub fn renew(&mut self, worker: WorkerId, now: Instant) {
        if let Phase::Shards(p) = &mut self.phase {
            p.renew(worker, now);
        }
    }

    /// Reopens the leases lapsed by `now`; returns the shards and their former holders.
    pub fn expire(&mut self, now: Instant) -> Vec<(u32, WorkerId)> {
        match &mut self.phase {
            Phase::Shards(p) => p.expire(now),
            _ => Vec::new(),
        }
    }
}

/// An event saying `message`.
fn warning(message: String) -> Action {
    Action::Event(Event::Warning(v1::Warning { message }))
}

/// The trigger that fails the job for `reason`.
fn fail(reason: String) -> Action {
    Action::Apply(Trigger::Fail { reason })
}

/// A failure's error and retryability, or a missing outcome as a fatal protocol error.
fn failure(outcome: &Option<v1::task_result::Outcome>) -> Option<(String, bool)> {
    match outcome {
        Some(v1::task_result::Outcome::Succeeded(_)) => None,
        Some(v1::task_result::Outcome::Failed(f)) => Some((f.error.clone(), f.retryable)),
        None => Some(("the result has no outcome".to_string(), false)),
    }
}
