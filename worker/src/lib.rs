//! spin-worker: the diffusers models in burn, their loaders, schedulers and pipelines, and
//! (later) the training step and task runner of a worker daemon.

pub mod error;
pub mod models;
pub mod nn;
pub mod weights;

pub use error::ModelError;
pub mod collective;
pub mod device;
pub mod pipeline;
pub mod schedulers;
pub mod text;
pub mod toy_model;
pub mod train;
