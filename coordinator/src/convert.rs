//! Conversions between the coordinator's core types and the `spin.v1` wire messages: phases,
//! devices, job statuses, and the training task of a ring member.

use spin_common::auth::Token;
use spin_common::ids::{JobId, WorkerId};
use spin_common::proto::{v1, ProtoError};
use spin_common::task::TrainTask;

use crate::journal::JobRecord;
use crate::membership::{Device, Ring};
use crate::state::JobState;

impl From<JobState> for v1::Phase {
    fn from(state: JobState) -> Self {
        use v1::PhaseKind as K;
        let (kind, iteration) = match state {
            JobState::Pending => (K::Pending, 0),
            JobState::Preparing => (K::Preparing, 0),
            JobState::Sampling(k) => (K::Sampling, k),
            JobState::Training(k) => (K::Training, k),
            JobState::Snapshot(k) => (K::Snapshot, k),
            JobState::Done => (K::Done, 0),
            JobState::Failed => (K::Failed, 0),
            JobState::Cancelled => (K::Cancelled, 0),
        };
        Self {
            kind: kind as i32,
            iteration,
        }
    }
}

impl TryFrom<v1::Phase> for JobState {
    type Error = ProtoError;

    fn try_from(phase: v1::Phase) -> Result<Self, ProtoError> {
        use v1::PhaseKind as K;
        let k = phase.iteration;
        match v1::PhaseKind::try_from(phase.kind) {
            Ok(K::Pending) => Ok(Self::Pending),
            Ok(K::Preparing) => Ok(Self::Preparing),
            Ok(K::Sampling) => Ok(Self::Sampling(k)),
            Ok(K::Training) => Ok(Self::Training(k)),
            Ok(K::Snapshot) => Ok(Self::Snapshot(k)),
            Ok(K::Done) => Ok(Self::Done),
            Ok(K::Failed) => Ok(Self::Failed),
            Ok(K::Cancelled) => Ok(Self::Cancelled),
            Ok(K::Unspecified) | Err(_) => Err(ProtoError::Enum {
                field: "Phase.kind",
                value: phase.kind,
            }),
        }
    }
}

impl From<v1::DeviceInfo> for Device {
    fn from(d: v1::DeviceInfo) -> Self {
        Self {
            backend: d.backend,
            name: d.name,
            memory_bytes: d.memory_bytes,
        }
    }
}

impl From<Device> for v1::DeviceInfo {
    fn from(d: Device) -> Self {
        Self {
            backend: d.backend,
            name: d.name,
            memory_bytes: d.memory_bytes,
        }
    }
}

/// The wire status of a journaled job; `workers` and `last_step` come from live state.
pub fn job_status(
    job: &JobRecord,
    workers: u32,
    last_step: Option<v1::StepMetrics>,
) -> v1::JobStatus {
    v1::JobStatus {
        job_id: job.id.to_string(),
        name: job.name.clone(),
        phase: Some(job.state.into()),
        submitted_at_ms: job.submitted_at_ms,
        updated_at_ms: job.updated_at_ms,
        iterations: job.shape.iterations,
        workers,
        last_step,
        error: job.error.clone().unwrap_or_default(),
    }
}

/// The name of the `attempt`-th ring run `run` of `job` formed, in iteration `iteration` at
/// membership generation `generation`: every ring formed gets a new name, so chunks of an
/// older ring are never mixed in. `run` tells apart the runs of one job (a coordinator
/// restart or a resume starts a new one, whose counts start again), so a worker that took
/// part in an earlier run's ring never sees its id again.
pub fn collective_id(
    job: JobId,
    run: u32,
    iteration: u32,
    generation: u64,
    attempt: u64,
) -> String {
    format!("{job}/run-{run:08x}/iteration-{iteration}/ring-{generation}-{attempt}")
}

