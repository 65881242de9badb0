//! The training objectives of DESIGN.md §1: SPIN-Diffusion (approximate, trajectory, exact),
//! Diffusion-DPO and SFT, with their loss, weighting, noise and reduction options. Each returns
//! the loss, the per-pair argument `z` of the loss function and the gradients of theta.

use burn::module::Module;
use burn::tensor::{activation, Device, Tensor, TensorData};
pub use spin_common::spec::{LossFunction, NoiseMode, Objective, Reduction, Weighting};

use super::grads::ParamGrads;
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::schedulers::NoiseSchedule;

/// Everything that decides the loss of a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ObjectiveConfig {
    /// The objective.
    pub objective: Objective,
    /// `l`.
    pub loss: LossFunction,
    /// `w_t`.
    pub weighting: Weighting,
    /// Loser noise.
    pub noise: NoiseMode,
    /// Error reduction.
    pub reduction: Reduction,
    /// `beta` of this iteration.
    pub beta: f64,
    /// DDIM steps of the sampling schedule (for `h_t` and the trajectory objectives).
    pub sampling_steps: usize,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Spin,
            loss: LossFunction::Logistic,
            weighting: Weighting::None,
            noise: NoiseMode::Independent,
            reduction: Reduction::Mean,
            beta: 2000.0,
            sampling_steps: 50,
        }
    }
}

/// The opponent's stored DDIM trajectory for a batch.
#[derive(Clone, Debug)]
pub struct Trajectory {
    /// States `[B, S, C, H, W]`; state k belongs to `timesteps[k]`.
    pub states: Tensor<5>,
    /// The sampling schedule, descending.
    pub timesteps: Vec<usize>,
    /// For `spin-trajectory`: which state each pair trains on.
    pub index: Vec<usize>,
    /// For `spin-exact`: winner-side noise per schedule step, `[B, S, C, H, W]`.
    pub eps_steps: Tensor<5>,
}

/// One batch of pairs with all its randomness drawn.
#[derive(Clone, Debug)]
pub struct PairBatch {
    /// Real winner latents `[B, C, H, W]`.
    pub x0_win: Tensor<4>,
    /// Loser latents: the opponent's sample (SPIN) or the real loser (DPO).
    pub x0_lose: Tensor<4>,
    /// Text conditioning `[B, L, D]`.
    pub context: Tensor<3>,
    /// One timestep per pair.
    pub t: Vec<usize>,
    /// Winner noise `[B, C, H, W]`.
    pub eps: Tensor<4>,
    /// Independent loser noise `[B, C, H, W]`.
    pub eps_lose: Tensor<4>,
    /// The opponent's trajectory (trajectory objectives only).
    pub trajectory: Option<Trajectory>,
}

/// What one batch gives.
#[derive(Clone, Debug)]
pub struct LossOutput {
    /// Mean loss over the batch.
    pub loss: f64,
    /// Per-pair argument of `l` (empty for SFT).
    pub z: Vec<f64>,
    /// Gradients of theta's parameters.
    pub grads: ParamGrads,
}

/// Why a batch cannot be computed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    /// A trajectory objective without a trajectory.
    #[error("objective {0:?} needs the opponent's stored DDIM trajectory")]
    MissingTrajectory(Objective),
    /// The loss is not finite.
    #[error("non-finite loss {0}")]
    NonFinite(f64),
}

/// Computes loss and gradients of `theta` (parameters on an autodiff device) against the
/// frozen reference `reference` (no autodiff: it never receives gradients).
pub fn loss_and_grads(
    theta: &UNet2DConditionModel,
    reference: &UNet2DConditionModel,
    batch: &PairBatch,
    config: &ObjectiveConfig,
    schedule: &NoiseSchedule,
) -> Result<LossOutput, ObjectiveError> {
    let ctx = Context {
        theta,
        reference,
        config,
        schedule,
        tracked: theta.devices().iter().any(Device::is_autodiff),
    };
    let out = match config.objective {
        Objective::Sft => ctx.sft(batch),
        Objective::Spin | Objective::Dpo => ctx.pairwise(batch),
        Objective::SpinTrajectory => ctx.trajectory(batch)?,
        Objective::SpinExact => ctx.exact(batch)?,
    };
    if !out.loss.is_finite() {
        return Err(ObjectiveError::NonFinite(out.loss));
    }
    Ok(out)
}

struct Context<'a> {
    theta: &'a UNet2DConditionModel,
    reference: &'a UNet2DConditionModel,
    config: &'a ObjectiveConfig,
    schedule: &'a NoiseSchedule,
    /// theta is on an autodiff device.
    tracked: bool,
}

