//! The job spec: TOML read with unknown fields denied (layered with the `config` crate: file,
//! then `SPIN_JOB__SECTION__FIELD` overrides passed in as a map), then validated into
//! [`JobSpec`], a separate type that the trainer trusts. Every paper hyperparameter
//! (DESIGN.md §1) is a setting, per self-play iteration where the paper varies it.
//!
//! `raw` holds the spec as written ([`RawJobSpec`]) and how it is read and overridden;
//! `validate` fills the defaults and checks every range. This module holds the choices both
//! share, the validated [`JobSpec`] types, the errors and the reading of a submitted spec.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod raw;
mod validate;

pub use raw::{
    RawData, RawEval, RawIteration, RawJob, RawJobSpec, RawModel, RawSampling, RawTraining,
};

/// Which objective trains the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Approximate SPIN (paper eq. 4.9 / C.5 final form).
    #[default]
    Spin,
    /// C.5 first form: loser term at the opponent's stored DDIM state.
    SpinTrajectory,
    /// Eq. 4.8: the whole trajectory inside the loss, O(1) memory.
    SpinExact,
    /// Diffusion-DPO against the real loser.
    Dpo,
    /// Plain denoising loss on winners.
    Sft,
}

impl Objective {
    /// Whether the objective needs opponent samples from theta_k.
    pub fn self_play(self) -> bool {
        matches!(self, Self::Spin | Self::SpinTrajectory | Self::SpinExact)
    }

    /// Whether the objective needs the opponent's stored trajectory.
    pub fn needs_trajectory(self) -> bool {
        matches!(self, Self::SpinTrajectory | Self::SpinExact)
    }
}

/// The loss function `l`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossFunction {
    /// `log(1 + exp(-z))`.
    #[default]
    Logistic,
    /// `max(0, 1 - z)`.
    Hinge,
    /// `1 - z`.
    Correlation,
}

/// Timestep weighting `w_t`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// 1.
    #[default]
    None,
    /// `h_t^2`.
    H2,
}

/// Loser-side noise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseMode {
    /// Independent of the winner's.
    #[default]
    Independent,
    /// The winner's.
    Shared,
}

/// Reduction of squared errors over an example.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// Mean.
    #[default]
    Mean,
    /// Sum.
    Sum,
}

/// Learning-rate shape within an iteration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrShape {
    /// Warm-up then linear decay to 0.
    #[default]
    Linear,
    /// Warm-up then constant.
    Constant,
}

/// What a non-finite loss or gradient does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop the job.
    #[default]
    Fail,
    /// Drop the step (up to `max_skipped_steps`).
    Skip,
}

/// A validated job: every value present and in range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Human name.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// Output folder.
    pub output: PathBuf,
    /// Base pipeline folder.
    pub base_model: PathBuf,
    /// Parquet shards or folders.
    pub train_data: Vec<PathBuf>,
    /// Image side.
    pub resolution: usize,
    /// Held-out fraction.
    pub held_out_fraction: f64,
    /// Prompt cap (0: all).
    pub max_prompts: usize,
    /// Random flips.
    pub random_flip: bool,
    /// Opponent sampling.
    pub sampling: SamplingSpec,
    /// Training.
    pub training: TrainingSpec,
    /// Self-play iterations.
    pub iterations: Vec<IterationSpec>,
    /// Evaluation.
    pub eval: EvalSpec,
}

/// Validated `[sampling]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingSpec {
    /// DDIM steps.
    pub steps: usize,
    /// Guidance.
    pub guidance: f64,
    /// Eta.
    pub eta: f64,
    /// Prompts per sampling batch.
    pub batch_size: usize,
    /// Prompts per encode and sampling shard.
    pub shard_size: usize,
}

/// Validated `[training]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingSpec {
    /// Objective.
    pub objective: Objective,
    /// Loss function.
    pub loss: LossFunction,
    /// Weighting.
    pub weighting: Weighting,
    /// Loser noise.
    pub noise: NoiseMode,
    /// Reduction.
    pub reduction: Reduction,
    /// Pairs per micro-batch per worker.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub gradient_accumulation: usize,
    /// LR shape.
    pub lr_schedule: LrShape,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Gradient clipping (0: off).
    pub max_grad_norm: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW eps.
    pub adam_eps: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Non-finite policy.
    pub nonfinite: NonFinitePolicy,
    /// Most skipped steps.
    pub max_skipped_steps: u64,
    /// Checkpoint interval (0: off).
    pub checkpoint_every: u64,
}

/// Validated `[[iteration]]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct IterationSpec {
    /// Peak learning rate.
    pub lr: f64,
    /// Beta.
    pub beta: f64,
    /// Optimizer steps.
    pub steps: u64,
}

/// Validated `[eval]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSpec {
    /// Held-out prompts sampled per evaluation.
    pub samples: usize,
    /// Timesteps per held-out example.
    pub loss_timesteps: usize,
    /// Grid columns.
    pub grid_columns: usize,
}

