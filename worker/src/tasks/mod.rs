//! The worker's tasks (DESIGN §4) over one job's state on one worker: theta, theta_k, the
//! optimizer and the cached data. One file per task, each a set of methods on [`JobRunner`]:
//! encode a shard, sample a shard, run optimizer steps as one rank of a data-parallel ring,
//! write and read checkpoints, write a snapshot, evaluate. The decisions they take (checkpoint
//! cadence and retention, the non-finite policy, where weights come from) are pure functions
//! in [`policy`]. The worker daemon calls these for the coordinator's tasks; the local loop
//! (`train::self_play::run_local`) calls the same ones in order with a ring of one. Everything
//! a task writes goes to the job's object store ([`spin_common::store::layout`]).

mod batch;
mod checkpoint;
mod encode;
mod evaluate;
pub mod policy;
mod sample;
mod snapshot;
mod train;

use std::path::Path;

use burn::tensor::Device;
use spin_common::dataset::JobPrompts;
use spin_common::spec::JobSpec;
use spin_common::store::{layout, Store};

pub use evaluate::Metrics;
pub use train::{StepReport, TrainFailure};

use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::pipeline::StableDiffusion;
use crate::schedulers::NoiseSchedule;
use crate::train::data::{examples_from_bytes, to_vec, Example};
use crate::train::{AdamW, AdamWConfig, TrainError};
use policy::Position;
use sample::Opponents;

/// One job's state on one worker.
pub struct JobRunner {
    spec: JobSpec,
    store: Store,
    device: Device,
    /// The frozen parts, and `unet` = theta_k: the opponent and the reference.
    pipeline: StableDiffusion,
    /// The trained replica (autodiff device).
    theta: UNet2DConditionModel,
    unet_config: UNet2DConditionConfig,
    optimizer: AdamW,
    schedule: NoiseSchedule,
    uncond: Vec<f32>,
    latent_shape: [usize; 3],
    context_shape: [usize; 2],
    prompts: Option<JobPrompts>,
    train: Option<Vec<Example>>,
    held_out: Option<Vec<Example>>,
    opponents: Option<(u32, Opponents)>,
    skipped_steps: u64,
    /// k such that `pipeline.unet` is theta_k (the opponent and, but for DPO, the reference).
    reference_iteration: u32,
    /// Where theta and the optimizer stand: `(k, s)` = ready for step `s` of iteration `k`
    /// (after the last step of k: `(k + 1, 0)`, theta = theta_{k+1}).
    position: Option<Position>,
    /// Rank 0 writes checkpoints.
    writes_checkpoints: bool,
}

impl JobRunner {
    /// Loads the job's base model on `device`; `store` is the job's own prefix.
    pub fn open(spec: JobSpec, store: Store, device: &Device) -> Result<Self, TrainError> {
        let pipeline = StableDiffusion::load(&spec.base_model, device)?;
        let train_device = device.clone().autodiff();
        let (theta, unet_config) =
            UNet2DConditionModel::load(&spec.base_model.join("unet"), &train_device)?;
        let schedule = NoiseSchedule::new(&pipeline.scheduler_config);
        let uncond = pipeline.encode_prompts(&[""], device)?;
        let [_, l, d] = uncond.dims();
        let t = &spec.training;
        let optimizer = AdamW::new(AdamWConfig {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
            weight_decay: t.weight_decay,
        });
        Ok(Self {
            latent_shape: pipeline.latent_shape(),
            context_shape: [l, d],
            uncond: to_vec(uncond),
            spec,
            store,
            device: device.clone(),
            pipeline,
            theta,
            unet_config,
            optimizer,
            schedule,
            prompts: None,
            train: None,
            held_out: None,
            opponents: None,
            skipped_steps: 0,
            reference_iteration: 0,
            position: Some(Position::at(0, 0)),
            writes_checkpoints: true,
        })
    }

    /// What this replica holds, for the [`policy`] decisions.
    fn held(&self) -> policy::Held {
        policy::Held {
            position: self.position,
            reference_iteration: self.reference_iteration,
        }
    }

    /// The job's spec.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// The job's store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The trained replica theta.
    pub fn theta(&self) -> &UNet2DConditionModel {
        &self.theta
    }

    /// The job's prompts (the dataset read and split), read on first use.
    pub fn prompts(&mut self) -> Result<&JobPrompts, TrainError> {
        if self.prompts.is_none() {
            self.prompts = Some(JobPrompts::read(&self.spec)?);
        }
        self.prompts
            .as_ref()
            .ok_or_else(|| TrainError::Input("job prompts not read".into()))
    }

    /// Reads every cached example file under `dir` in name order.
    fn read_examples(&self, keys: &[String]) -> Result<Vec<Example>, TrainError> {
        let mut out = Vec::new();
        for key in keys {
            let bytes = self.store.get(key).map_err(store_error)?;
            out.extend(examples_from_bytes(Path::new(key), &bytes)?);
        }
        Ok(out)
    }

    /// The keys of the training shards' cached latents, in shard order.
    fn latent_keys(&self) -> Result<Vec<String>, TrainError> {
        let names = self.store.list("cache/latents").map_err(store_error)?;
        let keys: Vec<String> = names
            .into_iter()
            .filter(|n| n.starts_with("shard-") && n.ends_with(".safetensors"))
            .map(|n| format!("cache/latents/{n}"))
            .collect();
        if keys.is_empty() {
            return Err(TrainError::Input(format!(
                "no cached latents in {}: the job has not been prepared",
                self.store.root().join("cache/latents").display()
            )));
        }
        Ok(keys)
    }

    fn ensure_train(&mut self) -> Result<(), TrainError> {
        if self.train.is_none() {
            let keys = self.latent_keys()?;
            let train = self.read_examples(&keys)?;
            if train.is_empty() {
                return Err(TrainError::Input(
                    "no usable training pairs after dropping ties and bad rows".into(),
                ));
            }
            self.train = Some(train);
        }
        Ok(())
    }

    fn ensure_held_out(&mut self) -> Result<(), TrainError> {
        if self.held_out.is_none() {
            let held = if self.store.exists(&layout::held_out()) {
                self.read_examples(&[layout::held_out()])?
            } else {
                Vec::new()
            };
            self.held_out = Some(held);
        }
        Ok(())
    }

    fn train_examples(&self) -> &[Example] {
        self.train.as_deref().unwrap_or(&[])
    }

    fn optimizer_config(&self) -> AdamWConfig {
        let t = &self.spec.training;
        AdamWConfig {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_eps,
            weight_decay: t.weight_decay,
        }
    }
}

/// A store error as a training error (it names the key and the directory).
pub fn store_error(e: spin_common::store::StoreError) -> TrainError {
    TrainError::Input(e.to_string())
}

#[cfg(test)]
pub(crate) mod test_job;
