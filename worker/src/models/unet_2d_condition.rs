//! diffusers `UNet2DConditionModel` (the Stable Diffusion 1.x/2.x denoiser): the model, its
//! forward pass, and loading / saving in the diffusers folder layout; its config lives in
//! [`config`], the plan of down, mid and up blocks it implies in [`block_plan`].

use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D,
};
use super::{write_config, CONFIG_NAME, WEIGHTS_NAME};
use crate::error::ModelError;
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::{load_module, save_module, WeightFile};

mod block_plan;
mod config;

pub use block_plan::{BlockKind, BlockPlan, UNetPlan};
pub use config::{OneOrMany, UNet2DConditionConfig};
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
