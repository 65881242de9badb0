//! The training objectives of DESIGN.md §1: SPIN-Diffusion (approximate, trajectory, exact),
//! Diffusion-DPO and SFT, with their loss, weighting, noise and reduction options. Each returns
//! the loss, the per-pair argument `z` of the loss function and the gradients of theta.
//!
//! This file holds the inputs, outputs and the dispatch; the terms every objective shares are in
//! [`shared`], the SPIN family and DPO in [`spin`], SFT in [`sft`].

use burn::module::Module;
use burn::tensor::{Device, Tensor};
pub use spin_common::spec::{LossFunction, NoiseMode, Objective, Reduction, Weighting};

use super::grads::ParamGrads;
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::schedulers::NoiseSchedule;

mod sft;
mod shared;
mod spin;

pub use shared::{ddim_h, loss_and_slope};

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
