//! Shard planning lives in `spin_common::shards` (workers and the local loop cut the same
//! shards); re-exported here for the coordinator's modules.

pub use spin_common::shards::{plan_shards, PlanError, Shard};
