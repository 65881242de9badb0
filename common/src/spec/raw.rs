//! The spec as written: the serde `RawJobSpec` family (every field optional except the model
//! and the data, unknown fields denied) and how it is read from a file or a text with
//! overrides layered on top.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    LossFunction, LrShape, NoiseMode, NonFinitePolicy, Objective, Reduction, SpecError, Weighting,
};

/// The spec as written (every field optional except the model and data).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobSpec {
    /// `[job]`.
    #[serde(default)]
    pub job: RawJob,
    /// `[model]`.
    pub model: RawModel,
    /// `[data]`.
    pub data: RawData,
    /// `[sampling]`.
    #[serde(default)]
    pub sampling: RawSampling,
    /// `[training]`.
    #[serde(default)]
    pub training: RawTraining,
    /// `[[iteration]]`, one per self-play iteration.
    #[serde(default)]
    pub iteration: Vec<RawIteration>,
    /// `[eval]`.
    #[serde(default)]
    pub eval: RawEval,
}

/// `[job]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    /// Human name.
    pub name: Option<String>,
    /// Seed of every random choice of the job.
    pub seed: Option<u64>,
    /// Output folder (local runs) or object-store prefix.
    pub output: Option<PathBuf>,
}

/// `[model]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// The base diffusers pipeline folder.
    pub base: PathBuf,
}

/// `[data]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    /// Parquet shards or folders of them.
    pub train: Vec<PathBuf>,
    /// Image side in pixels.
    pub resolution: Option<usize>,
    /// Fraction of prompts held out for evaluation.
    pub held_out_fraction: Option<f64>,
    /// Use at most this many training prompts (0: all).
    pub max_prompts: Option<usize>,
    /// Random horizontal flips.
    pub random_flip: Option<bool>,
}

/// `[sampling]`: how the opponent generates.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSampling {
    /// DDIM steps.
    pub steps: Option<usize>,
    /// Guidance scale.
    pub guidance: Option<f64>,
    /// DDIM eta.
    pub eta: Option<f64>,
    /// Prompts generated per batch.
    pub batch_size: Option<usize>,
    /// Prompts per encode and sampling shard (the unit leased to a worker).
    pub shard_size: Option<usize>,
}

/// `[training]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTraining {
    /// Objective.
    pub objective: Option<Objective>,
    /// Loss function.
    pub loss: Option<LossFunction>,
    /// Timestep weighting.
    pub weighting: Option<Weighting>,
    /// Loser noise.
    pub noise: Option<NoiseMode>,
    /// Error reduction.
    pub reduction: Option<Reduction>,
    /// Pairs per micro-batch.
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step, shared out over the workers (the global batch is
    /// `batch_size * gradient_accumulation` whatever the number of workers).
    pub gradient_accumulation: Option<usize>,
    /// Learning-rate shape.
    pub lr_schedule: Option<LrShape>,
    /// Warm-up steps.
    pub warmup_steps: Option<u64>,
    /// Clip the global gradient norm to this (0: off).
    pub max_grad_norm: Option<f64>,
    /// AdamW beta1.
    pub adam_beta1: Option<f64>,
    /// AdamW beta2.
    pub adam_beta2: Option<f64>,
    /// AdamW eps.
    pub adam_eps: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: Option<f64>,
    /// Non-finite loss policy.
    pub nonfinite: Option<NonFinitePolicy>,
    /// Most steps `skip` may drop.
    pub max_skipped_steps: Option<u64>,
    /// Checkpoint every N optimizer steps (0: only snapshots).
    pub checkpoint_every: Option<u64>,
}

/// One `[[iteration]]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIteration {
    /// Peak learning rate.
    pub lr: f64,
    /// Beta of the loss.
    pub beta: Option<f64>,
    /// Optimizer steps.
    pub steps: u64,
}

/// `[eval]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEval {
    /// Held-out prompts sampled for the image metrics and grid.
    pub samples: Option<usize>,
    /// Timesteps per held-out example for the denoising loss.
    pub loss_timesteps: Option<usize>,
    /// Columns of the sample grid.
    pub grid_columns: Option<usize>,
}

impl RawJobSpec {
    /// Reads `path` (TOML) with `overrides` layered on top: keys such as
    /// `training.batch_size`, as the `SPIN_JOB__TRAINING__BATCH_SIZE` environment variable
    /// gives them; the caller passes the map so tests never touch the process environment.
    pub fn load(path: &Path, overrides: &HashMap<String, String>) -> Result<Self, SpecError> {
        let parse = |message: String| SpecError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| parse(e.to_string()))?;
        Self::parse(&text, path, overrides)
    }

    /// Parses spec `text` (`source` names it in errors) with `overrides` layered on top.
    pub fn parse(
        text: &str,
        source: &Path,
        overrides: &HashMap<String, String>,
    ) -> Result<Self, SpecError> {
        let parse = |message: String| SpecError::Parse {
            path: source.to_path_buf(),
            message,
        };
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml));
        for (key, value) in overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| parse(e.to_string()))?;
        }
        let merged = builder.build().map_err(|e| parse(e.to_string()))?;
        merged
            .try_deserialize::<RawJobSpec>()
            .map_err(|e| parse(e.to_string()))
    }

    /// `SPIN_JOB__A__B=v` entries of `env` as overrides `a.b = v`.
    pub fn overrides_from_env(env: &HashMap<String, String>) -> HashMap<String, String> {
        env.iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("SPIN_JOB__")
                    .map(|rest| (rest.to_lowercase().replace("__", "."), v.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::spec::tests::{write, MINIMAL};
    use crate::spec::JobSpec;
    use std::collections::HashMap;

    #[test]
    fn unknown_field_is_named() {
        let path = write("unknown", &format!("{MINIMAL}[training]\nbatch_sise = 4\n"));
        let err = JobSpec::load(&path, &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("batch_sise") && err.contains("job.toml"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_layer_on_the_file() {
        let env = HashMap::from([(
            "SPIN_JOB__TRAINING__BATCH_SIZE".to_string(),
            "3".to_string(),
        )]);
        let spec = JobSpec::load(&write("env", MINIMAL), &env).unwrap();
        assert_eq!(spec.training.batch_size, 3);
    }
}
