//! The shard phases, preparing and sampling k: shards are leased one at a time to idle workers;
//! a finished shard is never handed out again, a retryable failure reopens it (up to
//! [`MAX_ATTEMPTS`] failures), and the phase ends when every shard is written. A resumed phase
//! starts with the shards found written in the store already finished.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use spin_common::ids::WorkerId;
use spin_common::proto::v1;
use spin_common::task::{SampleTask, TaskKind};
use v1::job_event::Event;
use v1::task_result::Outcome;

use super::{fail, failure, warning, Action, Plan, Tasks, Work, MAX_ATTEMPTS};
use crate::lease::{Completion, LeaseTable};
use crate::membership::Member;
use crate::state::{JobState, Trigger};

/// One shard phase.
#[derive(Debug)]
pub(super) struct ShardPhase {
    state: JobState,
    table: LeaseTable,
    failures: HashMap<u32, u32>,
}

impl ShardPhase {
    /// `shards` open shards of the phase `state` (preparing or sampling k).
    pub(super) fn new(state: JobState, shards: u32, lease_duration: Duration) -> Self {
        Self {
            state,
            table: LeaseTable::new(shards, lease_duration),
            failures: HashMap::new(),
        }
    }

    /// The job state this phase belongs to.
    pub(super) fn state(&self) -> JobState {
        self.state
    }

    /// Shards of the phase.
    pub(super) fn total(&self) -> u32 {
        self.table.len()
    }

    /// The trigger that ends the phase.
    fn trigger(&self) -> Trigger {
        match self.state {
            JobState::Sampling(iteration) => Trigger::Sampled { iteration },
            _ => Trigger::Prepared,
        }
    }

    /// The trigger at once when the phase has no shard.
    pub(super) fn finished_already(&self) -> Vec<Action> {
        if self.table.is_finished() {
            vec![Action::Apply(self.trigger())]
        } else {
            Vec::new()
        }
    }

    /// Marks `done` (shards whose output was found in the store) finished; returns the
    /// progress, then the trigger if nothing is left.
    pub(super) fn found_written(&mut self, done: &[u32]) -> Vec<Action> {
        for &shard in done {
            if let Err(err) = self.table.mark_done(shard) {
                tracing::debug!(shard, error = %err, "a file of no planned shard ignored");
            }
        }
        let mut actions = vec![self.progress()];
        actions.extend(self.finished_already());
        actions
    }

    /// Shards written so far, as an event.
    fn progress(&self) -> Action {
        Action::Event(Event::Shards(v1::ShardsProgress {
            phase: Some(self.state.into()),
            done: self.table.done(),
            total: self.table.len(),
        }))
    }

    /// The shard's name in messages.
    fn describe(&self, shard: u32, plan: &Plan) -> String {
        match self.state {
            JobState::Sampling(k) => format!("sampling shard {shard} of iteration {k}"),
            _ if plan.held_out && shard == plan.train_shards() => {
                format!("held-out encode shard {shard}")
            }
            _ => format!("encode shard {shard}"),
        }
    }

    /// The task of `shard` and its label in task ids.
    fn task(&self, shard: u32, plan: &Plan) -> Option<(String, TaskKind)> {
        if let JobState::Sampling(k) = self.state {
            let task = SampleTask {
                iteration: k,
                shard: *plan.shards.get(shard as usize)?,
                seed: plan.seed,
            };
            return Some((format!("sample-{k}-{shard}"), TaskKind::Sample(task)));
        }
        match plan.shards.get(shard as usize) {
            Some(s) => Some((format!("encode-{shard}"), TaskKind::Encode(*s))),
            None if plan.held_out && shard == plan.train_shards() => Some((
                "encode-held-out".to_string(),
                TaskKind::EncodeHeldOut { shard },
            )),
            None => None,
        }
    }

    /// Grants the next open shard to each idle worker, in join order.
    pub(super) fn dispatch(
        &mut self,
        workers: &[&Member],
        now: Instant,
        plan: &Plan,
        tasks: &mut Tasks,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for member in workers {
            if tasks.busy(member.id) {
                continue;
            }
            let Some(lease) = self.table.grant(member.id, now) else {
                break;
            };
            let Some((label, kind)) = self.task(lease.shard, plan) else {
                // Not reachable: the table has exactly the plan's shards.
                actions.push(fail(format!("no task for shard {}", lease.shard)));
                break;
            };
            if let Some(former) = lease.replaces {
                tracing::info!(shard = lease.shard, worker = %member.id, former = %former, "lapsed shard handed to another worker");
            }
            let work = Work::Shard {
                state: self.state,
                shard: lease.shard,
            };
            actions.push(tasks.issue(member.id, work, &label, kind));
        }
        actions
    }

    /// Applies the result of `shard` from `worker`.
    pub(super) fn on_result(
        &mut self,
        worker: WorkerId,
        shard: u32,
        outcome: Option<Outcome>,
        plan: &Plan,
    ) -> Vec<Action> {
        let what = self.describe(shard, plan);
        if let Some((error, retryable)) = failure(&outcome) {
            if !retryable {
                return vec![fail(format!("{what} failed on worker {worker}: {error}"))];
            }
            if self.table.fail(shard, worker).is_err() {
                tracing::debug!(shard, worker = %worker, "failure of a shard held by another worker ignored");
                return Vec::new();
            }
            let failures = self.failures.entry(shard).or_insert(0);
            *failures += 1;
            if *failures >= MAX_ATTEMPTS {
                return vec![fail(format!(
                    "{what} failed {failures} times; last on worker {worker}: {error}"
                ))];
            }
            return vec![warning(format!(
                "{what} failed on worker {worker} (attempt {failures} of {MAX_ATTEMPTS}); retrying: {error}"
            ))];
        }
        match self.table.complete(shard, worker) {
            Ok(Completion::Accepted) => {}
            Ok(Completion::Duplicate) | Err(_) => {
                tracing::debug!(shard, worker = %worker, "result of a shard already written or held by another worker ignored");
                return Vec::new();
            }
        }
        let mut actions = vec![self.progress()];
        if let Some(Outcome::Succeeded(s)) = outcome {
            actions.extend(
                s.metrics
                    .into_iter()
                    .map(|m| Action::Event(Event::Metrics(m))),
            );
        }
        if self.table.is_finished() {
            actions.push(Action::Apply(self.trigger()));
        }
        actions
    }

    /// Reopens the shards `worker` held.
    pub(super) fn on_lost(&mut self, worker: WorkerId) {
        let reopened = self.table.release_worker(worker);
        if !reopened.is_empty() {
            tracing::info!(worker = %worker, ?reopened, "shards of a lost worker reopened");
        }
    }

    /// Renews `worker`'s leases.
    pub(super) fn renew(&mut self, worker: WorkerId, now: Instant) {
        self.table.renew(worker, now);
    }

    /// Reopens lapsed leases.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<(u32, WorkerId)> {
        self.table.expire(now)
    }
}
