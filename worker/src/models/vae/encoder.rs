//! The diffusers VAE `Encoder`: image to posterior moments.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};

use super::AutoencoderKLConfig;
use crate::models::unet_2d_blocks::{DownEncoderBlock2D, UNetMidBlock2D};
use crate::nn::{Conv2d, GroupNorm};

/// diffusers VAE `Encoder` (`double_z`): image `[N, 3, H, W]` to posterior moments
/// `[N, 2 * latent, H / 2^(levels-1), W / 2^(levels-1)]`.
#[derive(Module, Debug)]
pub struct Encoder {
    /// `in_channels -> block_out_channels[0]`.
    pub conv_in: Conv2d,
    /// Down blocks (padding-0 downsamplers except the last).
    pub down_blocks: Vec<DownEncoderBlock2D>,
    /// Resnet, attention, resnet.
    pub mid_block: UNetMidBlock2D,
    /// Output group norm.
    pub conv_norm_out: GroupNorm,
    /// `block_out_channels[-1] -> 2 * latent_channels`.
    pub conv_out: Conv2d,
}

impl Encoder {
    pub(super) fn new(config: &AutoencoderKLConfig, device: &Device) -> Self {
        let channels = &config.block_out_channels;
        let n = channels.len();
        let last = channels[n - 1];
        Self {
            conv_in: Conv2d::new(config.in_channels, channels[0], 3, 1, 1, device),
            down_blocks: (0..n)
                .map(|i| {
                    let in_channels = if i == 0 { channels[0] } else { channels[i - 1] };
                    let block = config.block(in_channels, channels[i], config.layers_per_block);
                    DownEncoderBlock2D::new(block, (i + 1 < n).then_some(0), device)
                })
                .collect(),
            mid_block: UNetMidBlock2D::new(
                config.block(last, last, 1),
                last,
                config.mid_block_add_attention,
                device,
            ),
            conv_norm_out: GroupNorm::new(config.norm_num_groups, last, 1e-6, device),
            conv_out: Conv2d::new(last, 2 * config.latent_channels, 3, 1, 1, device),
        }
    }

    /// `[N, C, H, W] -> [N, 2 * latent, h, w]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        for block in &self.down_blocks {
            x = block.forward(x);
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}
