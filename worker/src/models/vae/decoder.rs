//! The diffusers VAE `Decoder`: latents to image.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};

use super::AutoencoderKLConfig;
use crate::models::unet_2d_blocks::{UNetMidBlock2D, UpDecoderBlock2D};
use crate::nn::{Conv2d, GroupNorm};

/// diffusers VAE `Decoder` (group norm): latents `[N, latent, h, w]` to an image.
#[derive(Module, Debug)]
pub struct Decoder {
    /// `latent_channels -> block_out_channels[-1]`.
    pub conv_in: Conv2d,
    /// Resnet, attention, resnet.
    pub mid_block: UNetMidBlock2D,
    /// Up blocks (deepest first; upsamplers except the last).
    pub up_blocks: Vec<UpDecoderBlock2D>,
    /// Output group norm.
    pub conv_norm_out: GroupNorm,
    /// `block_out_channels[0] -> out_channels`.
    pub conv_out: Conv2d,
}

impl Decoder {
    pub(super) fn new(config: &AutoencoderKLConfig, device: &Device) -> Self {
        let channels = &config.block_out_channels;
        let n = channels.len();
        let last = channels[n - 1];
        Self {
            conv_in: Conv2d::new(config.latent_channels, last, 3, 1, 1, device),
            mid_block: UNetMidBlock2D::new(
                config.block(last, last, 1),
                last,
                config.mid_block_add_attention,
                device,
            ),
            up_blocks: (0..n)
                .map(|i| {
                    let prev = channels[n - i.max(1)];
                    let out = channels[n - 1 - i];
                    let block = config.block(prev, out, config.layers_per_block + 1);
                    UpDecoderBlock2D::new(block, i + 1 < n, device)
                })
                .collect(),
            conv_norm_out: GroupNorm::new(config.norm_num_groups, channels[0], 1e-6, device),
            conv_out: Conv2d::new(channels[0], config.out_channels, 3, 1, 1, device),
        }
    }

    /// `[N, latent, h, w] -> [N, out_channels, H, W]`.
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let x = self.conv_in.forward(z);
        let mut x = self.mid_block.forward(x);
        for block in &self.up_blocks {
            x = block.forward(x);
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}
