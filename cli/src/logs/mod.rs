//! `spinctl logs`: a job's `WatchJob` event stream rendered as text. [`Renderer`] turns events
//! into text without I/O; [`follow`] and [`show`] drive the stream (reconnecting, or stopping
//! after the kept events) and write what the renderer makes.
//!
//! `format` holds the renderer and the pure formatting of events, phases and times; `stream`
//! drives the stream. This module holds how a stream ended and the options of following it.

use std::time::Duration;

use spin_common::proto::v1::{self, job_event::Event, PhaseKind};

mod format;
mod stream;

pub use format::{
    format_clock, format_duration, format_utc, phase_kind, phase_label, Renderer, Style,
};
pub use stream::{follow, show};

/// How a job's stream ended, as far as `logs` saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The job finished; its final model is at `model_path` (empty if no event said).
    Done {
        /// Object-store path of the final model.
        model_path: String,
    },
    /// The job failed.
    Failed {
        /// Why.
        error: String,
    },
    /// The job was cancelled.
    Cancelled {
        /// Why (empty if no event said).
        reason: String,
    },
    /// The job had not ended when [`show`] stopped after the kept events.
    Running {
        /// The first sequence number not printed (`--from` to go on from there).
        next_sequence: u64,
    },
}

impl Outcome {
    /// The process exit code: 0 for done or still running, 1 for failed or cancelled.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Done { .. } | Self::Running { .. } => 0,
            Self::Failed { .. } | Self::Cancelled { .. } => 1,
        }
    }

    /// How a final event ended the job; `None` for any other event.
    pub fn of_event(event: &v1::JobEvent) -> Option<Self> {
        match &event.event {
            Some(Event::Done(d)) => Some(Self::Done {
                model_path: d.model_path.clone(),
            }),
            Some(Event::Failed(f)) => Some(Self::Failed {
                error: f.error.clone(),
            }),
            Some(Event::Cancelled(c)) => Some(Self::Cancelled {
                reason: c.reason.clone(),
            }),
            _ => None,
        }
    }

    /// How a job in a terminal phase ended, from its status; `None` while it runs.
    pub fn of_status(status: &v1::JobStatus) -> Option<Self> {
        match phase_kind(status.phase.as_ref()) {
            PhaseKind::Done => Some(Self::Done {
                model_path: String::new(),
            }),
            PhaseKind::Failed => Some(Self::Failed {
                error: status.error.clone(),
            }),
            PhaseKind::Cancelled => Some(Self::Cancelled {
                reason: String::new(),
            }),
            _ => None,
        }
    }
}

/// Reconnection after a broken stream: delays double from `first` up to `max`; after
/// `attempts` failures in a row (an event received resets the count) [`follow`] gives up.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Delay before the first retry.
    pub first: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Failed attempts in a row before giving up.
    pub attempts: u32,
}

impl Backoff {
    /// The delay before retry number `n` (from 1).
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(16);
        self.first.saturating_mul(factor).min(self.max)
    }
}

/// Options of [`follow`] and [`show`].
#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// How progress is drawn.
    pub style: Style,
    /// First event sequence number to print (0: from the start).
    pub from_sequence: u64,
    /// Reconnection after a broken stream ([`follow`] only).
    pub backoff: Backoff,
    /// [`show`]: the kept events arrive in one burst; a pause this long ends it.
    pub quiet: Duration,
    /// [`show`]: stop after this long even if events keep coming (a busy live job).
    pub show_limit: Duration,
}

impl Default for FollowOptions {
    fn default() -> Self {
        Self {
            style: Style::Plain,
            from_sequence: 0,
            backoff: Backoff {
                first: Duration::from_millis(250),
                max: Duration::from_secs(5),
                attempts: 20,
            },
            quiet: Duration::from_millis(300),
            show_limit: Duration::from_secs(3),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn event(sequence: u64, event: Event) -> v1::JobEvent {
        v1::JobEvent {
            job_id: "j".into(),
            sequence,
            at_ms: 1_700_000_000_000 + 1000 * sequence as i64,
            event: Some(event),
        }
    }

    pub(super) fn phase(kind: PhaseKind, iteration: u32) -> Option<v1::Phase> {
        Some(v1::Phase {
            kind: kind as i32,
            iteration,
        })
    }

    pub(super) fn step(step: u64, steps: u64, step_time_s: f64) -> Event {
        Event::Step(v1::StepMetrics {
            iteration: 1,
            step,
            steps,
            loss: 0.693,
            lr: 2e-5,
            grad_norm: 1.5,
            images_per_sec: 12.0,
            step_time_s,
            skipped: String::new(),
        })
    }

    #[test]
    fn outcomes_come_from_final_events_or_terminal_statuses() {
        let cancelled = event(3, Event::Cancelled(v1::JobCancelled { reason: "r".into() }));
        let outcome = Outcome::of_event(&cancelled).unwrap_or_else(|| panic!("final"));
        assert_eq!(outcome.exit_code(), 1);
        assert_eq!(Outcome::of_event(&event(0, step(0, 1, 1.0))), None);
        let mut status = v1::JobStatus {
            phase: phase(PhaseKind::Failed, 0),
            error: "bad".into(),
            ..Default::default()
        };
        assert_eq!(
            Outcome::of_status(&status),
            Some(Outcome::Failed {
                error: "bad".into()
            })
        );
        status.phase = phase(PhaseKind::Training, 0);
        assert_eq!(Outcome::of_status(&status), None);
        status.phase = phase(PhaseKind::Done, 0);
        assert_eq!(Outcome::of_status(&status).map(|o| o.exit_code()), Some(0));
        assert_eq!(Outcome::Running { next_sequence: 4 }.exit_code(), 0);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = FollowOptions::default().backoff;
        assert_eq!(b.delay(1), Duration::from_millis(250));
        assert_eq!(b.delay(3), Duration::from_secs(1));
        assert_eq!(b.delay(10), Duration::from_secs(5));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
    }
}
