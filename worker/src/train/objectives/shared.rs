//! The terms every objective shares: the per-example error reduction, the timestep weights
//! `w_t` and DDIM's `h_t`, the paired theta / reference pass, the loss function `l(z)` with its
//! backward, and the loss and slope of `l` for the exact objective.

use burn::tensor::{activation, Device, Tensor, TensorData};

use super::{Context, LossFunction, LossOutput, Reduction, Weighting};
use crate::schedulers::NoiseSchedule;
use crate::train::grads::ParamGrads;

impl Context<'_> {
    /// `reduce((a - b)^2)` per example: `[B, ...] -> [B]`.
    ///
    /// Summed one axis at a time (W, then H, then C) rather than over all C*H*W elements at
    /// once: `D` is a difference of nearly equal errors that `beta` (thousands) then multiplies,
    /// so the rounding of a long float32 sum shows in `z`. On the golden fixtures the flat sum
    /// put `z` 1.2e-4 (relative) off PyTorch's; the nested one 1e-5.
    pub(super) fn reduce_sq(&self, a: Tensor<4>, b: Tensor<4>) -> Tensor<1> {
        let [n, c, h, w] = a.dims();
        let sum = (a - b)
            .powi_scalar(2)
            .sum_dim(3)
            .sum_dim(2)
            .sum_dim(1)
            .reshape([n]);
        match self.config.reduction {
            Reduction::Mean => sum / (c * h * w) as f64,
            Reduction::Sum => sum,
        }
    }

    pub(super) fn timesteps(&self, t: &[usize], device: &Device) -> Tensor<1> {
        let values: Vec<f32> = t.iter().map(|&t| t as f32).collect();
        Tensor::from_data(TensorData::new(values, [t.len()]), device)
    }

    /// `w_t` per pair.
    pub(super) fn weights(&self, t: &[usize]) -> Vec<f64> {
        t.iter()
            .map(|&t| match self.config.weighting {
                Weighting::None => 1.0,
                Weighting::H2 => {
                    let h = ddim_h(self.schedule, t, self.config.sampling_steps);
                    h * h
                }
            })
            .collect()
    }

    /// Runs theta (tracked) and the reference (constant) on the same inputs.
    ///
    /// When theta is tracked, the reference runs on autodiff tensors too (untracked constants:
    /// no graph is recorded, and its output is taken back off autodiff), so that both models go
    /// through the same kernels. The plain backend's fused ops (attention) round differently
    /// from the autodiff backend's decompositions, about 1e-6 per output; `beta` (thousands)
    /// would turn that into a nonzero `z` at theta = theta_k, where D must be exactly 0 and the
    /// logistic loss exactly log 2 (DESIGN.md §1).
    pub(super) fn both(
        &self,
        x: Tensor<4>,
        t: &[usize],
        context: Tensor<3>,
    ) -> (Tensor<4>, Tensor<4>) {
        let device = x.device();
        let timesteps = self.timesteps(t, &device);
        let reference = if self.tracked {
            self.reference
                .forward(
                    x.clone().inner().autodiff(),
                    timesteps.clone().inner().autodiff(),
                    context.clone().inner().autodiff(),
                )
                .inner()
        } else {
            self.reference.forward(
                x.clone().inner(),
                timesteps.clone().inner(),
                context.clone().inner(),
            )
        };
        let theta = self.theta.forward(x, timesteps, context);
        (theta, reference)
    }

    /// `z = -coef * w_t * D`, `loss = mean l(z)`, backward.
    pub(super) fn finish(&self, d: Tensor<1>, t: &[usize], coefficient: f64) -> LossOutput {
        let device = d.device();
        let w: Vec<f32> = self
            .weights(t)
            .into_iter()
            .map(|w| (-coefficient * w) as f32)
            .collect();
        let scale = Tensor::<1>::from_data(TensorData::new(w, [t.len()]), &device);
        let z = d * scale;
        let per_pair = match self.config.loss {
            LossFunction::Logistic => activation::softplus(z.clone().neg(), 1.0),
            LossFunction::Hinge => (z.clone().neg() + 1.0).clamp_min(0.0),
            LossFunction::Correlation => z.clone().neg() + 1.0,
        };
        let loss = per_pair.mean();
        self.backward(loss, z_values(z))
    }

    pub(super) fn backward(&self, loss: Tensor<1>, z: Vec<f64>) -> LossOutput {
        let value = loss.clone().into_scalar::<f32>() as f64;
        let gradients = loss.backward();
        LossOutput {
            loss: value,
            z,
            grads: ParamGrads::collect(self.theta, &gradients),
        }
    }
}

/// `h_t = sqrt(1 - abar_prev) - sqrt(abar_prev / abar_t) sqrt(1 - abar_t)`, prev = t - T/steps
/// (abar = 1 before the first timestep).
pub fn ddim_h(schedule: &NoiseSchedule, t: usize, steps: usize) -> f64 {
    let ratio = (schedule.num_train_timesteps() / steps.max(1)) as i64;
    let abar_t = schedule.alpha_cumprod(t as i64, 1.0);
    let abar_prev = schedule.alpha_cumprod(t as i64 - ratio, 1.0);
    (1.0 - abar_prev).sqrt() - (abar_prev / abar_t).sqrt() * (1.0 - abar_t).sqrt()
}

/// Mean loss over pairs and `l'(z_i)` per pair.
pub fn loss_and_slope(loss: LossFunction, z: &[f64]) -> (f64, Vec<f64>) {
    let (values, slopes): (Vec<f64>, Vec<f64>) = z
        .iter()
        .map(|&z| match loss {
            // softplus(-z), derivative -sigmoid(-z); written to stay finite for large |z|.
            LossFunction::Logistic => {
                let value = if z > 0.0 {
                    (-z).exp().ln_1p()
                } else {
                    -z + z.exp().ln_1p()
                };
                (value, -1.0 / (1.0 + z.exp()))
            }
            LossFunction::Hinge => {
                if z < 1.0 {
                    (1.0 - z, -1.0)
                } else {
                    (0.0, 0.0)
                }
            }
            LossFunction::Correlation => (1.0 - z, -1.0),
        })
        .unzip();
    (values.iter().sum::<f64>() / z.len().max(1) as f64, slopes)
}

/// The values of `z` as `f64`.
pub(super) fn z_values(z: Tensor<1>) -> Vec<f64> {
    z.into_data()
        .convert::<f32>()
        .iter::<f32>()
        .map(f64::from)
        .collect()
}
