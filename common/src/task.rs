//! The tasks a coordinator hands its workers, as domain types. The coordinator's dispatch makes
//! them and converts each to a `v1::Task` only when it is sent; a worker decodes a `v1::Task`
//! once, at its session's edge, with [`Task::try_from`] (ids parsed, the oneof present, ring
//! and shard bounds checked), and runs the domain task.

use crate::auth::Token;
use crate::ids::JobId;
use crate::proto::{parse_id, v1, ProtoError};
use crate::shards::Shard;

/// One task of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Names the task in its result (`{job}/{label}/{n}`).
    pub id: String,
    /// The job it belongs to.
    pub job: JobId,
    /// What to do.
    pub kind: TaskKind,
}

/// What a task asks of a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// Encode the images and captions of training pairs `[first, end)` of the shard into
    /// cached latents and text states.
    Encode(Shard),
    /// Encode the held-out prompts and evaluate the base model on them; `shard` is the encode
    /// shard's index (the one after the training shards).
    EncodeHeldOut {
        /// Its index among the encode shards.
        shard: u32,
    },
    /// Generate opponent latents with theta_k.
    Sample(SampleTask),
    /// Run optimizer steps as one rank of a ring.
    Train(TrainTask),
    /// Write theta_{k+1} in diffusers layout with a verified manifest and evaluate it.
    Snapshot {
        /// The iteration k whose training just ended.
        iteration: u32,
    },
}

/// Opponent sampling of prompts `shard` in iteration `iteration`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampleTask {
    /// The self-play iteration (its theta_k samples).
    pub iteration: u32,
    /// The prompts `[first, end)`.
    pub shard: Shard,
    /// The job seed; each prompt's seed derives from (seed, iteration, prompt).
    pub seed: u64,
}

/// Optimizer steps `first_step..=last_step` of `iteration` as `rank` of a ring of `world`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainTask {
    /// The self-play iteration.
    pub iteration: u32,
    /// The first step to run.
    pub first_step: u64,
    /// The last step to run (inclusive).
    pub last_step: u64,
    /// This worker's place in the ring, below `world`.
    pub rank: u32,
    /// Ranks in the ring, at least 1.
    pub world: u32,
    /// Every rank's `CollectiveService` address, indexed by rank (`world` of them).
    pub peers: Vec<String>,
    /// Names the ring; it changes whenever the ring is re-formed.
    pub collective_id: String,
    /// The ring's secret (the coordinator's, made for this ring alone): ranks present it to
    /// their right neighbour, whose inbox refuses streams without it.
    pub secret: Token,
}

impl TrainTask {
    /// The address of the rank this one sends to (`rank + 1`, wrapping).
    pub fn right_peer(&self) -> &str {
        &self.peers[(self.rank as usize + 1) % self.peers.len()]
    }
}

fn invalid(field: &'static str, reason: String) -> ProtoError {
    ProtoError::Invalid { field, reason }
}

fn shard(field: &'static str, index: u32, first: u64, end: u64) -> Result<Shard, ProtoError> {
    if first > end {
        return Err(invalid(
            field,
            format!("shard {index} starts at {first}, after its end {end}"),
        ));
    }
    Ok(Shard { index, first, end })
}

impl TryFrom<v1::TrainSteps> for TrainTask {
    type Error = ProtoError;

    fn try_from(t: v1::TrainSteps) -> Result<Self, ProtoError> {
        let peers = t.peer_addresses.len();
        if t.world == 0 || t.rank >= t.world || peers != t.world as usize {
            return Err(invalid(
                "Task.train",
                format!(
                    "rank {} of world {} with {peers} peer addresses",
                    t.rank, t.world
                ),
            ));
        }
        if t.first_step > t.last_step {
            return Err(invalid(
                "Task.train",
                format!("steps {}..={} are empty", t.first_step, t.last_step),
            ));
        }
        Ok(Self {
            iteration: t.iteration,
            first_step: t.first_step,
            last_step: t.last_step,
            rank: t.rank,
            world: t.world,
            peers: t.peer_addresses,
            collective_id: t.collective_id,
            secret: Token::from(t.ring_secret),
        })
    }
}

impl TryFrom<v1::task::Kind> for TaskKind {
    type Error = ProtoError;

    fn try_from(kind: v1::task::Kind) -> Result<Self, ProtoError> {
        use v1::task::Kind;
        Ok(match kind {
            Kind::Encode(e) if e.held_out => TaskKind::EncodeHeldOut { shard: e.shard },
            Kind::Encode(e) => {
                TaskKind::Encode(shard("Task.encode", e.shard, e.first_pair, e.end_pair)?)
            }
            Kind::Sample(s) => TaskKind::Sample(SampleTask {
                iteration: s.iteration,
                shard: shard("Task.sample", s.shard, s.first_prompt, s.end_prompt)?,
                seed: s.seed,
            }),
            Kind::Train(t) => TaskKind::Train(t.try_into()?),
            Kind::Snapshot(s) => TaskKind::Snapshot {
                iteration: s.iteration,
            },
        })
    }
}

