//! The gradient collective: data-parallel workers average their flat gradient buffers before
//! every optimizer step (DESIGN §5). The ring schedule is pure ([`schedule`]), the ring driver
//! runs it over any [`Transport`] ([`ring`]), and [`RingCollective`] is the blocking handle the
//! training loop calls.

pub mod blocking;
pub mod error;
pub mod frame;
pub mod grpc;
pub mod memory;
pub mod ring;
pub mod schedule;
pub mod solo;
pub mod tcp;
pub mod transport;

pub use blocking::RingCollective;
pub use error::CollectiveError;
pub use frame::{Frame, FrameHeader, Phase};
pub use grpc::{CollectiveInbox, GrpcOptions, GrpcTransport};
pub use memory::MemoryTransport;
pub use ring::{Ring, RingConfig};
pub use schedule::RingSchedule;
pub use solo::Solo;
pub use tcp::{TcpOptions, TcpTransport};
pub use transport::Transport;

/// An all-reduce over the data-parallel group; the ring implements it today, NCCL can later.
///
/// Every rank of the group must call [`Collective::all_reduce_mean`] the same number of times
/// with buffers of the same length, in the same order.
pub trait Collective: Send {
    /// This worker's rank, `0..world`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world(&self) -> usize;

    /// Replaces `buffer` with the elementwise mean of every rank's `buffer`; on return every
    /// rank holds bitwise identical values. Blocks the calling thread until done.
    fn all_reduce_mean(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError>;
}

#[cfg(test)]
mod tests;
