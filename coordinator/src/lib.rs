//! The spin-diffusion coordinator: drives jobs through their phases over a cluster of workers.
//!
//! The core is pure and tested without a network: [`state`] is the job state machine,
//! [`shards`] cuts prompts into shards, [`lease`] hands shards out with expiring leases,
//! [`membership`] tracks workers and forms the ring, [`journal`] makes jobs survive a restart,
//! and [`convert`] maps the core's types to the `spin.v1` wire messages. The tonic services
//! are thin adapters over these.

pub mod convert;
pub mod journal;
pub mod lease;
pub mod membership;
pub mod shards;
pub mod state;
