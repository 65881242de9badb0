//! The link a ring rank needs: frames to its right neighbour, frames from its left one. The
//! in-process and TCP transports live beside this; a gRPC `CollectiveService` stream pair can
//! implement the same trait.

use std::future::Future;

use super::error::CollectiveError;
use super::frame::Frame;

/// A rank's two ring links. Frames from the left arrive in the order the left neighbour sent
/// them.
///
/// Flow control contract: a link must hold at least [`Transport::capacity`] frames that were
/// sent but not yet received before `send` waits. The ring keeps fewer than that many frames
/// per chunk in flight, which is what makes it deadlock-free.
pub trait Transport: Send {
    /// This rank.
    fn rank(&self) -> usize;

    /// The number of ranks in the ring.
    fn world(&self) -> usize;

    /// Frames a link buffers before `send` waits (at least 2).
    fn capacity(&self) -> usize;

    /// Queues `frame` for the right neighbour, waiting while the link is full. Callers put it
    /// under a timeout.
    fn send(&mut self, frame: Frame) -> impl Future<Output = Result<(), CollectiveError>> + Send;

    /// Queues `frame` if the link has room now; best effort (used for aborts).
    fn try_send(&mut self, frame: Frame) -> Result<(), CollectiveError>;

    /// The next frame from the left neighbour. Callers put it under a timeout.
    fn recv(&mut self) -> impl Future<Output = Result<Frame, CollectiveError>> + Send;

    /// Waits until every frame sent so far has left this process (or sits where the right
    /// neighbour will still receive it if this rank exits). Callers put it under a timeout.
    fn flush(&mut self) -> impl Future<Output = Result<(), CollectiveError>> + Send;
}
