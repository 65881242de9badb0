//! Membership: the registered workers, their last heartbeats, and the ring they form. A worker
//! silent for longer than `lost_after` is lost; the survivors are re-ranked densely in join
//! order and the ring's generation moves on, so chunks of the old ring are never mixed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use spin_common::ids::WorkerId;

/// The compute device a worker brings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    /// Backend name ("flex", "cuda", "wgpu").
    pub backend: String,
    /// Human-readable device name.
    pub name: String,
    /// Device memory in bytes (0 if unknown).
    pub memory_bytes: u64,
}

/// One registered worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its id.
    pub id: WorkerId,
    /// Where its peers dial its `CollectiveService`.
    pub address: String,
    /// Its device.
    pub device: Device,
    /// Registration order (ranks follow it).
    pub joined: u64,
    /// When it was last heard from.
    pub last_heartbeat: Instant,
}

/// A rank of the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingMember {
    /// 0..world, dense.
    pub rank: u32,
    /// The worker at that rank.
    pub worker: WorkerId,
    /// Its collective address.
    pub address: String,
}

/// The ring at one generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    /// Changes whenever a worker joins or leaves.
    pub generation: u64,
    /// Ordered by rank.
    pub members: Vec<RingMember>,
}

impl Ring {
    /// Ranks in the ring.
    pub fn world(&self) -> u32 {
        u32::try_from(self.members.len()).unwrap_or(u32::MAX)
    }

    /// The rank of `worker`, if it is in the ring.
    pub fn rank_of(&self, worker: WorkerId) -> Option<u32> {
        self.members
            .iter()
            .find(|m| m.worker == worker)
            .map(|m| m.rank)
    }

    /// The collective addresses, indexed by rank.
    pub fn addresses(&self) -> Vec<String> {
        self.members.iter().map(|m| m.address.clone()).collect()
    }
}

/// Ranks `members` densely (0..n) in join order: a pure function of who is present.
pub fn form_ring<'a>(members: impl IntoIterator<Item = &'a Member>) -> Vec<RingMember> {
    let mut present: Vec<&Member> = members.into_iter().collect();
    present.sort_by_key(|m| (m.joined, m.id));
    present
        .into_iter()
        .enumerate()
        .map(|(rank, m)| RingMember {
            rank: u32::try_from(rank).unwrap_or(u32::MAX),
            worker: m.id,
            address: m.address.clone(),
        })
        .collect()
}

/// Why a membership operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The id is already registered.
    #[error("worker {0} is already registered")]
    AlreadyRegistered(WorkerId),
    /// The id is not (or no longer) registered.
    #[error("worker {0} is not registered (never joined, or was declared lost)")]
    Unknown(WorkerId),
}

/// The workers the coordinator knows, and when each was last heard from.
#[derive(Clone, Debug)]
pub struct Membership {
    lost_after: Duration,
    members: BTreeMap<WorkerId, Member>,
    next_join: u64,
    generation: u64,
}

impl Membership {
    /// An empty membership where silence longer than `lost_after` loses a worker.
    pub fn new(lost_after: Duration) -> Self {
        Self {
            lost_after,
            members: BTreeMap::new(),
            next_join: 0,
            generation: 0,
        }
    }

    /// Admits `id`, heard from at `now`; the ring moves to a new generation.
    pub fn register(
        &mut self,
        id: WorkerId,
        address: String,
        device: Device,
        now: Instant,
    ) -> Result<(), MembershipError> {
        if self.members.contains_key(&id) {
            return Err(MembershipError::AlreadyRegistered(id));
        }
        self.members.insert(
            id,
            Member {
                id,
                address,
                device,
                joined: self.next_join,
                last_heartbeat: now,
            },
        );
        self.next_join += 1;
        self.generation += 1;
        Ok(())
    }

    /// Records that `id` was heard from at `now`.
    pub fn heartbeat(&mut self, id: WorkerId, now: Instant) -> Result<(), MembershipError> {
        let member = self
            .members
            .get_mut(&id)
            .ok_or(MembershipError::Unknown(id))?;
        member.last_heartbeat = member.last_heartbeat.max(now);
        Ok(())
    }

    /// Removes `id` (its session broke, or it said goodbye); the ring moves on.
    pub fn remove(&mut self, id: WorkerId) -> Result<Member, MembershipError> {
        let member = self
            .members
            .remove(&id)
            .ok_or(MembershipError::Unknown(id))?;
        self.generation += 1;
        Ok(member)
    }

    /// Removes and returns every worker silent for longer than `lost_after` at `now`.
    pub fn sweep(&mut self, now: Instant) -> Vec<Member> {
        let lost: Vec<WorkerId> = self
            .members
            .values()
            .filter(|m| now.saturating_duration_since(m.last_heartbeat) > self.lost_after)
            .map(|m| m.id)
            .collect();
        if !lost.is_empty() {
            self.generation += 1;
        }
        let mut removed: Vec<Member> = lost
            .iter()
            .filter_map(|id| self.members.remove(id))
            .collect();
        removed.sort_by_key(|m| m.joined);
        removed
    }

