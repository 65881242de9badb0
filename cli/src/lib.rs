//! The spin-diffusion command line as a library: `spinctl` is a thin binary over these
//! modules (the daemons' binaries live in their own crates, `spin-coordinator` and
//! `spin-worker`).

pub mod client;
pub mod cluster;
pub mod connect;
pub mod demo;
pub mod logs;
pub mod sample;
pub mod train;

pub use spin_common::process::{init_tracing, shutdown_signal};