/// Why a spec was refused; each names the field (`section.field`) or the file.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read or parsed (unknown fields included).
    #[error("job spec {path}: {message}")]
    Parse {
        /// The spec file.
        path: PathBuf,
        /// The parser's message (names the unknown field).
        message: String,
    },
    /// A value is out of range.
    #[error("job spec field `{field}` = {value}: {reason}")]
    Invalid {
        /// `section.field`.
        field: String,
        /// The value given.
        value: String,
        /// What is allowed.
        reason: String,
    },
}

/// The largest submitted spec text accepted (a coordinator refuses a longer `SubmitJob`).
pub const MAX_SUBMITTED_SPEC_BYTES: usize = 1 << 20;

/// Why a submitted spec text was refused: [`JobSpec::from_submitted`]'s error. The messages
/// name no source (the caller says which field or file the text came from).
#[derive(Debug, thiserror::Error)]
pub enum SubmittedSpecError {
    /// Nothing but whitespace.
    #[error("is empty")]
    Empty,
    /// Longer than [`MAX_SUBMITTED_SPEC_BYTES`]; the text is not echoed back.
    #[error("{len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// The text's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not TOML, or not a spec (unknown fields included).
    #[error("job spec: {message}")]
    Parse {
        /// The parser's message (names the unknown field or the key).
        message: String,
    },
    /// A value is out of range ([`SpecError::Invalid`]).
    #[error(transparent)]
    Invalid(SpecError),
}

impl JobSpec {
    /// Reads and validates the spec at `path` with environment overrides from `env`.
    pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Self, SpecError> {
        let raw = RawJobSpec::load(path, &RawJobSpec::overrides_from_env(env))?;
        raw.validate(path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates a submitted spec text, the one way every process reads what
    /// `spinctl submit` sends: `spinctl` before sending, the coordinator when it accepts and
    /// when it plans the job, the worker when it is assigned it. The text is TOML through
    /// `config` with unknown fields refused and named, no overrides (they were applied before
    /// submitting), then every range checked. Relative paths stay relative (workers resolve
    /// them against their own data root).
    pub fn from_submitted(text: &str) -> Result<Self, SubmittedSpecError> {
        if text.len() > MAX_SUBMITTED_SPEC_BYTES {
            return Err(SubmittedSpecError::TooLarge {
                len: text.len(),
                max: MAX_SUBMITTED_SPEC_BYTES,
            });
        }
        if text.trim().is_empty() {
            return Err(SubmittedSpecError::Empty);
        }
        let raw =
            RawJobSpec::parse(text, Path::new("submitted spec"), &HashMap::new()).map_err(|e| {
                match e {
                    SpecError::Parse { message, .. } => SubmittedSpecError::Parse { message },
                    other => SubmittedSpecError::Invalid(other),
                }
            })?;
        raw.validate(Path::new(""))
            .map_err(SubmittedSpecError::Invalid)
    }

    /// Pairs per optimizer step: `batch_size` pairs in each of `gradient_accumulation`
    /// micro-batches, which the workers share out (micro-batch m goes to rank m mod world).
    /// It does not depend on the number of workers, so a job gives the same result on any.
    pub fn global_batch(&self) -> usize {
        self.training.batch_size * self.training.gradient_accumulation
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Writes `text` as `job.toml` in a folder of its own, named after `name`.
    pub(super) fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spin-spec-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("job.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub(super) const MINIMAL: &str = "[model]\nbase = \"base\"\n[data]\ntrain = [\"data\"]\n[[iteration]]\nlr = 2e-5\nsteps = 50\n";

    #[test]
    fn submitted_specs_keep_relative_paths_and_name_what_is_wrong() {
        let spec = JobSpec::from_submitted(MINIMAL).unwrap();
        assert_eq!(spec.base_model, Path::new("base"));
        assert_eq!(spec.train_data, vec![PathBuf::from("data")]);
        let err = |text: &str| JobSpec::from_submitted(text).unwrap_err().to_string();
        assert_eq!(err(" \n\t"), "is empty");
        let huge = format!("{MINIMAL}#{}", "x".repeat(MAX_SUBMITTED_SPEC_BYTES));
        assert!(err(&huge).ends_with("over the 1048576-byte limit"));
        let unknown = err(&format!("{MINIMAL}[training]\nbatch_sise = 4\n"));
        assert!(
            unknown.starts_with("job spec: ") && unknown.contains("batch_sise"),
            "{unknown}"
        );
        let range = err(&format!("{MINIMAL}[sampling]\nsteps = 0\n"));
        assert!(
            range.starts_with("job spec field `sampling.steps` = 0"),
            "{range}"
        );
    }

    #[test]
    fn committed_examples_validate() {
        let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for name in [
            "sd15-pickapic-spin.toml",
            "toy-spin.toml",
            "toy-sft-base.toml",
        ] {
            let path = examples.join(name);
            JobSpec::load(&path, &HashMap::new()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
