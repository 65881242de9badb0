//! Runtime helpers of the gRPC links: the I/O runtime each rank drives its stream on, the
//! runtime serving a localhost ring's inboxes, and error chains for messages.

use tokio::runtime::{Builder, Runtime};

use crate::collective::error::CollectiveError;

/// The runtime serving a localhost ring's inboxes; shut down once its last rank is gone (so a
/// rank that finishes first does not take its inbox away from a neighbour still flushing).
#[derive(Debug)]
pub(super) struct ServerRuntime(pub(super) Option<Runtime>);

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside async code; this does not.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// `error` with its sources (tonic's transport errors say little at the top).
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

pub(super) fn io_runtime(io_threads: usize) -> Result<Runtime, CollectiveError> {
    Ok(Builder::new_multi_thread()
        .worker_threads(io_threads.max(1))
        .thread_name("spin-collective")
        .enable_all()
        .build()?)
}
