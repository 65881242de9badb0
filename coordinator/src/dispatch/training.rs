//! Training k: a ring of replicas runs the iteration's optimizer steps. The first ring is every
//! worker of the job; when a member is lost or a rank fails, the coordinator waits for every
//! surviving member's result, takes the step boundary they reached, and re-forms the ring from
//! those survivors only (they alone hold the weights at that step). Workers that join meanwhile
//! take part from the next phase.

use std::collections::BTreeSet;

use spin_common::ids::WorkerId;
use spin_common::proto::v1;
use v1::task_result::Outcome;

use super::{fail, failure, warning, Action, Tasks, Work, MAX_ATTEMPTS};
use crate::convert::{collective_id, train_task};
use crate::membership::{form_ring, Member, Ring};
use crate::state::Trigger;

/// What one rank of a ring reported.
#[derive(Clone, Debug)]
struct Report {
    worker: WorkerId,
    rank: u32,
    completed: u64,
    error: Option<String>,
}

/// A ring that was sent its steps.
#[derive(Debug)]
struct RingRun {
    /// Which ring of the job this is (counted from 1).
    ordinal: u64,
    ring: Ring,
    first_step: u64,
    /// Members whose result has not come.
    waiting: BTreeSet<WorkerId>,
    /// Results of members still connected.
    reports: Vec<Report>,
    /// Members lost, with their rank and why.
    lost: Vec<(WorkerId, u32, String)>,
}

/// Training of one iteration.
#[derive(Debug)]
pub(super) struct Training {
    iteration: u32,
    steps: u64,
    /// The first step no replica has applied yet.
    next_step: u64,
    /// The workers holding the weights at `next_step`, in rank order; `None` before the first
    /// ring (every worker of the job holds theta_k then).
    replicas: Option<Vec<WorkerId>>,
    ring: Option<RingRun>,
    /// Re-formed rings in a row that made no progress.
    stalled: u32,
}

impl Training {
    /// Iteration `iteration` of `steps` optimizer steps.
    pub(super) fn new(iteration: u32, steps: u64) -> Self {
        Self {
            iteration,
            steps,
            next_step: 0,
            replicas: None,
            ring: None,
            stalled: 0,
        }
    }

    /// The workers holding the weights (after training: the ring that finished, rank order).
    pub(super) fn replicas(&self) -> Vec<WorkerId> {
        self.replicas.clone().unwrap_or_default()
    }

    /// `Trained` at once for an iteration of no step.
    pub(super) fn finished_already(&self) -> Vec<Action> {
        if self.steps == 0 {
            vec![Action::Apply(Trigger::Trained {
                iteration: self.iteration,
            })]
        } else {
            Vec::new()
        }
    }

    fn no_replica(&self) -> Action {
        fail(format!(
            "training iteration {}: no replica holds the weights at step {} (every worker of the \
             ring was lost; restoring from a checkpoint is not supported yet)",
            self.iteration, self.next_step
        ))
    }

    /// Forms a ring of the replicas among `workers` (the job's connected workers, in join
    /// order, none with a task in flight) and sends each rank its steps.
    pub(super) fn dispatch(
        &mut self,
        workers: &[&Member],
        generation: u64,
        rings_formed: &mut u64,
        tasks: &mut Tasks,
    ) -> Vec<Action> {
        if self.ring.is_some() || self.steps == 0 {
            return Vec::new();
        }
        let eligible: Vec<&Member> = workers
            .iter()
            .copied()
            .filter(|m| self.replicas.as_ref().is_none_or(|r| r.contains(&m.id)))
            .collect();
        if eligible.is_empty() {
            // Before the first ring, wait for a worker; after it, the replicas are gone.
            return match self.replicas {
                Some(_) => vec![self.no_replica()],
                None => Vec::new(),
            };
        }
        *rings_formed += 1;
        let ordinal = *rings_formed;
        let ring = Ring {
            generation,
            members: form_ring(eligible),
        };
        let id = collective_id(tasks.job, self.iteration, generation, ordinal);
        let (first, last) = (self.next_step, self.steps - 1);
        let mut actions = Vec::new();
        for member in &ring.members {
            let Some(task) = train_task(&ring, &id, member.worker, self.iteration, first, last)
            else {
                continue;
            };
            let label = format!("train-{}-ring-{ordinal}-rank-{}", self.iteration, task.rank);
            actions.push(tasks.issue(
                member.worker,
                Work::Train { ring: ordinal },
                &label,
                v1::task::Kind::Train(task),
            ));
        }
        tracing::info!(job = %tasks.job, iteration = self.iteration, collective = %id, world = ring.world(), first_step = first, "ring formed");
        self.replicas = Some(ring.members.iter().map(|m| m.worker).collect());
        self.ring = Some(RingRun {
            ordinal,
            waiting: ring.members.iter().map(|m| m.worker).collect(),
            ring,
            first_step: first,
            reports: Vec::new(),
            lost: Vec::new(),
        });
        actions
    }

