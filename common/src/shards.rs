//! Shard planning: a contiguous range of prompts (or pairs) cut into shards of at most N, the
//! unit that encode and sampling tasks are leased by.

use serde::{Deserialize, Serialize};

/// One shard: items `[first, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    /// Position among the shards, from 0.
    pub index: u32,
    /// First item.
    pub first: u64,
    /// One past the last item.
    pub end: u64,
}

impl Shard {
    /// Items in the shard.
    pub fn len(&self) -> u64 {
        self.end - self.first
    }

    /// Whether the shard holds no item (never true of a planned shard).
    pub fn is_empty(&self) -> bool {
        self.end == self.first
    }
}

/// Why a shard plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Shards of zero items.
    #[error("shard size must be at least 1 item")]
    ZeroShardSize,
    /// More shards than a `u32` index names.
    #[error("{count} items in shards of {size} need more than {max} shards", max = u32::MAX)]
    TooManyShards {
        /// Items to cut.
        count: u64,
        /// Items per shard.
        size: u64,
    },
}

/// Cuts items `0..count` into shards of `size` (the last may be shorter), in order.
pub fn plan_shards(count: u64, size: u64) -> Result<Vec<Shard>, PlanError> {
    if size == 0 {
        return Err(PlanError::ZeroShardSize);
    }
    let shards = count.div_ceil(size);
    if shards > u64::from(u32::MAX) {
        return Err(PlanError::TooManyShards { count, size });
    }
    Ok((0..shards)
        .map(|i| Shard {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            first: i * size,
            end: ((i + 1) * size).min(count),
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_item_once_in_order() {
        let shards = plan_shards(10, 4).unwrap();
        assert_eq!(
            shards
                .iter()
                .map(|s| (s.index, s.first, s.end))
                .collect::<Vec<_>>(),
            [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
        );
        assert_eq!(shards.iter().map(Shard::len).sum::<u64>(), 10);
        assert!(shards.iter().all(|s| !s.is_empty()));
    }

    #[test]
    fn exact_multiples_and_empty_inputs() {
        assert_eq!(plan_shards(8, 4).unwrap().len(), 2);
        assert!(plan_shards(0, 4).unwrap().is_empty());
        assert_eq!(
            plan_shards(3, 100).unwrap(),
            [Shard {
                index: 0,
                first: 0,
                end: 3
            }]
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(plan_shards(5, 0), Err(PlanError::ZeroShardSize));
        assert!(matches!(
            plan_shards(u64::MAX, 1),
            Err(PlanError::TooManyShards { .. })
        ));
    }
}
