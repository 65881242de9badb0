//! A Stable Diffusion pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`) loaded as one object, and text-to-image sampling with DDIM and
//! classifier-free guidance, as diffusers' `StableDiffusionPipeline` does it.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution as _, StandardNormal};

use crate::error::ModelError;
use crate::models::unet_2d_condition::{OneOrMany, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::schedulers::{DdimScheduler, SchedulerConfig};
use crate::text::{ClipTextConfig, ClipTextModel, ClipTokenizer};

/// The components of a diffusers Stable Diffusion folder.
#[derive(Debug)]
pub struct StableDiffusion {
    /// Where it was loaded from.
    pub dir: PathBuf,
    /// CLIP BPE tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Frozen text encoder.
    pub text_encoder: ClipTextModel,
    /// Its config.
    pub text_config: ClipTextConfig,
    /// The denoiser.
    pub unet: UNet2DConditionModel,
    /// Its config.
    pub unet_config: UNet2DConditionConfig,
    /// Frozen autoencoder with its config; `None` for a pixel-space pipeline (the toy model),
    /// whose UNet denoises images in `[-1, 1]` directly.
    pub vae: Option<(AutoencoderKL, AutoencoderKLConfig)>,
    /// Noise schedule.
    pub scheduler_config: SchedulerConfig,
}

/// Settings of one text-to-image call.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// DDIM steps (50).
    pub steps: usize,
    /// Classifier-free guidance scale (7.5); 1 or less disables guidance.
    pub guidance: f64,
    /// DDIM eta (0: deterministic).
    pub eta: f64,
    /// Seed of the initial noise (and of the eta noise).
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            guidance: 7.5,
            eta: 0.0,
            seed: 0,
        }
    }
}

impl StableDiffusion {
    /// Loads every component of the folder `dir`; the error names the missing or bad file.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let index = dir.join("model_index.json");
        if !index.exists() {
            return Err(ModelError::MissingFile { path: index });
        }
        let tokenizer = ClipTokenizer::load(&dir.join("tokenizer"))?;
        let (text_encoder, text_config) = ClipTextModel::load(&dir.join("text_encoder"), device)?;
        let (unet, unet_config) = UNet2DConditionModel::load(&dir.join("unet"), device)?;
        let vae_dir = dir.join("vae");
        let vae = if vae_dir.exists() {
            Some(AutoencoderKL::load(&vae_dir, device)?)
        } else {
            None
        };
        let scheduler_config =
            SchedulerConfig::from_file(&dir.join("scheduler").join("scheduler_config.json"))?;
        check_fit(
            dir,
            &tokenizer,
            &text_config,
            &unet_config,
            vae.as_ref().map(|(_, config)| config),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer,
            text_encoder,
            text_config,
            unet,
            unet_config,
            vae,
            scheduler_config,
        })
    }

    /// Token ids of `prompts`, `[N, 77]`.
    pub fn tokenize(
        &self,
        prompts: &[&str],
        device: &Device,
    ) -> Result<Tensor<2, Int>, ModelError> {
        let len = self.tokenizer.max_length();
        let mut ids = Vec::with_capacity(prompts.len() * len);
        for prompt in prompts {
            ids.extend(self.tokenizer.encode(prompt)?.into_iter().map(i64::from));
        }
        Ok(Tensor::from_data(
            TensorData::new(ids, [prompts.len(), len]),
            device,
        ))
    }

    /// Text-encoder hidden states of `prompts`, `[N, 77, D]`.
    pub fn encode_prompts(
        &self,
        prompts: &[&str],
        device: &Device,
    ) -> Result<Tensor<3>, ModelError> {
        Ok(self.text_encoder.forward(self.tokenize(prompts, device)?))
    }

    /// Latent `[C, H, W]` of the UNet's native resolution.
    pub fn latent_shape(&self) -> [usize; 3] {
        let (h, w) = self.unet_config.latent_size();
        [self.unet_config.in_channels, h, w]
    }

    /// Standard normal initial latents `[1, C, H, W]` from `seed`.
    pub fn initial_latents(&self, seed: u64, device: &Device) -> Tensor<4> {
        let [c, h, w] = self.latent_shape();
        gaussian([1, c, h, w], seed, device)
    }

    /// Denoises `latents` `[1, C, H, W]` from pure noise with DDIM, guided by `prompt` against
    /// `negative_prompt` (the empty prompt when `None`); returns the final latents, before the
    /// VAE. `progress(step, steps)` is called after every step.
    pub fn sample_latents(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        latents: Tensor<4>,
        options: &SampleOptions,
        progress: impl FnMut(usize, usize),
    ) -> Result<Tensor<4>, ModelError> {
        let [n, c, h, w] = latents.dims();
        let channels = self.unet_config.in_channels;
        if n == 0 || c != channels || h == 0 || w == 0 {
            return Err(ModelError::InputShape {
                what: "latents".into(),
                found: vec![n, c, h, w],
                expected: format!("[N, {channels}, H, W] with N, H and W at least 1"),
            });
        }
        let device = latents.device();
        let cond = self.encode_prompts(&[prompt], &device)?;
        let uncond = self.encode_prompts(&[negative_prompt.unwrap_or("")], &device)?;
        Ok(self
            .denoise(&cond, &uncond, latents, options, false, progress)
            .latents)
    }

    /// The batched DDIM loop: `latents` `[N, C, H, W]`, conditional and unconditional text
    /// states `[N or 1, L, D]`. With `record`, the state entering every step is kept (the
    /// opponent's trajectory for the trajectory objectives), as `[N, S, C, H, W]`.
    pub fn denoise(
        &self,
        cond: &Tensor<3>,
        uncond: &Tensor<3>,
        latents: Tensor<4>,
        options: &SampleOptions,
        record: bool,
        mut progress: impl FnMut(usize, usize),
    ) -> Denoised {
        let device = latents.device();
        let n = latents.dims()[0];
        let expand = |t: &Tensor<3>| {
            let [b, l, d] = t.dims();
            if b == n {
                t.clone()
            } else {
                t.clone().narrow(0, 0, 1).expand([n, l, d])
            }
        };
        let guided = options.guidance > 1.0;
        // diffusers' order: unconditional half first.
        let context = if guided {
            Tensor::cat(vec![expand(uncond), expand(cond)], 0)
        } else {
            expand(cond)
        };
        let scheduler = DdimScheduler::new(&self.scheduler_config, options.steps);
        let mut latents = latents;
        let mut states = Vec::new();
        let steps = scheduler.timesteps().len();
        for (i, &t) in scheduler.timesteps().iter().enumerate() {
            if record {
                states.push(latents.clone());
            }
            let batch = if guided { 2 * n } else { n };
            let input = if guided {
                Tensor::cat(vec![latents.clone(), latents.clone()], 0)
            } else {
                latents.clone()
            };
            let timesteps =
                Tensor::<1>::from_data(TensorData::new(vec![t as f32; batch], [batch]), &device);
            let noise_pred = self.unet.forward(input, timesteps, context.clone());
            let noise_pred = if guided {
                let uncond = noise_pred.clone().narrow(0, 0, n);
                let cond = noise_pred.narrow(0, n, n);
                uncond.clone() + (cond - uncond) * options.guidance
            } else {
                noise_pred
            };
            let noise = (options.eta > 0.0).then(|| {
                gaussian(
                    latents.dims(),
                    options.seed.wrapping_add(1 + i as u64),
                    &device,
                )
            });
            latents = scheduler.step(noise_pred, t, latents, options.eta, noise);
            progress(i + 1, steps);
        }
        let trajectory = record.then(|| Tensor::stack(states, 1));
        Denoised {
            latents,
            trajectory,
            timesteps: scheduler.timesteps().to_vec(),
        }
    }

    /// Latents `[N, C, h, w]` (as sampled, before scaling) -> images `[N, 3, H, W]` in `[0, 1]`.
    pub fn decode_latents(&self, latents: Tensor<4>) -> Tensor<4> {
        let image = match &self.vae {
            Some((vae, config)) => vae.decode(latents / config.scaling_factor),
            None => latents,
        };
        (image / 2.0 + 0.5).clamp(0.0, 1.0)
    }
}

