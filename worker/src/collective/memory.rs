//! An in-process transport: bounded tokio channels between the ranks of one process (tests,
//! benchmarks, single-host runs).

use tokio::sync::mpsc;

use super::error::CollectiveError;
use super::frame::Frame;
use super::transport::Transport;

/// One rank's links in an in-process ring.
#[derive(Debug)]
pub struct MemoryTransport {
    rank: usize,
    world: usize,
    capacity: usize,
    to_right: mpsc::Sender<Frame>,
    from_left: mpsc::Receiver<Frame>,
}

impl MemoryTransport {
    /// The links of all `world` ranks, index = rank; each link buffers `capacity` frames
    /// (at least 2).
    pub fn ring(world: usize, capacity: usize) -> Vec<MemoryTransport> {
        let world = world.max(1);
        let capacity = capacity.max(2);
        // Channel `i` carries frames from rank `i` to rank `i + 1`.
        let (senders, mut receivers): (Vec<_>, Vec<_>) =
            (0..world).map(|_| mpsc::channel(capacity)).unzip();
        receivers.rotate_right(1);
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to_right, from_left))| MemoryTransport {
                rank,
                world,
                capacity,
                to_right,
                from_left,
            })
            .collect()
    }

    fn closed(&self, peer: usize, what: &str) -> CollectiveError {
        CollectiveError::PeerClosed {
            rank: self.rank,
            peer,
            reason: format!("in-process {what} channel closed"),
        }
    }
}

impl Transport for MemoryTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    async fn send(&mut self, frame: Frame) -> Result<(), CollectiveError> {
        let right = (self.rank + 1) % self.world;
        self.to_right
            .send(frame)
            .await
            .map_err(|_| self.closed(right, "send"))
    }

    fn try_send(&mut self, frame: Frame) -> Result<(), CollectiveError> {
        let right = (self.rank + 1) % self.world;
        self.to_right
            .try_send(frame)
            .map_err(|_| self.closed(right, "send"))
    }

    async fn recv(&mut self) -> Result<Frame, CollectiveError> {
        let left = (self.rank + self.world - 1) % self.world;
        match self.from_left.recv().await {
            Some(frame) => Ok(frame),
            None => Err(self.closed(left, "receive")),
        }
    }

    async fn flush(&mut self) -> Result<(), CollectiveError> {
        // Queued frames stay receivable after this rank's sender is dropped.
        Ok(())
    }
}
