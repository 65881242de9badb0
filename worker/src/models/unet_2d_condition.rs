//! diffusers `UNet2DConditionModel` (the Stable Diffusion 1.x/2.x denoiser): its config as
//! read from `unet/config.json`, the per-block plan derived from it, the model, its forward
//! pass, and loading / saving in the diffusers folder layout.

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::unet_2d_blocks::{
    BlockConfig, CrossAttnConfig, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
    UNetMidBlock2DCrossAttn, UpBlock2D,
};
use super::{
    config_error, read_config, require_silu, require_unset, require_value, unsupported_json,
    write_config, CONFIG_NAME, WEIGHTS_NAME,
};
use crate::error::ModelError;
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::{load_module, save_module, WeightFile};

/// A config value given either once for every block or as one value per block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// The same value for every block.
    One(T),
    /// One value per block, in down-block order.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The value for each of `n` blocks, or `None` if a list has another length.
    pub fn per_block(&self, n: usize) -> Option<Vec<T>> {
        match self {
            Self::One(value) => Some(vec![value.clone(); n]),
            Self::Many(values) if values.len() == n => Some(values.clone()),
            Self::Many(_) => None,
        }
    }
}

/// `unet/config.json` of a diffusers `UNet2DConditionModel`. Missing fields take diffusers'
/// defaults; unknown fields are ignored. Options this implementation does not support are
/// kept so that [`UNet2DConditionConfig::validate`] can name them. `Default` is SD-1.5's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default = "UNet2DConditionConfig::diffusers_default")]
pub struct UNet2DConditionConfig {
    /// Latent size the model was trained on (informational).
    pub sample_size: Option<OneOrMany<usize>>,
    /// Latent channels in.
    pub in_channels: usize,
    /// Channels out.
    pub out_channels: usize,
    /// Map the input from `[0, 1]` to `[-1, 1]` first.
    pub center_input_sample: bool,
    /// Timestep embedding laid out `[cos, sin]` instead of `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep embedding.
    pub freq_shift: f64,
    /// `DownBlock2D` or `CrossAttnDownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn`, or `None` for no mid block.
    pub mid_block_type: Option<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D` per level (deepest first).
    pub up_block_types: Vec<String>,
    /// Must be false.
    pub only_cross_attention: OneOrMany<bool>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: OneOrMany<usize>,
    /// Conv padding of the downsamplers.
    pub downsample_padding: usize,
    /// `output_scale_factor` of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Must be 0.
    pub dropout: f64,
    /// Must be `silu`.
    pub act_fn: String,
    /// Group-norm groups (must be set).
    pub norm_num_groups: Option<usize>,
    /// Group-norm epsilon of the resnets and the output norm.
    pub norm_eps: f64,
    /// Width of the encoder hidden states, per block or for all.
    pub cross_attention_dim: OneOrMany<usize>,
    /// `BasicTransformerBlock`s per transformer, per block or for all.
    pub transformer_layers_per_block: OneOrMany<usize>,
    /// Must be unset.
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Must be unset.
    pub encoder_hid_dim: Option<serde_json::Value>,
    /// Must be unset.
    pub encoder_hid_dim_type: Option<serde_json::Value>,
    /// Despite its name, the number of attention heads per block (diffusers' naming quirk).
    pub attention_head_dim: OneOrMany<usize>,
    /// Must be unset (diffusers rejects it too).
    pub num_attention_heads: Option<serde_json::Value>,
    /// Must be false.
    pub dual_cross_attention: bool,
    /// Linear instead of 1x1-conv projections in the transformers.
    pub use_linear_projection: bool,
    /// Must be unset.
    pub class_embed_type: Option<serde_json::Value>,
    /// Must be unset.
    pub addition_embed_type: Option<serde_json::Value>,
    /// Must be unset.
    pub addition_time_embed_dim: Option<serde_json::Value>,
    /// Must be unset.
    pub num_class_embeds: Option<serde_json::Value>,
    /// Must be false.
    pub upcast_attention: bool,
    /// Must be `default`.
    pub resnet_time_scale_shift: String,
    /// Not used by the supported block types.
    pub resnet_skip_time_act: bool,
    /// Not used by the supported block types.
    pub resnet_out_scale_factor: f64,
    /// Must be `positional`.
    pub time_embedding_type: String,
    /// Width of the time embedding (default `4 * block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// Must be unset.
    pub time_embedding_act_fn: Option<serde_json::Value>,
    /// Must be unset.
    pub timestep_post_act: Option<serde_json::Value>,
    /// Must be unset.
    pub time_cond_proj_dim: Option<serde_json::Value>,
    /// Kernel of `conv_in` (odd).
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out` (odd).
    pub conv_out_kernel: usize,
    /// Must be unset.
    pub projection_class_embeddings_input_dim: Option<serde_json::Value>,
    /// Must be `default`.
    pub attention_type: String,
    /// Must be false.
    pub class_embeddings_concat: bool,
    /// Not used by `UNetMidBlock2DCrossAttn`.
    pub mid_block_only_cross_attention: Option<bool>,
    /// Not used by the supported block types.
    pub cross_attention_norm: Option<serde_json::Value>,
    /// Not used without an addition embedding.
    pub addition_embed_type_num_heads: usize,
}

impl Default for UNet2DConditionConfig {
    /// Stable Diffusion 1.5's `unet/config.json`.
    fn default() -> Self {
        Self {
            sample_size: Some(OneOrMany::One(64)),
            cross_attention_dim: OneOrMany::One(768),
            ..Self::diffusers_default()
        }
    }
}

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
    /// The latent `(height, width)` the model was trained on (`sample_size`; 64 when absent).
    pub fn latent_size(&self) -> (usize, usize) {
        match &self.sample_size {
            Some(OneOrMany::One(s)) => (*s, *s),
            Some(OneOrMany::Many(hw)) if hw.len() == 2 => (hw[0], hw[1]),
            _ => (64, 64),
        }
    }

    /// Width of the text conditioning (the first block's, when given per block).
    pub fn context_dim(&self) -> usize {
        match &self.cross_attention_dim {
            OneOrMany::One(d) => *d,
            OneOrMany::Many(ds) => ds.first().copied().unwrap_or(768),
        }
    }

    /// diffusers' `UNet2DConditionModel.__init__` defaults (used for fields a file omits).
    pub fn diffusers_default() -> Self {
        let strings = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_string()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".to_string(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: OneOrMany::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".to_string(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".to_string(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }

    /// Reads and validates a diffusers `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let config: Self = read_config(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every option is supported and consistent; errors name the option, its value and
    /// `source` (the config file).
    pub fn validate(&self, source: &Path) -> Result<(), ModelError> {
        self.plan(source).map(|_| ())
    }

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

    /// Rejects options whose non-default values this implementation does not support.
    fn check_supported(&self, source: &Path) -> Result<(), ModelError> {
        let unset = [
            (
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            ),
            ("encoder_hid_dim", &self.encoder_hid_dim),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
            ("num_attention_heads", &self.num_attention_heads),
            ("class_embed_type", &self.class_embed_type),
            ("addition_embed_type", &self.addition_embed_type),
            ("addition_time_embed_dim", &self.addition_time_embed_dim),
            ("num_class_embeds", &self.num_class_embeds),
            ("time_embedding_act_fn", &self.time_embedding_act_fn),
            ("timestep_post_act", &self.timestep_post_act),
            ("time_cond_proj_dim", &self.time_cond_proj_dim),
            (
                "projection_class_embeddings_input_dim",
                &self.projection_class_embeddings_input_dim,
            ),
        ];
        for (option, value) in unset {
            // `null` in the file deserialises to `None`; anything else is a setting.
            require_unset(source, option, value)?;
        }
        let only_cross = match &self.only_cross_attention {
            OneOrMany::One(value) => *value,
            OneOrMany::Many(values) => values.iter().any(|v| *v),
        };
        if only_cross {
            return Err(unsupported_json(
                source,
                "only_cross_attention",
                &self.only_cross_attention,
            ));
        }
        require_value(
            source,
            "dual_cross_attention",
            &self.dual_cross_attention,
            &false,
        )?;
        require_value(source, "upcast_attention", &self.upcast_attention, &false)?;
        require_value(
            source,
            "class_embeddings_concat",
            &self.class_embeddings_concat,
            &false,
        )?;
        require_value(source, "dropout", &self.dropout, &0.0)?;
        require_value(
            source,
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift.as_str(),
            &"default",
        )?;
        require_value(
            source,
            "time_embedding_type",
            &self.time_embedding_type.as_str(),
            &"positional",
        )?;
        require_value(
            source,
            "attention_type",
            &self.attention_type.as_str(),
            &"default",
        )?;
        require_silu(source, "act_fn", &self.act_fn)?;
        if self.norm_num_groups.is_none() {
            return Err(unsupported_json(
                source,
                "norm_num_groups",
                &serde_json::Value::Null,
            ));
        }
        Ok(())
    }
}

/// The cross-attention sizes recorded (unused) for a plain block.
fn unchecked_attn(
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

/// A down block of either family (the variant is not part of the parameter path).
#[derive(Module, Debug)]
pub enum DownBlock {
    /// `DownBlock2D`.
    DownBlock2D(DownBlock2D),
    /// `CrossAttnDownBlock2D`.
    CrossAttnDownBlock2D(CrossAttnDownBlock2D),
}

impl DownBlock {
    /// `-> (output, skips)`; see [`DownBlock2D::forward`].
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
    ) -> (Tensor<4>, Vec<Tensor<4>>) {
        match self {
            Self::DownBlock2D(block) => block.forward(x, temb),
            Self::CrossAttnDownBlock2D(block) => block.forward(x, temb, context),
        }
    }
}

/// An up block of either family (the variant is not part of the parameter path).
#[derive(Module, Debug)]
pub enum UpBlock {
    /// `UpBlock2D`.
    UpBlock2D(UpBlock2D),
    /// `CrossAttnUpBlock2D`.
    CrossAttnUpBlock2D(CrossAttnUpBlock2D),
}

impl UpBlock {
    /// Number of skips the block consumes (one per resnet).
    pub fn num_resnets(&self) -> usize {
        match self {
            Self::UpBlock2D(block) => block.resnets.len(),
            Self::CrossAttnUpBlock2D(block) => block.resnets.len(),
        }
    }

