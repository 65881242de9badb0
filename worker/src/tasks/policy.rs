//! The decisions of the tasks, as pure functions returning what to do: when a checkpoint is
//! due and which ones to keep, what a non-finite step leads to, where a replica's weights come
//! from before a train or snapshot task. The tasks carry them out; these are tested without I/O.

use spin_common::spec::{NonFinitePolicy, Objective};

/// How many verified checkpoints an iteration keeps: one to resume from, one in case the
/// newest turns out damaged.
pub const CHECKPOINTS_KEPT: usize = 2;

/// Whether a checkpoint is written after `step` (from 0) of an iteration of `steps` steps:
/// every `every` steps (0: never), and always after the last step.
pub fn checkpoint_due(step: u64, steps: u64, every: u64) -> bool {
    step + 1 == steps || (every > 0 && (step + 1).is_multiple_of(every))
}

/// The step number in a checkpoint folder's name (`step-00000012`), if it is one.
fn checkpoint_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Which of an iteration's checkpoint folders to remove so that the `keep` newest (by step)
/// remain. Names that are not checkpoint folders are left alone.
pub fn checkpoints_to_remove(names: &[String], keep: usize) -> Vec<String> {
    let mut steps: Vec<(u64, &String)> = names
        .iter()
        .filter_map(|n| checkpoint_step(n).map(|s| (s, n)))
        .collect();
    steps.sort_unstable();
    let remove = steps.len().saturating_sub(keep);
    steps[..remove].iter().map(|(_, n)| (*n).clone()).collect()
}

/// What happens to a step that every replica found non-finite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonFiniteAction {
    /// Drop the step on every replica and go on (one more skipped step).
    Skip,
    /// Stop the task: policy `fail`, or the skip limit is reached.
    Fail,
}

/// The non-finite policy: `skip` drops up to `max_skipped` steps over the job, `fail` none.
pub fn on_non_finite(policy: NonFinitePolicy, skipped: u64, max_skipped: u64) -> NonFiniteAction {
    if policy == NonFinitePolicy::Skip && skipped < max_skipped {
        NonFiniteAction::Skip
    } else {
        NonFiniteAction::Fail
    }
}

/// Where a replica stands: ready for step `step` of iteration `iteration` (after an
/// iteration's last step: `(iteration + 1, 0)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Iteration k.
    pub iteration: u32,
    /// The next step to run.
    pub step: u64,
}

impl Position {
    /// Ready for `step` of `iteration`.
    pub const fn at(iteration: u32, step: u64) -> Self {
        Self { iteration, step }
    }
}

/// The weights a replica holds: where it stands (unknown after a failure mid-load) and which
/// theta_k its reference and opponent are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// Where theta and the optimizer stand.
    pub position: Option<Position>,
    /// k such that the frozen UNet is theta_k.
    pub reference_iteration: u32,
}

/// How to bring a replica to "ready for step `first` of iteration `k`".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ResumePlan {
    /// Load theta_k (the base for k = 0, else its snapshot) as theta first.
    pub restore_theta_k: bool,
    /// Then load the job's checkpoint written after this step of iteration k.
    pub checkpoint_after: Option<u64>,
    /// Start the optimizer afresh (every iteration starts from theta_k with new moments).
    pub fresh_optimizer: bool,
}

/// Decides how a replica holding `held` gets to step `first` of iteration `k`: kept as it is
/// when it is there already; theta_k with a fresh optimizer for step 0; otherwise the
/// checkpoint after step `first - 1` (on top of theta_k when the reference is another
/// iteration's).
pub fn resume_plan(held: Held, k: u32, first: u64) -> ResumePlan {
    if held.position == Some(Position::at(k, first)) {
        return ResumePlan {
            fresh_optimizer: first == 0,
            ..ResumePlan::default()
        };
    }
    ResumePlan {
        restore_theta_k: held.reference_iteration != k || first == 0,
        checkpoint_after: first.checked_sub(1),
        fresh_optimizer: first == 0,
    }
}

/// Where the weights of a snapshot of theta_{k+1} come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotSource {
    /// This replica finished iteration k itself: theta is theta_{k+1}.
    Trained,
    /// It did not (it joined later, or the coordinator restarted): theta_k, then the
    /// iteration's last checkpoint, which holds theta_{k+1}.
    LastCheckpoint {
        /// The iteration's last step.
        step: u64,
    },
}

/// Decides where theta_{k+1} comes from for a snapshot of iteration `k` of `steps` steps.
pub fn snapshot_source(position: Option<Position>, k: u32, steps: u64) -> SnapshotSource {
    if position == Some(Position::at(k + 1, 0)) {
        SnapshotSource::Trained
    } else {
        SnapshotSource::LastCheckpoint {
            step: steps.saturating_sub(1),
        }
    }
}

/// Which weights theta_k is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThetaK {
    /// k = 0: the job's base model.
    Base,
    /// The job's verified snapshot of iteration k.
    Snapshot(u32),
}

/// Which weights are theta_k.
pub fn theta_k(k: u32) -> ThetaK {
    if k == 0 {
        ThetaK::Base
    } else {
        ThetaK::Snapshot(k)
    }
}

