//! The up blocks: the UNet's `UpBlock2D` and `CrossAttnUpBlock2D` (resnets on the skips of
//! the matching down block), and the VAE decoder's `UpDecoderBlock2D`.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::{down_resnets, BlockConfig, CrossAttnConfig};
use crate::models::resampling::Upsample2D;
use crate::models::resnet::ResnetBlock2D;
use crate::models::transformer_2d::Transformer2DModel;

/// diffusers `UpBlock2D`: resnets on `cat([x, skip])`, then an optional upsampler.
#[derive(Module, Debug)]
pub struct UpBlock2D {
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one `Upsample2D`.
    pub upsamplers: Vec<Upsample2D>,
}

impl UpBlock2D {
    /// A block taking `prev_output_channel` channels from below; see [`BlockConfig`].
    pub fn new(
        config: BlockConfig,
        prev_output_channel: usize,
        add_upsample: bool,
        device: &Device,
    ) -> Self {
        Self {
            resnets: up_resnets(&config, prev_output_channel, device),
            upsamplers: upsampler(&config, add_upsample, device),
        }
    }

    /// `x: [N, C_prev, H, W]`; pops one skip per resnet from the end of `skips`;
    /// `upsample_size` overrides the 2x upsampling size. `-> [N, C_out, H', W']`.
    pub fn forward(
        &self,
        x: Tensor<4>,
        skips: &mut Vec<Tensor<4>>,
        temb: &Tensor<2>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<4> {
        let mut x = x;
        for resnet in &self.resnets {
            x = resnet.forward(concat_skip(x, skips), Some(temb));
        }
        for up in &self.upsamplers {
            x = up.forward(x, upsample_size);
        }
        x
    }
}

/// diffusers `CrossAttnUpBlock2D`: (resnet on `cat([x, skip])`, transformer) pairs, then an
/// optional upsampler.
#[derive(Module, Debug)]
pub struct CrossAttnUpBlock2D {
    /// One transformer after each resnet.
    pub attentions: Vec<Transformer2DModel>,
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one `Upsample2D`.
    pub upsamplers: Vec<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    /// A block taking `prev_output_channel` channels from below; see [`BlockConfig`].
    pub fn new(
        config: BlockConfig,
        attn: CrossAttnConfig,
        prev_output_channel: usize,
        add_upsample: bool,
        device: &Device,
    ) -> Self {
        let transformer = attn.transformer(config.out_channels, config.groups);
        Self {
            attentions: (0..config.num_layers)
                .map(|_| Transformer2DModel::new(transformer, device))
                .collect(),
            resnets: up_resnets(&config, prev_output_channel, device),
            upsamplers: upsampler(&config, add_upsample, device),
        }
    }

    /// As [`UpBlock2D::forward`], with `context: [N, S, D]` for the transformers.
    pub fn forward(
        &self,
        x: Tensor<4>,
        skips: &mut Vec<Tensor<4>>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<4> {
        let mut x = x;
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            x = resnet.forward(concat_skip(x, skips), Some(temb));
            x = attn.forward(x, context);
        }
        for up in &self.upsamplers {
            x = up.forward(x, upsample_size);
        }
        x
    }
}

/// diffusers `UpDecoderBlock2D` (VAE): resnets without skips or time embedding, then an
/// optional upsampler.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D {
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one `Upsample2D`.
    pub upsamplers: Vec<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// A block `in_channels -> out_channels`.
    pub fn new(config: BlockConfig, add_upsample: bool, device: &Device) -> Self {
        Self {
            resnets: down_resnets(&config, device),
            upsamplers: upsampler(&config, add_upsample, device),
        }
    }

    /// `[N, C_in, H, W] -> [N, C_out, 2H, 2W]` (or same size without upsampler).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = x;
        for resnet in &self.resnets {
            x = resnet.forward(x, None);
        }
        for up in &self.upsamplers {
            x = up.forward(x, None);
        }
        x
    }
}

/// Up-block resnets: resnet `i` takes `(prev_output_channel if i == 0 else out)` channels plus
/// the skip's (`in_channels` for the last resnet, `out_channels` otherwise).
fn up_resnets(
    config: &BlockConfig,
    prev_output_channel: usize,
    device: &Device,
) -> Vec<ResnetBlock2D> {
    let n = config.num_layers;
    (0..n)
        .map(|i| {
            let skip = if i + 1 == n {
                config.in_channels
            } else {
                config.out_channels
            };
            let input = if i == 0 {
                prev_output_channel
            } else {
                config.out_channels
            };
            ResnetBlock2D::new(config.resnet(input + skip, config.out_channels), device)
        })
        .collect()
}

fn upsampler(config: &BlockConfig, add: bool, device: &Device) -> Vec<Upsample2D> {
    add.then(|| Upsample2D::new(config.out_channels, config.out_channels, device))
        .into_iter()
        .collect()
}

/// `cat([x, skips.pop()], dim = 1)`; `x` unchanged if no skip is left (a config error that
/// the UNet constructor rules out).
fn concat_skip(x: Tensor<4>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
    match skips.pop() {
        Some(skip) => Tensor::cat(vec![x, skip], 1),
        None => x,
    }
}
