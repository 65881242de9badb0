//! The DDIM sampler (Song et al.), step for step as diffusers' `DDIMScheduler`: timestep
//! spacing, `steps_offset`, `set_alpha_to_one`, `clip_sample`, prediction type and eta.

use burn::tensor::Tensor;

use super::noise_schedule::{NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

/// A DDIM schedule set to a number of inference steps.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<usize>,
    step_ratio: usize,
    final_alpha_cumprod: f64,
}

impl DdimScheduler {
    /// A scheduler for `steps` inference steps under `config`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Self {
        let schedule = NoiseSchedule::new(config);
        let steps = steps.clamp(1, config.num_train_timesteps);
        let t = config.num_train_timesteps;
        let step_ratio = t / steps;
        let timesteps: Vec<usize> = match config.timestep_spacing {
            TimestepSpacing::Leading => (0..steps)
                .rev()
                .map(|k| (k * step_ratio + config.steps_offset).min(t - 1))
                .collect(),
            TimestepSpacing::Trailing => {
                let ratio = t as f64 / steps as f64;
                (0..steps)
                    .map(|k| ((t as f64 - k as f64 * ratio).round() as usize).saturating_sub(1))
                    .collect()
            }
            TimestepSpacing::Linspace => (0..steps)
                .rev()
                .map(|k| {
                    let x = if steps == 1 {
                        0.0
                    } else {
                        k as f64 * (t - 1) as f64 / (steps - 1) as f64
                    };
                    round_half_even(x) as usize
                })
                .collect(),
        };
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alpha_cumprod(0, 1.0)
        };
        Self {
            config: config.clone(),
            schedule,
            timesteps,
            step_ratio,
            final_alpha_cumprod,
        }
    }

    /// The inference timesteps, descending.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The training schedule underneath.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// `abar` of the step before `t` in this schedule (`t - T/steps`; 1 or abar_0 before the first).
    pub fn previous_alpha_cumprod(&self, t: usize) -> f64 {
        self.schedule
            .alpha_cumprod(t as i64 - self.step_ratio as i64, self.final_alpha_cumprod)
    }

    /// The DDIM update from `sample` at timestep `t` given the model output; `noise` (same shape
    /// as the sample) is used only when `eta > 0`.
    pub fn step(
        &self,
        model_output: Tensor<4>,
        t: usize,
        sample: Tensor<4>,
        eta: f64,
        noise: Option<Tensor<4>>,
    ) -> Tensor<4> {
        let alpha_t = self.schedule.alpha_cumprod(t as i64, 1.0);
        let alpha_prev = self.previous_alpha_cumprod(t);
        let beta_t = 1.0 - alpha_t;
        let (mut pred_x0, pred_eps) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = (sample - model_output.clone() * beta_t.sqrt()) / alpha_t.sqrt();
                (x0, model_output)
            }
            PredictionType::Sample => {
                let eps = (sample - model_output.clone() * alpha_t.sqrt()) / beta_t.sqrt();
                (model_output, eps)
            }
            PredictionType::VPrediction => {
                let x0 = sample.clone() * alpha_t.sqrt() - model_output.clone() * beta_t.sqrt();
                let eps = model_output * alpha_t.sqrt() + sample * beta_t.sqrt();
                (x0, eps)
            }
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            pred_x0 = pred_x0.clamp(-r, r);
        }
        let variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = eta * variance.max(0.0).sqrt();
        let direction = pred_eps * (1.0 - alpha_prev - std_dev * std_dev).max(0.0).sqrt();
        let prev = pred_x0 * alpha_prev.sqrt() + direction;
        match noise {
            Some(noise) if eta > 0.0 => prev + noise * std_dev,
            _ => prev,
        }
    }
}

/// numpy's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_spacing_matches_stable_diffusion() {
        let ddim = DdimScheduler::new(&SchedulerConfig::stable_diffusion(), 10);
        assert_eq!(
            ddim.timesteps(),
            &[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
        let ddim = DdimScheduler::new(&SchedulerConfig::stable_diffusion(), 50);
        assert_eq!(ddim.timesteps()[0], 981);
        assert_eq!(ddim.timesteps()[49], 1);
    }

    #[test]
    fn trailing_and_linspace_spacing() {
        let mut config = SchedulerConfig::stable_diffusion();
        config.timestep_spacing = TimestepSpacing::Trailing;
        assert_eq!(
            DdimScheduler::new(&config, 4).timesteps(),
            &[999, 749, 499, 249]
        );
        config.timestep_spacing = TimestepSpacing::Linspace;
        assert_eq!(
            DdimScheduler::new(&config, 4).timesteps(),
            &[999, 666, 333, 0]
        );
    }

    #[test]
    fn previous_alpha_uses_final_alpha_before_the_first_step() {
        let config = SchedulerConfig::stable_diffusion();
        let ddim = DdimScheduler::new(&config, 10);
        let abar0 = ddim.schedule().alpha_cumprod(0, 1.0);
        assert_eq!(ddim.previous_alpha_cumprod(1), abar0);
        assert_eq!(
            ddim.previous_alpha_cumprod(101),
            ddim.schedule().alpha_cumprod(1, 1.0)
        );
    }
}