/// Checks that the components of the folder `dir` fit together, so that a mismatch is an
/// error naming the files at load time rather than a shape panic in the first forward pass.
fn check_fit(
    dir: &Path,
    tokenizer: &ClipTokenizer,
    text: &ClipTextConfig,
    unet: &UNet2DConditionConfig,
    vae: Option<&AutoencoderKLConfig>,
) -> Result<(), ModelError> {
    let misfit = |file: &str, message: String| ModelError::Config {
        path: dir.join(file),
        message,
    };
    if tokenizer.max_length() > text.max_position_embeddings {
        return Err(misfit(
            "tokenizer",
            format!(
                "model_max_length {} is longer than the text encoder's max_position_embeddings \
                 {} (text_encoder/config.json)",
                tokenizer.max_length(),
                text.max_position_embeddings
            ),
        ));
    }
    if tokenizer.id_limit() > text.vocab_size {
        return Err(misfit(
            "tokenizer",
            format!(
                "token ids go up to {}, past the text encoder's vocab_size {} \
                 (text_encoder/config.json)",
                tokenizer.id_limit() - 1,
                text.vocab_size
            ),
        ));
    }
    let widths = match &unet.cross_attention_dim {
        OneOrMany::One(d) => vec![*d],
        OneOrMany::Many(ds) => ds.clone(),
    };
    if let Some(width) = widths.iter().find(|&&d| d != text.hidden_size) {
        return Err(misfit(
            "unet/config.json",
            format!(
                "cross_attention_dim {width} does not match the text encoder's hidden_size {} \
                 (text_encoder/config.json)",
                text.hidden_size
            ),
        ));
    }
    let (channels, source) = match vae {
        Some(vae) => (
            vae.latent_channels,
            "the vae's latent_channels (vae/config.json) is",
        ),
        None => (3, "a pipeline with no vae denoises RGB pixels and needs"),
    };
    for (option, value) in [
        ("in_channels", unet.in_channels),
        ("out_channels", unet.out_channels),
    ] {
        if value != channels {
            return Err(misfit(
                "unet/config.json",
                format!("{option} is {value}, but {source} {channels}"),
            ));
        }
    }
    Ok(())
}

/// What the DDIM loop produced.
#[derive(Clone, Debug)]
pub struct Denoised {
    /// Final latents `[N, C, H, W]`.
    pub latents: Tensor<4>,
    /// States entering each step, `[N, S, C, H, W]`, when recorded.
    pub trajectory: Option<Tensor<5>>,
    /// The schedule's timesteps, descending.
    pub timesteps: Vec<usize>,
}

/// Standard normal noise of `shape` drawn from a seeded ChaCha stream, so the same seed gives
/// the same tensor on every machine and backend.
pub fn gaussian(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}
