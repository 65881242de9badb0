//! The SPIN-Diffusion self-play loop in one process (DESIGN.md §1, §4 phases): prepare, then per
//! iteration k: sample one opponent image per prompt with theta_k, train the configured steps
//! against theta_k, snapshot theta_{k+1} (diffusers layout + sha256 manifest), evaluate.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use burn::tensor::Device;
use spin_common::shards::plan_shards;
use spin_common::spec::JobSpec;
use spin_common::store::Store;

use super::TrainError;
use crate::collective::Solo;
use crate::tasks::{store_error, JobRunner, StepReport};

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
        /// Wall time of the step.
        step_time_s: f64,
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

pub use crate::tasks::Metrics;

/// What a finished run produced.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Snapshot folders theta_1.. in order.
    pub snapshots: Vec<PathBuf>,
    /// Metrics of the base model then of every snapshot.
    pub metrics: Vec<Metrics>,
}

/// Runs the whole job in this process on `device` (flex, wgpu, cuda): the same tasks a
/// worker runs for the coordinator, in order, with a ring of one. Artifacts go to
/// `spec.output` in the store layout (`iteration-k/`, `eval-k/`, `cache/`).
pub fn run_local(
    spec: &JobSpec,
    device: &Device,
    mut events: impl FnMut(&TrainEvent),
) -> Result<RunSummary, TrainError> {
    let store = Store::open(&spec.output.to_string_lossy()).map_err(store_error)?;
    // Cached shards of an earlier run in the same folder may be planned differently.
    store.remove("cache").map_err(store_error)?;
    events(&TrainEvent::Phase("preparing".into()));
    let mut runner = JobRunner::open(spec.clone(), store, device)?;
    // The runner reads the dataset once, for planning here and for encoding.
    let train_prompts = runner.prompts()?.train.len();
    let shards = plan_shards(train_prompts as u64, spec.sampling.shard_size as u64)
        .map_err(|e| TrainError::Input(e.to_string()))?;
    let mut skipped_rows = 0;
    for shard in &shards {
        let (_, report) = runner.encode_shard(shard, |_, _| {})?;
        skipped_rows += report.skipped.len();
    }
    tracing::info!(
        train = train_prompts,
        shards = shards.len(),
        skipped_rows,
        "prepared data"
    );
    let mut summary = RunSummary {
        snapshots: Vec::new(),
        metrics: Vec::new(),
    };
    let (_, base_metrics) = runner.encode_held_out(|_, _| {})?;
    events(&TrainEvent::Metrics(base_metrics.clone()));
    summary.metrics.push(base_metrics);

    let never = AtomicBool::new(false);
    for (k, iteration) in spec.iterations.iter().enumerate() {
        let k32 = u32::try_from(k).unwrap_or(u32::MAX);
        if spec.training.objective.self_play() {
            events(&TrainEvent::Phase(format!("sampling {k}")));
            let total = train_prompts;
            let mut offset = 0;
            for shard in &shards {
                runner.sample_shard(k32, shard.index, |done, _| {
                    events(&TrainEvent::Sampling {
                        iteration: k,
                        done: offset + done,
                        total,
                    });
                })?;
                offset += shard.len() as usize;
            }
        }
        events(&TrainEvent::Phase(format!("training {k}")));
        runner
            .train_steps(k32, 0, iteration.steps - 1, &mut Solo, &never, |r| {
                events(&step_event(r));
            })
            .map_err(|failure| failure.error)?;
        events(&TrainEvent::Phase(format!("snapshot {k}")));
        let (dir, metrics) = runner.snapshot(k32)?;
        events(&TrainEvent::Snapshot {
            iteration: k,
            dir: dir.clone(),
        });
        events(&TrainEvent::Metrics(metrics.clone()));
        summary.metrics.push(metrics);
        summary.snapshots.push(dir);
    }
    let report = serde_json::to_string_pretty(&summary.metrics).unwrap_or_default();
    let path = spec.output.join("metrics.json");
    std::fs::write(&path, report).map_err(|e| TrainError::io(&path, e))?;
    Ok(summary)
}

/// The event of one step report.
pub fn step_event(r: &StepReport) -> TrainEvent {
    if let Some(reason) = &r.skipped {
        TrainEvent::Skipped {
            iteration: r.iteration,
            step: r.step,
            reason: reason.clone(),
        }
    } else {
        TrainEvent::Step {
            iteration: r.iteration,
            step: r.step + 1,
            steps: r.steps,
            loss: r.loss,
            lr: r.lr,
            grad_norm: r.grad_norm,
            images_per_sec: r.images_per_sec,
            step_time_s: r.step_time_s,
        }
    }
}