impl TryFrom<v1::Task> for Task {
    type Error = ProtoError;

    /// Decodes a task from the wire: the job id parsed, the kind present and in bounds.
    fn try_from(task: v1::Task) -> Result<Self, ProtoError> {
        let job = parse_id("Task.job_id", &task.job_id)?;
        let kind = task
            .kind
            .ok_or(ProtoError::Missing { field: "Task.kind" })?;
        Ok(Self {
            id: task.task_id,
            job,
            kind: kind.try_into()?,
        })
    }
}

impl From<TaskKind> for v1::task::Kind {
    fn from(kind: TaskKind) -> Self {
        use v1::task::Kind;
        match kind {
            TaskKind::Encode(s) => Kind::Encode(v1::EncodeShard {
                shard: s.index,
                first_pair: s.first,
                end_pair: s.end,
                held_out: false,
            }),
            TaskKind::EncodeHeldOut { shard } => Kind::Encode(v1::EncodeShard {
                shard,
                first_pair: 0,
                end_pair: 0,
                held_out: true,
            }),
            TaskKind::Sample(s) => Kind::Sample(v1::SampleShard {
                iteration: s.iteration,
                shard: s.shard.index,
                first_prompt: s.shard.first,
                end_prompt: s.shard.end,
                seed: s.seed,
            }),
            TaskKind::Train(t) => Kind::Train(v1::TrainSteps {
                iteration: t.iteration,
                first_step: t.first_step,
                last_step: t.last_step,
                rank: t.rank,
                world: t.world,
                peer_addresses: t.peers,
                collective_id: t.collective_id,
                ring_secret: t.secret.expose().to_owned(),
            }),
            TaskKind::Snapshot { iteration } => Kind::Snapshot(v1::Snapshot { iteration }),
        }
    }
}

impl From<Task> for v1::Task {
    fn from(task: Task) -> Self {
        v1::Task {
            task_id: task.id,
            job_id: task.job.to_string(),
            kind: Some(task.kind.into()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn train(rank: u32, world: u32, peers: usize) -> TrainTask {
        TrainTask {
            iteration: 1,
            first_step: 3,
            last_step: 9,
            rank,
            world,
            peers: (0..peers).map(|i| format!("w{i}:1")).collect(),
            collective_id: "ring".into(),
            secret: Token::from("ring-secret"),
        }
    }

    fn task(kind: TaskKind) -> Task {
        Task {
            id: "job/train/1".into(),
            job: JobId::new(),
            kind,
        }
    }

    #[test]
    fn every_kind_round_trips_through_the_wire() {
        let shard = Shard {
            index: 2,
            first: 20,
            end: 30,
        };
        let kinds = [
            TaskKind::Encode(shard),
            TaskKind::EncodeHeldOut { shard: 3 },
            TaskKind::Sample(SampleTask {
                iteration: 1,
                shard,
                seed: 42,
            }),
            TaskKind::Train(train(1, 2, 2)),
            TaskKind::Snapshot { iteration: 1 },
        ];
        for kind in kinds {
            let task = task(kind);
            let wire = v1::Task::from(task.clone());
            assert_eq!(wire.job_id, task.job.to_string());
            assert_eq!(Task::try_from(wire).unwrap(), task);
        }
    }

    #[test]
    fn malformed_tasks_are_refused_naming_the_field() {
        let err = |wire: v1::Task| Task::try_from(wire).unwrap_err().to_string();
        let mut wire = v1::Task::from(task(TaskKind::Snapshot { iteration: 0 }));
        wire.kind = None;
        assert!(err(wire.clone()).contains("Task.kind"));
        wire.job_id = "not-a-uuid".into();
        assert!(err(wire).contains("Task.job_id"));
        for (rank, world, peers) in [(2, 2, 2), (0, 0, 0), (0, 2, 1)] {
            let wire = v1::Task::from(task(TaskKind::Train(train(rank, world, peers))));
            let msg = err(wire);
            assert!(
                msg.contains("Task.train")
                    && msg.contains(&format!("rank {rank} of world {world}")),
                "{msg}"
            );
        }
        let mut backwards = train(0, 1, 1);
        backwards.first_step = 10;
        assert!(err(task(TaskKind::Train(backwards)).into()).contains("empty"));
        let inverted = Shard {
            index: 1,
            first: 9,
            end: 3,
        };
        assert!(err(task(TaskKind::Encode(inverted)).into()).contains("Task.encode"));
    }

    #[test]
    fn the_right_peer_wraps_around_the_ring() {
        assert_eq!(train(0, 3, 3).right_peer(), "w1:1");
        assert_eq!(train(2, 3, 3).right_peer(), "w0:1");
        assert_eq!(train(0, 1, 1).right_peer(), "w0:1");
    }
}
