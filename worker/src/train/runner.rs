//! The task runner: one job's state on one worker (theta, theta_k, the optimizer, cached data)
//! and the tasks of DESIGN §4 over it: encode a shard, sample a shard, run optimizer steps as
//! one rank of a data-parallel ring, write a snapshot. The worker daemon calls these for the
//! coordinator's tasks; the local loop (`self_play::run_local`) calls the same ones in order
//! with a ring of one. Everything a task writes goes to the job's object store
//! ([`spin_common::store::layout`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use spin_common::checkpoint::{self, CheckpointState};
use spin_common::dataset::{grid_png, JobPrompts, ReadReport};
use spin_common::plan::{step_examples, StepShape};
use spin_common::seeds::{derive, Purpose};
use spin_common::shards::Shard;
use spin_common::spec::{JobSpec, LrShape, NonFinitePolicy, Objective};
use spin_common::store::{layout, Store};

use super::data::{
    encode_examples, examples_from_bytes, examples_to_bytes, safetensors_bytes, to_vec,
    CachedImage, Example,
};
use super::objectives::{loss_and_grads, ObjectiveConfig, PairBatch, Trajectory};
use super::{AdamW, AdamWConfig, LrSchedule, ParamGrads, TrainError};
use crate::collective::Collective;
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::pipeline::{gaussian, SampleOptions, StableDiffusion};
use crate::schedulers::NoiseSchedule;
use crate::weights::WeightFile;

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

/// One optimizer step as every replica applied it.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Iteration.
    pub iteration: usize,
    /// Step within the iteration, from 0.
    pub step: u64,
    /// Steps in the iteration.
    pub steps: u64,
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Pairs of the global batch per second of this step.
    pub images_per_sec: f64,
    /// Wall time of the step on this replica.
    pub step_time_s: f64,
    /// Why the step was dropped on every replica (non-finite, policy `skip`), if it was.
    pub skipped: Option<String>,
}

/// Why a train task stopped before its last step, and how far it got.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct TrainFailure {
    /// What went wrong.
    pub error: TrainError,
    /// Steps applied before it (the replica is at that step boundary).
    pub completed: u64,
    /// Whether redoing the remaining steps (on a re-formed ring) may succeed.
    pub retryable: bool,
}

/// A step's outcome, identical on every replica.
enum StepOutcome {
    Applied(StepReport),
    Skipped(StepReport, String),
}

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
    position: Option<(u32, u64)>,
    /// Rank 0 writes checkpoints.
    writes_checkpoints: bool,
}

