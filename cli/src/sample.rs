//! `spinctl sample`: text to image with a diffusers pipeline folder, DDIM and guidance.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use burn::tensor::{Device, Tensor, TensorData};
use spin_worker::device::parse_device;
use spin_worker::pipeline::{SampleOptions, StableDiffusion};
use spin_worker::weights::{write_safetensors, WeightFile};

/// Arguments of `spinctl sample`.
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (the empty prompt by default).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// DDIM steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale; 1 disables guidance.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// DDIM eta (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Seed of the initial noise; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Initial noise: a safetensors file with a tensor `latents` of shape [1, C, H, W].
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Write the final latents (before the VAE) to this safetensors file, as `latents`.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Output PNG; with several images, FILE-0.png, FILE-1.png, ...
    #[arg(long)]
    out: PathBuf,
    /// Compute device: flex (CPU), wgpu or cuda when built with those features.
    #[arg(long, default_value = "flex")]
    device: String,
}

/// Runs `spinctl sample`.
pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    if args.latents.is_some() && args.num_images != 1 {
        bail!("--latents gives the noise of one image; use --num-images 1 with it");
    }
    let device = parse_device(&args.device)?;
    // Refuse an output that cannot be written before sampling, not after.
    check_folder("--out", &args.out)?;
    if let Some(path) = &args.save_latents {
        check_folder("--save-latents", path)?;
    }
    let started = Instant::now();
    let pipeline = StableDiffusion::load(&args.model, &device)
        .with_context(|| format!("loading pipeline {}", args.model.display()))?;
    eprintln!(
        "loaded {} in {:.1}s",
        args.model.display(),
        started.elapsed().as_secs_f64()
    );

    let options = SampleOptions {
        steps: args.steps,
        guidance: args.guidance,
        eta: args.eta,
        seed: args.seed,
    };
    let mut all_latents = Vec::new();
    for i in 0..args.num_images {
        let seed = args.seed.wrapping_add(i as u64);
        let initial = match &args.latents {
            Some(path) => read_latents(path, pipeline.latent_shape(), &device)?,
            None => pipeline.initial_latents(seed, &device),
        };
        let options = SampleOptions {
            seed,
            ..options.clone()
        };
        let step_started = Instant::now();
        let latents = pipeline.sample_latents(
            &args.prompt,
            args.negative_prompt.as_deref(),
            initial,
            &options,
            |step, steps| {
                let per_step = step_started.elapsed().as_secs_f64() / step as f64;
                eprint!(
                    "\rimage {}/{}: step {step}/{steps} ({per_step:.2}s/step, eta {:.0}s)   ",
                    i + 1,
                    args.num_images,
                    per_step * (steps - step) as f64
                );
                let _ = std::io::stderr().flush();
            },
        )?;
        eprintln!();
        let image = pipeline.decode_latents(latents.clone());
        let out = output_path(&args.out, i, args.num_images);
        save_png(image, &out)?;
        eprintln!("wrote {}", out.display());
        all_latents.push(latents);
    }
    if let Some(path) = &args.save_latents {
        let latents = Tensor::cat(all_latents, 0);
        let shape = latents.dims().to_vec();
        let values = latents
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let tensors = [("latents".to_string(), (shape, values))]
            .into_iter()
            .collect();
        write_safetensors(path, &tensors, None::<HashMap<String, String>>)?;
        eprintln!("wrote latents to {}", path.display());
    }
    Ok(())
}

/// Fails unless the folder `path` would be written in exists.
fn check_folder(flag: &str, path: &Path) -> anyhow::Result<()> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() {
        bail!(
            "{flag} {}: the folder {} does not exist",
            path.display(),
            folder.display()
        );
    }
    Ok(())
}

fn output_path(out: &Path, index: usize, count: usize) -> PathBuf {
    if count == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{stem}-{index}.png"))
}

/// Reads `latents` `[1, C, H, W]` from a safetensors file, checking the shape against the model.
fn read_latents(path: &Path, [c, h, w]: [usize; 3], device: &Device) -> anyhow::Result<Tensor<4>> {
    let file = WeightFile::open(path)?;
    let stored = file.require("latents")?;
    if stored.shape.len() != 4 || stored.shape[0] != 1 || stored.shape[1] != c {
        bail!(
            "tensor `latents` in {} has shape {:?}, expected [1, {c}, H, W] (the model's native size is {h}x{w})",
            path.display(),
            stored.shape
        );
    }
    Ok(Tensor::from_data(
        TensorData::new(stored.values.clone(), stored.shape.clone()),
        device,
    ))
}

/// Writes images `[N, 3, H, W]` in `[0, 1]` (the first of them) as an 8-bit PNG.
fn save_png(image: Tensor<4>, path: &Path) -> anyhow::Result<()> {
    let [_, c, h, w] = image.dims();
    if c != 3 {
        bail!("the VAE produced {c} channels, a PNG needs 3");
    }
    let values = image
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut pixels = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..3 {
                let v = values[ch * h * w + y * w + x];
                pixels[(y * w + x) * 3 + ch] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    image::save_buffer(path, &pixels, w as u32, h as u32, image::ColorType::Rgb8)
        .with_context(|| format!("writing {}", path.display()))
}
