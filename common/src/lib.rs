//! Shared types for spin-diffusion: no burn here.
//!
//! [`dataset`] reads Pick-a-Pic parquet shards into preference pairs and preprocesses their
//! images; [`toy`] writes the synthetic dataset in the same schema; [`spec`] is the job spec.
//! [`auth`] (bearer tokens) and [`tls`] (certificates) secure the gRPC ports.

pub mod auth;
pub mod checkpoint;
pub mod dataset;
pub mod ids;
pub mod manifest;
pub mod metrics;
pub mod plan;
pub mod process;
pub mod proto;
pub mod seeds;
pub mod shards;
pub mod spec;
pub mod store;
pub mod task;
#[cfg(feature = "test-pki")]
pub mod test_pki;
pub mod tls;
pub mod toy;
