//! The pairwise objectives (SPIN-Diffusion approximate and Diffusion-DPO) and SPIN's
//! trajectory objectives (`spin-trajectory`, `spin-exact`) on the opponent's stored DDIM
//! trajectory.

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};

use super::shared::{loss_and_slope, z_values};
use super::{Context, LossOutput, NoiseMode, Objective, ObjectiveError, PairBatch};
use crate::train::grads::ParamGrads;

impl Context<'_> {
    /// `[e(theta, x, n) - e(ref, x, n)]` for stacked winner and loser halves.
    pub(super) fn pairwise(&self, batch: &PairBatch) -> LossOutput {
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

    pub(super) fn trajectory(&self, batch: &PairBatch) -> Result<LossOutput, ObjectiveError> {
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
    pub(super) fn exact(&self, batch: &PairBatch) -> Result<LossOutput, ObjectiveError> {
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
