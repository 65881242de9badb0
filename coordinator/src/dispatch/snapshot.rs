//! Snapshot k: rank 0 of the ring that finished training writes theta_{k+1}; if it is lost or
//! fails retryably, the next replica in rank order writes it instead. When no replica holds the
//! trained weights (every one was lost, or the job resumed here), any connected worker writes
//! it from the iteration's last checkpoint.

use spin_common::ids::WorkerId;
use spin_common::proto::v1;
use spin_common::store::layout;
use spin_common::task::TaskKind;
use v1::job_event::Event;
use v1::task_result::Outcome;

use super::{fail, failure, warning, Action, Plan, Tasks, Work, MAX_ATTEMPTS};
use crate::membership::Member;
use crate::state::Trigger;

/// The snapshot of one iteration.
#[derive(Debug)]
pub(super) struct SnapshotPhase {
    iteration: u32,
    /// Replicas holding the trained weights, in rank order; `None`: only the store has them
    /// (the checkpoint after the iteration's last step), and any worker loads them from it.
    replicas: Option<Vec<WorkerId>>,
    /// The replica writing it now.
    writer: Option<WorkerId>,
    failures: u32,
}

impl SnapshotPhase {
    /// The snapshot of iteration `iteration`, written by one of `replicas` (rank order), or by
    /// any worker from the last checkpoint when `None`.
    pub(super) fn new(iteration: u32, replicas: Option<Vec<WorkerId>>) -> Self {
        Self {
            iteration,
            replicas,
            writer: None,
            failures: 0,
        }
    }

    /// k.
    pub(super) fn iteration(&self) -> u32 {
        self.iteration
    }

    /// Every replica is gone: any worker writes the snapshot from the last checkpoint.
    fn fall_back_to_checkpoint(&mut self, why: &str) -> Vec<Action> {
        self.replicas = None;
        vec![warning(format!(
            "snapshot of iteration {}: {why}; another worker writes it from the iteration's last \
             checkpoint",
            self.iteration
        ))]
    }

    /// Sends the snapshot task to the first replica connected (or, with none, the first idle
    /// worker), when none is writing it.
    pub(super) fn dispatch(&mut self, workers: &[&Member], tasks: &mut Tasks) -> Vec<Action> {
        if self.writer.is_some() {
            return Vec::new();
        }
        let mut actions = Vec::new();
        let writer = match &self.replicas {
            Some(replicas) => {
                let connected = |w: &WorkerId| workers.iter().any(|m| m.id == *w);
                match replicas.iter().copied().find(connected) {
                    Some(writer) if tasks.busy(writer) => return Vec::new(),
                    Some(writer) => writer,
                    None => {
                        actions = self
                            .fall_back_to_checkpoint("no replica holding the weights is connected");
                        match workers.iter().find(|m| !tasks.busy(m.id)) {
                            Some(m) => m.id,
                            None => return actions,
                        }
                    }
                }
            }
            None => match workers.iter().find(|m| !tasks.busy(m.id)) {
                Some(m) => m.id,
                None => return Vec::new(),
            },
        };
        self.writer = Some(writer);
        let k = self.iteration;
        actions.push(tasks.issue(
            writer,
            Work::Snapshot { iteration: k },
            &format!("snapshot-{k}"),
            TaskKind::Snapshot { iteration: k },
        ));
        actions
    }

    /// Applies the writer's result.
    pub(super) fn on_result(
        &mut self,
        worker: WorkerId,
        outcome: Option<Outcome>,
        plan: &Plan,
    ) -> Vec<Action> {
        if self.writer != Some(worker) {
            return Vec::new();
        }
        self.writer = None;
        let k = self.iteration;
        if let Some((error, retryable)) = failure(&outcome) {
            let what = format!("snapshot of iteration {k} failed on worker {worker}");
            if !retryable {
                return vec![fail(format!("{what}: {error}"))];
            }
            self.failures += 1;
            if self.failures >= MAX_ATTEMPTS {
                return vec![fail(format!(
                    "{what} ({} failures): {error}",
                    self.failures
                ))];
            }
            return vec![warning(format!(
                "{what} (attempt {} of {MAX_ATTEMPTS}); retrying: {error}",
                self.failures
            ))];
        }
        let Some(Outcome::Succeeded(result)) = outcome else {
            return Vec::new();
        };
        let path = result.outputs.first().cloned().unwrap_or_else(|| {
            plan.job_dir
                .join(layout::snapshot(k + 1))
                .display()
                .to_string()
        });
        let mut actions = vec![Action::Event(Event::SnapshotPublished(
            v1::SnapshotPublished { iteration: k, path },
        ))];
        actions.extend(
            result
                .metrics
                .into_iter()
                .map(|m| Action::Event(Event::Metrics(m))),
        );
        actions.push(Action::Apply(Trigger::SnapshotPublished { iteration: k }));
        actions
    }

    /// Forgets lost `worker`; another replica (or, with none left, any worker from the last
    /// checkpoint) writes the snapshot if it was writing it.
    pub(super) fn on_lost(&mut self, worker: WorkerId, reason: &str) -> Vec<Action> {
        if self.writer == Some(worker) {
            self.writer = None;
        }
        let Some(replicas) = &mut self.replicas else {
            return Vec::new();
        };
        replicas.retain(|w| *w != worker);
        if replicas.is_empty() {
            self.fall_back_to_checkpoint(&format!(
                "the last replica holding the trained weights, worker {worker}, was lost ({reason})"
            ))
        } else {
            Vec::new()
        }
    }
}
