//! The mid blocks: the UNet's `UNetMidBlock2DCrossAttn` and the VAE's `UNetMidBlock2D`.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::{BlockConfig, CrossAttnConfig};
use crate::models::attention::Attention;
use crate::models::resnet::ResnetBlock2D;
use crate::models::transformer_2d::Transformer2DModel;

/// diffusers `UNetMidBlock2DCrossAttn` (one layer): resnet, transformer, resnet.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn {
    /// One transformer.
    pub attentions: Vec<Transformer2DModel>,
    /// Two resnets.
    pub resnets: Vec<ResnetBlock2D>,
}

impl UNetMidBlock2DCrossAttn {
    /// A mid block on `config.in_channels` channels (`num_layers` is ignored: always 1).
    pub fn new(config: BlockConfig, attn: CrossAttnConfig, device: &Device) -> Self {
        let channels = config.in_channels;
        let resnet = config.resnet(channels, channels);
        Self {
            attentions: vec![Transformer2DModel::new(
                attn.transformer(channels, config.groups),
                device,
            )],
            resnets: vec![
                ResnetBlock2D::new(resnet, device),
                ResnetBlock2D::new(resnet, device),
            ],
        }
    }

    /// `x: [N, C, H, W]`, `temb: [N, T]`, `context: [N, S, D]` `-> [N, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
        let mut resnets = self.resnets.iter();
        let mut x = match resnets.next() {
            Some(first) => first.forward(x, Some(temb)),
            None => x,
        };
        for (attn, resnet) in self.attentions.iter().zip(resnets) {
            x = attn.forward(x, context);
            x = resnet.forward(x, Some(temb));
        }
        x
    }
}

/// diffusers `UNetMidBlock2D` (VAE, one layer): resnet, group-norm self-attention, resnet.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D {
    /// One spatial attention (none when `mid_block_add_attention` is false).
    pub attentions: Vec<Attention>,
    /// Two resnets.
    pub resnets: Vec<ResnetBlock2D>,
}

impl UNetMidBlock2D {
    /// A mid block on `config.in_channels` channels with one attention head of width
    /// `attention_head_dim` per `attention_head_dim` channels.
    pub fn new(
        config: BlockConfig,
        attention_head_dim: usize,
        add_attention: bool,
        device: &Device,
    ) -> Self {
        let channels = config.in_channels;
        let resnet = config.resnet(channels, channels);
        let attentions = if add_attention {
            vec![Attention::new_spatial(
                channels,
                attention_head_dim,
                config.groups,
                config.eps,
                config.output_scale_factor,
                device,
            )]
        } else {
            Vec::new()
        };
        Self {
            attentions,
            resnets: vec![
                ResnetBlock2D::new(resnet, device),
                ResnetBlock2D::new(resnet, device),
            ],
        }
    }

    /// `[N, C, H, W] -> [N, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut resnets = self.resnets.iter();
        let mut x = match resnets.next() {
            Some(first) => first.forward(x, None),
            None => x,
        };
        let mut attentions = self.attentions.iter();
        for resnet in resnets {
            if let Some(attn) = attentions.next() {
                x = attn.forward_spatial(x);
            }
            x = resnet.forward(x, None);
        }
        x
    }
}
