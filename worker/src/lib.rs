//! spin-worker: the diffusers models in burn, their loaders, schedulers and pipelines, the
//! training step and objectives, the gradient collective, the task runner and the worker
//! daemon that runs tasks for the coordinator.

pub mod collective;
pub mod daemon;

pub mod device;
pub mod error;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod schedulers;
pub mod tasks;
pub mod text;
pub mod toy_model;
pub mod train;
pub mod weights;

pub use error::ModelError;
