//! Job events as text, without I/O or clocks: the [`Renderer`] of events and progress lines in
//! a [`Style`], and the formatting of phases, times and durations.

use std::collections::HashMap;

use spin_common::proto::v1::{self, job_event::Event, PhaseKind};

/// How progress is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// One line per event: for pipes, files and scripts.
    Plain,
    /// One line per phase, redrawn in place with `\r`: for a terminal.
    Redraw,
}

impl Style {
    /// `Redraw` when standard output is a terminal, `Plain` otherwise.
    pub fn for_stdout() -> Self {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            Self::Redraw
        } else {
            Self::Plain
        }
    }
}

/// Which progress line an event updates: one per training iteration and per shard phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ProgressKey {
    Steps { iteration: u32 },
    Shards { kind: i32, iteration: u32 },
}

/// Turns job events into text, without I/O or clocks: times come from the events, the ETA from
/// the reported step times.
#[derive(Debug)]
pub struct Renderer {
    style: Style,
    /// The progress line left open (no newline yet) in `Redraw` style, and its width.
    open: Option<(ProgressKey, usize)>,
    /// Smoothed seconds per step of each iteration.
    step_time: HashMap<u32, f64>,
}

/// Weight of the newest step time in the smoothed average behind the ETA.
const STEP_TIME_SMOOTHING: f64 = 0.2;

impl Renderer {
    /// A renderer drawing in `style`.
    pub fn new(style: Style) -> Self {
        Self {
            style,
            open: None,
            step_time: HashMap::new(),
        }
    }

    /// The text for `event`: whole lines in `Plain` style; in `Redraw` style progress events
    /// redraw their phase's line in place and leave it open.
    pub fn render(&mut self, event: &v1::JobEvent) -> String {
        let time = format_clock(event.at_ms);
        let progress = match &event.event {
            Some(Event::Step(m)) if !m.skipped.is_empty() => None,
            Some(Event::Step(m)) => Some((
                ProgressKey::Steps {
                    iteration: m.iteration,
                },
                self.step_line(m),
            )),
            Some(Event::Shards(s)) => {
                let (kind, iteration) = s.phase.as_ref().map_or((0, 0), |p| (p.kind, p.iteration));
                Some((
                    ProgressKey::Shards { kind, iteration },
                    format!(
                        "{}: shards {}/{}",
                        phase_label(s.phase.as_ref()),
                        s.done,
                        s.total
                    ),
                ))
            }
            _ => None,
        };
        match progress {
            Some((key, line)) => self.progress(key, &format!("{time} {line}")),
            None => {
                let line = event_line(event.event.as_ref());
                let mut text = self.finish();
                text.push_str(&format!("{time} {line}\n"));
                text
            }
        }
    }

    /// A line that is not an event (e.g. a reconnection notice).
    pub fn note(&mut self, line: &str) -> String {
        let mut text = self.finish();
        text.push_str(line);
        text.push('\n');
        text
    }

    /// Ends an open progress line; empty if none is open.
    pub fn finish(&mut self) -> String {
        match self.open.take() {
            Some(_) => "\n".to_string(),
            None => String::new(),
        }
    }

    fn progress(&mut self, key: ProgressKey, line: &str) -> String {
        if self.style == Style::Plain {
            return format!("{line}\n");
        }
        let width = line.chars().count();
        let text = match self.open {
            // Same line: go back and overwrite, padding over a longer previous text.
            Some((open, previous)) if open == key => {
                format!("\r{line}{}", " ".repeat(previous.saturating_sub(width)))
            }
            Some(_) => format!("\n{line}"),
            None => line.to_string(),
        };
        self.open = Some((key, width));
        text
    }

    fn step_line(&mut self, m: &v1::StepMetrics) -> String {
        let smoothed = self.step_time.entry(m.iteration).or_insert(m.step_time_s);
        *smoothed += STEP_TIME_SMOOTHING * (m.step_time_s - *smoothed);
        let done = m.step + 1;
        let remaining = m.steps.saturating_sub(done);
        let eta = if remaining == 0 {
            "done".to_string()
        } else {
            format!("eta {}", format_duration(*smoothed * remaining as f64))
        };
        let percent = if m.steps == 0 {
            0.0
        } else {
            100.0 * done as f64 / m.steps as f64
        };
        format!(
            "TRAINING k={}: step {done}/{} ({percent:.0}%) loss {:.4} lr {:.2e} grad norm {:.3} {:.1} img/s {eta}",
            m.iteration, m.steps, m.loss, m.lr, m.grad_norm, m.images_per_sec
        )
    }
}