    /// See [`UpBlock2D::forward`].
    pub fn forward(
        &self,
        x: Tensor<4>,
        skips: &mut Vec<Tensor<4>>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<4> {
        match self {
            Self::UpBlock2D(block) => block.forward(x, skips, temb, upsample_size),
            Self::CrossAttnUpBlock2D(block) => {
                block.forward(x, skips, temb, context, upsample_size)
            }
        }
    }
}

/// diffusers `UNet2DConditionModel`; parameter paths are the diffusers state-dict keys.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    /// `in_channels -> block_out_channels[0]`.
    pub conv_in: Conv2d,
    /// Timestep MLP.
    pub time_embedding: TimestepEmbedding,
    /// Down blocks.
    pub down_blocks: Vec<DownBlock>,
    /// Mid block.
    pub mid_block: Option<UNetMidBlock2DCrossAttn>,
    /// Up blocks.
    pub up_blocks: Vec<UpBlock>,
    /// Output group norm.
    pub conv_norm_out: GroupNorm,
    /// `block_out_channels[0] -> out_channels`.
    pub conv_out: Conv2d,
    #[module(skip)]
    time_proj: Timesteps,
    #[module(skip)]
    center_input_sample: bool,
}

/// The pseudo-path named in errors about configs that did not come from a file.
const IN_MEMORY: &str = "<UNet2DConditionConfig>";

impl UNet2DConditionModel {
    /// Builds the model from `config` (validated; parameters lazily initialised, so nothing is
    /// allocated until they are read or loaded).
    pub fn new(config: &UNet2DConditionConfig, device: &Device) -> Result<Self, ModelError> {
        let plan = config.plan(Path::new(IN_MEMORY))?;
        Ok(Self::from_plan(config, &plan, device))
    }

