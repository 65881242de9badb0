//! The UNet's down, mid and up blocks (`DownBlock2D`, `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`) and the VAE's
//! (`DownEncoderBlock2D`, `UNetMidBlock2D`, `UpDecoderBlock2D`), as in diffusers.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::attention::Attention;
use super::resampling::{Downsample2D, Upsample2D};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use super::transformer_2d::{Transformer2DConfig, Transformer2DModel};

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

fn downsampler(config: &BlockConfig, padding: Option<usize>, device: &Device) -> Vec<Downsample2D> {
    padding
        .map(|p| Downsample2D::new(config.out_channels, config.out_channels, p, device))
        .into_iter()
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
