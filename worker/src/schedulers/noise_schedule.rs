//! The training noise schedule: betas, cumulative alphas, `x_t = sqrt(abar_t) x_0 +
//! sqrt(1 - abar_t) eps`, from the scheduler config.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// How betas grow over the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Evenly spaced betas.
    Linear,
    /// Betas evenly spaced in sqrt (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule (Nichol & Dhariwal), capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (SD-1.5).
    Epsilon,
    /// The velocity `sqrt(abar) eps - sqrt(1 - abar) x0` (SD-2 768).
    VPrediction,
    /// The clean sample.
    Sample,
}

/// How inference timesteps are placed over the training ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `k * (T / n) + steps_offset`, descending (SD-1.5).
    Leading,
    /// `round(T - k * T / n) - 1`.
    Trailing,
    /// `round(linspace(0, T - 1, n))`, descending.
    Linspace,
}

/// `scheduler_config.json`, with DDIMScheduler's defaults for absent fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Training timesteps (1000).
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    /// First beta.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// Beta growth.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    /// Clamp range.
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
    /// Use abar = 1 before the first step (else abar_0).
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// Added to every inference timestep.
    #[serde(default)]
    pub steps_offset: usize,
    /// What the model predicts.
    #[serde(default = "default_prediction")]
    pub prediction_type: PredictionType,
    /// Inference timestep placement.
    #[serde(default = "default_spacing")]
    pub timestep_spacing: TimestepSpacing,
    /// Explicit betas: not supported.
    #[serde(default)]
    pub trained_betas: Option<serde_json::Value>,
    /// Dynamic thresholding: not supported.
    #[serde(default)]
    pub thresholding: bool,
    /// Zero-terminal-SNR rescaling: not supported.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn default_true() -> bool {
    true
}
fn default_clip_range() -> f64 {
    1.0
}
fn default_prediction() -> PredictionType {
    PredictionType::Epsilon
}
fn default_spacing() -> TimestepSpacing {
    TimestepSpacing::Leading
}

impl SchedulerConfig {
    /// Stable Diffusion 1.5's schedule as its pipeline folder sets it.
    pub fn stable_diffusion() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: false,
            steps_offset: 1,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            trained_betas: None,
            thresholding: false,
            rescale_betas_zero_snr: false,
        }
    }

    /// Reads `scheduler_config.json` and rejects options this implementation lacks.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        if self.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ModelError::unsupported(path, "trained_betas", "a list"));
        }
        if self.thresholding {
            return Err(ModelError::unsupported(path, "thresholding", true));
        }
        if self.rescale_betas_zero_snr {
            return Err(ModelError::unsupported(
                path,
                "rescale_betas_zero_snr",
                true,
            ));
        }
        if self.num_train_timesteps == 0 {
            return Err(ModelError::unsupported(path, "num_train_timesteps", 0));
        }
        Ok(())
    }
}

/// Betas and cumulative alphas of the training process.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    /// `abar_t` for t in 0..T.
    alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// The schedule `config` describes.
    pub fn new(config: &SchedulerConfig) -> Self {
        let n = config.num_train_timesteps;
        let linspace = |a: f64, b: f64| -> Vec<f64> {
            if n == 1 {
                return vec![a];
            }
            (0..n)
                .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
                .collect()
        };
        let betas: Vec<f64> = match config.beta_schedule {
            BetaSchedule::Linear => linspace(config.beta_start, config.beta_end),
            BetaSchedule::ScaledLinear => {
                linspace(config.beta_start.sqrt(), config.beta_end.sqrt())
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => {
                let f = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - f(t2) / f(t1)).min(0.999)
                    })
                    .collect()
            }
        };
        // diffusers keeps these in float32; rounding here keeps us on the same values.
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0f32;
        for beta in betas {
            acc *= 1.0 - beta as f32;
            alphas_cumprod.push(acc as f64);
        }
        Self { alphas_cumprod }
    }

    /// Number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `abar_t`; timesteps below 0 give `before_first` (1.0, or abar_0 without set_alpha_to_one).
    pub fn alpha_cumprod(&self, t: i64, before_first: f64) -> f64 {
        if t < 0 {
            before_first
        } else {
            self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
        }
    }

    /// `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, one timestep per batch element.
    ///
    /// `x0`, `noise`: `[N, C, H, W]`; `timesteps`: N values in `0..T`.
    pub fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, timesteps: &[usize]) -> Tensor<4> {
        let n = timesteps.len();
        let device = x0.device();
        let (a, b): (Vec<f32>, Vec<f32>) = timesteps
            .iter()
            .map(|&t| {
                let abar = self.alphas_cumprod[t];
                (abar.sqrt() as f32, (1.0 - abar).sqrt() as f32)
            })
            .unzip();
        let column = |v: Vec<f32>, device: &Device| {
            Tensor::<1>::from_data(TensorData::new(v, [n]), device).reshape([n, 1, 1, 1])
        };
        x0 * column(a, &device) + noise * column(b, &device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_diffusion_schedule_matches_diffusers_values() {
        let schedule = NoiseSchedule::new(&SchedulerConfig::stable_diffusion());
        // torch: alphas_cumprod[0], [499], [999] of the scaled_linear 0.00085..0.012 schedule.
        assert!((schedule.alpha_cumprod(0, 1.0) - 0.999_149_978).abs() < 1e-7);
        assert!((schedule.alpha_cumprod(499, 1.0) - 0.277_669_43).abs() < 1e-6);
        assert!((schedule.alpha_cumprod(999, 1.0) - 0.004_660_095).abs() < 1e-7);
        assert_eq!(schedule.alpha_cumprod(-1, 1.0), 1.0);
    }

    #[test]
    fn unsupported_options_name_option_and_file() {
        let dir = std::env::temp_dir().join(format!("sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("scheduler_config.json");
        std::fs::write(&path, r#"{"thresholding": true}"#).expect("write");
        let err = SchedulerConfig::from_file(&path)
            .expect_err("must fail")
            .to_string();
        assert!(
            err.contains("thresholding") && err.contains("scheduler_config.json"),
            "{err}"
        );
    }
}