    fn from_plan(config: &UNet2DConditionConfig, plan: &UNetPlan, device: &Device) -> Self {
        let c0 = config.block_out_channels[0];
        let down_padding = config.downsample_padding;
        let down_blocks = plan
            .down
            .iter()
            .map(|p| {
                let padding = p.resample.then_some(down_padding);
                match p.kind {
                    BlockKind::Plain => {
                        DownBlock::DownBlock2D(DownBlock2D::new(p.block, padding, device))
                    }
                    BlockKind::CrossAttn => DownBlock::CrossAttnDownBlock2D(
                        CrossAttnDownBlock2D::new(p.block, p.attn, padding, device),
                    ),
                }
            })
            .collect();
        let up_blocks = plan
            .up
            .iter()
            .map(|p| match p.kind {
                BlockKind::Plain => UpBlock::UpBlock2D(UpBlock2D::new(
                    p.block,
                    p.prev_output_channel,
                    p.resample,
                    device,
                )),
                BlockKind::CrossAttn => UpBlock::CrossAttnUpBlock2D(CrossAttnUpBlock2D::new(
                    p.block,
                    p.attn,
                    p.prev_output_channel,
                    p.resample,
                    device,
                )),
            })
            .collect();
        let groups = config.norm_num_groups.unwrap_or(32);
        let (k_in, k_out) = (config.conv_in_kernel, config.conv_out_kernel);
        Self {
            conv_in: Conv2d::new(config.in_channels, c0, k_in, 1, (k_in - 1) / 2, device),
            time_embedding: TimestepEmbedding::new(c0, plan.time_embed_dim, device),
            down_blocks,
            mid_block: plan
                .mid
                .map(|p| UNetMidBlock2DCrossAttn::new(p.block, p.attn, device)),
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, c0, config.norm_eps, device),
            conv_out: Conv2d::new(c0, config.out_channels, k_out, 1, (k_out - 1) / 2, device),
            time_proj: Timesteps {
                num_channels: c0,
                flip_sin_to_cos: config.flip_sin_to_cos,
                downscale_freq_shift: config.freq_shift,
            },
            center_input_sample: config.center_input_sample,
        }
    }

