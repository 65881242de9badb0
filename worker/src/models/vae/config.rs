//! The diffusers `AutoencoderKL` config as read from `vae/config.json`, its checks, and the
//! block sizes it gives the encoder and decoder.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::models::unet_2d_blocks::BlockConfig;
use crate::models::unet_2d_condition::OneOrMany;
use crate::models::{config_error, read_config, require_silu};

/// `vae/config.json` of a diffusers `AutoencoderKL`. Missing fields take diffusers' defaults;
/// unknown fields are ignored. `Default` is SD-1.5's VAE.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default = "AutoencoderKLConfig::diffusers_default")]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// `DownEncoderBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `UpDecoderBlock2D` per level.
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Must be `silu`.
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// Image size the model was trained on (informational).
    pub sample_size: OneOrMany<usize>,
    /// Latents are multiplied by this before entering the UNet.
    pub scaling_factor: f64,
    /// Latents are shifted by this before scaling (SD3/Flux VAEs; `None` for SD 1.x/2.x).
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (informational).
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations (informational).
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs the VAE in f32 when true (informational).
    pub force_upcast: bool,
    /// A 1x1 conv after the encoder.
    pub use_quant_conv: bool,
    /// A 1x1 conv before the decoder.
    pub use_post_quant_conv: bool,
    /// An attention in the encoder's and decoder's mid blocks.
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    /// Stable Diffusion 1.5's `vae/config.json`.
    fn default() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".to_string(); 4],
            up_block_types: vec!["UpDecoderBlock2D".to_string(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: OneOrMany::One(512),
            ..Self::diffusers_default()
        }
    }
}

impl AutoencoderKLConfig {
    /// diffusers' `AutoencoderKL.__init__` defaults (used for fields a file omits).
    pub fn diffusers_default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".to_string()],
            up_block_types: vec!["UpDecoderBlock2D".to_string()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_string(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: OneOrMany::One(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    /// Reads and validates a diffusers `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let config: Self = read_config(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every option is supported and consistent; errors name the option, its value and
    /// `source` (the config file).
    pub fn validate(&self, source: &Path) -> Result<(), ModelError> {
        require_silu(source, "act_fn", &self.act_fn)?;
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(config_error(source, "`block_out_channels` is empty"));
        }
        for (option, types, supported) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(config_error(
                    source,
                    format!(
                        "`{option}` has {} entries but `block_out_channels` has {n}",
                        types.len()
                    ),
                ));
            }
            if let Some(other) = types.iter().find(|t| t.as_str() != supported) {
                return Err(ModelError::unsupported(source, option, other));
            }
        }
        let groups = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| groups == 0 || c % groups != 0)
        {
            return Err(config_error(
                source,
                format!("`norm_num_groups` = {groups} does not divide the {c} channels of a block"),
            ));
        }
        Ok(())
    }

    pub(super) fn block(
        &self,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
    ) -> BlockConfig {
        BlockConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            num_layers,
            groups: self.norm_num_groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_block_type_names_option_and_file() {
        let config = AutoencoderKLConfig {
            down_block_types: vec!["AttnDownEncoderBlock2D".to_string()],
            ..AutoencoderKLConfig::diffusers_default()
        };
        let message = config
            .validate(Path::new("vae/config.json"))
            .expect_err("unsupported")
            .to_string();
        assert!(message.contains("down_block_types"), "{message}");
        assert!(message.contains("AttnDownEncoderBlock2D"), "{message}");
        assert!(message.contains("vae/config.json"), "{message}");
    }
}