/// The training task of `worker` in `ring` (named `collective_id`) for steps
/// `first..=last` of `iteration`; `None` if the worker is not in the ring.
pub fn train_task(
    ring: &Ring,
    collective_id: &str,
    secret: &Token,
    worker: WorkerId,
    iteration: u32,
    first_step: u64,
    last_step: u64,
) -> Option<TrainTask> {
    Some(TrainTask {
        iteration,
        first_step,
        last_step,
        rank: ring.rank_of(worker)?,
        world: ring.world(),
        peers: ring.addresses(),
        collective_id: collective_id.to_string(),
        secret: secret.clone(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use spin_common::task::{SampleTask, TaskKind};
    use v1::task::Kind;

    use super::*;
    use crate::membership::Membership;
    use crate::shards::Shard;
    use crate::state::JobShape;

    #[test]
    fn every_state_round_trips_through_the_wire_phase() {
        let states = [
            JobState::Pending,
            JobState::Preparing,
            JobState::Sampling(2),
            JobState::Training(3),
            JobState::Snapshot(4),
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ];
        for s in states {
            assert_eq!(JobState::try_from(v1::Phase::from(s)).unwrap(), s);
        }
        let bad = v1::Phase {
            kind: 0,
            iteration: 0,
        };
        assert!(JobState::try_from(bad)
            .unwrap_err()
            .to_string()
            .contains("Phase.kind"));
    }

    #[test]
    fn train_tasks_carry_dense_ranks_and_the_ring_generation() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_secs(10));
        let ids: Vec<WorkerId> = (0..3).map(|_| WorkerId::new()).collect();
        for (i, id) in ids.iter().enumerate() {
            m.register(*id, format!("w{i}:1"), Device::default(), t0)
                .unwrap();
        }
        m.remove(ids[0]).unwrap();
        let ring = m.ring();
        let job = JobId::new();
        let id = collective_id(job, 0xab, 1, ring.generation, 7);
        assert_eq!(id, format!("{job}/run-000000ab/iteration-1/ring-4-7"));
        assert_ne!(id, collective_id(job, 0xab, 1, ring.generation, 8));
        assert_ne!(id, collective_id(job, 0xac, 1, ring.generation, 7));
        let secret = Token::random();
        let task = train_task(&ring, &id, &secret, ids[2], 1, 0, 99).unwrap();
        assert_eq!(task.secret, secret);
        assert_ne!(
            Token::random(),
            secret,
            "each ring gets a secret of its own"
        );
        assert_eq!((task.rank, task.world), (1, 2));
        assert_eq!(task.peers, ["w1:1", "w2:1"]);
        assert_eq!(task.collective_id, id);
        assert!(train_task(&ring, &id, &secret, ids[0], 1, 0, 99).is_none());
    }

    #[test]
    fn statuses_and_tasks_copy_their_fields() {
        let shape = JobShape {
            iterations: 2,
            self_play: true,
        };
        let mut job = JobRecord::pending(JobId::new(), "toy".into(), String::new(), shape, 5);
        job.state = JobState::Failed;
        job.error = Some("rank 1 lost".into());
        let status = job_status(&job, 2, None);
        assert_eq!(status.phase.unwrap().kind, v1::PhaseKind::Failed as i32);
        assert_eq!((status.iterations, status.workers), (2, 2));
        assert_eq!(status.error, "rank 1 lost");
        let shard = Shard {
            index: 3,
            first: 30,
            end: 40,
        };
        let sample = SampleTask {
            iteration: 1,
            shard,
            seed: 42,
        };
        let Kind::Sample(task) = TaskKind::Sample(sample).into() else {
            panic!("a sample task went on the wire as another kind");
        };
        assert_eq!(
            (task.shard, task.first_prompt, task.end_prompt, task.seed),
            (3, 30, 40, 42)
        );
        let Kind::Encode(encode) = TaskKind::Encode(shard).into() else {
            panic!("an encode task went on the wire as another kind");
        };
        assert_eq!(encode.end_pair, 40);
    }
}
