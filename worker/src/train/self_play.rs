//! The SPIN-Diffusion self-play loop in one process (DESIGN.md §1, §4 phases): prepare, then per
//! iteration k: sample one opponent image per prompt with theta_k, train the configured steps
//! against theta_k, snapshot theta_{k+1} (diffusers layout + sha256 manifest), evaluate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use spin_common::dataset::grid_png;
use spin_common::plan::{step_examples, StepShape};
use spin_common::seeds::{derive, Purpose};
use spin_common::spec::{JobSpec, LrShape, NonFinitePolicy};

use super::data::{prepare, to_vec, CachedImage, PreparedData};
use super::objectives::{loss_and_grads, ObjectiveConfig, PairBatch, Trajectory};
use super::{AdamW, AdamWConfig, LrSchedule, ParamGrads, TrainError};
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::pipeline::{gaussian, SampleOptions, StableDiffusion};
use crate::schedulers::NoiseSchedule;

/// Progress of a run, for logs and the job's event stream.
#[derive(Clone, Debug)]
pub enum TrainEvent {
    /// A phase began.
    Phase(String),
    /// Opponent sampling progress.
    Sampling {
        /// Iteration.
        iteration: usize,
        /// Prompts done.
        done: usize,
        /// Prompts in all.
        total: usize,
    },
    /// An optimizer step finished.
    Step {
        /// Iteration.
        iteration: usize,
        /// Step within the iteration (1-based).
        step: u64,
        /// Steps in the iteration.
        steps: u64,
        /// Mean loss of the step.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Pairs per second.
        images_per_sec: f64,
    },
    /// A step was dropped (non-finite loss or gradient, policy `skip`).
    Skipped {
        /// Iteration.
        iteration: usize,
        /// Step.
        step: u64,
        /// Why.
        reason: String,
    },
    /// A snapshot was published.
    Snapshot {
        /// Iteration it ends.
        iteration: usize,
        /// Folder.
        dir: PathBuf,
    },
    /// Evaluation of a model.
    Metrics(Metrics),
}

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

/// What a finished run produced.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Snapshot folders theta_1.. in order.
    pub snapshots: Vec<PathBuf>,
    /// Metrics of the base model then of every snapshot.
    pub metrics: Vec<Metrics>,
}

