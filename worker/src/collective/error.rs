//! The collective's one error type.

use std::time::Duration;

/// What went wrong in an all-reduce or while forming the ring.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A receive or send did not complete in time; `silent` names the ranks found not to have sent
    /// (empty when every rank reported itself stalled, e.g. a timeout set too short).
    #[error(
        "rank {rank}: all-reduce round {round} timed out after {timeout:?} waiting for {waiting_for}; \
         ranks that did not send: {silent:?}"
    )]
    Timeout {
        /// The rank reporting the timeout.
        rank: usize,
        /// The all-reduce call (counted from 0 per collective) that failed.
        round: u64,
        /// The configured per-receive timeout.
        timeout: Duration,
        /// The frame this rank was waiting for.
        waiting_for: String,
        /// The ranks that did not send.
        silent: Vec<usize>,
    },
    /// The coordinator aborted the ring (it lost a member): stop waiting for it.
    #[error("rank {rank}: the coordinator aborted the ring: {reason}")]
    Aborted {
        /// This rank.
        rank: usize,
        /// The coordinator's reason (a member of the ring was lost).
        reason: String,
    },
    /// A neighbour's link closed (the peer exited or its connection broke).
    #[error("rank {rank}: link with rank {peer} closed: {reason}")]
    PeerClosed {
        /// The rank reporting it.
        rank: usize,
        /// The neighbour whose link closed.
        peer: usize,
        /// What the transport saw.
        reason: String,
    },
    /// A frame arrived that the schedule did not expect (ranks out of step or a corrupt link).
    #[error("rank {rank}: unexpected frame from rank {peer}: expected {expected}, got {got}")]
    Protocol {
        /// The rank reporting it.
        rank: usize,
        /// The sender.
        peer: usize,
        /// The frame the schedule expected.
        expected: String,
        /// What arrived.
        got: String,
    },
    /// An earlier all-reduce failed; the ring must be re-formed before the next step.
    #[error("rank {rank}: collective is broken by an earlier failure; re-form the ring")]
    Broken {
        /// The rank reporting it.
        rank: usize,
    },
    /// Invalid ranks, world size or configuration.
    #[error("invalid collective configuration: {0}")]
    Config(String),
    /// Forming the ring failed (bind, connect, accept or handshake).
    #[error("rank {rank}: ring setup failed: {reason}")]
    Setup {
        /// The rank reporting it.
        rank: usize,
        /// What went wrong and with whom.
        reason: String,
    },
    /// An I/O error outside a frame exchange (e.g. building the runtime).
    #[error("collective i/o: {0}")]
    Io(#[from] std::io::Error),
}
