//! The down blocks: the UNet's `DownBlock2D` and `CrossAttnDownBlock2D`, and the VAE
//! encoder's `DownEncoderBlock2D`.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::{down_resnets, BlockConfig, CrossAttnConfig};
use crate::models::resampling::Downsample2D;
use crate::models::resnet::ResnetBlock2D;
use crate::models::transformer_2d::Transformer2DModel;

/// diffusers `DownBlock2D`: resnets, then an optional stride-2 downsampler.
#[derive(Module, Debug)]
pub struct DownBlock2D {
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one `Downsample2D`.
    pub downsamplers: Vec<Downsample2D>,
}

impl DownBlock2D {
    /// A block; `downsample_padding: Some(p)` adds a downsampler with conv padding `p`.
    pub fn new(config: BlockConfig, downsample_padding: Option<usize>, device: &Device) -> Self {
        Self {
            resnets: down_resnets(&config, device),
            downsamplers: downsampler(&config, downsample_padding, device),
        }
    }

    /// `x: [N, C_in, H, W]`, `temb: [N, T]` `-> ([N, C_out, H', W'], skips)`, the skips being
    /// each resnet's output and the downsampled output, in order.
    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>) -> (Tensor<4>, Vec<Tensor<4>>) {
        let mut x = x;
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for resnet in &self.resnets {
            x = resnet.forward(x, Some(temb));
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        (x, skips)
    }
}

/// diffusers `CrossAttnDownBlock2D`: (resnet, transformer) pairs, then an optional downsampler.
#[derive(Module, Debug)]
pub struct CrossAttnDownBlock2D {
    /// One `Transformer2DModel` after each resnet.
    pub attentions: Vec<Transformer2DModel>,
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one `Downsample2D`.
    pub downsamplers: Vec<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    /// A block; `downsample_padding: Some(p)` adds a downsampler with conv padding `p`.
    pub fn new(
        config: BlockConfig,
        attn: CrossAttnConfig,
        downsample_padding: Option<usize>,
        device: &Device,
    ) -> Self {
        let transformer = attn.transformer(config.out_channels, config.groups);
        Self {
            attentions: (0..config.num_layers)
                .map(|_| Transformer2DModel::new(transformer, device))
                .collect(),
            resnets: down_resnets(&config, device),
            downsamplers: downsampler(&config, downsample_padding, device),
        }
    }

    /// `x: [N, C_in, H, W]`, `temb: [N, T]`, `context: [N, S, D]`
    /// `-> ([N, C_out, H', W'], skips)` as [`DownBlock2D::forward`].
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
    ) -> (Tensor<4>, Vec<Tensor<4>>) {
        let mut x = x;
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            x = resnet.forward(x, Some(temb));
            x = attn.forward(x, context);
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        (x, skips)
    }
}

/// diffusers `DownEncoderBlock2D` (VAE): resnets without time embedding, then an optional
/// downsampler (padding 0 with the asymmetric pad).
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D {
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one `Downsample2D`.
    pub downsamplers: Vec<Downsample2D>,
}

impl DownEncoderBlock2D {
    /// A block; `downsample_padding: Some(p)` adds a downsampler with conv padding `p`.
    pub fn new(config: BlockConfig, downsample_padding: Option<usize>, device: &Device) -> Self {
        Self {
            resnets: down_resnets(&config, device),
            downsamplers: downsampler(&config, downsample_padding, device),
        }
    }

    /// `[N, C_in, H, W] -> [N, C_out, H', W']`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = x;
        for resnet in &self.resnets {
            x = resnet.forward(x, None);
        }
        for down in &self.downsamplers {
            x = down.forward(x);
        }
        x
    }
}

fn downsampler(config: &BlockConfig, padding: Option<usize>, device: &Device) -> Vec<Downsample2D> {
    padding
        .map(|p| Downsample2D::new(config.out_channels, config.out_channels, p, device))
        .into_iter()
        .collect()
}
