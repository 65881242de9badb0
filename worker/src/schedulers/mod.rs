//! Noise schedules: the training forward process and the DDIM sampler, both sized from a
//! diffusers `scheduler/scheduler_config.json`.

pub mod ddim;
pub mod noise_schedule;

pub use ddim::DdimScheduler;
pub use noise_schedule::{NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
