//! The diffusers `UNet2DConditionModel` config as read from `unet/config.json` and its checks
//! of the options this implementation supports; the per-block plan derived from it is in
//! [`super::block_plan`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::models::{read_config, require_silu, require_unset, require_value, unsupported_json};

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

    /// Rejects options whose non-default values this implementation does not support.
    pub(super) fn check_supported(&self, source: &Path) -> Result<(), ModelError> {
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
