//! The job state machine: pending, preparing, sampling k, training k, snapshot k, then done,
//! failed or cancelled; a failed job can be resumed into the phase it failed in. [`transition`]
//! is the only way a job changes state.

use std::fmt;

use serde::{Deserialize, Serialize};
use spin_common::spec::JobSpec;

/// Where a job is. `Sampling`, `Training` and `Snapshot` carry the self-play iteration k.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "phase", content = "iteration", rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, waiting for workers.
    Pending,
    /// Encoding the dataset into cached latents.
    Preparing,
    /// theta_k generating opponent latents for iteration k.
    Sampling(u32),
    /// Optimizer steps of iteration k.
    Training(u32),
    /// Publishing theta_{k+1}.
    Snapshot(u32),
    /// Every iteration finished; the final model is published.
    Done,
    /// Stopped by an error.
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended (no trigger applies any more).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    /// The self-play iteration of an iteration phase.
    pub fn iteration(self) -> Option<u32> {
        match self {
            Self::Sampling(k) | Self::Training(k) | Self::Snapshot(k) => Some(k),
            _ => None,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pending => f.write_str("pending"),
            Self::Preparing => f.write_str("preparing"),
            Self::Sampling(k) => write!(f, "sampling {k}"),
            Self::Training(k) => write!(f, "training {k}"),
            Self::Snapshot(k) => write!(f, "snapshot {k}"),
            Self::Done => f.write_str("done"),
            Self::Failed => f.write_str("failed"),
            Self::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// What happened to a job, as the coordinator learns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// Enough workers joined: start preparing.
    Start,
    /// Every encode shard is written.
    Prepared,
    /// Every sampling shard of the iteration is written.
    Sampled {
        /// k.
        iteration: u32,
    },
    /// The iteration's last optimizer step is done.
    Trained {
        /// k.
        iteration: u32,
    },
    /// theta_{k+1} is published and verified.
    SnapshotPublished {
        /// k.
        iteration: u32,
    },
    /// An error stops the job.
    Fail {
        /// What went wrong, naming the thing.
        reason: String,
    },
    /// A user asked the job to stop.
    Cancel,
    /// A user asked a failed job to go on (`spinctl resume`) once the cause of its failure is
    /// gone. The job re-enters `phase`, the phase it failed in (the `from` of its journaled
    /// `Fail` transition, see [`crate::journal::failed_in`]), not a fresh start: that phase is
    /// where the job's store says how far it got (the shards written, the newest verified
    /// checkpoint, a published snapshot), and re-entering it is exactly how a restarted
    /// coordinator goes on with a job it finds in that phase. An earlier phase would redo
    /// work whose results are in the store, and training re-entered through the phase before
    /// it would start over from step 0 instead of from the checkpoint. A job that failed while
    /// pending goes back to pending.
    Resume {
        /// The phase the job failed in, which it re-enters.
        phase: JobState,
    },
}

impl Trigger {
    /// The trigger's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Prepared => "prepared",
            Self::Sampled { .. } => "sampled",
            Self::Trained { .. } => "trained",
            Self::SnapshotPublished { .. } => "snapshot published",
            Self::Fail { .. } => "fail",
            Self::Cancel => "cancel",
            Self::Resume { .. } => "resume",
        }
    }
}

/// What the state machine needs to know about a job's plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobShape {
    /// Self-play iterations (`[[iteration]]` entries).
    pub iterations: u32,
    /// Whether iterations start by sampling opponents (SPIN objectives); SFT and DPO do not.
    pub self_play: bool,
}

impl JobShape {
    /// The shape of a validated spec.
    pub fn of(spec: &JobSpec) -> Self {
        Self {
            iterations: u32::try_from(spec.iterations.len()).unwrap_or(u32::MAX),
            self_play: spec.training.objective.self_play(),
        }
    }

