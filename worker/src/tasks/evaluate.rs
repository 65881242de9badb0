//! The evaluation of one model (the base, or theta_k after a snapshot): held-out denoising
//! loss at fixed timesteps and noise, kernel MMD of generated vs held-out real images, and a
//! sample grid, written to the store beside a metrics.json.

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use spin_common::dataset::grid_png;
use spin_common::seeds::{derive, Purpose};
use spin_common::store::layout;

use super::{store_error, JobRunner};
use crate::pipeline::{gaussian, SampleOptions, StableDiffusion};
use crate::train::data::{to_vec, Example};
use crate::train::TrainError;

/// Evaluation of one model.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Metrics {
    /// 0 for the base model, k for theta_k.
    pub iteration: usize,
    /// Held-out denoising loss (fixed timesteps and noise).
    pub held_out_loss: f64,
    /// Kernel MMD^2 between generated and held-out real images (pixels).
    pub mmd: f64,
    /// Sample grid PNG.
    pub grid: PathBuf,
}

impl JobRunner {
    /// Held-out denoising loss (fixed timesteps and noise), generated images vs held-out real
    /// winners (kernel MMD on pixels), and a sample grid, of theta (iteration 0: the base).
    /// `progress(done, total)` follows the loss timesteps, then the sample batches.
    pub fn evaluate(
        &mut self,
        iteration: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Metrics, TrainError> {
        self.ensure_held_out()?;
        // Evaluate theta: make it the pipeline's UNet for the duration.
        let reference = std::mem::replace(&mut self.pipeline.unet, self.theta.valid());
        let result = self.evaluate_pipeline(iteration, progress);
        self.pipeline.unet = reference;
        result
    }

    fn evaluate_pipeline(
        &self,
        iteration: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Metrics, TrainError> {
        let spec = &self.spec;
        let pipeline = &self.pipeline;
        let device = &self.device;
        let [c, h, w] = self.latent_shape;
        let [l, d] = self.context_shape;
        let held = self.held_out.as_deref().unwrap_or(&[]);
        let n = held.len();
        let mut loss = 0.0;
        let steps = spec.eval.loss_timesteps.max(1);
        let count = n.min(spec.eval.samples);
        let batch = spec.sampling.batch_size.max(1);
        if n > 0 {
            let context: Vec<f32> = held
                .iter()
                .flat_map(|e| e.context.iter().copied())
                .collect();
            let context = Tensor::<3>::from_data(TensorData::new(context, [n, l, d]), device);
            let x0: Vec<f32> = held
                .iter()
                .flat_map(|e| e.winner.mean[0].iter().copied())
                .collect();
            let x0 = Tensor::<4>::from_data(TensorData::new(x0, [n, c, h, w]), device);
            for s in 0..steps {
                let t = ((s as f64 + 0.5) * 1000.0 / steps as f64) as usize;
                let noise = gaussian(
                    [n, c, h, w],
                    derive(spec.seed, Purpose::Eval, &[s as u64]),
                    device,
                );
                let x_t = self
                    .schedule
                    .add_noise(x0.clone(), noise.clone(), &vec![t; n]);
                let timesteps =
                    Tensor::<1>::from_data(TensorData::new(vec![t as f32; n], [n]), device);
                let pred = pipeline.unet.forward(x_t, timesteps, context.clone());
                loss += (pred - noise).powi_scalar(2).mean().into_scalar::<f32>() as f64;
                progress(s + 1, steps + count.div_ceil(batch));
            }
            loss /= steps as f64;
        }
        // Generate for the held-out prompts with fixed seeds (the same for every model).
        let uncond =
            Tensor::<3>::from_data(TensorData::new(self.uncond.clone(), [1, l, d]), device);
        let options = SampleOptions {
            steps: spec.sampling.steps,
            guidance: spec.sampling.guidance,
            eta: 0.0,
            seed: 0,
        };
        let mut generated = Vec::new();
        for (b, chunk) in (0..count).collect::<Vec<_>>().chunks(batch).enumerate() {
            let noise: Vec<Tensor<4>> = chunk
                .iter()
                .map(|&i| {
                    gaussian(
                        [1, c, h, w],
                        derive(spec.seed, Purpose::Eval, &[1_000_000 + i as u64]),
                        device,
                    )
                })
                .collect();
            let context: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| held[i].context.iter().copied())
                .collect();
            let cond =
                Tensor::<3>::from_data(TensorData::new(context, [chunk.len(), l, d]), device);
            let latents = pipeline
                .denoise(
                    &cond,
                    &uncond,
                    Tensor::cat(noise, 0),
                    &options,
                    false,
                    |_, _| {},
                )
                .latents;
            let images = pipeline.decode_latents(latents) * 2.0 - 1.0;
            let per_image = images.dims()[1..].iter().product::<usize>();
            generated.extend(to_vec(images).chunks(per_image).map(<[f32]>::to_vec));
            progress(steps + b + 1, steps + count.div_ceil(batch));
        }
        let real: Vec<Vec<f32>> = held
            .iter()
            .take(count)
            .map(|e| real_pixels(e, pipeline, device))
            .collect();
        let mmd = spin_common::metrics::mmd_rbf(&generated, &real);
        let dir_key = layout::eval(iteration as u32);
        let grid_key = format!("{dir_key}/samples.png");
        let grid = self.store.path(&grid_key).map_err(store_error)?;
        if !generated.is_empty() {
            let side = ((generated[0].len() / 3) as f64).sqrt() as u32;
            let png = grid_png(&generated, side, spec.eval.grid_columns as u32)?;
            self.store.put(&grid_key, &png).map_err(store_error)?;
        }
        let metrics = Metrics {
            iteration,
            held_out_loss: loss,
            mmd,
            grid,
        };
        let text = serde_json::to_vec_pretty(&metrics)
            .map_err(|e| TrainError::Input(format!("metrics of {dir_key}: {e}")))?;
        self.store
            .put(&format!("{dir_key}/metrics.json"), &text)
            .map_err(store_error)?;
        Ok(metrics)
    }
}

/// The held-out winner in pixel space, `[-1, 1]` (decoded through the VAE when there is one).
fn real_pixels(example: &Example, pipeline: &StableDiffusion, device: &Device) -> Vec<f32> {
    match &pipeline.vae {
        None => example.winner.mean[0].clone(),
        Some(_) => {
            let [c, h, w] = pipeline.latent_shape();
            let latents = Tensor::<4>::from_data(
                TensorData::new(example.winner.mean[0].clone(), [1, c, h, w]),
                device,
            );
            to_vec(pipeline.decode_latents(latents) * 2.0 - 1.0)
        }
    }
}