/// Opponent samples of one iteration, aligned with the training examples.
#[derive(Default)]
struct Opponents {
    latents: Vec<Vec<f32>>,
    trajectories: Vec<Vec<f32>>,
    timesteps: Vec<usize>,
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
            position: Some((0, 0)),
            writes_checkpoints: true,
        })
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

    /// Encodes training prompts `shard` (positions in the job's training list) and writes
    /// them to the store. Returns the key written and what reading skipped.
    pub fn encode_shard(&mut self, shard: &Shard) -> Result<(String, ReadReport), TrainError> {
        let prompts = self.prompts()?;
        let first = usize::try_from(shard.first).unwrap_or(usize::MAX);
        let end = usize::try_from(shard.end)
            .unwrap_or(usize::MAX)
            .min(prompts.train.len());
        if first >= end {
            return Err(TrainError::Input(format!(
                "encode shard {} covers prompts {}..{} but the job has {} training prompts",
                shard.index,
                shard.first,
                shard.end,
                prompts.train.len()
            )));
        }
        let indices = prompts.train[first..end].to_vec();
        let positions: Vec<u64> = (shard.first..shard.first + indices.len() as u64).collect();
        let mut report = ReadReport::default();
        let prompts = self
            .prompts
            .as_ref()
            .ok_or_else(|| TrainError::Input("job prompts not read".into()))?;
        let examples = encode_examples(
            &self.spec,
            &self.pipeline,
            prompts,
            &indices,
            &positions,
            &mut report,
            &self.device,
        )?;
        let key = layout::latents(shard.index);
        let bytes = examples_to_bytes(&examples, self.latent_shape, self.context_shape)?;
        self.store.put(&key, &bytes).map_err(store_error)?;
        Ok((key, report))
    }

    /// Encodes the held-out prompts, writes them, and evaluates the base model on them.
    pub fn encode_held_out(&mut self) -> Result<(String, Metrics), TrainError> {
        let prompts = self.prompts()?;
        let indices = prompts.held_out.clone();
        let positions: Vec<u64> = (0..indices.len() as u64).collect();
        let mut report = ReadReport::default();
        let prompts = self
            .prompts
            .as_ref()
            .ok_or_else(|| TrainError::Input("job prompts not read".into()))?;
        let examples = encode_examples(
            &self.spec,
            &self.pipeline,
            prompts,
            &indices,
            &positions,
            &mut report,
            &self.device,
        )?;
        let key = layout::held_out();
        let bytes = examples_to_bytes(&examples, self.latent_shape, self.context_shape)?;
        self.store.put(&key, &bytes).map_err(store_error)?;
        self.held_out = Some(examples);
        let metrics = self.evaluate(0)?;
        Ok((key, metrics))
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
    fn ensure_opponents(&mut self, k: u32) -> Result<(), TrainError> {
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

    /// The objective and learning-rate schedule of iteration `k`.
    fn iteration_plan(&self, k: usize) -> Result<(ObjectiveConfig, LrSchedule, u64), TrainError> {
        let iteration = self.spec.iterations.get(k).ok_or_else(|| {
            TrainError::Input(format!(
                "iteration {k} does not exist (the job has {})",
                self.spec.iterations.len()
            ))
        })?;
        let t = &self.spec.training;
        let config = ObjectiveConfig {
            objective: t.objective,
            loss: t.loss,
            weighting: t.weighting,
            noise: t.noise,
            reduction: t.reduction,
            beta: iteration.beta,
            sampling_steps: self.spec.sampling.steps,
        };
        let lr = match t.lr_schedule {
            LrShape::Linear => LrSchedule::Linear {
                lr: iteration.lr,
                warmup: t.warmup_steps,
                total: iteration.steps,
            },
            LrShape::Constant => LrSchedule::Constant {
                lr: iteration.lr,
                warmup: t.warmup_steps,
            },
        };
        Ok((config, lr, iteration.steps))
    }

    /// Runs optimizer steps `first..=last` of iteration `k` as one rank of `collective`: this
    /// rank computes micro-batches `m` with `m mod world == rank`, gradients (with the loss and
    /// a non-finite flag) are averaged over the ring, and every replica applies the same
    /// AdamW step. After the iteration's last step theta becomes theta_k. `cancel` is checked
    /// between steps; `report` gets every step.
    pub fn train_steps(
        &mut self,
        k: u32,
        first: u64,
        last: u64,
        collective: &mut dyn Collective,
        cancel: &AtomicBool,
        mut report: impl FnMut(&StepReport),
    ) -> Result<u64, TrainFailure> {
        let fail = |error: TrainError, completed: u64, retryable: bool| TrainFailure {
            error,
            completed,
            retryable,
        };
        let ki = k as usize;
        let (config, lr, steps) = self.iteration_plan(ki).map_err(|e| fail(e, 0, false))?;
        if last >= steps || first > last {
            return Err(fail(
                TrainError::Input(format!(
                    "steps {first}..={last} are outside iteration {k}'s {steps} steps"
                )),
                0,
                false,
            ));
        }
        let accumulation = self.spec.training.gradient_accumulation;
        let (rank, world) = (collective.rank(), collective.world());
        if world > accumulation {
            return Err(fail(
                TrainError::Input(format!(
                    "a ring of {world} workers is larger than training.gradient_accumulation \
                     = {accumulation}: some workers would have no micro-batch"
                )),
                0,
                false,
            ));
        }
        self.position_at(k, first).map_err(|e| {
            let retryable = matches!(e, TrainError::Io { .. });
            fail(e, 0, retryable)
        })?;
        self.writes_checkpoints = rank == 0;
        self.ensure_train().map_err(|e| fail(e, 0, false))?;
        self.ensure_opponents(k).map_err(|e| fail(e, 0, false))?;
        let mut completed = 0;
        for step in first..=last {
            if cancel.load(Ordering::Relaxed) {
                return Err(fail(
                    TrainError::Input("cancelled".into()),
                    completed,
                    false,
                ));
            }
            let outcome = self
                .train_step(ki, step, steps, &config, &lr, rank, world, collective)
                .map_err(|e| {
                    let retryable = matches!(e, TrainError::Collective(_));
                    fail(e, completed, retryable)
                });
            let outcome = match outcome {
                Ok(o) => o,
                Err(f) => {
                    self.position = Some((k, step));
                    return Err(f);
                }
            };
            match outcome {
                StepOutcome::Applied(r) => report(&r),
                StepOutcome::Skipped(mut r, reason) => {
                    let t = &self.spec.training;
                    if t.nonfinite == NonFinitePolicy::Skip
                        && self.skipped_steps < t.max_skipped_steps
                    {
                        self.skipped_steps += 1;
                        tracing::warn!(iteration = k, step, %reason, "step dropped on every replica");
                        r.skipped = Some(reason);
                        report(&r);
                    } else {
                        self.position = Some((k, step));
                        return Err(fail(
                            TrainError::NonFinite {
                                iteration: ki,
                                step,
                                reason,
                            },
                            completed,
                            false,
                        ));
                    }
                }
            }
            completed += 1;
            self.position = Some((k, step + 1));
            let every = self.spec.training.checkpoint_every;
            let due = step + 1 == steps || (every > 0 && (step + 1) % every == 0);
            if due && self.writes_checkpoints {
                self.write_checkpoint(k, step)
                    .map_err(|e| fail(e, completed, true))?;
            }
        }
        if last + 1 == steps {
            self.finish_iteration(k);
        }
        Ok(completed)
    }

    /// Brings theta and the optimizer to "ready for step `first` of iteration `k`": kept as
    /// they are when this replica is there already; theta_k (from its snapshot, or the base)
    /// with a fresh optimizer for step 0; otherwise the job's checkpoint after step
    /// `first - 1`. Every iteration fine-tunes theta_k afresh (new moments, the schedule from
    /// its warm-up), so the state at an iteration's start is the snapshot alone.
    fn position_at(&mut self, k: u32, first: u64) -> Result<(), TrainError> {
        if self.position != Some((k, first)) {
            if self.reference_iteration != k || first == 0 {
                self.restore_theta_k(k)?;
            }
            if first > 0 {
                self.load_checkpoint(k, first - 1)?;
                return Ok(());
            }
        }
        if first == 0 {
            self.optimizer = AdamW::new(self.optimizer_config());
        }
        Ok(())
    }

    /// Loads theta_k (k = 0: the base model; else the job's verified snapshot) as theta and,
    /// but for DPO, as the reference and opponent.
    fn restore_theta_k(&mut self, k: u32) -> Result<(), TrainError> {
        let dir = if k == 0 {
            self.spec.base_model.clone()
        } else {
            let dir = self.store.path(&layout::snapshot(k)).map_err(store_error)?;
            spin_common::manifest::verify(&dir).map_err(|e| {
                TrainError::Input(format!("theta_{k} is needed here but cannot be used: {e}"))
            })?;
            dir
        };
        let train_device = self.device.clone().autodiff();
        let (theta, _) = UNet2DConditionModel::load(&dir.join("unet"), &train_device)?;
        self.theta = theta;
        if self.spec.training.objective != Objective::Dpo || k == 0 {
            self.pipeline.unet = self.theta.valid();
        }
        self.reference_iteration = k;
        self.position = Some((k, 0));
        self.opponents = None;
        tracing::info!(iteration = k, dir = %dir.display(), "loaded theta_k");
        Ok(())
    }

    /// Writes the checkpoint after `step` of iteration `k` (theta, optimizer moments, state)
    /// and publishes it with a manifest; keeps the two newest of the iteration.
    fn write_checkpoint(&mut self, k: u32, step: u64) -> Result<(), TrainError> {
        let started = Instant::now();
        let key = checkpoint::key(k, step);
        let dir = self.store.path(&key).map_err(store_error)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        self.theta
            .save(&self.unet_config, &dir.join(checkpoint::WEIGHTS))?;
        let mut tensors = BTreeMap::new();
        for (name, moments) in self.optimizer.moments() {
            let n = moments.m.dims()[0];
            tensors.insert(format!("{name}.m"), (vec![n], to_vec(moments.m.clone())));
            tensors.insert(format!("{name}.v"), (vec![n], to_vec(moments.v.clone())));
        }
        let bytes = safetensors_bytes(&tensors, None)?;
        let path = dir.join(checkpoint::OPTIMIZER);
        std::fs::write(&path, bytes).map_err(|e| TrainError::io(&path, e))?;
        let state = CheckpointState {
            iteration: k,
            step,
            optimizer_steps: self.optimizer.steps_taken(),
            skipped_steps: self.skipped_steps,
        };
        let path = dir.join(checkpoint::STATE);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&state).unwrap_or_default(),
        )
        .map_err(|e| TrainError::io(&path, e))?;
        spin_common::manifest::publish(&dir, &format!("checkpoint of {key}"))
            .map_err(|e| TrainError::Input(e.to_string()))?;
        // Keep the two newest: one to resume from, one if the newest turns out damaged.
        let parent = checkpoint::iteration_dir(k);
        let names: Vec<String> = self
            .store
            .list(&parent)
            .map_err(store_error)?
            .into_iter()
            .filter(|n| n.starts_with("step-"))
            .collect();
        for old in names.iter().rev().skip(2) {
            self.store
                .remove(&format!("{parent}/{old}"))
                .map_err(store_error)?;
        }
        tracing::info!(
            iteration = k,
            step,
            secs = started.elapsed().as_secs_f64(),
            "checkpoint published"
        );
        Ok(())
    }

    /// Loads the checkpoint after `step` of iteration `k` (verified) into theta and the
    /// optimizer. A newer damaged checkpoint is never read; an older one is not a substitute:
    /// the coordinator chose `step`.
    fn load_checkpoint(&mut self, k: u32, step: u64) -> Result<(), TrainError> {
        let (found, refused) = checkpoint::latest_at_most(self.store.root(), k, step);
        for (dir, reason) in &refused {
            tracing::warn!(dir = %dir.display(), %reason, "checkpoint refused");
        }
        let found = found.filter(|f| f.state.step == step).ok_or_else(|| {
            TrainError::Input(format!(
                "no verified checkpoint of iteration {k} after step {step} in {}{}",
                self.store
                    .root()
                    .join(checkpoint::iteration_dir(k))
                    .display(),
                refused
                    .first()
                    .map(|(_, r)| format!(" (newest refused: {r})"))
                    .unwrap_or_default()
            ))
        })?;
        let train_device = self.device.clone().autodiff();
        let (theta, _) =
            UNet2DConditionModel::load(&found.dir.join(checkpoint::WEIGHTS), &train_device)?;
        let file = WeightFile::open(&found.dir.join(checkpoint::OPTIMIZER))?;
        let mut moments = std::collections::HashMap::new();
        for key in file.keys() {
            if let Some(name) = key.strip_suffix(".m") {
                let m = file.tensor::<1>(key, &self.device)?;
                let v = file.tensor::<1>(&format!("{name}.v"), &self.device)?;
                moments.insert(name.to_string(), super::optim::Moments { m, v });
            }
        }
        self.theta = theta;
        self.optimizer = AdamW::from_state(
            self.optimizer_config(),
            found.state.optimizer_steps,
            moments,
        );
        self.skipped_steps = found.state.skipped_steps;
        self.position = Some((k, step + 1));
        tracing::info!(iteration = k, step, dir = %found.dir.display(), "resumed from checkpoint");
        Ok(())
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

    /// theta_{k+1} becomes the opponent and the reference (DPO keeps the base as reference).
    fn finish_iteration(&mut self, k: u32) {
        if self.spec.training.objective != Objective::Dpo {
            self.pipeline.unet = self.theta.valid();
        }
        self.reference_iteration = k + 1;
        self.position = Some((k + 1, 0));
        self.opponents = None;
    }

    #[allow(clippy::too_many_arguments)]
    fn train_step(
        &mut self,
        k: usize,
        step: u64,
        steps: u64,
        config: &ObjectiveConfig,
        lr: &LrSchedule,
        rank: usize,
        world: usize,
        collective: &mut dyn Collective,
    ) -> Result<StepOutcome, TrainError> {
        let started = Instant::now();
        let t = &self.spec.training;
        let accumulation = t.gradient_accumulation;
        let shape = StepShape {
            world: 1,
            batch: t.batch_size,
            accumulation,
        };
        let count = self.train_examples().len();
        let mut total: Option<ParamGrads> = None;
        let mut loss_sum = 0.0f64;
        let mut failure: Option<String> = None;
        for micro in (rank..accumulation).step_by(world) {
            let examples = step_examples(self.spec.seed, k as u64, step, micro, 0, shape, count);
            let batch = self.build_batch(&examples, k, step, micro);
            match loss_and_grads(
                &self.theta,
                &self.pipeline.unet,
                &batch,
                config,
                &self.schedule,
            ) {
                Ok(out) if out.grads.all_finite() => {
                    loss_sum += out.loss;
                    match total.as_mut() {
                        Some(sum) => sum.accumulate(out.grads),
                        None => total = Some(out.grads),
                    }
                }
                Ok(_) => failure = Some(format!("non-finite gradient on rank {rank}")),
                Err(e) => failure = Some(format!("{e} on rank {rank}")),
            }
        }
        // Gradients, the loss sum, then one failure slot per rank: one all-reduce decides for
        // every replica, and every replica can name the ranks that failed.
        let mut flat = match (&total, &failure) {
            (Some(grads), None) => grads.to_flat(),
            _ => vec![0.0; self.theta.num_params()],
        };
        flat.push(loss_sum as f32);
        flat.extend((0..world).map(|r| {
            if r == rank && failure.is_some() {
                1.0
            } else {
                0.0
            }
        }));
        collective.all_reduce_mean(&mut flat)?;
        let slots = flat.split_off(flat.len() - world);
        let failed_ranks: Vec<usize> = (0..world).filter(|&r| slots[r] != 0.0).collect();
        let flag = if failed_ranks.is_empty() { 0.0 } else { 1.0 };
        let loss_mean =
            f64::from(flat.pop().unwrap_or(f32::NAN)) * world as f64 / accumulation as f64;
        let rate = lr.lr(step);
        let mut report = StepReport {
            iteration: k,
            step,
            steps,
            loss: loss_mean,
            lr: rate,
            grad_norm: f64::NAN,
            images_per_sec: 0.0,
            step_time_s: 0.0,
            skipped: None,
        };
        let finish = |mut report: StepReport| {
            let elapsed = started.elapsed().as_secs_f64();
            report.step_time_s = elapsed;
            report.images_per_sec = (t.batch_size * accumulation) as f64 / elapsed.max(1e-9);
            report
        };
        // Every rank sees the same flag, so every rank takes the same branch.
        let Some(mut grads) = total.filter(|_| flag == 0.0 && failure.is_none()) else {
            let reason = failure.unwrap_or_else(|| {
                format!("a non-finite loss or gradient on rank(s) {failed_ranks:?}")
            });
            return Ok(StepOutcome::Skipped(finish(report), reason));
        };
        grads.set_flat(&flat);
        grads.scale(world as f64 / accumulation as f64);
        if !grads.all_finite() {
            return Ok(StepOutcome::Skipped(
                finish(report),
                "non-finite averaged gradient".into(),
            ));
        }
        report.grad_norm = if t.max_grad_norm > 0.0 {
            grads.clip_global_norm(t.max_grad_norm)
        } else {
            grads.global_norm()
        };
        // Take theta by value for the optimizer; the placeholder (a cheap handle on theta_k's
        // tensors) is overwritten at once.
        let theta = std::mem::replace(&mut self.theta, self.pipeline.unet.clone());
        self.theta = self.optimizer.step(theta, &grads, rate);
        Ok(StepOutcome::Applied(finish(report)))
    }

    /// The pairs of one micro-batch with all their randomness, from seeds alone.
    fn build_batch(
        &self,
        examples: &[usize],
        iteration: usize,
        step: u64,
        micro: usize,
    ) -> PairBatch {
        let spec = &self.spec;
        let data = self.train_examples();
        let opponents = self.opponents.as_ref().map(|(_, o)| o);
        let device = &self.device;
        let [c, h, w] = self.latent_shape;
        let [l, d] = self.context_shape;
        let b = examples.len();
        let per = c * h * w;
        let mut rng = ChaCha8Rng::seed_from_u64(derive(
            spec.seed,
            Purpose::StepNoise,
            &[iteration as u64, step, micro as u64],
        ));
        let mut win = Vec::with_capacity(b * per);
        let mut lose = Vec::with_capacity(b * per);
        let mut context = Vec::with_capacity(b * l * d);
        for &i in examples {
            let example = &data[i];
            let flip = spec.random_flip && rng.random_bool(0.5);
            win.extend(draw(&example.winner, flip, &mut rng));
            match opponents {
                Some(o) => lose.extend_from_slice(&o.latents[i]),
                None => lose.extend(draw(&example.loser, flip, &mut rng)),
            }
            context.extend_from_slice(&example.context);
        }
        let t: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
        let tensor4 =
            |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, c, h, w]), device);
        let eps = tensor4(normal(&mut rng, b * per));
        let eps_lose = tensor4(normal(&mut rng, b * per));
        let trajectory = opponents.filter(|o| !o.trajectories.is_empty()).map(|o| {
            let s = o.timesteps.len();
            let states: Vec<f32> = examples
                .iter()
                .flat_map(|&i| o.trajectories[i].iter().copied())
                .collect();
            Trajectory {
                states: Tensor::from_data(TensorData::new(states, [b, s, c, h, w]), device),
                timesteps: o.timesteps.clone(),
                index: (0..b).map(|_| rng.random_range(0..s)).collect(),
                eps_steps: Tensor::from_data(
                    TensorData::new(normal(&mut rng, b * s * per), [b, s, c, h, w]),
                    device,
                ),
            }
        });
        PairBatch {
            x0_win: tensor4(win),
            x0_lose: tensor4(lose),
            context: Tensor::from_data(TensorData::new(context, [b, l, d]), device),
            t,
            eps,
            eps_lose,
            trajectory,
        }
    }

    /// Writes theta_{k+1} (diffusers layout beside copies of the base's frozen parts, then a
    /// sha256 manifest) and evaluates it. Returns the snapshot folder and the metrics.
    pub fn snapshot(&mut self, k: u32) -> Result<(PathBuf, Metrics), TrainError> {
        if self.position != Some((k + 1, 0)) {
            // This replica did not finish iteration k itself (it joined later, or the
            // coordinator restarted): the iteration's last checkpoint holds theta_{k+1}.
            let (_, _, steps) = self.iteration_plan(k as usize)?;
            self.restore_theta_k(k)?;
            self.load_checkpoint(k, steps.saturating_sub(1))?;
            self.finish_iteration(k);
        }
        let dir = self
            .store
            .path(&layout::snapshot(k + 1))
            .map_err(store_error)?;
        write_snapshot(
            &self.spec.base_model,
            &self.theta,
            &self.unet_config,
            &dir,
            &format!("theta_{} of job {}", k + 1, self.spec.name),
        )?;
        let metrics = self.evaluate(k as usize + 1)?;
        Ok((dir, metrics))
    }

    /// Held-out denoising loss (fixed timesteps and noise), generated images vs held-out real
    /// winners (kernel MMD on pixels), and a sample grid, of theta (iteration 0: the base).
    pub fn evaluate(&mut self, iteration: usize) -> Result<Metrics, TrainError> {
        self.ensure_held_out()?;
        // Evaluate theta: make it the pipeline's UNet for the duration.
        let reference = std::mem::replace(&mut self.pipeline.unet, self.theta.valid());
        let result = self.evaluate_pipeline(iteration);
        self.pipeline.unet = reference;
        result
    }

    fn evaluate_pipeline(&self, iteration: usize) -> Result<Metrics, TrainError> {
        let spec = &self.spec;
        let pipeline = &self.pipeline;
        let device = &self.device;
        let [c, h, w] = self.latent_shape;
        let [l, d] = self.context_shape;
        let held = self.held_out.as_deref().unwrap_or(&[]);
        let n = held.len();
        let mut loss = 0.0;
        let steps = spec.eval.loss_timesteps.max(1);
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
            }
            loss /= steps as f64;
        }
        // Generate for the held-out prompts with fixed seeds (the same for every model).
        let count = n.min(spec.eval.samples);
        let uncond =
            Tensor::<3>::from_data(TensorData::new(self.uncond.clone(), [1, l, d]), device);
        let options = SampleOptions {
            steps: spec.sampling.steps,
            guidance: spec.sampling.guidance,
            eta: 0.0,
            seed: 0,
        };
        let mut generated = Vec::new();
        for chunk in (0..count)
            .collect::<Vec<_>>()
            .chunks(spec.sampling.batch_size)
        {
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
        self.store
            .put(
                &format!("{dir_key}/metrics.json"),
                serde_json::to_string_pretty(&metrics)
                    .unwrap_or_default()
                    .as_bytes(),
            )
            .map_err(store_error)?;
        Ok(metrics)
    }
}

