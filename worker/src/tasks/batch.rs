//! One micro-batch of the train task built from seeds alone: the pairs' latents (a draw of
//! each cached posterior, flipped or not), the opponent's samples and trajectory, timesteps and
//! noise.

use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use spin_common::seeds::{derive, Purpose};

use super::JobRunner;
use crate::train::data::CachedImage;
use crate::train::objectives::{PairBatch, Trajectory};

impl JobRunner {
    /// The pairs of one micro-batch with all their randomness, from seeds alone.
    pub(super) fn build_batch(
        &self,
        examples: &[usize],
        iteration: usize,
        step: u64,
        micro: usize,
    ) -> PairBatch {
        let spec = &self.spec;
        let data = self.train_examples();
        let opponents = self.opponents.as_ref().map(|(_, o)| o);
        let device = &self.device;
        let [c, h, w] = self.latent_shape;
        let [l, d] = self.context_shape;
        let b = examples.len();
        let per = c * h * w;
        let mut rng = ChaCha8Rng::seed_from_u64(derive(
            spec.seed,
            Purpose::StepNoise,
            &[iteration as u64, step, micro as u64],
        ));
        let mut win = Vec::with_capacity(b * per);
        let mut lose = Vec::with_capacity(b * per);
        let mut context = Vec::with_capacity(b * l * d);
        for &i in examples {
            let example = &data[i];
            let flip = spec.random_flip && rng.random_bool(0.5);
            win.extend(draw(&example.winner, flip, &mut rng));
            match opponents {
                Some(o) => lose.extend_from_slice(&o.latents[i]),
                None => lose.extend(draw(&example.loser, flip, &mut rng)),
            }
            context.extend_from_slice(&example.context);
        }
        let t: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
        let tensor4 =
            |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, c, h, w]), device);
        let eps = tensor4(normal(&mut rng, b * per));
        let eps_lose = tensor4(normal(&mut rng, b * per));
        let trajectory = opponents.filter(|o| !o.trajectories.is_empty()).map(|o| {
            let s = o.timesteps.len();
            let states: Vec<f32> = examples
                .iter()
                .flat_map(|&i| o.trajectories[i].iter().copied())
                .collect();
            Trajectory {
                states: Tensor::from_data(TensorData::new(states, [b, s, c, h, w]), device),
                timesteps: o.timesteps.clone(),
                index: (0..b).map(|_| rng.random_range(0..s)).collect(),
                eps_steps: Tensor::from_data(
                    TensorData::new(normal(&mut rng, b * s * per), [b, s, c, h, w]),
                    device,
                ),
            }
        });
        PairBatch {
            x0_win: tensor4(win),
            x0_lose: tensor4(lose),
            context: Tensor::from_data(TensorData::new(context, [b, l, d]), device),
            t,
            eps,
            eps_lose,
            trajectory,
        }
    }
}

/// Draws a value of the cached posterior (mean + std * noise), flipped or not.
fn draw(image: &CachedImage, flip: bool, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let side = usize::from(flip);
    if image.std[side].is_empty() {
        return image.mean[side].clone();
    }
    image.mean[side]
        .iter()
        .zip(&image.std[side])
        .map(|(m, s)| m + s * rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}
