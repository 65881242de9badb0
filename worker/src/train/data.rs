//! Preparing a job's data once: read the Pick-a-Pic shards, split prompts, encode winner (and
//! loser) images to latents (the VAE posterior mean and std of the image and of its flip; the
//! pixels themselves for a pixel-space pipeline) and captions to text states. The VAE and text
//! encoder are frozen, so this is done once per job.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use spin_common::dataset::{JobPrompts, PreferencePair, ReadReport};
use spin_common::spec::JobSpec;

use super::TrainError;
use crate::pipeline::StableDiffusion;
use crate::weights::WeightFile;

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
    /// Position in the job's training (or held-out) prompt list: seeds derive from it.
    pub prompt: u64,
    /// Caption.
    pub caption: String,
    /// Real winner.
    pub winner: CachedImage,
    /// Real loser (DPO).
    pub loser: CachedImage,
    /// Text states `[L, D]`, flattened.
    pub context: Vec<f32>,
}

/// Encodes the pairs `indices` (pair numbers in `prompts.pairs`; `positions` the prompt
/// numbers recorded with them) with the frozen parts of `pipeline`, 32 at a time. Rows whose
/// images do not decode are skipped and recorded in `report`.
pub fn encode_examples(
    spec: &JobSpec,
    pipeline: &StableDiffusion,
    prompts: &JobPrompts,
    indices: &[usize],
    positions: &[u64],
    report: &mut ReadReport,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Example>, TrainError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut done = 0;
    let items: Vec<(usize, u64)> = indices
        .iter()
        .copied()
        .zip(positions.iter().copied())
        .collect();
    for chunk in items.chunks(32) {
        done += chunk.len();
        let mut kept: Vec<(&PreferencePair, u64)> = Vec::new();
        let mut pixels: Vec<[Vec<f32>; 4]> = Vec::new();
        for &(i, position) in chunk {
            let pair = &prompts.pairs[i];
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
                    kept.push((pair, position));
                    pixels.push(p);
                }
                Err(e) => report.skip(pair.source.clone(), e.to_string()),
            }
        }
        if kept.is_empty() {
            progress(done, items.len());
            continue;
        }
        let captions: Vec<&str> = kept.iter().map(|(p, _)| p.caption.as_str()).collect();
        let context = pipeline.encode_prompts(&captions, device)?;
        let [_, l, d] = context.dims();
        let context = to_vec(context);
        let images = encode_images(pipeline, &pixels, spec.resolution, device);
        for (j, (pair, position)) in kept.iter().enumerate() {
            out.push(Example {
                prompt: *position,
                caption: pair.caption.clone(),
                winner: images[j][0].clone(),
                loser: images[j][1].clone(),
                context: context[j * l * d..(j + 1) * l * d].to_vec(),
            });
        }
        progress(done, items.len());
    }
    Ok(out)
}

/// Cached examples as safetensors bytes: per side `{winner,loser}.{mean,std}.{0,1}`
/// `[N, C, H, W]` (std absent in pixel space), `context` `[N, L, D]`, `prompt` `[N]`;
/// captions in the metadata.
pub fn examples_to_bytes(
    examples: &[Example],
    latent_shape: [usize; 3],
    context_shape: [usize; 2],
) -> Result<Vec<u8>, TrainError> {
    let n = examples.len();
    let [c, h, w] = latent_shape;
    let [l, d] = context_shape;
    let mut tensors = BTreeMap::new();
    let pixel_space = examples.first().is_some_and(|e| e.winner.std[0].is_empty());
    for (side, pick) in [("winner", 0usize), ("loser", 1)] {
        for flip in 0..2 {
            fn image(e: &Example, pick: usize) -> &CachedImage {
                if pick == 0 {
                    &e.winner
                } else {
                    &e.loser
                }
            }
            let mean: Vec<f32> = examples
                .iter()
                .flat_map(|e| image(e, pick).mean[flip].iter().copied())
                .collect();
            tensors.insert(format!("{side}.mean.{flip}"), (vec![n, c, h, w], mean));
            if !pixel_space {
                let std: Vec<f32> = examples
                    .iter()
                    .flat_map(|e| image(e, pick).std[flip].iter().copied())
                    .collect();
                tensors.insert(format!("{side}.std.{flip}"), (vec![n, c, h, w], std));
            }
        }
    }
    let context: Vec<f32> = examples
        .iter()
        .flat_map(|e| e.context.iter().copied())
        .collect();
    tensors.insert("context".into(), (vec![n, l, d], context));
    let prompt: Vec<f32> = examples.iter().map(|e| e.prompt as f32).collect();
    tensors.insert("prompt".into(), (vec![n], prompt));
    let captions: Vec<&str> = examples.iter().map(|e| e.caption.as_str()).collect();
    let metadata = HashMap::from([(
        "captions".to_string(),
        serde_json::to_string(&captions).unwrap_or_default(),
    )]);
    safetensors_bytes(&tensors, Some(metadata))
}

/// Reads examples written by [`examples_to_bytes`]; `name` is used in errors.
pub fn examples_from_bytes(name: &Path, bytes: &[u8]) -> Result<Vec<Example>, TrainError> {
    let file = WeightFile::from_bytes(name, bytes)?;
    let prompt = file.require("prompt")?;
    let n = prompt.values.len();
    let rows = |key: &str| -> Result<Vec<Vec<f32>>, TrainError> {
        let t = file.require(key)?;
        if t.shape.first() != Some(&n) {
            return Err(TrainError::Input(format!(
                "{}: `{key}` has {:?} rows, `prompt` has {n}",
                name.display(),
                t.shape.first()
            )));
        }
        let per = t.values.len() / n.max(1);
        Ok(t.values
            .chunks(per.max(1))
            .map(<[f32]>::to_vec)
            .take(n)
            .collect())
    };
    let optional = |key: &str| -> Result<Vec<Vec<f32>>, TrainError> {
        if file.get(key).is_some() {
            rows(key)
        } else {
            Ok(vec![Vec::new(); n])
        }
    };
    let captions: Vec<String> = safetensors::SafeTensors::read_metadata(bytes)
        .ok()
        .and_then(|(_, meta)| meta.metadata().as_ref()?.get("captions").cloned())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let image = |side: &str| -> Result<Vec<CachedImage>, TrainError> {
        let m0 = rows(&format!("{side}.mean.0"))?;
        let m1 = rows(&format!("{side}.mean.1"))?;
        let s0 = optional(&format!("{side}.std.0"))?;
        let s1 = optional(&format!("{side}.std.1"))?;
        Ok(m0
            .into_iter()
            .zip(m1)
            .zip(s0.into_iter().zip(s1))
            .map(|((a, b), (c, d))| CachedImage {
                mean: [a, b],
                std: [c, d],
            })
            .collect())
    };
    let winners = image("winner")?;
    let losers = image("loser")?;
    let context = rows("context")?;
    Ok(winners
        .into_iter()
        .zip(losers)
        .zip(context)
        .enumerate()
        .map(|(i, ((winner, loser), context))| Example {
            prompt: prompt.values[i] as u64,
            caption: captions.get(i).cloned().unwrap_or_default(),
            winner,
            loser,
            context,
        })
        .collect())
}

/// Serialises named f32 tensors to safetensors bytes.
pub fn safetensors_bytes(
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, TrainError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(key, (shape, values))| {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (key.clone(), shape.clone(), data)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(key, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|view| (key.clone(), view))
                .map_err(|e| TrainError::Input(format!("tensor `{key}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, metadata).map_err(|e| TrainError::Input(e.to_string()))
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
