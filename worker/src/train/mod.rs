//! Training: named gradients, AdamW and learning-rate schedules, the objectives, data
//! preparation and the in-process self-play loop.

pub mod data;
pub mod grads;
pub mod objectives;
pub mod optim;
pub mod self_play;

use std::path::{Path, PathBuf};

pub use grads::ParamGrads;
pub use optim::{AdamW, AdamWConfig, LrSchedule};

/// Why a training run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A model component failed to load or save.
    #[error(transparent)]
    Model(#[from] crate::error::ModelError),
    /// The dataset could not be read.
    #[error(transparent)]
    Dataset(#[from] spin_common::dataset::DatasetError),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The gradient all-reduce failed (a peer is gone or stalled).
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
    /// The job's inputs are unusable.
    #[error("{0}")]
    Input(String),
    /// A non-finite loss or gradient under policy `fail` (or past the skip limit).
    #[error("iteration {iteration} step {step}: {reason}; stopping (training.nonfinite = \"fail\" or skip limit reached)")]
    NonFinite {
        /// Iteration.
        iteration: usize,
        /// Step.
        step: u64,
        /// What was not finite.
        reason: String,
    },
}

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
