//! The UNet's down, mid and up blocks (`DownBlock2D`, `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`) and the VAE's
//! (`DownEncoderBlock2D`, `UNetMidBlock2D`, `UpDecoderBlock2D`), as in diffusers: the sizes
//! every block shares live here, the blocks in [`down`], [`mid`] and [`up`].

use burn::tensor::Device;

use super::resnet::{ResnetBlock2D, ResnetConfig};
use super::transformer_2d::Transformer2DConfig;

mod down;
mod mid;
mod up;

pub use down::{CrossAttnDownBlock2D, DownBlock2D, DownEncoderBlock2D};
pub use mid::{UNetMidBlock2D, UNetMidBlock2DCrossAttn};
pub use up::{CrossAttnUpBlock2D, UpBlock2D, UpDecoderBlock2D};

/// Sizes shared by every block: the resnets' channels, time embedding and norms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockConfig {
    /// Input channels (for up blocks: the channels of the skip taken by the last resnet).
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Time-embedding width (`None` in the VAE).
    pub temb_channels: Option<usize>,
    /// Number of resnets (for up blocks already `layers_per_block + 1`).
    pub num_layers: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// Group-norm epsilon of the resnets.
    pub eps: f64,
    /// Resnet `output_scale_factor`.
    pub output_scale_factor: f64,
}

impl BlockConfig {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: self.output_scale_factor,
        }
    }
}

/// The cross-attention part of a block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossAttnConfig {
    /// Attention heads (`num_attention_heads` of the block); `dim_head = out_channels / heads`.
    pub heads: usize,
    /// Width of the encoder hidden states.
    pub cross_attention_dim: usize,
    /// `BasicTransformerBlock`s per `Transformer2DModel`.
    pub transformer_layers: usize,
    /// Linear instead of 1x1-conv projections in the transformers.
    pub use_linear_projection: bool,
}

impl CrossAttnConfig {
    fn transformer(&self, channels: usize, groups: usize) -> Transformer2DConfig {
        Transformer2DConfig {
            heads: self.heads,
            dim_head: channels / self.heads.max(1),
            in_channels: channels,
            num_layers: self.transformer_layers,
            cross_attention_dim: self.cross_attention_dim,
            norm_num_groups: groups,
            use_linear_projection: self.use_linear_projection,
        }
    }
}

/// Resnets `in -> out, out -> out, ...`.
fn down_resnets(config: &BlockConfig, device: &Device) -> Vec<ResnetBlock2D> {
    (0..config.num_layers)
        .map(|i| {
            let in_channels = if i == 0 {
                config.in_channels
            } else {
                config.out_channels
            };
            ResnetBlock2D::new(config.resnet(in_channels, config.out_channels), device)
        })
        .collect()
}