    /// When the quietest worker will be lost unless heard from.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.members
            .values()
            .map(|m| m.last_heartbeat + self.lost_after)
            .min()
    }

    /// A registered worker.
    pub fn get(&self, id: WorkerId) -> Option<&Member> {
        self.members.get(&id)
    }

    /// Registered workers.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no worker is registered.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The ring's generation: it moves on whenever a worker joins or leaves.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The current ring.
    pub fn ring(&self) -> Ring {
        Ring {
            generation: self.generation,
            members: form_ring(self.members.values()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LOST_AFTER: Duration = Duration::from_secs(10);

    fn at(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    fn join(m: &mut Membership, n: usize, now: Instant) -> Vec<WorkerId> {
        (0..n)
            .map(|i| {
                let id = WorkerId::new();
                m.register(id, format!("10.0.0.{i}:7000"), Device::default(), now)
                    .unwrap();
                id
            })
            .collect()
    }

    #[test]
    fn ranks_follow_join_order_whatever_the_ids() {
        let t0 = Instant::now();
        let mut m = Membership::new(LOST_AFTER);
        let ids = join(&mut m, 3, t0);
        let ring = m.ring();
        assert_eq!(ring.world(), 3);
        assert_eq!(ring.generation, 3);
        for (rank, id) in ids.iter().enumerate() {
            assert_eq!(ring.rank_of(*id), Some(rank as u32));
        }
        assert_eq!(ring.addresses()[2], "10.0.0.2:7000");
        assert_eq!(
            m.register(ids[0], String::new(), Device::default(), t0),
            Err(MembershipError::AlreadyRegistered(ids[0]))
        );
    }

    #[test]
    fn a_silent_worker_is_lost_and_the_ring_reforms_densely() {
        let t0 = Instant::now();
        let mut m = Membership::new(LOST_AFTER);
        let ids = join(&mut m, 3, t0);
        m.heartbeat(ids[0], at(t0, 8)).unwrap();
        m.heartbeat(ids[2], at(t0, 8)).unwrap();
        assert!(
            m.sweep(at(t0, 10)).is_empty(),
            "exactly lost_after is not yet lost"
        );
        let before = m.ring().generation;
        let lost = m.sweep(at(t0, 11));
        assert_eq!(lost.iter().map(|x| x.id).collect::<Vec<_>>(), [ids[1]]);
        let ring = m.ring();
        assert_eq!(ring.generation, before + 1);
        assert_eq!(ring.world(), 2);
        assert_eq!(ring.rank_of(ids[0]), Some(0));
        assert_eq!(ring.rank_of(ids[2]), Some(1));
        assert_eq!(ring.rank_of(ids[1]), None);
        assert_eq!(
            m.heartbeat(ids[1], at(t0, 12)),
            Err(MembershipError::Unknown(ids[1]))
        );
        assert_eq!(m.next_deadline(), Some(at(t0, 18)));
    }

    #[test]
    fn a_quiet_sweep_keeps_the_generation() {
        let t0 = Instant::now();
        let mut m = Membership::new(LOST_AFTER);
        join(&mut m, 2, t0);
        let before = m.ring();
        assert!(m.sweep(at(t0, 5)).is_empty());
        assert_eq!(m.ring(), before);
    }

    #[test]
    fn removal_and_a_late_joiner_rerank() {
        let t0 = Instant::now();
        let mut m = Membership::new(LOST_AFTER);
        let ids = join(&mut m, 2, t0);
        m.remove(ids[0]).unwrap();
        assert!(m.remove(ids[0]).is_err());
        let late = join(&mut m, 1, at(t0, 1))[0];
        let ring = m.ring();
        assert_eq!(ring.rank_of(ids[1]), Some(0));
        assert_eq!(ring.rank_of(late), Some(1));
        assert_eq!(m.len(), 2);
        // An out-of-order heartbeat never moves the clock back.
        m.heartbeat(late, at(t0, 9)).unwrap();
        m.heartbeat(late, at(t0, 3)).unwrap();
        assert_eq!(m.get(late).unwrap().last_heartbeat, at(t0, 9));
    }

    #[test]
    fn form_ring_is_pure_and_dense() {
        let t0 = Instant::now();
        let member = |joined| Member {
            id: WorkerId::new(),
            address: format!("w{joined}"),
            device: Device::default(),
            joined,
            last_heartbeat: t0,
        };
        let members = [member(7), member(2), member(5)];
        let ring = form_ring(&members);
        assert_eq!(
            ring.iter()
                .map(|r| (r.rank, r.address.as_str()))
                .collect::<Vec<_>>(),
            [(0, "w2"), (1, "w5"), (2, "w7")]
        );
        assert_eq!(form_ring(&members), ring);
    }
}