/// The one-line text of an event that is not progress.
fn event_line(event: Option<&Event>) -> String {
    match event {
        Some(Event::PhaseChanged(p)) => match &p.from {
            Some(from) => format!(
                "phase {} -> {}",
                phase_label(Some(from)),
                phase_label(p.to.as_ref())
            ),
            None => format!("phase {}", phase_label(p.to.as_ref())),
        },
        Some(Event::WorkerJoined(w)) => {
            let device = w.device.clone().unwrap_or_default();
            let memory = if device.memory_bytes > 0 {
                format!(
                    ", {:.1} GiB",
                    device.memory_bytes as f64 / (1u64 << 30) as f64
                )
            } else {
                String::new()
            };
            format!(
                "worker {} joined ({} {}{memory}); {} in the ring",
                w.worker_id, device.backend, device.name, w.world
            )
        }
        Some(Event::WorkerLost(w)) => format!(
            "worker {} lost: {}; {} in the ring",
            w.worker_id, w.reason, w.world
        ),
        Some(Event::Warning(w)) => format!("warning: {}", w.message),
        Some(Event::SnapshotPublished(s)) => format!(
            "snapshot of iteration k={} (theta_{}) published at {}",
            s.iteration,
            s.iteration + 1,
            s.path
        ),
        Some(Event::Metrics(m)) => format!(
            "eval k={}: held-out loss {:.5} MMD {:.5} grid {}",
            m.iteration, m.held_out_loss, m.mmd, m.grid_path
        ),
        Some(Event::Done(d)) => format!("done: final model at {}", d.model_path),
        Some(Event::Failed(f)) => format!("failed: {}", f.error),
        Some(Event::Cancelled(c)) => format!("cancelled: {}", c.reason),
        // Progress is drawn by the caller; an empty oneof is a newer coordinator's event.
        Some(Event::Step(m)) if !m.skipped.is_empty() => format!(
            "warning: step {} of iteration k={} dropped on every replica: {}",
            m.step + 1,
            m.iteration,
            m.skipped
        ),
        Some(Event::Step(_) | Event::Shards(_)) | None => {
            "(an event this spinctl does not know)".into()
        }
    }
}

/// The kind of `phase` (`Unspecified` when absent or unknown).
pub fn phase_kind(phase: Option<&v1::Phase>) -> PhaseKind {
    phase
        .and_then(|p| PhaseKind::try_from(p.kind).ok())
        .unwrap_or(PhaseKind::Unspecified)
}

/// `PENDING`, `SAMPLING k=0`, `TRAINING k=1`, `DONE`...: the kind, with the self-play
/// iteration k (from 0, as the coordinator counts) where it has one.
pub fn phase_label(phase: Option<&v1::Phase>) -> String {
    let kind = phase_kind(phase);
    let name = kind
        .as_str_name()
        .strip_prefix("PHASE_KIND_")
        .unwrap_or("UNSPECIFIED");
    match (kind, phase) {
        (PhaseKind::Sampling | PhaseKind::Training | PhaseKind::Snapshot, Some(p)) => {
            format!("{name} k={}", p.iteration)
        }
        _ => name.to_string(),
    }
}

/// `12:34:56Z`: the UTC time of day of Unix milliseconds `ms`.
pub fn format_clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// `2025-06-01 12:34:56Z`: Unix milliseconds `ms` as a UTC date and time.
pub fn format_utc(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    // Civil from days (H. Hinnant): the proleptic Gregorian date of a day number.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {}", format_clock(ms))
}