/// Runs the whole job in this process on `device` (flex, wgpu, cuda).
pub fn run_local(
    spec: &JobSpec,
    device: &Device,
    mut events: impl FnMut(&TrainEvent),
) -> Result<RunSummary, TrainError> {
    std::fs::create_dir_all(&spec.output).map_err(|e| TrainError::io(&spec.output, e))?;
    events(&TrainEvent::Phase("preparing".into()));
    let mut pipeline = StableDiffusion::load(&spec.base_model, device)?;
    let train_device = device.clone().autodiff();
    let (mut theta, unet_config) =
        UNet2DConditionModel::load(&spec.base_model.join("unet"), &train_device)?;
    let data = prepare(spec, &pipeline, device)?;
    tracing::info!(
        train = data.train.len(),
        held_out = data.held_out.len(),
        "prepared data"
    );
    let schedule = NoiseSchedule::new(&pipeline.scheduler_config);
    let t = &spec.training;
    let mut optimizer = AdamW::new(AdamWConfig {
        beta1: t.adam_beta1,
        beta2: t.adam_beta2,
        eps: t.adam_eps,
        weight_decay: t.weight_decay,
    });
    let mut summary = RunSummary {
        snapshots: Vec::new(),
        metrics: Vec::new(),
    };
    let base_metrics = evaluate(spec, &pipeline, &data, &schedule, 0, device)?;
    events(&TrainEvent::Metrics(base_metrics.clone()));
    summary.metrics.push(base_metrics);

    for (k, iteration) in spec.iterations.iter().enumerate() {
        let opponents = if t.objective.self_play() {
            events(&TrainEvent::Phase(format!("sampling {k}")));
            Some(sample_opponents(
                spec,
                &pipeline,
                &data,
                k,
                device,
                &mut events,
            ))
        } else {
            None
        };
        events(&TrainEvent::Phase(format!("training {k}")));
        let config = ObjectiveConfig {
            objective: t.objective,
            loss: t.loss,
            weighting: t.weighting,
            noise: t.noise,
            reduction: t.reduction,
            beta: iteration.beta,
            sampling_steps: spec.sampling.steps,
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
        let shape = StepShape {
            world: 1,
            batch: t.batch_size,
            accumulation: t.gradient_accumulation,
        };
        let mut skipped = 0u64;
        for step in 0..iteration.steps {
            let started = Instant::now();
            let mut total: Option<ParamGrads> = None;
            let mut loss_sum = 0.0;
            let mut failure = None;
            for micro in 0..shape.accumulation {
                let examples =
                    step_examples(spec.seed, k as u64, step, micro, 0, shape, data.train.len());
                let batch = build_batch(
                    spec,
                    &data,
                    opponents.as_ref(),
                    &examples,
                    k,
                    step,
                    micro,
                    device,
                );
                match loss_and_grads(&theta, &pipeline.unet, &batch, &config, &schedule) {
                    Ok(out) if out.grads.all_finite() => {
                        loss_sum += out.loss;
                        match total.as_mut() {
                            Some(sum) => sum.accumulate(out.grads),
                            None => total = Some(out.grads),
                        }
                    }
                    Ok(_) => failure = Some("non-finite gradient".to_string()),
                    Err(e) => failure = Some(e.to_string()),
                }
            }
            let Some(mut grads) = total.filter(|_| failure.is_none()) else {
                let reason = failure.unwrap_or_else(|| "no gradients".into());
                if t.nonfinite == NonFinitePolicy::Skip && skipped < t.max_skipped_steps {
                    skipped += 1;
                    events(&TrainEvent::Skipped {
                        iteration: k,
                        step,
                        reason,
                    });
                    continue;
                }
                return Err(TrainError::NonFinite {
                    iteration: k,
                    step,
                    reason,
                });
            };
            grads.scale(1.0 / shape.accumulation as f64);
            let grad_norm = if t.max_grad_norm > 0.0 {
                grads.clip_global_norm(t.max_grad_norm)
            } else {
                grads.global_norm()
            };
            let rate = lr.lr(step);
            theta = optimizer.step(theta, &grads, rate);
            let elapsed = started.elapsed().as_secs_f64();
            events(&TrainEvent::Step {
                iteration: k,
                step: step + 1,
                steps: iteration.steps,
                loss: loss_sum / shape.accumulation as f64,
                lr: rate,
                grad_norm,
                images_per_sec: shape.global_batch() as f64 / elapsed.max(1e-9),
            });
        }
        events(&TrainEvent::Phase(format!("snapshot {k}")));
        let dir = spec.output.join(format!("iteration-{}", k + 1));
        write_snapshot(
            &spec.base_model,
            &theta,
            &unet_config,
            &dir,
            &format!("theta_{} of job {}", k + 1, spec.name),
        )?;
        events(&TrainEvent::Snapshot {
            iteration: k,
            dir: dir.clone(),
        });
        // theta_{k+1} becomes the opponent, the reference and (already) the starting point.
        pipeline.unet = theta.valid();
        let metrics = evaluate(spec, &pipeline, &data, &schedule, k + 1, device)?;
        events(&TrainEvent::Metrics(metrics.clone()));
        summary.metrics.push(metrics);
        summary.snapshots.push(dir);
    }
    let report = serde_json::to_string_pretty(&summary.metrics).unwrap_or_default();
    let path = spec.output.join("metrics.json");
    std::fs::write(&path, report).map_err(|e| TrainError::io(&path, e))?;
    Ok(summary)
}

/// Opponent samples of every training prompt: final latents and, when recorded, trajectories.
struct Opponents {
    latents: Vec<Vec<f32>>,
    trajectories: Vec<Vec<f32>>,
    timesteps: Vec<usize>,
}

fn sample_opponents(
    spec: &JobSpec,
    pipeline: &StableDiffusion,
    data: &PreparedData,
    iteration: usize,
    device: &Device,
    events: &mut impl FnMut(&TrainEvent),
) -> Opponents {
    let [c, h, w] = data.latent_shape;
    let [l, d] = data.context_shape;
    let record = spec.training.objective.needs_trajectory();
    let options = SampleOptions {
        steps: spec.sampling.steps,
        guidance: spec.sampling.guidance,
        eta: spec.sampling.eta,
        seed: derive(
            spec.seed,
            Purpose::OpponentNoise,
            &[iteration as u64, u64::MAX],
        ),
    };
    let uncond = Tensor::<3>::from_data(TensorData::new(data.uncond.clone(), [1, l, d]), device);
    let mut out = Opponents {
        latents: Vec::new(),
        trajectories: Vec::new(),
        timesteps: Vec::new(),
    };
    let indices: Vec<usize> = (0..data.train.len()).collect();
    for chunk in indices.chunks(spec.sampling.batch_size) {
        let n = chunk.len();
        // Each prompt's noise depends only on (seed, iteration, prompt): any worker can redo it.
        let noise: Vec<Tensor<4>> = chunk
            .iter()
            .map(|&i| {
                gaussian(
                    [1, c, h, w],
                    derive(
                        spec.seed,
                        Purpose::OpponentNoise,
                        &[iteration as u64, i as u64],
                    ),
                    device,
                )
            })
            .collect();
        let context: Vec<f32> = chunk
            .iter()
            .flat_map(|&i| data.train[i].context.iter().copied())
            .collect();
        let cond = Tensor::<3>::from_data(TensorData::new(context, [n, l, d]), device);
        let result = pipeline.denoise(
            &cond,
            &uncond,
            Tensor::cat(noise, 0),
            &options,
            record,
            |_, _| {},
        );
        let per = c * h * w;
        let latents = to_vec(result.latents);
        out.latents.extend(latents.chunks(per).map(<[f32]>::to_vec));
        if let Some(trajectory) = result.trajectory {
            let per_traj = per * result.timesteps.len();
            out.trajectories
                .extend(to_vec(trajectory).chunks(per_traj).map(<[f32]>::to_vec));
        }
        out.timesteps = result.timesteps;
        events(&TrainEvent::Sampling {
            iteration,
            done: out.latents.len(),
            total: data.train.len(),
        });
    }
    out
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

/// The pairs of one micro-batch with all their randomness, from seeds alone.
#[allow(clippy::too_many_arguments)]
fn build_batch(
    spec: &JobSpec,
    data: &PreparedData,
    opponents: Option<&Opponents>,
    examples: &[usize],
    iteration: usize,
    step: u64,
    micro: usize,
    device: &Device,
) -> PairBatch {
    let [c, h, w] = data.latent_shape;
    let [l, d] = data.context_shape;
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
        let example = &data.train[i];
        let flip = spec.random_flip && rng.random_bool(0.5);
        win.extend(draw(&example.winner, flip, &mut rng));
        match opponents {
            Some(o) => lose.extend_from_slice(&o.latents[i]),
            None => lose.extend(draw(&example.loser, flip, &mut rng)),
        }
        context.extend_from_slice(&example.context);
    }
    let t: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
    let tensor4 = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, c, h, w]), device);
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

