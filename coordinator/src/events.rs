//! Each job's event log: events get sequence numbers from 0, the newest are kept in a bounded
//! history for watchers that join late or lag, and live watchers hear them through a
//! `tokio::sync::broadcast` channel.

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
            history: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            live,
        }
    }

    /// Numbers `event`, keeps it and tells the live watchers. Returns the sequence number.
    pub fn push(&mut self, at_ms: i64, event: Event) -> u64 {
        let sequence = self.next;
        self.next += 1;
        let event = v1::JobEvent {
            job_id: self.job_id.clone(),
            sequence,
            at_ms,
            event: Some(event),
        };
        if self.history.len() == self.capacity {
            self.history.pop_front();
        }
        self.history.push_back(event.clone());
        // No receiver is not an error: nobody is watching.
        let _ = self.live.send(event);
        sequence
    }

    /// The kept events from `from` on (from the oldest kept one if `from` is older).
    pub fn since(&self, from: u64) -> Vec<v1::JobEvent> {
        let oldest = self.history.front().map_or(self.next, |e| e.sequence);
        let skip = usize::try_from(from.saturating_sub(oldest)).unwrap_or(usize::MAX);
        self.history.iter().skip(skip).cloned().collect()
    }

    /// A receiver of the events pushed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<v1::JobEvent> {
        self.live.subscribe()
    }

    /// The sequence number the next event will get.
    pub fn next_sequence(&self) -> u64 {
        self.next
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

    #[test]
    fn events_are_numbered_kept_and_broadcast() {
        let mut log = EventLog::new("j".into(), 3);
        let mut rx = log.subscribe();
        for i in 0..5 {
            assert_eq!(
                log.push(i, warning(&i.to_string())),
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
        log.push(9, Event::Cancelled(v1::JobCancelled::default()));
        assert!(is_final(&log.since(5)[0]));
    }
}
