//! Each job's event log: events get sequence numbers from 0 and wait in an outbox until the
//! coordinator has stored them in the journal; only then are they published: kept in a
//! bounded history for watchers that join late or lag, and sent to live watchers through a
//! `tokio::sync::broadcast` channel. A watcher therefore never sees an event a restarted
//! coordinator would not have, and sequence numbers are never reused.

use std::collections::VecDeque;

use spin_common::proto::v1::{self, job_event::Event};
use tokio::sync::broadcast;

/// Events buffered in each job's broadcast channel; a watcher further behind recovers from the
/// history.
const BROADCAST_CAPACITY: usize = 256;

/// Whether `event` ends the job's stream (done, failed or cancelled).
pub fn is_final(event: &v1::JobEvent) -> bool {
    matches!(
        event.event,
        Some(Event::Done(_) | Event::Failed(_) | Event::Cancelled(_))
    )
}

/// One job's events.
#[derive(Debug)]
pub struct EventLog {
    job_id: String,
    next: u64,
    /// Numbered, not yet stored.
    outbox: Vec<v1::JobEvent>,
    history: VecDeque<v1::JobEvent>,
    capacity: usize,
    live: broadcast::Sender<v1::JobEvent>,
}

impl EventLog {
    /// An empty log for `job_id` keeping the newest `capacity` events.
    pub fn new(job_id: String, capacity: usize) -> Self {
        let (live, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            job_id,
            next: 0,
            outbox: Vec::new(),
            history: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            live,
        }
    }

    /// The log of `job_id` as stored: `stored` are its events in sequence order (the newest
    /// `capacity` are kept); numbering goes on after the last one.
    pub fn restore(job_id: String, capacity: usize, stored: Vec<v1::JobEvent>) -> Self {
        let mut log = Self::new(job_id, capacity);
        log.next = stored.last().map_or(0, |e| e.sequence + 1);
        let skip = stored.len().saturating_sub(log.capacity);
        log.history.extend(stored.into_iter().skip(skip));
        log
    }

    /// Numbers `event` and puts it in the outbox, to be published once stored. Returns the
    /// sequence number.
    pub fn push(&mut self, at_ms: i64, event: Event) -> u64 {
        let sequence = self.next;
        self.next += 1;
        self.outbox.push(v1::JobEvent {
            job_id: self.job_id.clone(),
            sequence,
            at_ms,
            event: Some(event),
        });
        sequence
    }

    /// Takes the events waiting to be stored, in order.
    pub fn take_outbox(&mut self) -> Vec<v1::JobEvent> {
        std::mem::take(&mut self.outbox)
    }

    /// Keeps `events` (taken from the outbox, now stored) and tells the live watchers.
    pub fn publish(&mut self, events: Vec<v1::JobEvent>) {
        for event in events {
            if self.history.len() == self.capacity {
                self.history.pop_front();
            }
            self.history.push_back(event.clone());
            // No receiver is not an error: nobody is watching.
            let _ = self.live.send(event);
        }
    }

    /// The kept events from `from` on (from the oldest kept one if `from` is older).
    pub fn since(&self, from: u64) -> Vec<v1::JobEvent> {
        let oldest = self.history.front().map_or(self.next, |e| e.sequence);
        let skip = usize::try_from(from.saturating_sub(oldest)).unwrap_or(usize::MAX);
        self.history.iter().skip(skip).cloned().collect()
    }

    /// A receiver of the events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<v1::JobEvent> {
        self.live.subscribe()
    }

    /// The sequence number the next event will get.
    pub fn next_sequence(&self) -> u64 {
        self.next
    }

    /// The newest step metrics kept, if any.
    pub fn last_step(&self) -> Option<v1::StepMetrics> {
        self.history.iter().rev().find_map(|e| match &e.event {
            Some(Event::Step(m)) => Some(m.clone()),
            _ => None,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn warning(text: &str) -> Event {
        Event::Warning(v1::Warning {
            message: text.into(),
        })
    }

    /// Pushes `event` and publishes it at once.
    fn push(log: &mut EventLog, at_ms: i64, event: Event) -> u64 {
        let sequence = log.push(at_ms, event);
        let stored = log.take_outbox();
        log.publish(stored);
        sequence
    }

    #[test]
    fn events_are_numbered_kept_and_broadcast() {
        let mut log = EventLog::new("j".into(), 3);
        let mut rx = log.subscribe();
        for i in 0..5 {
            assert_eq!(
                push(&mut log, i, warning(&i.to_string())),
                u64::try_from(i).unwrap()
            );
        }
        assert_eq!(rx.try_recv().unwrap().sequence, 0);
        let kept: Vec<u64> = log.since(0).iter().map(|e| e.sequence).collect();
        assert_eq!(kept, [2, 3, 4]);
        let kept: Vec<u64> = log.since(3).iter().map(|e| e.sequence).collect();
        assert_eq!(kept, [3, 4]);
        assert!(log.since(9).is_empty());
        assert_eq!(log.next_sequence(), 5);
        assert!(!is_final(&log.since(4)[0]));
        push(&mut log, 9, Event::Cancelled(v1::JobCancelled::default()));
        assert!(is_final(&log.since(5)[0]));
    }

    #[test]
    fn events_are_published_only_once_stored() {
        let mut log = EventLog::new("j".into(), 10);
        let mut rx = log.subscribe();
        log.push(1, warning("a"));
        log.push(2, warning("b"));
        assert!(log.since(0).is_empty(), "not stored yet");
        assert!(rx.try_recv().is_err());
        let stored = log.take_outbox();
        assert_eq!(
            stored.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [0, 1]
        );
        assert!(log.take_outbox().is_empty());
        log.publish(stored);
        assert_eq!(rx.try_recv().unwrap().sequence, 0);
        assert_eq!(log.since(1).len(), 1);
    }

    #[test]
    fn a_restored_log_goes_on_from_the_last_stored_sequence() {
        let step = |sequence, step| v1::JobEvent {
            job_id: "j".into(),
            sequence,
            at_ms: 0,
            event: Some(Event::Step(v1::StepMetrics {
                step,
                ..Default::default()
            })),
        };
        let stored: Vec<v1::JobEvent> = (0..5).map(|s| step(s, s + 10)).collect();
        let mut log = EventLog::restore("j".into(), 3, stored);
        assert_eq!(log.next_sequence(), 5);
        assert_eq!(
            log.since(0).iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(log.last_step().unwrap().step, 14);
        assert_eq!(log.push(9, warning("after")), 5);
        let empty = EventLog::restore("k".into(), 3, Vec::new());
        assert_eq!((empty.next_sequence(), empty.last_step()), (0, None));
    }
}