    /// Applies a rank's result for the `ordinal`-th ring.
    pub(super) fn on_result(
        &mut self,
        worker: WorkerId,
        ordinal: u64,
        outcome: Option<Outcome>,
    ) -> Vec<Action> {
        let iteration = self.iteration;
        let last = self.steps - 1;
        let Some(run) = self.ring.as_mut().filter(|r| r.ordinal == ordinal) else {
            return Vec::new();
        };
        if !run.waiting.remove(&worker) {
            return Vec::new();
        }
        let rank = run.ring.rank_of(worker).unwrap_or(u32::MAX);
        let report = match (failure(&outcome), outcome) {
            (Some((error, false)), _) => {
                return vec![fail(format!(
                    "training iteration {iteration}: worker {worker} (rank {rank}) failed: {error}"
                ))];
            }
            (Some((error, true)), Some(Outcome::Failed(f))) => Report {
                worker,
                rank,
                completed: f.completed_steps,
                error: Some(error),
            },
            // Success means every step of the task was applied.
            _ => Report {
                worker,
                rank,
                completed: last + 1 - run.first_step,
                error: None,
            },
        };
        run.reports.push(report);
        self.settle()
    }

    /// Forgets lost `worker`: it no longer holds the weights, and its ring is broken.
    pub(super) fn on_lost(&mut self, worker: WorkerId, reason: &str) -> Vec<Action> {
        if let Some(replicas) = &mut self.replicas {
            replicas.retain(|w| *w != worker);
        }
        if let Some(run) = &mut self.ring {
            if let Some(rank) = run.ring.rank_of(worker) {
                run.waiting.remove(&worker);
                run.reports.retain(|r| r.worker != worker);
                run.lost.push((worker, rank, reason.to_string()));
                return self.settle();
            }
            return Vec::new();
        }
        match &self.replicas {
            Some(replicas) if replicas.is_empty() => vec![self.no_replica()],
            _ => Vec::new(),
        }
    }

    /// Once every surviving member of the ring has reported: the iteration is trained, or the
    /// ring re-forms from the survivors at the step they reached, or the job fails.
    fn settle(&mut self) -> Vec<Action> {
        if self.ring.as_ref().is_none_or(|r| !r.waiting.is_empty()) {
            return Vec::new();
        }
        let Some(run) = self.ring.take() else {
            return Vec::new();
        };
        let k = self.iteration;
        let mut survivors = run.reports;
        survivors.sort_by_key(|r| r.rank);
        self.replicas = Some(survivors.iter().map(|r| r.worker).collect());
        let Some(min) = survivors.iter().map(|r| r.completed).min() else {
            return vec![self.no_replica()];
        };
        let max = survivors.iter().map(|r| r.completed).max().unwrap_or(min);
        let next = run.first_step.saturating_add(min).min(self.steps);
        let mut actions = Vec::new();
        if min != max {
            let counts: Vec<String> = survivors
                .iter()
                .map(|r| format!("worker {} (rank {}): {}", r.worker, r.rank, r.completed))
                .collect();
            actions.push(warning(format!(
                "training iteration {k}: replicas disagree on the steps they completed since \
                 step {} ({}); resuming from step {next}",
                run.first_step,
                counts.join(", ")
            )));
        }
        if next >= self.steps {
            self.next_step = next;
            actions.push(Action::Apply(Trigger::Trained { iteration: k }));
            return actions;
        }
        self.stalled = if next > run.first_step {
            0
        } else {
            self.stalled + 1
        };
        self.next_step = next;
        let mut causes: Vec<String> = run
            .lost
            .iter()
            .map(|(w, rank, reason)| format!("worker {w} (rank {rank}) was lost ({reason})"))
            .collect();
        causes.extend(survivors.iter().filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("worker {} (rank {}) failed: {e}", r.worker, r.rank))
        }));
        if self.stalled >= MAX_ATTEMPTS {
            actions.push(fail(format!(
                "training iteration {k}: no progress past step {next} in {MAX_ATTEMPTS} rings; last: {}",
                causes.join("; ")
            )));
            return actions;
        }
        actions.push(warning(format!(
            "training iteration {k}: {} at step {next}; re-forming the ring with {} worker(s) \
             from step {next}",
            causes.join("; "),
            survivors.len()
        )));
        actions
    }
}
