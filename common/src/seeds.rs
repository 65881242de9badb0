//! Derived seeds: every random choice of a job is a pure function of the job seed and the
//! coordinates of the choice (iteration, prompt, step, ...), so any worker can redo any piece
//! of work identically.

/// splitmix64's finaliser: a well-mixed 64-bit permutation.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The seed for `purpose` at `coords` under the job seed.
pub fn derive(seed: u64, purpose: Purpose, coords: &[u64]) -> u64 {
    let mut h = mix(seed ^ mix(purpose as u64));
    for &c in coords {
        h = mix(h ^ c);
    }
    h
}

/// What a derived seed is for (so two uses never share a stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// Opponent initial noise: (iteration, prompt).
    OpponentNoise = 1,
    /// Which pairs a step takes: (iteration, step).
    BatchOrder = 2,
    /// Timesteps and noise of a micro-batch: (iteration, step, micro, rank).
    StepNoise = 3,
    /// Evaluation noise: (iteration, example).
    Eval = 4,
    /// Random flips: (iteration, step, pair).
    Flip = 5,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ_by_purpose_and_coordinates() {
        let a = derive(1, Purpose::OpponentNoise, &[0, 5]);
        assert_eq!(a, derive(1, Purpose::OpponentNoise, &[0, 5]));
        assert_ne!(a, derive(1, Purpose::OpponentNoise, &[5, 0]));
        assert_ne!(a, derive(1, Purpose::BatchOrder, &[0, 5]));
        assert_ne!(a, derive(2, Purpose::OpponentNoise, &[0, 5]));
    }
}
