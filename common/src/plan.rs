//! Which examples each rank trains on: a pure function of (seed, iteration, step, micro-batch,
//! rank, world size), so gradient shards need no per-step round trip and the global batch is
//! the same whatever the world size.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::seeds::{derive, Purpose};

/// How one optimizer step is cut up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    /// Replicas.
    pub world: usize,
    /// Pairs per replica per micro-batch.
    pub batch: usize,
    /// Micro-batches per step.
    pub accumulation: usize,
}

impl StepShape {
    /// Pairs per optimizer step, over all replicas.
    pub fn global_batch(&self) -> usize {
        self.world * self.batch * self.accumulation
    }
}

/// The permutation of `0..count` used in `epoch` of `iteration`.
fn epoch_order(seed: u64, iteration: u64, epoch: u64, count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, Purpose::BatchOrder, &[iteration, epoch]));
    order.shuffle(&mut rng);
    order
}

/// The example indices (into `0..count`) that `rank` takes in micro-batch `micro` of `step`:
/// positions of an endless stream of per-epoch permutations. The union over ranks and
/// micro-batches of a step is the same global batch for any `world` that divides it.
pub fn step_examples(
    seed: u64,
    iteration: u64,
    step: u64,
    micro: usize,
    rank: usize,
    shape: StepShape,
    count: usize,
) -> Vec<usize> {
    if count == 0 {
        return Vec::new();
    }
    let global = shape.global_batch() as u64;
    // Slot within the step: micro-batches outermost, so a rank's micro-batches are contiguous
    // runs of the same global order whatever the world size.
    let first = step * global + ((micro * shape.world + rank) * shape.batch) as u64;
    let mut cached: Option<(u64, Vec<usize>)> = None;
    (0..shape.batch as u64)
        .map(|i| {
            let position = first + i;
            let epoch = position / count as u64;
            let within = (position % count as u64) as usize;
            if cached.as_ref().map(|(e, _)| *e) != Some(epoch) {
                cached = Some((epoch, epoch_order(seed, iteration, epoch, count)));
            }
            cached.as_ref().map_or(0, |(_, order)| order[within])
        })
        .collect()
}

/// All examples of a step, in global order (every rank's micro-batches together).
pub fn global_step_examples(
    seed: u64,
    iteration: u64,
    step: u64,
    shape: StepShape,
    count: usize,
) -> Vec<usize> {
    let mut all = Vec::with_capacity(shape.global_batch());
    for micro in 0..shape.accumulation {
        for rank in 0..shape.world {
            all.extend(step_examples(
                seed, iteration, step, micro, rank, shape, count,
            ));
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_batch_does_not_depend_on_world_size() {
        let one = StepShape {
            world: 1,
            batch: 8,
            accumulation: 2,
        };
        let two = StepShape {
            world: 2,
            batch: 4,
            accumulation: 2,
        };
        for step in 0..5 {
            let mut a = global_step_examples(7, 1, step, one, 37);
            let mut b = global_step_examples(7, 1, step, two, 37);
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "step {step}");
        }
    }

    #[test]
    fn an_epoch_visits_every_example_once() {
        let shape = StepShape {
            world: 1,
            batch: 5,
            accumulation: 1,
        };
        let mut seen: Vec<usize> = (0..4)
            .flat_map(|s| step_examples(3, 0, s, 0, 0, shape, 20))
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
    }
}