/// A store error as a training error (it names the key and the directory).
pub fn store_error(e: spin_common::store::StoreError) -> TrainError {
    TrainError::Input(e.to_string())
}

/// Draws a value of the cached posterior (mean + std * noise), flipped or not.
fn draw(image: &CachedImage, flip: bool, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let side = usize::from(flip);
    if image.std[side].is_empty() {
        return image.mean[side].clone();
    }
    image.mean[side]
        .iter()
        .zip(&image.std[side])
        .map(|(m, s)| m + s * rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// Writes theta in diffusers layout beside copies of the base's frozen parts, then publishes a
/// sha256 manifest: a folder without a valid manifest is never loaded.
fn write_snapshot(
    base: &Path,
    theta: &UNet2DConditionModel,
    config: &UNet2DConditionConfig,
    dir: &Path,
    description: &str,
) -> Result<(), TrainError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    for entry in [
        "model_index.json",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "vae",
    ] {
        copy_recursive(&base.join(entry), &dir.join(entry))?;
    }
    theta.save(config, &dir.join("unet"))?;
    spin_common::manifest::publish(dir, description)
        .map_err(|e| TrainError::Input(e.to_string()))?;
    Ok(())
}

fn copy_recursive(from: &Path, to: &Path) -> Result<(), TrainError> {
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| TrainError::io(to, e))?;
        for entry in std::fs::read_dir(from).map_err(|e| TrainError::io(from, e))? {
            let entry = entry.map_err(|e| TrainError::io(from, e))?;
            copy_recursive(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if from.exists()
        && from
            .file_name()
            .is_some_and(|n| n != spin_common::manifest::MANIFEST)
    {
        std::fs::copy(from, to).map_err(|e| TrainError::io(from, e))?;
    }
    Ok(())
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