/// `45s`, `4m12s`, `2h05m`: a duration in seconds, rounded for reading.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    if secs < 10.0 {
        return format!("{secs:.1}s");
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::tests::{event, phase, step};

    #[test]
    fn plain_style_prints_one_line_per_event() {
        let mut r = Renderer::new(Style::Plain);
        let text = r.render(&event(
            0,
            Event::PhaseChanged(v1::PhaseChanged {
                from: None,
                to: phase(PhaseKind::Pending, 0),
            }),
        ));
        assert_eq!(text, "22:13:20Z phase PENDING\n");
        let text = r.render(&event(
            1,
            Event::PhaseChanged(v1::PhaseChanged {
                from: phase(PhaseKind::Sampling, 1),
                to: phase(PhaseKind::Training, 1),
            }),
        ));
        assert!(
            text.ends_with("phase SAMPLING k=1 -> TRAINING k=1\n"),
            "{text}"
        );
        let text = r.render(&event(2, step(9, 100, 2.0)));
        assert!(
            text.contains("TRAINING k=1: step 10/100 (10%) loss 0.6930 lr 2.00e-5")
                && text.contains("grad norm 1.500 12.0 img/s eta 3m00s")
                && text.ends_with('\n'),
            "{text}"
        );
        assert_eq!(r.finish(), "");
    }

    #[test]
    fn eta_follows_smoothed_step_times() {
        let mut r = Renderer::new(Style::Plain);
        r.render(&event(0, step(0, 11, 1.0)));
        // 1.0 then 6.0 smoothed by 0.2: 2.0 s/step, 8 steps left.
        let text = r.render(&event(1, step(2, 11, 6.0)));
        assert!(text.contains("eta 16s"), "{text}");
        let text = r.render(&event(2, step(10, 11, 1.0)));
        assert!(
            text.contains("step 11/11 (100%)") && text.ends_with("done\n"),
            "{text}"
        );
    }

    #[test]
    fn redraw_style_rewrites_one_line_per_phase() {
        let mut r = Renderer::new(Style::Redraw);
        let first = r.render(&event(0, step(0, 100, 1.0)));
        assert!(
            !first.contains('\n') && !first.starts_with('\r'),
            "{first:?}"
        );
        let second = r.render(&event(1, step(1, 100, 1.0)));
        assert!(
            second.starts_with('\r') && !second.contains('\n'),
            "{second:?}"
        );
        // A shorter line pads over the longer one.
        let shards = |seq, done| {
            event(
                seq,
                Event::Shards(v1::ShardsProgress {
                    phase: phase(PhaseKind::Sampling, 2),
                    done,
                    total: 10,
                }),
            )
        };
        let third = r.render(&shards(2, 3));
        assert!(
            third.starts_with('\n') && third.ends_with("SAMPLING k=2: shards 3/10"),
            "{third:?}"
        );
        let fourth = r.render(&shards(3, 10));
        assert!(
            fourth.starts_with("\r") && fourth.contains("shards 10/10"),
            "{fourth:?}"
        );
        // Any other event closes the open line first.
        let warn = r.render(&event(
            4,
            Event::Warning(v1::Warning {
                message: "slow worker".into(),
            }),
        ));
        assert_eq!(warn, "\n22:13:24Z warning: slow worker\n");
        assert_eq!(r.finish(), "");
        let _ = r.render(&shards(5, 1));
        assert_eq!(r.note("reconnecting"), "\nreconnecting\n");
    }

    #[test]
    fn every_event_kind_has_a_line() {
        let mut r = Renderer::new(Style::Plain);
        let cases = [
            (
                Event::WorkerJoined(v1::WorkerJoined {
                    worker_id: "w1".into(),
                    device: Some(v1::DeviceInfo {
                        backend: "cuda".into(),
                        name: "H200".into(),
                        memory_bytes: 3 << 30,
                    }),
                    world: 2,
                }),
                "worker w1 joined (cuda H200, 3.0 GiB); 2 in the ring",
            ),
            (
                Event::WorkerLost(v1::WorkerLost {
                    worker_id: "w1".into(),
                    reason: "heartbeat".into(),
                    world: 1,
                }),
                "worker w1 lost: heartbeat; 1 in the ring",
            ),
            (
                Event::SnapshotPublished(v1::SnapshotPublished {
                    iteration: 0,
                    path: "jobs/j/iteration-1".into(),
                }),
                "snapshot of iteration k=0 (theta_1) published at jobs/j/iteration-1",
            ),
            (
                Event::Metrics(v1::EvalMetrics {
                    iteration: 1,
                    held_out_loss: 0.25,
                    mmd: 0.125,
                    grid_path: "g.png".into(),
                }),
                "eval k=1: held-out loss 0.25000 MMD 0.12500 grid g.png",
            ),
            (
                Event::Done(v1::JobDone {
                    model_path: "m".into(),
                }),
                "done: final model at m",
            ),
            (
                Event::Failed(v1::JobFailed {
                    error: "boom".into(),
                }),
                "failed: boom",
            ),
            (
                Event::Cancelled(v1::JobCancelled {
                    reason: "asked".into(),
                }),
                "cancelled: asked",
            ),
        ];
        for (i, (e, want)) in cases.into_iter().enumerate() {
            let text = r.render(&event(i as u64, e));
            assert!(
                text.ends_with(&format!(" {want}\n")),
                "{text:?} vs {want:?}"
            );
        }
        let mut empty = event(9, Event::Warning(v1::Warning::default()));
        empty.event = None;
        assert!(r.render(&empty).contains("does not know"));
    }

    #[test]
    fn times_and_durations_read_well() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_utc(1_700_000_000_123), "2023-11-14 22:13:20Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(format_duration(3.25), "3.2s");
        assert_eq!(format_duration(45.0), "45s");
        assert_eq!(format_duration(252.0), "4m12s");
        assert_eq!(format_duration(7500.0), "2h05m");
        assert_eq!(format_duration(f64::NAN), "?");
        assert_eq!(phase_label(None), "UNSPECIFIED");
        assert_eq!(
            phase_label(phase(PhaseKind::Snapshot, 3).as_ref()),
            "SNAPSHOT k=3"
        );
    }
}
