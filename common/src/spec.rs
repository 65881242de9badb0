//! The job spec: TOML read with unknown fields denied (layered with the `config` crate: file,
//! then `SPIN_JOB__SECTION__FIELD` overrides passed in as a map), then validated into
//! [`JobSpec`], a separate type that the trainer trusts. Every paper hyperparameter
//! (DESIGN.md §1) is a setting, per self-play iteration where the paper varies it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

fn invalid(field: &str, value: impl std::fmt::Display, reason: &str) -> SpecError {
    SpecError::Invalid {
        field: field.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
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

    /// Fills defaults (the paper's where it has one) and checks every range. Relative paths are
    /// taken relative to `base_dir` (the spec file's folder).
    pub fn validate(self, base_dir: &Path) -> Result<JobSpec, SpecError> {
        let t = &self.training;
        let resolve = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base_dir.join(p)
            }
        };
        let seed = self.job.seed.unwrap_or(5_775_709);
        let name = self
            .job
            .name
            .clone()
            .unwrap_or_else(|| "spin-job".to_string());
        if name.trim().is_empty() || name.len() > 200 {
            // A huge name is not echoed back whole.
            let shown = if name.len() > 200 {
                format!("a name of {} bytes", name.len())
            } else {
                format!("{name:?}")
            };
            return Err(invalid("job.name", shown, "must be 1 to 200 characters"));
        }
        if self.model.base.as_os_str().is_empty() {
            return Err(invalid(
                "model.base",
                "\"\"",
                "must name a diffusers pipeline folder",
            ));
        }
        if self.data.train.is_empty() {
            return Err(invalid(
                "data.train",
                "[]",
                "must list at least one parquet file or folder",
            ));
        }
        let resolution = self.data.resolution.unwrap_or(512);
        if !(8..=4096).contains(&resolution) || !resolution.is_multiple_of(8) {
            return Err(invalid(
                "data.resolution",
                resolution,
                "must be a multiple of 8 in 8..=4096",
            ));
        }
        let held_out_fraction = self.data.held_out_fraction.unwrap_or(0.05);
        if !(0.0..1.0).contains(&held_out_fraction) {
            return Err(invalid(
                "data.held_out_fraction",
                held_out_fraction,
                "must be in [0, 1)",
            ));
        }
        let sampling = SamplingSpec {
            steps: self.sampling.steps.unwrap_or(50),
            guidance: self.sampling.guidance.unwrap_or(7.5),
            eta: self.sampling.eta.unwrap_or(0.0),
            batch_size: self.sampling.batch_size.unwrap_or(8),
            shard_size: self.sampling.shard_size.unwrap_or(64),
        };
        if !(1..=1000).contains(&sampling.steps) {
            return Err(invalid(
                "sampling.steps",
                sampling.steps,
                "must be in 1..=1000",
            ));
        }
        if !(sampling.guidance.is_finite() && sampling.guidance >= 0.0) {
            return Err(invalid(
                "sampling.guidance",
                sampling.guidance,
                "must be finite and >= 0",
            ));
        }
        if !(0.0..=1.0).contains(&sampling.eta) {
            return Err(invalid("sampling.eta", sampling.eta, "must be in [0, 1]"));
        }
        if sampling.batch_size == 0 {
            return Err(invalid("sampling.batch_size", 0, "must be at least 1"));
        }
        if !(1..=1_000_000).contains(&sampling.shard_size) {
            return Err(invalid(
                "sampling.shard_size",
                sampling.shard_size,
                "must be in 1..=1000000",
            ));
        }
        let training = TrainingSpec {
            objective: t.objective.unwrap_or_default(),
            loss: t.loss.unwrap_or_default(),
            weighting: t.weighting.unwrap_or_default(),
            noise: t.noise.unwrap_or_default(),
            reduction: t.reduction.unwrap_or_default(),
            batch_size: t.batch_size.unwrap_or(8),
            // 8 pairs x 256 micro-batches = the paper's global batch of 2048 (8 GPUs x 8 x 32).
            gradient_accumulation: t.gradient_accumulation.unwrap_or(256),
            lr_schedule: t.lr_schedule.unwrap_or_default(),
            warmup_steps: t.warmup_steps.unwrap_or(200),
            max_grad_norm: t.max_grad_norm.unwrap_or(1.0),
            adam_beta1: t.adam_beta1.unwrap_or(0.9),
            adam_beta2: t.adam_beta2.unwrap_or(0.999),
            adam_eps: t.adam_eps.unwrap_or(1e-8),
            weight_decay: t.weight_decay.unwrap_or(1e-2),
            nonfinite: t.nonfinite.unwrap_or_default(),
            max_skipped_steps: t.max_skipped_steps.unwrap_or(10),
            checkpoint_every: t.checkpoint_every.unwrap_or(50),
        };
        if !(1..=4096).contains(&training.batch_size) {
            return Err(invalid(
                "training.batch_size",
                training.batch_size,
                "must be in 1..=4096",
            ));
        }
        if !(1..=65536).contains(&training.gradient_accumulation) {
            return Err(invalid(
                "training.gradient_accumulation",
                training.gradient_accumulation,
                "must be in 1..=65536",
            ));
        }
        for (field, value) in [
            ("training.adam_beta1", training.adam_beta1),
            ("training.adam_beta2", training.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(invalid(field, value, "must be in [0, 1)"));
            }
        }
        if !(training.adam_eps > 0.0 && training.adam_eps.is_finite()) {
            return Err(invalid(
                "training.adam_eps",
                training.adam_eps,
                "must be > 0",
            ));
        }
        if !(training.weight_decay >= 0.0 && training.weight_decay.is_finite()) {
            return Err(invalid(
                "training.weight_decay",
                training.weight_decay,
                "must be >= 0",
            ));
        }
        if !(training.max_grad_norm >= 0.0 && training.max_grad_norm.is_finite()) {
            return Err(invalid(
                "training.max_grad_norm",
                training.max_grad_norm,
                "must be >= 0 (0 disables clipping)",
            ));
        }
        if self.iteration.is_empty() {
            return Err(invalid(
                "iteration",
                "[]",
                "give at least one [[iteration]] with lr and steps",
            ));
        }
        let mut iterations = Vec::with_capacity(self.iteration.len());
        for (i, it) in self.iteration.iter().enumerate() {
            let beta = it.beta.unwrap_or(2000.0);
            if !(it.lr > 0.0 && it.lr.is_finite() && it.lr < 1.0) {
                return Err(invalid(
                    &format!("iteration[{i}].lr"),
                    it.lr,
                    "must be in (0, 1)",
                ));
            }
            if !(beta > 0.0 && beta.is_finite()) {
                return Err(invalid(
                    &format!("iteration[{i}].beta"),
                    beta,
                    "must be > 0",
                ));
            }
            if !(1..=10_000_000).contains(&it.steps) {
                return Err(invalid(
                    &format!("iteration[{i}].steps"),
                    it.steps,
                    "must be in 1..=10000000",
                ));
            }
            iterations.push(IterationSpec {
                lr: it.lr,
                beta,
                steps: it.steps,
            });
        }
        let eval = EvalSpec {
            samples: self.eval.samples.unwrap_or(16),
            loss_timesteps: self.eval.loss_timesteps.unwrap_or(8),
            grid_columns: self.eval.grid_columns.unwrap_or(4).max(1),
        };
        Ok(JobSpec {
            name,
            seed,
            output: resolve(
                &self
                    .job
                    .output
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("spin-runs")),
            ),
            base_model: resolve(&self.model.base),
            train_data: self.data.train.iter().map(resolve).collect(),
            resolution,
            held_out_fraction,
            max_prompts: self.data.max_prompts.unwrap_or(0),
            random_flip: self.data.random_flip.unwrap_or(true),
            sampling,
            training,
            iterations,
            eval,
        })
    }
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

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spin-spec-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("job.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const MINIMAL: &str = "[model]\nbase = \"base\"\n[data]\ntrain = [\"data\"]\n[[iteration]]\nlr = 2e-5\nsteps = 50\n";

    #[test]
    fn defaults_are_the_papers() {
        let spec = JobSpec::load(&write("min", MINIMAL), &HashMap::new()).unwrap();
        assert_eq!(spec.seed, 5_775_709);
        assert_eq!(spec.sampling.steps, 50);
        assert_eq!(spec.sampling.guidance, 7.5);
        assert_eq!(spec.training.objective, Objective::Spin);
        assert_eq!(spec.global_batch(), 2048);
        assert_eq!(spec.training.warmup_steps, 200);
        assert_eq!(spec.training.max_grad_norm, 1.0);
        assert_eq!(spec.training.weight_decay, 1e-2);
        assert_eq!(spec.iterations[0].beta, 2000.0);
        assert!(spec.base_model.ends_with("base"));
    }

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
    fn out_of_range_values_name_the_field() {
        let cases = [
            ("[sampling]\nsteps = 0\n", "sampling.steps"),
            (
                "[data]\ntrain = [\"d\"]\nresolution = 30\n",
                "data.resolution",
            ),
            ("[training]\nadam_beta1 = 1.5\n", "training.adam_beta1"),
            ("[training]\nbatch_size = 0\n", "training.batch_size"),
        ];
        for (extra, field) in cases {
            let text = if extra.starts_with("[data]") {
                format!("[model]\nbase = \"b\"\n{extra}[[iteration]]\nlr = 1e-5\nsteps = 1\n")
            } else {
                format!("{MINIMAL}{extra}")
            };
            let err = JobSpec::load(&write(field, &text), &HashMap::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let bad_lr = MINIMAL.replace("lr = 2e-5", "lr = -1.0");
        let err = JobSpec::load(&write("lr", &bad_lr), &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("iteration[0].lr"), "{err}");
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
