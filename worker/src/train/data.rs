//! Preparing a job's data once: read the Pick-a-Pic shards, split prompts, encode winner (and
//! loser) images to latents (the VAE posterior mean and std of the image and of its flip; the
//! pixels themselves for a pixel-space pipeline) and captions to text states. The VAE and text
//! encoder are frozen, so this is done once per job.

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use spin_common::dataset::{list_shards, read_pairs, split_prompts, PreferencePair, ReadReport};
use spin_common::spec::JobSpec;

use super::TrainError;
use crate::pipeline::StableDiffusion;

/// A cached image: posterior mean and std (std empty in pixel space), plain and flipped.
#[derive(Clone, Debug)]
pub struct CachedImage {
    /// `[C, H, W]` mean, then the same for the flipped image.
    pub mean: [Vec<f32>; 2],
    /// Matching std (empty in pixel space: the image is exact).
    pub std: [Vec<f32>; 2],
}

/// One prompt of the job with everything training needs.
#[derive(Clone, Debug)]
pub struct Example {
    /// Caption.
    pub caption: String,
    /// Real winner.
    pub winner: CachedImage,
    /// Real loser (DPO).
    pub loser: CachedImage,
    /// Text states `[L, D]`, flattened.
    pub context: Vec<f32>,
}

/// The prepared data of a job.
#[derive(Debug)]
pub struct PreparedData {
    /// Training examples.
    pub train: Vec<Example>,
    /// Held-out examples.
    pub held_out: Vec<Example>,
    /// `[C, H, W]` of a latent.
    pub latent_shape: [usize; 3],
    /// `[L, D]` of a text state.
    pub context_shape: [usize; 2],
    /// Unconditional (empty prompt) text state, flattened.
    pub uncond: Vec<f32>,
    /// What reading the shards found.
    pub report: ReadReport,
}

fn shard_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, TrainError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(list_shards(path)?);
        } else if path.exists() {
            files.push(path.clone());
        } else {
            return Err(TrainError::Input(format!(
                "data.train entry {} does not exist",
                path.display()
            )));
        }
    }
    if files.is_empty() {
        return Err(TrainError::Input(
            "data.train holds no parquet shards".into(),
        ));
    }
    Ok(files)
}

/// Reads, splits and encodes the job's data with the frozen parts of `pipeline`.
pub fn prepare(
    spec: &JobSpec,
    pipeline: &StableDiffusion,
    device: &Device,
) -> Result<PreparedData, TrainError> {
    let files = shard_files(&spec.train_data)?;
    let (pairs, mut report) = read_pairs(&files)?;
    tracing::info!(
        files = files.len(),
        pairs = pairs.len(),
        ties = report.ties_dropped,
        skipped = report.skipped.len(),
        "read dataset"
    );
    let split = split_prompts(pairs.len(), spec.seed, spec.held_out_fraction)?;
    let mut train_idx = split.train;
    if spec.max_prompts > 0 {
        train_idx.truncate(spec.max_prompts);
    }
    let held_idx: Vec<usize> = split
        .held_out
        .into_iter()
        .take(spec.eval.samples.max(8))
        .collect();
    let [lc, lh, lw] = pipeline.latent_shape();
    let encode = |indices: &[usize], report: &mut ReadReport| -> Result<Vec<Example>, TrainError> {
        let mut out = Vec::with_capacity(indices.len());
        for chunk in indices.chunks(32) {
            let mut kept: Vec<&PreferencePair> = Vec::new();
            let mut pixels: Vec<[Vec<f32>; 4]> = Vec::new();
            for &i in chunk {
                let pair = &pairs[i];
                let res = spec.resolution as u32;
                let decoded = (|| {
                    Ok::<_, spin_common::dataset::DatasetError>([
                        pair.winner_pixels(res, false)?,
                        pair.winner_pixels(res, true)?,
                        pair.loser_pixels(res, false)?,
                        pair.loser_pixels(res, true)?,
                    ])
                })();
                match decoded {
                    Ok(p) => {
                        kept.push(pair);
                        pixels.push(p);
                    }
                    Err(e) => report.skip(pair.source.clone(), e.to_string()),
                }
            }
            if kept.is_empty() {
                continue;
            }
            let captions: Vec<&str> = kept.iter().map(|p| p.caption.as_str()).collect();
            let context = pipeline.encode_prompts(&captions, device)?;
            let [_, l, d] = context.dims();
            let context = to_vec(context);
            let images = encode_images(pipeline, &pixels, spec.resolution, device);
            for (j, pair) in kept.iter().enumerate() {
                out.push(Example {
                    caption: pair.caption.clone(),
                    winner: images[j][0].clone(),
                    loser: images[j][1].clone(),
                    context: context[j * l * d..(j + 1) * l * d].to_vec(),
                });
            }
        }
        Ok(out)
    };
    let train = encode(&train_idx, &mut report)?;
    let held_out = encode(&held_idx, &mut report)?;
    if train.is_empty() {
        return Err(TrainError::Input(
            "no usable training pairs after dropping ties and bad rows".into(),
        ));
    }
    let uncond = pipeline.encode_prompts(&[""], device)?;
    let [_, l, d] = uncond.dims();
    Ok(PreparedData {
        train,
        held_out,
        latent_shape: [lc, lh, lw],
        context_shape: [l, d],
        uncond: to_vec(uncond),
        report,
    })
}

/// Encodes `[winner, winner flipped, loser, loser flipped]` pixel sets.
fn encode_images(
    pipeline: &StableDiffusion,
    pixels: &[[Vec<f32>; 4]],
    res: usize,
    device: &Device,
) -> Vec<[CachedImage; 2]> {
    let n = pixels.len();
    let flat: Vec<f32> = pixels
        .iter()
        .flat_map(|p| p.iter().flatten().copied())
        .collect();
    let images = Tensor::<4>::from_data(TensorData::new(flat, [n * 4, 3, res, res]), device);
    let (mean, std) = match &pipeline.vae {
        Some((vae, config)) => {
            let (mean, logvar) = vae.encode(images);
            let std = (logvar * 0.5).exp() * config.scaling_factor;
            (mean * config.scaling_factor, Some(std))
        }
        None => (images, None),
    };
    let per = mean.dims()[1..].iter().product::<usize>();
    let mean = to_vec(mean);
    let std = std.map(to_vec);
    let slice = |v: &[f32], k: usize| v[k * per..(k + 1) * per].to_vec();
    (0..n)
        .map(|i| {
            let image = |first: usize| CachedImage {
                mean: [slice(&mean, 4 * i + first), slice(&mean, 4 * i + first + 1)],
                std: match &std {
                    Some(s) => [slice(s, 4 * i + first), slice(s, 4 * i + first + 1)],
                    None => [Vec::new(), Vec::new()],
                },
            };
            [image(0), image(2)]
        })
        .collect()
}

/// Values of any tensor as f32.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().iter::<f32>().collect()
}