/// Whether theta_k also becomes the frozen reference and opponent: yes, but for DPO, whose
/// reference stays the base model across iterations.
pub fn reference_follows(objective: Objective, k: u32) -> bool {
    objective != Objective::Dpo || k == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(iteration: u32, step: u64) -> Option<Position> {
        Some(Position::at(iteration, step))
    }

    #[test]
    fn checkpoints_fall_every_n_steps_and_after_the_last() {
        let due: Vec<u64> = (0..10).filter(|&s| checkpoint_due(s, 10, 4)).collect();
        assert_eq!(due, vec![3, 7, 9]);
        let due: Vec<u64> = (0..5).filter(|&s| checkpoint_due(s, 5, 0)).collect();
        assert_eq!(due, vec![4], "every = 0: only the iteration's end");
        let due: Vec<u64> = (0..3).filter(|&s| checkpoint_due(s, 3, 1)).collect();
        assert_eq!(due, vec![0, 1, 2]);
    }

    #[test]
    fn retention_keeps_the_newest_by_step_and_ignores_other_names() {
        let names: Vec<String> = [
            "step-00000010",
            "step-00000002",
            "notes.txt",
            "step-00000100",
            "step-00000007",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            checkpoints_to_remove(&names, 2),
            vec!["step-00000002".to_string(), "step-00000007".to_string()]
        );
        assert!(checkpoints_to_remove(&names[..2], 2).is_empty());
        assert!(checkpoints_to_remove(&[], 2).is_empty());
        assert_eq!(checkpoints_to_remove(&names, 0).len(), 4);
    }

    #[test]
    fn non_finite_steps_are_skipped_up_to_the_limit_under_skip_only() {
        use NonFiniteAction::*;
        assert_eq!(on_non_finite(NonFinitePolicy::Skip, 0, 2), Skip);
        assert_eq!(on_non_finite(NonFinitePolicy::Skip, 1, 2), Skip);
        assert_eq!(on_non_finite(NonFinitePolicy::Skip, 2, 2), Fail);
        assert_eq!(on_non_finite(NonFinitePolicy::Skip, 0, 0), Fail);
        assert_eq!(on_non_finite(NonFinitePolicy::Fail, 0, 10), Fail);
    }

    #[test]
    fn a_replica_already_in_place_keeps_its_weights() {
        let held = Held {
            position: at(1, 3),
            reference_iteration: 1,
        };
        assert_eq!(resume_plan(held, 1, 3), ResumePlan::default());
        let fresh = resume_plan(
            Held {
                position: at(1, 0),
                reference_iteration: 1,
            },
            1,
            0,
        );
        assert_eq!(
            fresh,
            ResumePlan {
                fresh_optimizer: true,
                ..ResumePlan::default()
            },
            "step 0 always starts a fresh optimizer"
        );
    }

    #[test]
    fn step_zero_elsewhere_restores_theta_k_with_a_fresh_optimizer() {
        for held in [
            Held {
                position: at(0, 5),
                reference_iteration: 0,
            },
            Held {
                position: None,
                reference_iteration: 1,
            },
        ] {
            assert_eq!(
                resume_plan(held, 1, 0),
                ResumePlan {
                    restore_theta_k: true,
                    checkpoint_after: None,
                    fresh_optimizer: true,
                }
            );
        }
    }

    #[test]
    fn mid_iteration_resumes_from_the_checkpoint_before_the_first_step() {
        // Same reference: the checkpoint alone moves theta.
        let same = Held {
            position: at(1, 2),
            reference_iteration: 1,
        };
        assert_eq!(
            resume_plan(same, 1, 6),
            ResumePlan {
                restore_theta_k: false,
                checkpoint_after: Some(5),
                fresh_optimizer: false,
            }
        );
        // Another iteration's reference: theta_k first, then the checkpoint.
        let other = Held {
            position: at(0, 4),
            reference_iteration: 0,
        };
        assert_eq!(
            resume_plan(other, 1, 6),
            ResumePlan {
                restore_theta_k: true,
                checkpoint_after: Some(5),
                fresh_optimizer: false,
            }
        );
    }

    #[test]
    fn a_snapshot_uses_theta_only_when_this_replica_finished_the_iteration() {
        assert_eq!(snapshot_source(at(2, 0), 1, 8), SnapshotSource::Trained);
        for position in [at(1, 7), at(2, 1), None] {
            assert_eq!(
                snapshot_source(position, 1, 8),
                SnapshotSource::LastCheckpoint { step: 7 }
            );
        }
    }

    #[test]
    fn theta_k_is_the_base_then_the_snapshots_and_dpo_keeps_the_base_as_reference() {
        assert_eq!(theta_k(0), ThetaK::Base);
        assert_eq!(theta_k(3), ThetaK::Snapshot(3));
        assert!(reference_follows(Objective::Spin, 2));
        assert!(reference_follows(Objective::Dpo, 0));
        assert!(!reference_follows(Objective::Dpo, 1));
    }
}