    /// The first phase of iteration `k`, or `Done` past the last one.
    fn start_of(self, k: u32) -> JobState {
        if k >= self.iterations {
            JobState::Done
        } else if self.self_play {
            JobState::Sampling(k)
        } else {
            JobState::Training(k)
        }
    }
}

/// Why a trigger does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The job has already ended.
    #[error("job is {state}: trigger `{trigger}` does not apply to a finished job")]
    Finished {
        /// Its terminal state.
        state: JobState,
        /// The trigger refused.
        trigger: &'static str,
    },
    /// The trigger belongs to another phase (`resume`: the job has not failed).
    #[error("trigger `{trigger}` does not apply to a job that is {state}{}", hint(trigger, *state))]
    Illegal {
        /// The job's state.
        state: JobState,
        /// The trigger refused.
        trigger: &'static str,
    },
    /// The trigger names another iteration than the job's.
    #[error("trigger `{trigger}` names iteration {got} but the job is {state}")]
    WrongIteration {
        /// The job's state.
        state: JobState,
        /// The trigger refused.
        trigger: &'static str,
        /// The iteration the trigger named.
        got: u32,
    },
}

/// What a refusal of `trigger` on a job in `state` adds to say what would be accepted.
fn hint(trigger: &str, state: JobState) -> &'static str {
    if trigger == "resume" && state != JobState::Failed {
        " (only a failed job can be resumed)"
    } else {
        ""
    }
}

/// The state after `trigger` hits a job of `shape` in `state`.
pub fn transition(
    shape: JobShape,
    state: JobState,
    trigger: &Trigger,
) -> Result<JobState, TransitionError> {
    use JobState as S;
    let name = trigger.name();
    if let Trigger::Resume { phase } = trigger {
        return resume(shape, state, *phase);
    }
    if state.is_terminal() {
        return Err(TransitionError::Finished {
            state,
            trigger: name,
        });
    }
    let same = |k: u32, got: u32, next: JobState| {
        if k == got {
            Ok(next)
        } else {
            Err(TransitionError::WrongIteration {
                state,
                trigger: name,
                got,
            })
        }
    };
    match (state, trigger) {
        (_, Trigger::Fail { .. }) => Ok(S::Failed),
        (_, Trigger::Cancel) => Ok(S::Cancelled),
        (S::Pending, Trigger::Start) => Ok(S::Preparing),
        (S::Preparing, Trigger::Prepared) => Ok(shape.start_of(0)),
        (S::Sampling(k), Trigger::Sampled { iteration }) => same(k, *iteration, S::Training(k)),
        (S::Training(k), Trigger::Trained { iteration }) => same(k, *iteration, S::Snapshot(k)),
        (S::Snapshot(k), Trigger::SnapshotPublished { iteration }) => {
            same(k, *iteration, shape.start_of(k.saturating_add(1)))
        }
        _ => Err(TransitionError::Illegal {
            state,
            trigger: name,
        }),
    }
}

