//! The sampling task: theta_k generates the opponent latents (and DDIM trajectories when the
//! objective needs them) of one cached shard, with seeds that depend only on (job seed,
//! iteration, prompt); and the reading of an iteration's opponents back for training.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use spin_common::seeds::{derive, Purpose};
use spin_common::store::layout;

use super::{store_error, JobRunner};
use crate::pipeline::{gaussian, SampleOptions};
use crate::train::data::{examples_from_bytes, safetensors_bytes, to_vec};
use crate::train::TrainError;
use crate::weights::WeightFile;

/// Opponent samples of one iteration, aligned with the training examples.
#[derive(Default)]
pub(super) struct Opponents {
    pub(super) latents: Vec<Vec<f32>>,
    pub(super) trajectories: Vec<Vec<f32>>,
    pub(super) timesteps: Vec<usize>,
}

impl JobRunner {
    /// Generates iteration `k`'s opponent latents (and trajectories when the objective needs
    /// them) for the examples of cached shard `shard` with theta_k; writes them to the store.
    /// `progress(done, total)` after every sampling batch.
    pub fn sample_shard(
        &mut self,
        k: u32,
        shard: u32,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<String, TrainError> {
        if self.reference_iteration != k {
            self.restore_theta_k(k)?;
        }
        let key = layout::latents(shard);
        let bytes = self.store.get(&key).map_err(store_error)?;
        let examples = examples_from_bytes(Path::new(&key), &bytes)?;
        let [c, h, w] = self.latent_shape;
        let [l, d] = self.context_shape;
        let spec = &self.spec;
        let record = spec.training.objective.needs_trajectory();
        let options = SampleOptions {
            steps: spec.sampling.steps,
            guidance: spec.sampling.guidance,
            eta: spec.sampling.eta,
            seed: derive(spec.seed, Purpose::OpponentNoise, &[u64::from(k), u64::MAX]),
        };
        let uncond = Tensor::<3>::from_data(
            TensorData::new(self.uncond.clone(), [1, l, d]),
            &self.device,
        );
        let per = c * h * w;
        let mut latents: Vec<f32> = Vec::with_capacity(examples.len() * per);
        let mut trajectories: Vec<f32> = Vec::new();
        let mut timesteps = Vec::new();
        for (done, chunk) in examples.chunks(spec.sampling.batch_size).enumerate() {
            let n = chunk.len();
            // Each prompt's noise depends only on (seed, iteration, prompt): any worker can
            // redo any shard identically.
            let noise: Vec<Tensor<4>> = chunk
                .iter()
                .map(|e| {
                    gaussian(
                        [1, c, h, w],
                        derive(spec.seed, Purpose::OpponentNoise, &[u64::from(k), e.prompt]),
                        &self.device,
                    )
                })
                .collect();
            let context: Vec<f32> = chunk
                .iter()
                .flat_map(|e| e.context.iter().copied())
                .collect();
            let cond = Tensor::<3>::from_data(TensorData::new(context, [n, l, d]), &self.device);
            let result = self.pipeline.denoise(
                &cond,
                &uncond,
                Tensor::cat(noise, 0),
                &options,
                record,
                |_, _| {},
            );
            latents.extend(to_vec(result.latents));
            if let Some(trajectory) = result.trajectory {
                trajectories.extend(to_vec(trajectory));
            }
            timesteps = result.timesteps;
            progress(
                (done * spec.sampling.batch_size + n).min(examples.len()),
                examples.len(),
            );
        }
        let n = examples.len();
        let mut tensors = BTreeMap::new();
        tensors.insert("latents".to_string(), (vec![n, c, h, w], latents));
        if record {
            let s = timesteps.len();
            tensors.insert(
                "trajectory".to_string(),
                (vec![n, s, c, h, w], trajectories),
            );
        }
        tensors.insert(
            "timesteps".to_string(),
            (
                vec![timesteps.len()],
                timesteps.iter().map(|&t| t as f32).collect(),
            ),
        );
        tensors.insert(
            "prompt".to_string(),
            (vec![n], examples.iter().map(|e| e.prompt as f32).collect()),
        );
        let out = layout::opponents(k, shard);
        let bytes = safetensors_bytes(&tensors, None)?;
        self.store.put(&out, &bytes).map_err(store_error)?;
        Ok(out)
    }

    /// Reads iteration `k`'s opponents, checked to line up with the training examples.
    pub(super) fn ensure_opponents(&mut self, k: u32) -> Result<(), TrainError> {
        if !self.spec.training.objective.self_play()
            || self.opponents.as_ref().is_some_and(|(i, _)| *i == k)
        {
            return Ok(());
        }
        let dir = format!("cache/opponents/iteration-{k}");
        let mut opponents = Opponents::default();
        let mut prompts = Vec::new();
        for name in self.store.list(&dir).map_err(store_error)? {
            if !name.ends_with(".safetensors") {
                continue;
            }
            let key = format!("{dir}/{name}");
            let bytes = self.store.get(&key).map_err(store_error)?;
            let file = WeightFile::from_bytes(Path::new(&key), &bytes)?;
            let latents = file.require("latents")?;
            let n = latents.shape.first().copied().unwrap_or(0);
            let per = latents.values.len() / n.max(1);
            opponents.latents.extend(
                latents
                    .values
                    .chunks(per.max(1))
                    .map(<[f32]>::to_vec)
                    .take(n),
            );
            if let Some(trajectory) = file.get("trajectory") {
                let per = trajectory.values.len() / n.max(1);
                opponents.trajectories.extend(
                    trajectory
                        .values
                        .chunks(per.max(1))
                        .map(<[f32]>::to_vec)
                        .take(n),
                );
            }
            opponents.timesteps = file
                .require("timesteps")?
                .values
                .iter()
                .map(|&t| t as usize)
                .collect();
            prompts.extend(file.require("prompt")?.values.iter().map(|&p| p as u64));
        }
        let expected: Vec<u64> = self.train_examples().iter().map(|e| e.prompt).collect();
        if prompts != expected {
            return Err(TrainError::Input(format!(
                "opponent samples of iteration {k} in {} cover {} prompts, the cached latents {}: \
                 sampling is incomplete or stale",
                self.store.root().join(&dir).display(),
                prompts.len(),
                expected.len()
            )));
        }
        self.opponents = Some((k, opponents));
        Ok(())
    }
}