/// Writes theta in diffusers layout beside copies of the base's frozen parts, then publishes a
/// sha256 manifest: a folder without a valid manifest is never loaded.
fn write_snapshot(
    base: &Path,
    theta: &UNet2DConditionModel,
    config: &crate::models::unet_2d_condition::UNet2DConditionConfig,
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

/// Held-out denoising loss (fixed timesteps and noise), generated images vs held-out real
/// winners (kernel MMD on pixels), and a sample grid.
fn evaluate(
    spec: &JobSpec,
    pipeline: &StableDiffusion,
    data: &PreparedData,
    schedule: &NoiseSchedule,
    iteration: usize,
    device: &Device,
) -> Result<Metrics, TrainError> {
    let [c, h, w] = data.latent_shape;
    let [l, d] = data.context_shape;
    let held = &data.held_out;
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
            let x_t = schedule.add_noise(x0.clone(), noise.clone(), &vec![t; n]);
            let timesteps = Tensor::<1>::from_data(TensorData::new(vec![t as f32; n], [n]), device);
            let pred = pipeline.unet.forward(x_t, timesteps, context.clone());
            loss += (pred - noise).powi_scalar(2).mean().into_scalar::<f32>() as f64;
        }
        loss /= steps as f64;
    }
    // Generate for the held-out prompts with fixed seeds (the same for every model).
    let count = n.min(spec.eval.samples);
    let uncond = Tensor::<3>::from_data(TensorData::new(data.uncond.clone(), [1, l, d]), device);
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
        let cond = Tensor::<3>::from_data(TensorData::new(context, [chunk.len(), l, d]), device);
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
    let dir = spec.output.join(format!("eval-{iteration}"));
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let grid = dir.join("samples.png");
    if !generated.is_empty() {
        let side = ((generated[0].len() / 3) as f64).sqrt() as u32;
        let png = grid_png(&generated, side, spec.eval.grid_columns as u32)?;
        std::fs::write(&grid, png).map_err(|e| TrainError::io(&grid, e))?;
    }
    let metrics = Metrics {
        iteration,
        held_out_loss: loss,
        mmd,
        grid,
    };
    let path = dir.join("metrics.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&metrics).unwrap_or_default(),
    )
    .map_err(|e| TrainError::io(&path, e))?;
    Ok(metrics)
}

/// The held-out winner in pixel space, `[-1, 1]` (decoded through the VAE when there is one).
fn real_pixels(
    example: &super::data::Example,
    pipeline: &StableDiffusion,
    device: &Device,
) -> Vec<f32> {
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