/// `Resume { phase }` on a job of `shape` in `state`: only a failed job goes back, and only
/// into a live phase of its own plan (a journal's `Fail` always comes from one).
fn resume(shape: JobShape, state: JobState, phase: JobState) -> Result<JobState, TransitionError> {
    let trigger = "resume";
    if state != JobState::Failed || phase.is_terminal() {
        return Err(TransitionError::Illegal { state, trigger });
    }
    match phase {
        JobState::Sampling(_) if !shape.self_play => {
            Err(TransitionError::Illegal { state, trigger })
        }
        _ => match phase.iteration() {
            Some(k) if k >= shape.iterations => Err(TransitionError::WrongIteration {
                state,
                trigger,
                got: k,
            }),
            _ => Ok(phase),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use JobState as S;

    const SPIN2: JobShape = JobShape {
        iterations: 2,
        self_play: true,
    };
    const SFT1: JobShape = JobShape {
        iterations: 1,
        self_play: false,
    };

    fn run(shape: JobShape, triggers: &[Trigger]) -> Vec<JobState> {
        let mut state = S::Pending;
        let mut seen = vec![state];
        for t in triggers {
            state = transition(shape, state, t).unwrap();
            seen.push(state);
        }
        seen
    }

    #[test]
    fn a_spin_job_walks_every_phase_of_every_iteration() {
        let seen = run(
            SPIN2,
            &[
                Trigger::Start,
                Trigger::Prepared,
                Trigger::Sampled { iteration: 0 },
                Trigger::Trained { iteration: 0 },
                Trigger::SnapshotPublished { iteration: 0 },
                Trigger::Sampled { iteration: 1 },
                Trigger::Trained { iteration: 1 },
                Trigger::SnapshotPublished { iteration: 1 },
            ],
        );
        assert_eq!(
            seen,
            [
                S::Pending,
                S::Preparing,
                S::Sampling(0),
                S::Training(0),
                S::Snapshot(0),
                S::Sampling(1),
                S::Training(1),
                S::Snapshot(1),
                S::Done
            ]
        );
    }

    #[test]
    fn objectives_without_self_play_skip_sampling() {
        let seen = run(
            SFT1,
            &[
                Trigger::Start,
                Trigger::Prepared,
                Trigger::Trained { iteration: 0 },
                Trigger::SnapshotPublished { iteration: 0 },
            ],
        );
        assert_eq!(
            seen,
            [
                S::Pending,
                S::Preparing,
                S::Training(0),
                S::Snapshot(0),
                S::Done
            ]
        );
        let empty = JobShape {
            iterations: 0,
            self_play: true,
        };
        assert_eq!(
            transition(empty, S::Preparing, &Trigger::Prepared),
            Ok(S::Done)
        );
    }

    #[test]
    fn every_live_state_can_fail_or_be_cancelled() {
        let live = [
            S::Pending,
            S::Preparing,
            S::Sampling(1),
            S::Training(0),
            S::Snapshot(1),
        ];
        let fail = Trigger::Fail {
            reason: "worker lost".into(),
        };
        for state in live {
            assert_eq!(transition(SPIN2, state, &fail), Ok(S::Failed), "{state}");
            assert_eq!(transition(SPIN2, state, &Trigger::Cancel), Ok(S::Cancelled));
        }
    }

    #[test]
    fn finished_jobs_refuse_every_trigger() {
        for state in [S::Done, S::Failed, S::Cancelled] {
            for t in [
                Trigger::Cancel,
                Trigger::Start,
                Trigger::Trained { iteration: 0 },
            ] {
                let err = transition(SPIN2, state, &t).unwrap_err();
                assert!(matches!(err, TransitionError::Finished { .. }), "{err}");
            }
        }
    }

    #[test]
    fn triggers_of_another_phase_are_illegal() {
        let cases = [
            (S::Pending, Trigger::Prepared),
            (S::Pending, Trigger::Sampled { iteration: 0 }),
            (S::Preparing, Trigger::Start),
            (S::Sampling(0), Trigger::Trained { iteration: 0 }),
            (S::Training(0), Trigger::Sampled { iteration: 0 }),
            (S::Training(0), Trigger::SnapshotPublished { iteration: 0 }),
            (S::Snapshot(0), Trigger::Prepared),
        ];
        for (state, t) in cases {
            let err = transition(SPIN2, state, &t).unwrap_err();
            assert_eq!(
                err,
                TransitionError::Illegal {
                    state,
                    trigger: t.name()
                }
            );
        }
    }

    #[test]
    fn a_trigger_for_another_iteration_is_refused_and_named() {
        let err =
            transition(SPIN2, S::Training(1), &Trigger::Trained { iteration: 0 }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "trigger `trained` names iteration 0 but the job is training 1"
        );
        let err =
            transition(SPIN2, S::Sampling(0), &Trigger::Trained { iteration: 1 }).unwrap_err();
        assert!(matches!(err, TransitionError::Illegal { .. }), "{err}");
    }

    #[test]
    fn a_failed_job_resumes_into_the_phase_it_failed_in_and_goes_on_from_there() {
        let fail = Trigger::Fail {
            reason: "no space left on device".into(),
        };
        for (shape, phase) in [
            (SPIN2, S::Pending),
            (SPIN2, S::Preparing),
            (SPIN2, S::Sampling(1)),
            (SPIN2, S::Training(0)),
            (SPIN2, S::Snapshot(1)),
            (SFT1, S::Training(0)),
        ] {
            let failed = transition(shape, phase, &fail).unwrap();
            let back = transition(shape, failed, &Trigger::Resume { phase }).unwrap();
            assert_eq!(back, phase, "{phase}");
        }
        // The resumed job walks on as if it had never failed, and may fail again.
        let state = transition(
            SPIN2,
            S::Failed,
            &Trigger::Resume {
                phase: S::Training(1),
            },
        );
        let state = transition(SPIN2, state.unwrap(), &Trigger::Trained { iteration: 1 });
        assert_eq!(state, Ok(S::Snapshot(1)));
        let state = transition(
            SPIN2,
            S::Snapshot(1),
            &Trigger::SnapshotPublished { iteration: 1 },
        );
        assert_eq!(state, Ok(S::Done));
        assert_eq!(transition(SPIN2, S::Training(1), &fail), Ok(S::Failed));
    }

    #[test]
    fn only_a_failed_job_resumes_and_the_refusal_names_its_phase() {
        let resume = Trigger::Resume {
            phase: S::Training(0),
        };
        for state in [
            S::Done,
            S::Cancelled,
            S::Pending,
            S::Training(0),
            S::Snapshot(1),
        ] {
            let err = transition(SPIN2, state, &resume).unwrap_err();
            assert_eq!(
                err,
                TransitionError::Illegal {
                    state,
                    trigger: "resume"
                }
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("a job that is {state}"))
                    && message.contains("only a failed job can be resumed"),
                "{message}"
            );
        }
        assert_eq!(
            transition(SPIN2, S::Cancelled, &resume)
                .unwrap_err()
                .to_string(),
            "trigger `resume` does not apply to a job that is cancelled (only a failed job can \
             be resumed)"
        );
    }

    #[test]
    fn a_failed_job_resumes_only_into_a_live_phase_of_its_plan() {
        for phase in [S::Failed, S::Done, S::Cancelled] {
            let err = transition(SPIN2, S::Failed, &Trigger::Resume { phase }).unwrap_err();
            assert!(matches!(err, TransitionError::Illegal { .. }), "{err}");
        }
        let err = transition(
            SFT1,
            S::Failed,
            &Trigger::Resume {
                phase: S::Sampling(0),
            },
        );
        assert!(
            matches!(err, Err(TransitionError::Illegal { .. })),
            "{err:?}"
        );
        let err = transition(
            SPIN2,
            S::Failed,
            &Trigger::Resume {
                phase: S::Training(2),
            },
        );
        assert_eq!(
            err,
            Err(TransitionError::WrongIteration {
                state: S::Failed,
                trigger: "resume",
                got: 2
            })
        );
    }

    #[test]
    fn states_serialize_readably() {
        let json = serde_json::to_string(&S::Sampling(3)).unwrap();
        assert_eq!(json, r#"{"phase":"sampling","iteration":3}"#);
        assert_eq!(serde_json::from_str::<S>(&json).unwrap(), S::Sampling(3));
        let json = serde_json::to_string(&S::Done).unwrap();
        assert_eq!(serde_json::from_str::<S>(&json).unwrap(), S::Done);
        let resume = Trigger::Resume {
            phase: S::Training(1),
        };
        let json = serde_json::to_string(&resume).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"resume","phase":{"phase":"training","iteration":1}}"#
        );
        assert_eq!(serde_json::from_str::<Trigger>(&json).unwrap(), resume);
    }
}