    /// Loads a diffusers `unet/` folder: `config.json` and
    /// `diffusion_pytorch_model.safetensors` (f32, f16 or bf16). Errors name the file.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, UNet2DConditionConfig), ModelError> {
        let config_path = dir.join(CONFIG_NAME);
        let config = UNet2DConditionConfig::from_file(&config_path)?;
        let plan = config.plan(&config_path)?;
        let model = Self::from_plan(&config, &plan, device);
        let file = WeightFile::open(&dir.join(WEIGHTS_NAME))?;
        let model = load_module(model, &file, "", device)?;
        Ok((model, config))
    }

    /// Writes `config.json` (with `_class_name`) and `diffusion_pytorch_model.safetensors`
    /// (f32) into `dir`, creating it if needed.
    pub fn save(&self, config: &UNet2DConditionConfig, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        write_config(config, "UNet2DConditionModel", &dir.join(CONFIG_NAME))?;
        save_module(self, &dir.join(WEIGHTS_NAME))
    }

    /// Predicts the noise (or v) for noisy latents.
    ///
    /// - `sample`: `[N, in_channels, H, W]` noisy latents;
    /// - `timesteps`: `[N]` (or `[1]`, broadcast to the batch) float timesteps;
    /// - `encoder_hidden_states`: `[N, L, cross_attention_dim]` text-encoder states;
    ///
    /// returns `[N, out_channels, H, W]`.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Tensor<4> {
        let [batch, _, height, width] = sample.dims();
        let context = encoder_hidden_states;
        let sample = if self.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample
        };

        // 1. time: sinusoidal projection [N, C0] then MLP -> emb [N, time_embed_dim]
        let timesteps = if timesteps.dims()[0] == 1 && batch > 1 {
            timesteps.expand([batch])
        } else {
            timesteps
        };
        let emb = self
            .time_embedding
            .forward(self.time_proj.forward(timesteps));

        // 2. pre-process
        let mut x = self.conv_in.forward(sample);

        // 3. down: keep every intermediate output as a skip for the up path
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(x, &emb, &context);
            x = out;
            skips.extend(block_skips);
        }

        // 4. mid
        if let Some(mid) = &self.mid_block {
            x = mid.forward(x, &emb, &context);
        }

        // 5. up: when the input is not a multiple of the overall upsampling factor, each
        //    upsampler targets the size of the next skip instead of 2x
        let num_upsamplers = self.up_blocks.len().saturating_sub(1);
        let factor = 1usize << num_upsamplers;
        let forward_upsample_size = height % factor != 0 || width % factor != 0;
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len().saturating_sub(block.num_resnets());
            let upsample_size = (i < last && forward_upsample_size && remaining > 0).then(|| {
                let dims = skips[remaining - 1].dims();
                [dims[2], dims[3]]
            });
            x = block.forward(x, &mut skips, &emb, &context, upsample_size);
        }

        // 6. out
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::named_shapes;
    use burn::tensor::Distribution;

    fn tiny_config() -> UNet2DConditionConfig {
        UNet2DConditionConfig {
            block_out_channels: vec![8, 16],
            down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
            up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
            attention_head_dim: OneOrMany::One(2),
            cross_attention_dim: OneOrMany::One(12),
            norm_num_groups: Some(4),
            layers_per_block: OneOrMany::One(1),
            ..UNet2DConditionConfig::diffusers_default()
        }
    }

    #[test]
    fn heads_follow_attention_head_dim_per_block_and_reverse_for_up_blocks() {
        let config = UNet2DConditionConfig {
            block_out_channels: vec![8, 16, 32],
            down_block_types: vec!["CrossAttnDownBlock2D".into(); 3],
            up_block_types: vec!["CrossAttnUpBlock2D".into(); 3],
            attention_head_dim: OneOrMany::Many(vec![2, 4, 8]),
            norm_num_groups: Some(4),
            ..UNet2DConditionConfig::diffusers_default()
        };
        let plan = config.plan(Path::new("x")).expect("valid");
        let heads = |blocks: &[BlockPlan]| blocks.iter().map(|b| b.attn.heads).collect::<Vec<_>>();
        assert_eq!(heads(&plan.down), [2, 4, 8]);
        assert_eq!(plan.mid.map(|m| m.attn.heads), Some(8));
        assert_eq!(heads(&plan.up), [8, 4, 2]);
        // channels of up block i come from level n-1-i; dim_head = channels / heads = 4
        let model = UNet2DConditionModel::new(&config, &Device::flex()).expect("model");
        match &model.up_blocks[0] {
            UpBlock::CrossAttnUpBlock2D(block) => {
                let attn = &block.attentions[0].transformer_blocks[0].attn1;
                assert_eq!((attn.heads(), attn.dim_head()), (8, 4));
            }
            UpBlock::UpBlock2D(_) => panic!("expected a cross-attention block"),
        }
    }

    #[test]
    fn sd15_default_plan() {
        let plan = UNet2DConditionConfig::default()
            .plan(Path::new("sd15"))
            .expect("valid");
        assert_eq!(plan.time_embed_dim, 1280);
        assert!(plan.down.iter().all(|b| b.attn.heads == 8));
        assert_eq!(plan.up[1].block.num_layers, 3);
        assert_eq!(plan.up[1].prev_output_channel, 1280);
        assert_eq!(plan.up[3].block.in_channels, 320);
    }

    #[test]
    fn unsupported_options_name_option_value_and_file() {
        let dir = std::env::temp_dir().join(format!("unet-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("config.json");
        let cases = [
            (
                r#"{"class_embed_type": "timestep"}"#,
                "class_embed_type",
                "timestep",
            ),
            (
                r#"{"resnet_time_scale_shift": "scale_shift"}"#,
                "resnet_time_scale_shift",
                "scale_shift",
            ),
            (
                r#"{"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}"#,
                "mid_block_type",
                "UNetMidBlock2DSimpleCrossAttn",
            ),
            (
                r#"{"addition_embed_type": "text_time"}"#,
                "addition_embed_type",
                "text_time",
            ),
            (r#"{"upcast_attention": true}"#, "upcast_attention", "true"),
            (
                r#"{"only_cross_attention": [false, true, false, false]}"#,
                "only_cross_attention",
                "[false,true,false,false]",
            ),
            (
                r#"{"encoder_hid_dim": 1024}"#,
                "encoder_hid_dim",
                "= 1024 in",
            ),
            (
                r#"{"time_embedding_type": "fourier"}"#,
                "time_embedding_type",
                "fourier",
            ),
            (
                r#"{"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
                "down_block_types",
                "AttnDownBlock2D",
            ),
        ];
        for (json, option, value) in cases {
            std::fs::write(&path, json).expect("write config");
            let err = UNet2DConditionConfig::from_file(&path).expect_err(option);
            let message = err.to_string();
            assert!(matches!(err, ModelError::Unsupported { .. }), "{message}");
            assert!(message.contains(option), "{message}");
            assert!(message.contains(value), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        std::fs::write(&path, r#"{"attention_head_dim": [8, 8]}"#).expect("write config");
        let message = UNet2DConditionConfig::from_file(&path)
            .expect_err("length mismatch")
            .to_string();
        assert!(message.contains("attention_head_dim"), "{message}");
        std::fs::write(
            &path,
            r#"{"cross_attention_dim": 768, "_class_name": "UNet2DConditionModel"}"#,
        )
        .expect("write config");
        let config = UNet2DConditionConfig::from_file(&path).expect("valid config");
        assert_eq!(config.cross_attention_dim, OneOrMany::One(768));
        assert_eq!(config.block_out_channels, [320, 640, 1280, 1280]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gradients_flow_under_autodiff() {
        let device = Device::flex().autodiff();
        let model = UNet2DConditionModel::new(&tiny_config(), &device).expect("model");
        let sample = Tensor::<4>::ones([1, 4, 8, 8], &device);
        let t = Tensor::<1>::from_floats([10.0], &device);
        // Distinct context tokens, or attention would not depend on `to_k`.
        let context = Tensor::<3>::random([1, 3, 12], Distribution::Normal(0.0, 1.0), &device);
        let loss = model.forward(sample, t, context).powi_scalar(2).mean();
        let grads = loss.backward();
        let down = match &model.down_blocks[0] {
            DownBlock::CrossAttnDownBlock2D(block) => block,
            DownBlock::DownBlock2D(_) => panic!("expected a cross-attention block"),
        };
        let to_k = &down.attentions[0].transformer_blocks[0].attn2.to_k.weight;
        for grad in [
            model
                .conv_in
                .weight
                .val()
                .grad(&grads)
                .map(|g| g.abs().sum()),
            to_k.val().grad(&grads).map(|g| g.abs().sum()),
            model
                .time_embedding
                .linear_1
                .weight
                .val()
                .grad(&grads)
                .map(|g| g.abs().sum()),
        ] {
            let total = grad.expect("gradient").into_scalar::<f32>();
            assert!(total.is_finite() && total > 0.0, "gradient sum {total}");
        }
    }

    #[test]
    fn tiny_forward_shapes_and_keys() {
        let device = Device::flex();
        let config = tiny_config();
        let model = UNet2DConditionModel::new(&config, &device).expect("model");
        let keys: Vec<String> = named_shapes(&model).into_iter().map(|(k, _)| k).collect();
        for key in [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
            "down_blocks.0.downsamplers.0.conv.weight",
            "mid_block.attentions.0.proj_in.weight",
            "up_blocks.0.upsamplers.0.conv.bias",
            "up_blocks.1.resnets.1.conv_shortcut.weight",
            "time_embedding.linear_2.weight",
        ] {
            assert!(keys.iter().any(|k| k == key), "missing {key}");
        }
        for (h, w) in [(8, 8), (7, 5)] {
            let sample = Tensor::<4>::ones([2, 4, h, w], &device);
            let t = Tensor::<1>::from_floats([10.0], &device);
            let context = Tensor::<3>::ones([2, 3, 12], &device);
            assert_eq!(model.forward(sample, t, context).dims(), [2, 4, h, w]);
        }
    }
}
