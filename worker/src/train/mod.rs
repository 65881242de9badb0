//! Training machinery: named gradients, AdamW, learning-rate schedules.

pub mod grads;
pub mod objectives;
pub mod optim;

pub use grads::ParamGrads;
pub use optim::{AdamW, AdamWConfig, LrSchedule};
