//! Job events, stored before anyone sees them: [`Coordinator::save_events`] stores every
//! log's outbox in one journal transaction (the state lock not held meanwhile), then
//! publishes them; a restarted coordinator rebuilds each log from the journal
//! ([`restore_log`]), the events of any transition journaled without them included.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use spin_common::ids::JobId;
use spin_common::proto::v1;
use spin_common::store::layout;
use v1::job_event::Event;

use super::{job_dir, Coordinator, CANCELLED};
use crate::events::EventLog;
use crate::journal::{JobRecord, Journal, JournalError, TransitionRecord};
use crate::state::{JobState, Trigger};

impl Coordinator {
    /// Stores the events waiting in every log's outbox in the journal (one transaction, the
    /// state lock not held meanwhile), then publishes them to the logs' watchers. Serialized,
    /// so each log publishes in sequence order. Call it off the async runtime, without the
    /// state lock. If the journal fails, the events are published all the same (a restart
    /// loses them) rather than held back from every watcher.
    pub(super) fn save_events(&self) {
        let _order = self
            .shared
            .saving
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (journal, batch) = {
            let mut state = self.lock();
            let batch: Vec<(JobId, Vec<v1::JobEvent>)> = state
                .events
                .iter_mut()
                .filter_map(|(id, log)| {
                    let outbox = log.take_outbox();
                    (!outbox.is_empty()).then_some((*id, outbox))
                })
                .collect();
            (state.journal.clone(), batch)
        };
        if batch.is_empty() {
            return;
        }
        if let Err(err) = journal.append_events(&batch) {
            tracing::error!(error = %err, "could not store job events; publishing them unstored");
        }
        let mut state = self.lock();
        for (id, events) in batch {
            if let Some(log) = state.events.get_mut(&id) {
                log.publish(events);
            }
        }
    }

    /// Has the events pushed so far stored and published soon, on the blocking pool (at once
    /// when there is no runtime): for callers on the async runtime. One save is queued at a
    /// time; events pushed meanwhile go with it or with the next.
    pub(super) fn save_events_soon(&self) {
        if self.shared.save_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let c = self.clone();
        let save = move || {
            c.shared.save_queued.store(false, Ordering::Release);
            c.save_events();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(save);
            }
            Err(_) => save(),
        }
    }
}

/// Job `job`'s event log from the journal: its stored events, then, in the outbox, those of
/// any transition journaled without its events (a crash between the two writes, or a journal
/// written before events were stored).
pub(super) fn restore_log(
    journal: &Journal,
    job: &JobRecord,
    capacity: usize,
    store_root: &Path,
) -> Result<EventLog, JournalError> {
    let stored = journal.events(job.id)?;
    let phase_changes = stored
        .iter()
        .filter(|e| matches!(e.event, Some(Event::PhaseChanged(_))))
        .count();
    let mut log = EventLog::restore(job.id.to_string(), capacity, stored);
    if phase_changes == 0 {
        log.push(job.submitted_at_ms, submitted_event());
    }
    // The first phase change is the submission; each transition makes one more.
    let told = phase_changes.saturating_sub(1);
    for record in journal.transitions(job.id)?.iter().skip(told) {
        push_transition(&mut log, job, record, store_root);
    }
    Ok(log)
}

/// The first event of every job: it entered `PENDING`.
pub(super) fn submitted_event() -> Event {
    Event::PhaseChanged(v1::PhaseChanged {
        from: None,
        to: Some(JobState::Pending.into()),
    })
}

/// The events of one transition: the phase change, then how the job ended if it did. A done
/// job's model is the last snapshot in its store directory under `store_root`.
pub(super) fn push_transition(
    log: &mut EventLog,
    job: &JobRecord,
    record: &TransitionRecord,
    store_root: &Path,
) {
    log.push(
        record.at_ms,
        Event::PhaseChanged(v1::PhaseChanged {
            from: Some(record.from.into()),
            to: Some(record.to.into()),
        }),
    );
    let end = match record.to {
        JobState::Done => Some(Event::Done(v1::JobDone {
            model_path: job_dir(store_root, job.id)
                .join(layout::snapshot(job.shape.iterations))
                .display()
                .to_string(),
        })),
        JobState::Failed => Some(Event::Failed(v1::JobFailed {
            error: match &record.trigger {
                Trigger::Fail { reason } => reason.clone(),
                _ => job.error.clone().unwrap_or_default(),
            },
        })),
        JobState::Cancelled => Some(Event::Cancelled(v1::JobCancelled {
            reason: CANCELLED.into(),
        })),
        _ => None,
    };
    if let Some(event) = end {
        log.push(record.at_ms, event);
    }
}