impl Context<'_> {
    /// `reduce((a - b)^2)` per example: `[B, ...] -> [B]`.
    ///
    /// Summed one axis at a time (W, then H, then C) rather than over all C*H*W elements at
    /// once: `D` is a difference of nearly equal errors that `beta` (thousands) then multiplies,
    /// so the rounding of a long float32 sum shows in `z`. On the golden fixtures the flat sum
    /// put `z` 1.2e-4 (relative) off PyTorch's; the nested one 1e-5.
    fn reduce_sq(&self, a: Tensor<4>, b: Tensor<4>) -> Tensor<1> {
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

    fn timesteps(&self, t: &[usize], device: &Device) -> Tensor<1> {
        let values: Vec<f32> = t.iter().map(|&t| t as f32).collect();
        Tensor::from_data(TensorData::new(values, [t.len()]), device)
    }

    /// `w_t` per pair.
    fn weights(&self, t: &[usize]) -> Vec<f64> {
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
    fn both(&self, x: Tensor<4>, t: &[usize], context: Tensor<3>) -> (Tensor<4>, Tensor<4>) {
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

    /// `[e(theta, x, n) - e(ref, x, n)]` for stacked winner and loser halves.
    fn pairwise(&self, batch: &PairBatch) -> LossOutput {
        let b = batch.t.len();
        let shared =
            self.config.noise == NoiseMode::Shared || self.config.objective == Objective::Dpo;
        let eps_lose = if shared {
            batch.eps.clone()
        } else {
            batch.eps_lose.clone()
        };
        let x_win = self
            .schedule
            .add_noise(batch.x0_win.clone(), batch.eps.clone(), &batch.t);
        let x_lose = self
            .schedule
            .add_noise(batch.x0_lose.clone(), eps_lose.clone(), &batch.t);
        let t2: Vec<usize> = batch.t.iter().chain(&batch.t).copied().collect();
        let x = Tensor::cat(vec![x_win, x_lose], 0);
        let noise = Tensor::cat(vec![batch.eps.clone(), eps_lose], 0);
        let context = Tensor::cat(vec![batch.context.clone(), batch.context.clone()], 0);
        let (theta, reference) = self.both(x, &t2, context);
        let err_theta = self.reduce_sq(noise.clone(), theta);
        let err_ref = self.reduce_sq(noise.inner(), reference);
        let diff = err_theta - err_ref;
        let d = diff.clone().slice(0..b) - diff.slice(b..2 * b);
        let coefficient = if self.config.objective == Objective::Dpo {
            self.config.beta / 2.0
        } else {
            self.config.beta
        };
        self.finish(d, &batch.t, coefficient)
    }

    /// `z = -coef * w_t * D`, `loss = mean l(z)`, backward.
    fn finish(&self, d: Tensor<1>, t: &[usize], coefficient: f64) -> LossOutput {
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

    fn backward(&self, loss: Tensor<1>, z: Vec<f64>) -> LossOutput {
        let value = loss.clone().into_scalar::<f32>() as f64;
        let gradients = loss.backward();
        LossOutput {
            loss: value,
            z,
            grads: ParamGrads::collect(self.theta, &gradients),
        }
    }

    fn sft(&self, batch: &PairBatch) -> LossOutput {
        let x = self
            .schedule
            .add_noise(batch.x0_win.clone(), batch.eps.clone(), &batch.t);
        let timesteps = self.timesteps(&batch.t, &x.device());
        let pred = self.theta.forward(x, timesteps, batch.context.clone());
        let loss = self.reduce_sq(batch.eps.clone(), pred).mean();
        self.backward(loss, Vec::new())
    }

    /// The winner term `e(theta) - e(ref)` at `x0` noised with `eps` at `t`, and the trajectory
    /// loser term `reduce((ref(x') - theta(x'))^2)` at stored states `x'`; returns `D` per pair.
    fn trajectory_d(
        &self,
        x0: Tensor<4>,
        eps: Tensor<4>,
        states: Tensor<4>,
        t: &[usize],
        context: Tensor<3>,
    ) -> Tensor<1> {
        let b = t.len();
        let x_win = self.schedule.add_noise(x0, eps.clone(), t);
        let t2: Vec<usize> = t.iter().chain(t).copied().collect();
        let x = Tensor::cat(vec![x_win, states], 0);
        let context = Tensor::cat(vec![context.clone(), context], 0);
        let (theta, reference) = self.both(x, &t2, context);
        let win = self.reduce_sq(eps.clone(), theta.clone().slice(0..b))
            - self.reduce_sq(eps.inner(), reference.clone().slice(0..b));
        let lose = self.reduce_sq(reference.slice(b..2 * b), theta.slice(b..2 * b));
        win - lose
    }

    fn trajectory(&self, batch: &PairBatch) -> Result<LossOutput, ObjectiveError> {
        let traj = batch
            .trajectory
            .as_ref()
            .ok_or(ObjectiveError::MissingTrajectory(Objective::SpinTrajectory))?;
        let t: Vec<usize> = traj.index.iter().map(|&k| traj.timesteps[k]).collect();
        let states = select_states(&traj.states, &traj.index);
        let d = self.trajectory_d(
            batch.x0_win.clone(),
            batch.eps.clone(),
            states,
            &t,
            batch.context.clone(),
        );
        Ok(self.finish(d, &t, self.config.beta))
    }

    /// Eq. 4.8 in two passes: the argument `z` over the whole trajectory without gradients, then
    /// each step's gradient scaled by `l'(z)`; memory does not grow with the number of steps.
    fn exact(&self, batch: &PairBatch) -> Result<LossOutput, ObjectiveError> {
        let traj = batch
            .trajectory
            .as_ref()
            .ok_or(ObjectiveError::MissingTrajectory(Objective::SpinExact))?;
        let b = batch.t.len();
        let steps = traj.timesteps.len();
        let step_inputs = |k: usize| {
            let t = vec![traj.timesteps[k]; b];
            let states = slice_step(&traj.states, k);
            let eps = slice_step(&traj.eps_steps, k);
            (t, states, eps)
        };
        // Pass 1: z without building a graph (theta on the inner backend).
        let theta_plain = self.theta.valid();
        let plain = Context {
            theta: &theta_plain,
            tracked: false,
            ..*self
        };
        let mut z = vec![0.0f64; b];
        for k in 0..steps {
            let (t, states, eps) = step_inputs(k);
            let w = self.weights(&t)[0];
            let d = plain.trajectory_d(
                batch.x0_win.clone().inner(),
                eps.inner(),
                states.inner(),
                &t,
                batch.context.clone().inner(),
            );
            for (zi, di) in z.iter_mut().zip(z_values(d)) {
                *zi += -self.config.beta * w * di;
            }
        }
        let (loss, slope) = loss_and_slope(self.config.loss, &z);
        // Pass 2: d loss / d theta = mean_i l'(z_i) dz_i/dtheta, one step's graph at a time.
        let mut grads: Option<ParamGrads> = None;
        for k in 0..steps {
            let (t, states, eps) = step_inputs(k);
            let w = self.weights(&t)[0];
            let d = self.trajectory_d(batch.x0_win.clone(), eps, states, &t, batch.context.clone());
            let factors: Vec<f32> = slope
                .iter()
                .map(|s| (s * -self.config.beta * w / b as f64) as f32)
                .collect();
            let factors = Tensor::<1>::from_data(TensorData::new(factors, [b]), &d.device());
            let surrogate = (d * factors).sum();
            let step_grads = ParamGrads::collect(self.theta, &surrogate.backward());
            match grads.as_mut() {
                Some(total) => total.accumulate(step_grads),
                None => grads = Some(step_grads),
            }
        }
        Ok(LossOutput {
            loss,
            z,
            grads: grads.unwrap_or_else(ParamGrads::empty),
        })
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

fn z_values(z: Tensor<1>) -> Vec<f64> {
    z.into_data()
        .convert::<f32>()
        .iter::<f32>()
        .map(f64::from)
        .collect()
}

/// `states[i, index[i]]` for every pair: `[B, S, C, H, W] -> [B, C, H, W]`.
fn select_states(states: &Tensor<5>, index: &[usize]) -> Tensor<4> {
    let rows: Vec<Tensor<4>> = index
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let [_, _, c, h, w] = states.dims();
            states
                .clone()
                .slice([i..i + 1, k..k + 1])
                .reshape([1, c, h, w])
        })
        .collect();
    Tensor::cat(rows, 0)
}

/// `x[:, k]`: `[B, S, C, H, W] -> [B, C, H, W]`.
fn slice_step(x: &Tensor<5>, k: usize) -> Tensor<4> {
    let [b, _, c, h, w] = x.dims();
    x.clone().slice([0..b, k..k + 1]).reshape([b, c, h, w])
}
