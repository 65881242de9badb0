//! The toy base pipeline: a pixel-space (no VAE) 32x32 Stable-Diffusion-shaped model with a
//! small CLIP text encoder and a truncated copy of the real CLIP BPE vocabulary, randomly
//! initialised by our own code and written as a diffusers folder. `spinctl train` with the
//! `sft` objective turns it into the toy base model.

use std::path::Path;

use burn::tensor::Device;
use serde_json::json;

use crate::error::ModelError;
use crate::models::unet_2d_condition::{OneOrMany, UNet2DConditionConfig, UNet2DConditionModel};
use crate::schedulers::SchedulerConfig;
use crate::text::clip::HiddenAct;
use crate::text::{ClipTextConfig, ClipTextModel};
use crate::weights::save_module;

const VOCAB: &str = include_str!("../assets/toy-tokenizer/vocab.json");
const MERGES: &str = include_str!("../assets/toy-tokenizer/merges.txt");

/// Side of the toy images.
pub const TOY_RESOLUTION: usize = 32;

/// The toy UNet: 3 channels in and out (pixels), 32x32, two levels.
pub fn toy_unet_config() -> UNet2DConditionConfig {
    let mut config = UNet2DConditionConfig::diffusers_default();
    config.sample_size = Some(OneOrMany::One(TOY_RESOLUTION));
    config.in_channels = 3;
    config.out_channels = 3;
    // Attention only at 16x16: at 32x32 it would dominate the step time on a CPU.
    config.down_block_types = vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()];
    config.up_block_types = vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()];
    config.block_out_channels = vec![32, 64];
    config.layers_per_block = OneOrMany::One(1);
    config.norm_num_groups = Some(8);
    config.cross_attention_dim = OneOrMany::One(32);
    config.attention_head_dim = OneOrMany::One(8);
    config
}

/// The toy text encoder.
pub fn toy_text_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 1514,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: HiddenAct::QuickGelu,
        layer_norm_eps: 1e-5,
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// Writes a randomly initialised toy pipeline folder at `dir`.
pub fn write_toy_pipeline(dir: &Path, device: &Device) -> Result<(), ModelError> {
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|e| ModelError::io(p, e));
    for sub in ["unet", "text_encoder", "tokenizer", "scheduler"] {
        mkdir(&dir.join(sub))?;
    }
    let unet_config = toy_unet_config();
    UNet2DConditionModel::new(&unet_config, device)?.save(&unet_config, &dir.join("unet"))?;

    let text_config = toy_text_config();
    let text = ClipTextModel::new(&text_config, device);
    save_module(&text, &dir.join("text_encoder/model.safetensors"))?;
    let mut text_json = serde_json::to_value(&text_config).map_err(|e| ModelError::Config {
        path: dir.join("text_encoder/config.json"),
        message: e.to_string(),
    })?;
    text_json["architectures"] = json!(["CLIPTextModel"]);
    text_json["model_type"] = json!("clip_text_model");
    write_json(&dir.join("text_encoder/config.json"), &text_json)?;

    let tokenizer = dir.join("tokenizer");
    std::fs::write(tokenizer.join("vocab.json"), VOCAB)
        .map_err(|e| ModelError::io(&tokenizer, e))?;
    std::fs::write(tokenizer.join("merges.txt"), MERGES)
        .map_err(|e| ModelError::io(&tokenizer, e))?;
    write_json(
        &tokenizer.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>",
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
    )?;

    let mut scheduler = serde_json::to_value(SchedulerConfig::stable_diffusion()).map_err(|e| {
        ModelError::Config {
            path: dir.join("scheduler"),
            message: e.to_string(),
        }
    })?;
    scheduler["_class_name"] = json!("DDIMScheduler");
    write_json(&dir.join("scheduler/scheduler_config.json"), &scheduler)?;
    write_json(
        &dir.join("model_index.json"),
        &json!({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": [null, null], "safety_checker": [null, null], "feature_extractor": [null, null],
                "requires_safety_checker": false}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{SampleOptions, StableDiffusion};

    #[test]
    fn toy_pipeline_loads_and_samples_in_pixel_space() {
        let dir = std::env::temp_dir().join(format!("spin-toy-model-{}", std::process::id()));
        let device = Device::flex();
        write_toy_pipeline(&dir, &device).expect("write");
        let pipeline = StableDiffusion::load(&dir, &device).expect("load");
        assert!(pipeline.vae.is_none());
        assert_eq!(pipeline.latent_shape(), [3, 32, 32]);
        let options = SampleOptions {
            steps: 2,
            ..SampleOptions::default()
        };
        let latents = pipeline
            .sample_latents(
                "a red circle on a blue background",
                None,
                pipeline.initial_latents(1, &device),
                &options,
                |_, _| {},
            )
            .expect("sample");
        let image = pipeline.decode_latents(latents);
        assert_eq!(image.dims(), [1, 3, 32, 32]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
