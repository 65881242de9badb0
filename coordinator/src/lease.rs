//! Leases on shards: a shard is granted to one worker until a deadline, renewed by the
//! worker's heartbeats, and handed to another worker once it expires. A finished shard is never
//! handed out again. Time is passed in, so expiry is tested without sleeping.

use std::time::{Duration, Instant};

use spin_common::ids::WorkerId;

/// A grant of one shard to one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The shard's index.
    pub shard: u32,
    /// Its holder.
    pub worker: WorkerId,
    /// When it lapses unless renewed.
    pub expires_at: Instant,
    /// Grants of this shard so far, this one included (1 on the first).
    pub attempt: u32,
    /// The worker whose expired lease this one replaces.
    pub replaces: Option<WorkerId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Open {
        attempts: u32,
    },
    Leased {
        worker: WorkerId,
        expires_at: Instant,
        attempts: u32,
    },
    Done {
        /// `None`: found already written when the phase resumed.
        worker: Option<WorkerId>,
    },
}

/// What a completion report did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The shard is now finished.
    Accepted,
    /// The shard was already finished (a repeated report).
    Duplicate,
}

/// Why a lease operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// No such shard.
    #[error("shard {shard} does not exist (the table has {len})")]
    UnknownShard {
        /// Index asked for.
        shard: u32,
        /// Shards in the table.
        len: u32,
    },
    /// The worker does not hold the shard's lease.
    #[error("worker {worker} does not hold the lease on shard {shard}")]
    NotHolder {
        /// The shard.
        shard: u32,
        /// The worker that reported.
        worker: WorkerId,
    },
}

/// The leases of one phase's shards (encode shards, or one iteration's sampling shards).
#[derive(Clone, Debug)]
pub struct LeaseTable {
    duration: Duration,
    slots: Vec<Slot>,
}

impl LeaseTable {
    /// `shards` open shards, each lease lasting `duration` from its grant or last renewal.
    pub fn new(shards: u32, duration: Duration) -> Self {
        Self {
            duration,
            slots: vec![Slot::Open { attempts: 0 }; shards as usize],
        }
    }

