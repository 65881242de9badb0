//! The SFT objective: the plain diffusion loss of theta on the winners.

use super::{Context, LossOutput, PairBatch};

impl Context<'_> {
    /// `reduce((eps - theta(x_t, t))^2)` averaged over the batch, backward.
    pub(super) fn sft(&self, batch: &PairBatch) -> LossOutput {
        let x = self
            .schedule
            .add_noise(batch.x0_win.clone(), batch.eps.clone(), &batch.t);
        let timesteps = self.timesteps(&batch.t, &x.device());
        let pred = self.theta.forward(x, timesteps, batch.context.clone());
        let loss = self.reduce_sq(batch.eps.clone(), pred).mean();
        self.backward(loss, Vec::new())
    }
}
