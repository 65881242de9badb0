//! Prompt numbering: a deterministic split into train and held-out prompts.
//!
//! Prompts are numbered by their position in the dataset (shards in name order, rows in file
//! order, ties and skipped rows removed), so numbering is stable across runs. Whether prompt
//! `i` is held out depends only on a hash of `(seed, i)`, never on the process, the platform
//! or the Rust version, so every process agrees on the split without exchanging it.

use super::DatasetError;

/// Prompt indices split into a training set and a held-out set, each in increasing order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptSplit {
    /// Indices of the prompts to train on.
    pub train: Vec<usize>,
    /// Indices of the prompts kept for evaluation.
    pub held_out: Vec<usize>,
}

/// The splitmix64 finaliser: a fixed, well-mixed 64-bit hash.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in `[0, 1)` determined by `(seed, index)`.
fn unit_hash(seed: u64, index: u64) -> f64 {
    let h = splitmix64(splitmix64(seed) ^ index);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether prompt `index` is held out under `seed` with the given held-out fraction.
pub fn is_held_out(seed: u64, index: usize, held_out_fraction: f64) -> bool {
    unit_hash(seed, index as u64) < held_out_fraction
}

/// Split prompts `0..count` into train and held out; `held_out_fraction` must be in `[0, 1]`.
pub fn split_prompts(
    count: usize,
    seed: u64,
    held_out_fraction: f64,
) -> Result<PromptSplit, DatasetError> {
    if !(0.0..=1.0).contains(&held_out_fraction) {
        return Err(DatasetError::InvalidArgument(format!(
            "held-out fraction {held_out_fraction} is outside [0, 1]"
        )));
    }
    let (held_out, train) = (0..count).partition(|&i| is_held_out(seed, i, held_out_fraction));
    Ok(PromptSplit { train, held_out })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic on failure
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_close_to_the_fraction() {
        let a = split_prompts(10_000, 7, 0.1).unwrap();
        let b = split_prompts(10_000, 7, 0.1).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.train.len() + a.held_out.len(), 10_000);
        let n = a.held_out.len();
        assert!((850..=1150).contains(&n), "{n} held out of 10000 at 0.1");
        assert!(a.held_out.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn seed_changes_the_split_and_prefixes_agree() {
        let a = split_prompts(1000, 1, 0.2).unwrap();
        let b = split_prompts(1000, 2, 0.2).unwrap();
        assert_ne!(a.held_out, b.held_out);
        // Adding prompts never moves an existing one across the split.
        let longer = split_prompts(2000, 1, 0.2).unwrap();
        let prefix: Vec<usize> = longer.held_out.into_iter().filter(|&i| i < 1000).collect();
        assert_eq!(prefix, a.held_out);
    }

    #[test]
    fn edge_fractions() {
        assert!(split_prompts(100, 3, 0.0).unwrap().held_out.is_empty());
        assert!(split_prompts(100, 3, 1.0).unwrap().train.is_empty());
        assert!(split_prompts(100, 3, 1.5).is_err());
        assert!(split_prompts(100, 3, f64::NAN).is_err());
    }
}
