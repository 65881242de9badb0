//! Training k: a ring of replicas runs the iteration's optimizer steps. The first ring is every
//! worker of the job; when a member is lost or a rank fails, the coordinator waits for every
//! surviving member's result, takes the step boundary they reached, and re-forms the ring from
//! those survivors only (they alone hold the weights at that step). Workers that join meanwhile
//! take part from the next phase. When no member survives, the weights are only in the store:
//! the coordinator finds the iteration's latest verified checkpoint ([`super::resume`]) once
//! enough workers are connected, and a ring of every connected worker goes on from there (or
//! from theta_k at step 0 when there is none). A resumed job starts the same way.

use std::collections::BTreeSet;

use spin_common::auth::Token;
use spin_common::ids::WorkerId;
use spin_common::proto::v1;
use spin_common::task::TaskKind;
use v1::task_result::Outcome;

mod store;

use super::resume::TrainingPoint;
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
    /// Its collective id.
    id: String,
    ring: Ring,
    first_step: u64,
    /// Members whose result has not come.
    waiting: BTreeSet<WorkerId>,
    /// Results of members still connected.
    reports: Vec<Report>,
    /// Members lost, with their rank and why.
    lost: Vec<(WorkerId, u32, String)>,
}

/// Every replica was lost: training goes on from the store.
#[derive(Debug)]
struct LostAll {
    /// The first step of the ring that was lost (progress is counted from it).
    first_step: u64,
    /// What happened, for messages.
    causes: String,
}

/// Training of one iteration.
#[derive(Debug)]
pub(super) struct Training {
    iteration: u32,
    steps: u64,
    /// The first step no replica has applied yet.
    next_step: u64,
    /// The workers holding the weights at `next_step`, in rank order; `None` when the weights
    /// are in the store instead (theta_k before the first ring, or a checkpoint after a
    /// restart): then every worker of the job loads them.
    replicas: Option<Vec<WorkerId>>,
    ring: Option<RingRun>,
    /// Rings in a row that made no progress.
    stalled: u32,
    /// Set from the loss of every replica until the coordinator says where the store lets
    /// training go on ([`Training::restore`]).
    lost_all: Option<LostAll>,
    /// The largest ring (more ranks than micro-batches would leave some without work).
    max_world: usize,
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
            lost_all: None,
            max_world: usize::MAX,
        }
    }

    /// Rings of at most `n` workers (the first ones in join order; the others wait).
    pub(super) fn with_max_world(mut self, n: usize) -> Self {
        self.max_world = n.max(1);
        self
    }

    /// Iteration `iteration` of `steps` steps resumed from what the store holds (`point`).
    pub(super) fn resumed(
        iteration: u32,
        steps: u64,
        point: &TrainingPoint,
    ) -> (Self, Vec<Action>) {
        let mut training = Self::new(iteration, steps);
        let actions = training.go_on_from(
            point,
            "the job goes on from its store (a coordinator restart or a resume)",
        );
        (training, actions)
    }

    /// The workers holding the trained weights in memory (after training: the ring that
    /// finished, rank order); `None` when only the store has them.
    pub(super) fn replicas(&self) -> Option<Vec<WorkerId>> {
        self.replicas.clone().filter(|r| !r.is_empty())
    }

    /// k.
    pub(super) fn iteration(&self) -> u32 {
        self.iteration
    }

    /// Whether every replica was lost and training waits for [`Training::restore`].
    pub(super) fn checkpoint_wanted(&self) -> bool {
        self.lost_all.is_some()
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

    /// Forms a ring of the replicas among `workers` (the job's connected workers, in join
    /// order, none with a task in flight) and sends each rank its steps.
    pub(super) fn dispatch(
        &mut self,
        workers: &[&Member],
        generation: u64,
        rings_formed: &mut u64,
        tasks: &mut Tasks,
    ) -> Vec<Action> {
        if self.ring.is_some() || self.lost_all.is_some() || self.steps == 0 {
            return Vec::new();
        }
        let eligible: Vec<&Member> = workers
            .iter()
            .copied()
            .filter(|m| self.replicas.as_ref().is_none_or(|r| r.contains(&m.id)))
            .take(self.max_world)
            .collect();
        if eligible.is_empty() {
            // With the weights in the store, wait for a worker; else the replicas are gone.
            return match self.replicas {
                Some(_) => self.lose_all(self.next_step, "no replica is connected".into()),
                None => Vec::new(),
            };
        }
        *rings_formed += 1;
        let ordinal = *rings_formed;
        let ring = Ring {
            generation,
            members: form_ring(eligible),
        };
        let id = collective_id(tasks.job, tasks.run, self.iteration, generation, ordinal);
        let (first, last) = (self.next_step, self.steps - 1);
        // Known to the ring's members alone: their inboxes accept only streams that carry it.
        let secret = Token::random();
        let mut actions = Vec::new();
        for member in &ring.members {
            let Some(task) = train_task(
                &ring,
                &id,
                &secret,
                member.worker,
                self.iteration,
                first,
                last,
            ) else {
                continue;
            };
            let label = format!("train-{}-ring-{ordinal}-rank-{}", self.iteration, task.rank);
            actions.push(tasks.issue(
                member.worker,
                Work::Train { ring: ordinal },
                &label,
                TaskKind::Train(task),
            ));
        }
        tracing::info!(job = %tasks.job, iteration = self.iteration, collective = %id, world = ring.world(), first_step = first, "ring formed");
        self.replicas = Some(ring.members.iter().map(|m| m.worker).collect());
        self.ring = Some(RingRun {
            ordinal,
            id: id.clone(),
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
                // The members still running would wait for it until the ring timeout.
                let why = format!("worker {worker} (rank {rank}) was lost ({reason})");
                let mut actions: Vec<Action> = run
                    .waiting
                    .iter()
                    .map(|&member| Action::AbortRing {
                        worker: member,
                        collective_id: run.id.clone(),
                        reason: why.clone(),
                    })
                    .collect();
                actions.extend(self.settle());
                return actions;
            }
            return Vec::new();
        }
        match &self.replicas {
            Some(replicas) if replicas.is_empty() => self.lose_all(
                self.next_step,
                format!("worker {worker} was lost ({reason})"),
            ),
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
            let causes: Vec<String> = run
                .lost
                .iter()
                .map(|(w, rank, reason)| format!("worker {w} (rank {rank}) was lost ({reason})"))
                .collect();
            return self.lose_all(run.first_step, causes.join("; "));
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
