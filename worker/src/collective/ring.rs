//! The ring all-reduce driver: carries out [`RingSchedule`] over a [`Transport`], every
//! receive and send under the configured timeout. When a round stalls, the ranks pass abort
//! frames around the ring for a short grace period so each can name the rank that did not send.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::{timeout, timeout_at, Instant};

use super::error::CollectiveError;
use super::frame::{Frame, FrameHeader, Phase};
use super::schedule::{RingSchedule, Step};
use super::transport::Transport;

/// Tuning of the ring all-reduce.
#[derive(Clone, Debug, PartialEq)]
pub struct RingConfig {
    /// Bytes of f32 values per bucket (DESIGN §5: 25 MiB).
    pub bucket_bytes: usize,
    /// Bytes per pipelined piece of a chunk (fewer pieces when the link holds fewer frames).
    pub piece_bytes: usize,
    /// How long any single receive or send may wait.
    pub timeout: Duration,
    /// After a timeout, how long a rank keeps collecting abort frames to find the silent rank.
    pub abort_grace: Duration,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            bucket_bytes: 25 << 20,
            piece_bytes: 1 << 20,
            timeout: Duration::from_secs(120),
            abort_grace: Duration::from_secs(2),
        }
    }
}

impl RingConfig {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), CollectiveError> {
        let f32_bytes = std::mem::size_of::<f32>();
        if self.bucket_bytes < f32_bytes || self.piece_bytes < f32_bytes {
            return Err(CollectiveError::Config(format!(
                "bucket_bytes ({}) and piece_bytes ({}) must hold at least one f32",
                self.bucket_bytes, self.piece_bytes
            )));
        }
        if self.timeout.is_zero() {
            return Err(CollectiveError::Config("timeout must be positive".into()));
        }
        Ok(())
    }
}

/// One rank's ring all-reduce over transport `T` (async; see
/// [`super::RingCollective`] for the blocking handle).
#[derive(Debug)]
pub struct Ring<T> {
    transport: T,
    config: RingConfig,
    round: u64,
    broken: bool,
}

