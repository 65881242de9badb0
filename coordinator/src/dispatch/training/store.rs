//! Training from the store: when every replica was lost, the ring waits for the coordinator to
//! find the iteration's latest verified checkpoint, then goes on from it (or from theta_k at
//! step 0), as a resumed job does.

use super::super::resume::TrainingPoint;
use super::super::{fail, warning, Action, MAX_ATTEMPTS};
use super::{LostAll, Training};
use crate::state::Trigger;

impl Training {
    /// Goes on from `point` (where the store lets training go on) after every replica was
    /// lost; a stale call (nothing was lost) does nothing. Counts as a ring without progress
    /// unless `point` is past the lost ring's first step.
    pub(in crate::dispatch) fn restore(&mut self, point: &TrainingPoint) -> Vec<Action> {
        let Some(lost) = self.lost_all.take() else {
            return Vec::new();
        };
        let k = self.iteration;
        let next = point.next_step().min(self.steps);
        self.stalled = if next > lost.first_step {
            0
        } else {
            self.stalled + 1
        };
        if self.stalled >= MAX_ATTEMPTS {
            return vec![fail(format!(
                "training iteration {k}: no progress past step {next} in {MAX_ATTEMPTS} rings; \
                 last: every replica was lost ({})",
                lost.causes
            ))];
        }
        self.go_on_from(point, &format!("every replica was lost ({})", lost.causes))
    }

    /// Takes `point` as the step boundary the store holds: warns of the refused checkpoints,
    /// says where training resumes and why, and ends the iteration if nothing is left.
    pub(super) fn go_on_from(&mut self, point: &TrainingPoint, why: &str) -> Vec<Action> {
        let k = self.iteration;
        let mut actions: Vec<Action> = point
            .refused
            .iter()
            .map(|(dir, reason)| {
                warning(format!(
                    "training iteration {k}: torn or corrupt checkpoint skipped: {}: {reason}",
                    dir.display()
                ))
            })
            .collect();
        let next = point.next_step().min(self.steps);
        let from = match &point.checkpoint {
            Some((dir, step)) => format!("the checkpoint after step {step} ({})", dir.display()),
            None => format!("theta_{k}: no verified checkpoint of the iteration"),
        };
        actions.push(warning(format!(
            "training iteration {k}: {why}; resuming from step {next} of {} with {from}",
            self.steps
        )));
        self.next_step = next;
        self.replicas = None;
        self.ring = None;
        self.lost_all = None;
        if next >= self.steps {
            actions.push(Action::Apply(Trigger::Trained { iteration: k }));
        }
        actions
    }

    /// Every replica is gone (`causes`; the last ring started at `first_step`): training
    /// waits for the coordinator to find the latest checkpoint.
    pub(super) fn lose_all(&mut self, first_step: u64, causes: String) -> Vec<Action> {
        let k = self.iteration;
        self.replicas = None;
        self.ring = None;
        let message = warning(format!(
            "training iteration {k}: every replica was lost ({causes}); waiting for workers to \
             restart the ring from the latest verified checkpoint"
        ));
        self.lost_all = Some(LostAll { first_step, causes });
        vec![message]
    }
}
