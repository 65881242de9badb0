//! Timestep embeddings: diffusers' sinusoidal `get_timestep_embedding` (`Timesteps`, the
//! UNet's `time_proj`) and the `TimestepEmbedding` MLP (`linear_1`, SiLU, `linear_2`).

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};

use crate::nn::Linear;

/// The frequencies `exp(-ln(10000) * i / (half - downscale_freq_shift))`, `i < half`,
/// computed in f32 step by step as PyTorch does (exp correctly rounded from f64).
pub fn timestep_frequencies(half_dim: usize, downscale_freq_shift: f64) -> Vec<f32> {
    let log_max_period = -(10000f64.ln()) as f32;
    let denominator = (half_dim as f64 - downscale_freq_shift) as f32;
    (0..half_dim)
        .map(|i| {
            let exponent = (log_max_period * i as f32) / denominator;
            (exponent as f64).exp() as f32
        })
        .collect()
}

/// diffusers `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift)`
/// with `scale = 1`, `max_period = 10000`: `timesteps: [N] -> [N, dim]`, laid out
/// `[sin, cos]` (`[cos, sin]` when `flip_sin_to_cos`), zero-padded by one column for odd `dim`.
pub fn timestep_embedding(
    timesteps: Tensor<1>,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Tensor<2> {
    let half = dim / 2;
    let device = timesteps.device();
    let [n] = timesteps.dims();
    let frequencies = Tensor::<1>::from_data(
        TensorData::new(timestep_frequencies(half, downscale_freq_shift), [half]),
        &device,
    );
    let args = timesteps.reshape([n, 1]) * frequencies.reshape([1, half]);
    let (sin, cos) = (args.clone().sin(), args.cos());
    let halves = if flip_sin_to_cos {
        vec![cos, sin]
    } else {
        vec![sin, cos]
    };
    let mut embedding = Tensor::cat(halves, 1);
    if dim % 2 == 1 {
        embedding = Tensor::cat(vec![embedding, Tensor::zeros([n, 1], &device)], 1);
    }
    embedding
}

/// diffusers `Timesteps` (the UNet's `time_proj`): parameter-free sinusoidal projection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timesteps {
    /// Output width.
    pub num_channels: usize,
    /// `[cos, sin]` instead of `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` (the UNet's `freq_shift`).
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    /// `timesteps: [N] -> [N, num_channels]`.
    pub fn forward(&self, timesteps: Tensor<1>) -> Tensor<2> {
        timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
        )
    }
}

/// diffusers `TimestepEmbedding` with SiLU and no condition projection or post-activation.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    /// `in_channels -> time_embed_dim`.
    pub linear_1: Linear,
    /// `time_embed_dim -> time_embed_dim`.
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    /// An MLP `in_channels -> time_embed_dim -> time_embed_dim`.
    pub fn new(in_channels: usize, time_embed_dim: usize, device: &Device) -> Self {
        Self {
            linear_1: Linear::new(in_channels, time_embed_dim, true, device),
            linear_2: Linear::new(time_embed_dim, time_embed_dim, true, device),
        }
    }

    /// `[N, in_channels] -> [N, time_embed_dim]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embed(dim: usize, flip: bool, shift: f64) -> Vec<f32> {
        let device = Device::flex();
        let t = Tensor::<1>::from_data(TensorData::new(vec![0.0f32, 1.0, 500.0], [3]), &device);
        timestep_embedding(t, dim, flip, shift)
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32")
    }

    fn assert_near(actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len());
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!((a - e).abs() < 2e-6, "element {i}: {a} vs {e}");
        }
    }

    // Expected values: diffusers 0.42.1 `get_timestep_embedding(torch.tensor([0., 1., 500.]), ...)`.
    #[test]
    fn flipped_embedding_matches_diffusers() {
        #[rustfmt::skip]
        let expected = [
            1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
            0.5403023, 0.9950042, 0.99995, 0.9999995, 0.84147096, 0.099833414, 0.009999833, 0.0009999998,
            -0.88384926, 0.96496505, 0.2836622, 0.87758255, -0.4677718, -0.26237854, -0.9589243, 0.47942552,
        ];
        assert_near(&embed(8, true, 0.0), &expected);
    }

    #[test]
    fn shifted_embedding_matches_diffusers() {
        #[rustfmt::skip]
        let expected = [
            0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0,
            0.84147096, 0.04639923, 0.0021544332, 9.999999e-5, 0.5403023, 0.998923, 0.9999977, 1.0,
            -0.4677718, -0.9379936, 0.8806428, 0.04997916, -0.88384926, -0.34665257, 0.47378072, 0.99875027,
        ];
        assert_near(&embed(8, false, 1.0), &expected);
    }

    #[test]
    fn odd_width_is_zero_padded() {
        #[rustfmt::skip]
        let expected = [
            1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0,
            0.5403023, 0.998923, 0.9999977, 0.84147096, 0.04639923, 0.0021544332, 0.0,
            -0.88384926, -0.34665257, 0.47378072, -0.4677718, -0.9379936, 0.8806428, 0.0,
        ];
        assert_near(&embed(7, true, 0.0), &expected);
    }

    #[test]
    fn frequencies_follow_the_formula() {
        let f = timestep_frequencies(4, 1.0);
        let expected: Vec<f32> = (0..4)
            .map(|i| (-(10000f64.ln()) * i as f64 / 3.0).exp() as f32)
            .collect();
        assert_near(&f, &expected);
    }
}