    /// Shards in the table.
    pub fn len(&self) -> u32 {
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    /// Whether the table has no shard.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Finished shards.
    pub fn done(&self) -> u32 {
        let done = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Done { .. }))
            .count();
        u32::try_from(done).unwrap_or(u32::MAX)
    }

    /// Whether every shard is finished.
    pub fn is_finished(&self) -> bool {
        self.done() == self.len()
    }

    /// The current holder of `shard`'s live or lapsed lease.
    pub fn holder(&self, shard: u32) -> Option<WorkerId> {
        match self.slots.get(shard as usize) {
            Some(Slot::Leased { worker, .. }) => Some(*worker),
            _ => None,
        }
    }

    /// Grants `worker` the lowest open shard, or one whose lease lapsed by `now`; `None` when
    /// every shard is finished or held by a live lease.
    pub fn grant(&mut self, worker: WorkerId, now: Instant) -> Option<Lease> {
        let expires_at = now + self.duration;
        let (index, slot) = self.slots.iter_mut().enumerate().find(|(_, s)| match s {
            Slot::Open { .. } => true,
            Slot::Leased { expires_at, .. } => *expires_at <= now,
            Slot::Done { .. } => false,
        })?;
        let (attempts, replaces) = match *slot {
            Slot::Open { attempts } => (attempts, None),
            Slot::Leased {
                worker, attempts, ..
            } => (attempts, Some(worker)),
            Slot::Done { .. } => return None,
        };
        let attempt = attempts.saturating_add(1);
        *slot = Slot::Leased {
            worker,
            expires_at,
            attempts: attempt,
        };
        Some(Lease {
            shard: u32::try_from(index).unwrap_or(u32::MAX),
            worker,
            expires_at,
            attempt,
            replaces,
        })
    }

    /// Extends every live lease of `worker` to `now` plus the lease duration (a heartbeat);
    /// lapsed leases stay lapsed. Returns how many were renewed.
    pub fn renew(&mut self, worker: WorkerId, now: Instant) -> usize {
        let until = now + self.duration;
        let mut renewed = 0;
        for slot in &mut self.slots {
            if let Slot::Leased {
                worker: holder,
                expires_at,
                ..
            } = slot
            {
                if *holder == worker && *expires_at > now {
                    // A renewal never shortens a lease (heartbeats are folded in late).
                    *expires_at = (*expires_at).max(until);
                    renewed += 1;
                }
            }
        }
        renewed
    }

    /// Records that `worker` finished `shard`. The holder may report even after its lease
    /// lapsed, as long as nobody else was granted the shard: the seeds make the work identical.
    pub fn complete(&mut self, shard: u32, worker: WorkerId) -> Result<Completion, LeaseError> {
        let len = self.len();
        let slot = self
            .slots
            .get_mut(shard as usize)
            .ok_or(LeaseError::UnknownShard { shard, len })?;
        match *slot {
            Slot::Done { .. } => Ok(Completion::Duplicate),
            Slot::Leased { worker: holder, .. } if holder == worker => {
                *slot = Slot::Done {
                    worker: Some(worker),
                };
                Ok(Completion::Accepted)
            }
            _ => Err(LeaseError::NotHolder { shard, worker }),
        }
    }

    /// Marks `shard` finished without a lease: its output was found already written when the
    /// phase resumed.
    pub fn mark_done(&mut self, shard: u32) -> Result<(), LeaseError> {
        let len = self.len();
        let slot = self
            .slots
            .get_mut(shard as usize)
            .ok_or(LeaseError::UnknownShard { shard, len })?;
        *slot = Slot::Done { worker: None };
        Ok(())
    }

    /// Reopens `shard` after its holder reported a retryable failure.
    pub fn fail(&mut self, shard: u32, worker: WorkerId) -> Result<(), LeaseError> {
        let len = self.len();
        let slot = self
            .slots
            .get_mut(shard as usize)
            .ok_or(LeaseError::UnknownShard { shard, len })?;
        match *slot {
            Slot::Leased {
                worker: holder,
                attempts,
                ..
            } if holder == worker => {
                *slot = Slot::Open { attempts };
                Ok(())
            }
            _ => Err(LeaseError::NotHolder { shard, worker }),
        }
    }

    /// Reopens every shard leased to `worker` (it was lost). Returns the shards.
    pub fn release_worker(&mut self, worker: WorkerId) -> Vec<u32> {
        self.reopen(|holder, _| holder == worker)
            .into_iter()
            .map(|(shard, _)| shard)
            .collect()
    }

    /// Reopens every lease lapsed by `now`. Returns the shards and their former holders.
    pub fn expire(&mut self, now: Instant) -> Vec<(u32, WorkerId)> {
        self.reopen(|_, expires_at| expires_at <= now)
    }

    /// The earliest deadline of a live lease: when the next [`Self::expire`] is due.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Leased { expires_at, .. } => Some(*expires_at),
                _ => None,
            })
            .min()
    }

    /// Reopens the leases `pick` chooses (by holder and deadline), keeping their attempt counts.
    fn reopen(&mut self, pick: impl Fn(WorkerId, Instant) -> bool) -> Vec<(u32, WorkerId)> {
        let mut reopened = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Leased {
                worker,
                expires_at,
                attempts,
            } = *slot
            {
                if pick(worker, expires_at) {
                    *slot = Slot::Open { attempts };
                    reopened.push((u32::try_from(index).unwrap_or(u32::MAX), worker));
                }
            }
        }
        reopened
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn shards_are_granted_in_order_until_none_is_open() {
        let t0 = Instant::now();
        let (a, b) = (WorkerId::new(), WorkerId::new());
        let mut table = LeaseTable::new(2, TTL);
        let first = table.grant(a, t0).unwrap();
        assert_eq!((first.shard, first.attempt, first.replaces), (0, 1, None));
        assert_eq!(first.expires_at, secs(t0, 30));
        assert_eq!(table.grant(b, t0).unwrap().shard, 1);
        assert_eq!(table.grant(a, t0), None);
        assert_eq!(table.next_expiry(), Some(secs(t0, 30)));
    }

    #[test]
    fn an_expired_lease_is_reassigned_to_another_worker() {
        let t0 = Instant::now();
        let (a, b) = (WorkerId::new(), WorkerId::new());
        let mut table = LeaseTable::new(1, TTL);
        table.grant(a, t0).unwrap();
        assert_eq!(table.grant(b, secs(t0, 29)), None, "still live");
        let lease = table.grant(b, secs(t0, 30)).unwrap();
        assert_eq!(
            (lease.shard, lease.attempt, lease.replaces),
            (0, 2, Some(a))
        );
        assert_eq!(table.holder(0), Some(b));
        // The former holder's late report is refused; the new holder's is accepted.
        assert_eq!(
            table.complete(0, a),
            Err(LeaseError::NotHolder {
                shard: 0,
                worker: a
            })
        );
        assert_eq!(table.complete(0, b), Ok(Completion::Accepted));
    }

    #[test]
    fn expire_reopens_lapsed_leases_only() {
        let t0 = Instant::now();
        let (a, b) = (WorkerId::new(), WorkerId::new());
        let mut table = LeaseTable::new(3, TTL);
        table.grant(a, t0).unwrap();
        table.grant(b, secs(t0, 10)).unwrap();
        assert!(table.expire(secs(t0, 29)).is_empty());
        assert_eq!(table.expire(secs(t0, 35)), [(0, a)]);
        assert_eq!(table.holder(0), None);
        assert_eq!(table.holder(1), Some(b));
        // The reopened shard goes out before the never-granted one.
        assert_eq!(table.grant(b, secs(t0, 36)).unwrap().shard, 0);
    }

    #[test]
    fn heartbeats_keep_live_leases_alive_but_do_not_revive_lapsed_ones() {
        let t0 = Instant::now();
        let a = WorkerId::new();
        let mut table = LeaseTable::new(1, TTL);
        table.grant(a, t0).unwrap();
        assert_eq!(table.renew(a, secs(t0, 20)), 1);
        assert!(table.expire(secs(t0, 45)).is_empty(), "renewed to 50 s");
        assert_eq!(table.renew(a, secs(t0, 50)), 0, "lapsed at 50 s");
        assert_eq!(table.expire(secs(t0, 50)), [(0, a)]);
        assert_eq!(table.renew(WorkerId::new(), t0), 0);
    }

    #[test]
    fn a_finished_shard_is_never_handed_out_again() {
        let t0 = Instant::now();
        let (a, b) = (WorkerId::new(), WorkerId::new());
        let mut table = LeaseTable::new(1, TTL);
        table.grant(a, t0).unwrap();
        // Its holder's report is accepted even with no deadline checked: nobody else took it.
        assert_eq!(table.complete(0, a), Ok(Completion::Accepted));
        assert_eq!(table.complete(0, b), Ok(Completion::Duplicate));
        assert!(table.is_finished());
        assert_eq!(table.grant(b, secs(t0, 1000)), None);
        assert!(table.expire(secs(t0, 1000)).is_empty());
        assert!(table.release_worker(a).is_empty());
        assert_eq!(table.next_expiry(), None);
    }

    #[test]
    fn shards_found_written_are_done_without_a_lease() {
        let t0 = Instant::now();
        let a = WorkerId::new();
        let mut table = LeaseTable::new(3, TTL);
        table.mark_done(0).unwrap();
        table.mark_done(2).unwrap();
        assert_eq!(table.done(), 2);
        assert_eq!(table.grant(a, t0).unwrap().shard, 1);
        assert_eq!(table.grant(a, t0), None);
        assert_eq!(table.complete(0, a), Ok(Completion::Duplicate));
        assert_eq!(
            table.mark_done(3),
            Err(LeaseError::UnknownShard { shard: 3, len: 3 })
        );
    }

    #[test]
    fn a_lost_worker_releases_its_shards_and_failures_reopen() {
        let t0 = Instant::now();
        let (a, b) = (WorkerId::new(), WorkerId::new());
        let mut table = LeaseTable::new(3, TTL);
        table.grant(a, t0).unwrap();
        table.grant(b, t0).unwrap();
        table.grant(a, t0).unwrap();
        assert_eq!(table.release_worker(a), [0, 2]);
        assert_eq!(
            table.fail(1, a),
            Err(LeaseError::NotHolder {
                shard: 1,
                worker: a
            })
        );
        table.fail(1, b).unwrap();
        let again = table.grant(b, t0).unwrap();
        assert_eq!((again.shard, again.attempt), (0, 2));
        assert_eq!(
            table.complete(7, a),
            Err(LeaseError::UnknownShard { shard: 7, len: 3 })
        );
        assert_eq!(table.done(), 0);
    }

    #[test]
    fn an_empty_table_is_finished() {
        let mut table = LeaseTable::new(0, TTL);
        assert!(table.is_empty() && table.is_finished());
        assert_eq!(table.grant(WorkerId::new(), Instant::now()), None);
    }
}