impl<T: Transport> Ring<T> {
    /// A ring rank over `transport`.
    pub fn new(transport: T, config: RingConfig) -> Result<Self, CollectiveError> {
        config.validate()?;
        Ok(Self {
            transport,
            config,
            round: 0,
            broken: false,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.transport.world()
    }

    /// Replaces `buffer` with the elementwise mean over all ranks (bitwise identical on every
    /// rank). After an error the ring is broken and every later call fails fast.
    #[tracing::instrument(level = "debug", skip_all, fields(rank = self.rank(), round = self.round, len = buffer.len()))]
    pub async fn all_reduce_mean(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        if self.broken {
            return Err(CollectiveError::Broken { rank: self.rank() });
        }
        let round = self.round;
        self.round += 1;
        let result = self.run(round, buffer).await;
        if let Err(error) = &result {
            tracing::warn!(%error, "all-reduce failed");
            self.broken = true;
        }
        result
    }

    async fn run(&mut self, round: u64, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        let (rank, world) = (self.rank(), self.world());
        let f32_bytes = std::mem::size_of::<f32>();
        let schedule = RingSchedule::new(
            buffer.len(),
            world,
            self.config.bucket_bytes / f32_bytes,
            self.config.piece_bytes / f32_bytes,
            self.transport.capacity().saturating_sub(1),
        );
        if schedule.is_noop() {
            return Ok(());
        }
        let steps = schedule.steps(rank);
        let last_reduce_step = world - 2;
        let world_f32 = world as f32;
        for (bucket_index, bucket) in schedule.buckets().enumerate() {
            let pieces = schedule.pieces_per_chunk(&bucket);
            let header = |step: &Step, chunk: usize, piece: usize| FrameHeader {
                round,
                bucket: bucket_index as u32,
                phase: step.phase,
                step: step.step as u32,
                chunk: chunk as u32,
                piece: piece as u32,
            };
            let first = &steps[0];
            for piece in 0..pieces {
                let range = schedule.piece_range(&bucket, first.send_chunk, piece);
                let frame = Frame::Data {
                    header: header(first, first.send_chunk, piece),
                    payload: buffer[range].to_vec(),
                };
                self.send(round, frame).await?;
            }
            for (i, step) in steps.iter().enumerate() {
                for piece in 0..pieces {
                    let range = schedule.piece_range(&bucket, step.recv_chunk, piece);
                    let expected = header(step, step.recv_chunk, piece);
                    let payload = self.recv(round, expected, range.len()).await?;
                    let values = &mut buffer[range];
                    match step.phase {
                        Phase::ReduceScatter => {
                            for (mine, theirs) in values.iter_mut().zip(&payload) {
                                *mine += *theirs;
                            }
                            if step.step == last_reduce_step {
                                for value in values.iter_mut() {
                                    *value /= world_f32;
                                }
                            }
                        }
                        Phase::AllGather => values.copy_from_slice(&payload),
                    }
                    if let Some(next) = steps.get(i + 1) {
                        let frame = Frame::Data {
                            header: header(next, next.send_chunk, piece),
                            payload: values.to_vec(),
                        };
                        self.send(round, frame).await?;
                    }
                }
            }
        }
        let flushed = timeout(self.config.timeout, self.transport.flush()).await;
        flushed.unwrap_or_else(|_| {
            Err(CollectiveError::PeerClosed {
                rank,
                peer: (rank + 1) % world,
                reason: format!("last frames not written within {:?}", self.config.timeout),
            })
        })
    }

    async fn send(&mut self, round: u64, frame: Frame) -> Result<(), CollectiveError> {
        let what = frame.describe();
        match timeout(self.config.timeout, self.transport.send(frame)).await {
            Ok(result) => result,
            Err(_) => {
                // The right neighbour stopped receiving; the abort round finds out who is silent.
                let right = (self.rank() + 1) % self.world();
                let waiting_for = format!("rank {right} to receive {what}");
                Err(self.abort(round, Vec::new(), waiting_for).await)
            }
        }
    }

    async fn recv(
        &mut self,
        round: u64,
        expected: FrameHeader,
        len: usize,
    ) -> Result<Vec<f32>, CollectiveError> {
        let left = (self.rank() + self.world() - 1) % self.world();
        let waiting_for = || format!("{expected} from rank {left}");
        match timeout(self.config.timeout, self.transport.recv()).await {
            Err(_) => Err(self.abort(round, Vec::new(), waiting_for()).await),
            Ok(Err(error)) => Err(error),
            Ok(Ok(Frame::Data { header, payload }))
                if header == expected && payload.len() == len =>
            {
                Ok(payload)
            }
            Ok(Ok(Frame::Abort { round: r, alive })) if r == round => {
                Err(self.abort(round, alive, waiting_for()).await)
            }
            Ok(Ok(other)) => Err(CollectiveError::Protocol {
                rank: self.rank(),
                peer: left,
                expected: format!("{expected} ({len} values)"),
                got: other.describe(),
            }),
        }
    }

    /// Gives up on `round`: tells the right neighbour this rank is alive, collects and passes on
    /// the left's abort frames for the grace period, then names the first rank to the left that
    /// never reported in (the one that did not send).
    async fn abort(&mut self, round: u64, alive: Vec<u32>, waiting_for: String) -> CollectiveError {
        let (rank, world) = (self.rank(), self.world());
        let mut known: BTreeSet<usize> = alive.into_iter().map(|r| r as usize).collect();
        known.insert(rank);
        let as_frame = |known: &BTreeSet<usize>| Frame::Abort {
            round,
            alive: known.iter().map(|&r| r as u32).collect(),
        };
        // Best effort: a full or closed link just means the right neighbour learns less.
        let _ = self.transport.try_send(as_frame(&known));
        let deadline = Instant::now() + self.config.abort_grace;
        while let Ok(Ok(frame)) = timeout_at(deadline, self.transport.recv()).await {
            // Stale data frames of the failed round are dropped.
            let Frame::Abort { round: r, alive } = frame else {
                continue;
            };
            let before = known.len();
            if r == round {
                known.extend(alive.iter().map(|&q| q as usize).filter(|&q| q < world));
            }
            if known.len() > before {
                let _ = self.transport.try_send(as_frame(&known));
            }
        }
        let silent = (1..world)
            .map(|k| (rank + world - k) % world)
            .find(|r| !known.contains(r))
            .into_iter()
            .collect();
        CollectiveError::Timeout {
            rank,
            round,
            timeout: self.config.timeout,
            waiting_for,
            silent,
        }
    }
}
