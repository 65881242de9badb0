//! The per-block plan of a `UNet2DConditionModel`: which down, mid and up blocks it has and
//! their channels, heads and layers, derived from a validated [`UNet2DConditionConfig`] as
//! diffusers does.

use std::path::Path;

use super::config::{OneOrMany, UNet2DConditionConfig};
use crate::error::ModelError;
use crate::models::config_error;
use crate::models::unet_2d_blocks::{BlockConfig, CrossAttnConfig};

/// The supported down / up block families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: resnets and transformers.
    CrossAttn,
}

/// The sizes of one block, as diffusers derives them from the config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockPlan {
    /// Block family.
    pub kind: BlockKind,
    /// The block's resnet sizes.
    pub block: BlockConfig,
    /// Transformer sizes (used by cross-attention blocks only).
    pub attn: CrossAttnConfig,
    /// Channels coming from the block below (up blocks only; equal to `in_channels` else).
    pub prev_output_channel: usize,
    /// Down blocks: a downsampler; up blocks: an upsampler.
    pub resample: bool,
}

/// Every block's sizes, derived from a validated config.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetPlan {
    /// Width of the time embedding.
    pub time_embed_dim: usize,
    /// Down blocks, shallowest first.
    pub down: Vec<BlockPlan>,
    /// The mid block, if any.
    pub mid: Option<BlockPlan>,
    /// Up blocks, deepest first.
    pub up: Vec<BlockPlan>,
}

impl UNet2DConditionConfig {
    /// Validates the config and derives every block's sizes as diffusers does.
    pub fn plan(&self, source: &Path) -> Result<UNetPlan, ModelError> {
        self.check_supported(source)?;
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(config_error(source, "`block_out_channels` is empty"));
        }
        let lengths = [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ];
        for (option, len) in lengths {
            if len != n {
                return Err(config_error(
                    source,
                    format!("`{option}` has {len} entries but `block_out_channels` has {n}"),
                ));
            }
        }
        let per_block = |option: &str, value: &OneOrMany<usize>| {
            value.per_block(n).ok_or_else(|| {
                config_error(
                    source,
                    format!(
                        "`{option}` = {} does not give one value per block ({n})",
                        serde_json::to_string(value).unwrap_or_default()
                    ),
                )
            })
        };
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads = per_block("attention_head_dim", &self.attention_head_dim)?;
        let cross_dims = per_block("cross_attention_dim", &self.cross_attention_dim)?;
        let layers = per_block("layers_per_block", &self.layers_per_block)?;
        let transformer_layers = per_block(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
        )?;
        let groups = self.norm_num_groups.unwrap_or(32);
        let channels = &self.block_out_channels;
        for &c in channels {
            if groups == 0 || c % groups != 0 {
                return Err(config_error(
                    source,
                    format!(
                        "`norm_num_groups` = {groups} does not divide the {c} channels of a block"
                    ),
                ));
            }
        }
        for (option, kernel) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if kernel % 2 == 0 {
                return Err(ModelError::unsupported(source, option, kernel));
            }
        }
        let time_embed_dim = self.time_embedding_dim.unwrap_or(4 * channels[0]);
        let block = |in_channels, out_channels, num_layers, output_scale_factor| BlockConfig {
            in_channels,
            out_channels,
            temb_channels: Some(time_embed_dim),
            num_layers,
            groups,
            eps: self.norm_eps,
            output_scale_factor,
        };
        let attn = |heads: usize, cross_attention_dim, transformer_layers, channels: usize| {
            if heads == 0 || !channels.is_multiple_of(heads) {
                return Err(config_error(
                    source,
                    format!(
                        "{heads} attention heads (`attention_head_dim`) do not divide \
                         {channels} channels"
                    ),
                ));
            }
            Ok(CrossAttnConfig {
                heads,
                cross_attention_dim,
                transformer_layers,
                use_linear_projection: self.use_linear_projection,
            })
        };
        let kind = |option: &str, name: &str, plain: &str, cross: &str| {
            let stripped = name.strip_prefix("UNetRes").unwrap_or(name);
            if stripped == plain {
                Ok(BlockKind::Plain)
            } else if stripped == cross {
                Ok(BlockKind::CrossAttn)
            } else {
                Err(ModelError::unsupported(source, option, name))
            }
        };

        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let in_channels = if i == 0 { channels[0] } else { channels[i - 1] };
            let kind = kind(
                "down_block_types",
                &self.down_block_types[i],
                "DownBlock2D",
                "CrossAttnDownBlock2D",
            )?;
            let attn = match kind {
                BlockKind::CrossAttn => {
                    attn(heads[i], cross_dims[i], transformer_layers[i], channels[i])?
                }
                BlockKind::Plain => unchecked_attn(
                    heads[i],
                    cross_dims[i],
                    transformer_layers[i],
                    self.use_linear_projection,
                ),
            };
            down.push(BlockPlan {
                kind,
                block: block(in_channels, channels[i], layers[i], 1.0),
                attn,
                prev_output_channel: in_channels,
                resample: i + 1 < n,
            });
        }

        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let c = channels[n - 1];
                Some(BlockPlan {
                    kind: BlockKind::CrossAttn,
                    block: block(c, c, 1, self.mid_block_scale_factor),
                    attn: attn(
                        heads[n - 1],
                        cross_dims[n - 1],
                        transformer_layers[n - 1],
                        c,
                    )?,
                    prev_output_channel: c,
                    resample: false,
                })
            }
            Some(other) => return Err(ModelError::unsupported(source, "mid_block_type", other)),
        };

        let mut up = Vec::with_capacity(n);
        let mut output_channel = channels[n - 1];
        for i in 0..n {
            let r = n - 1 - i; // the matching down level
            let prev_output_channel = output_channel;
            output_channel = channels[r];
            let in_channels = channels[r.saturating_sub(1)];
            let kind = kind(
                "up_block_types",
                &self.up_block_types[i],
                "UpBlock2D",
                "CrossAttnUpBlock2D",
            )?;
            let attn = match kind {
                BlockKind::CrossAttn => attn(
                    heads[r],
                    cross_dims[r],
                    transformer_layers[r],
                    output_channel,
                )?,
                BlockKind::Plain => unchecked_attn(
                    heads[r],
                    cross_dims[r],
                    transformer_layers[r],
                    self.use_linear_projection,
                ),
            };
            up.push(BlockPlan {
                kind,
                block: block(in_channels, output_channel, layers[r] + 1, 1.0),
                attn,
                prev_output_channel,
                resample: i + 1 < n,
            });
        }
        Ok(UNetPlan {
            time_embed_dim,
            down,
            mid,
            up,
        })
    }
}

/// The cross-attention sizes recorded (unused) for a plain block.
pub(super) fn unchecked_attn(
    heads: usize,
    cross_attention_dim: usize,
    transformer_layers: usize,
    use_linear_projection: bool,
) -> CrossAttnConfig {
    CrossAttnConfig {
        heads,
        cross_attention_dim,
        transformer_layers,
        use_linear_projection,
    }
}
