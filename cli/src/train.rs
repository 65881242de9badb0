//! `spinctl train --local JOB.toml`, `make-toy-dataset` and `init-toy-model`: the whole
//! self-play loop in this process, and the synthetic data and model it is shown on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use spin_common::spec::JobSpec;
use spin_worker::device::parse_device;
use spin_worker::train::self_play::{run_local, TrainEvent};

/// Arguments of `spinctl train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Run in this process (no coordinator).
    #[arg(long)]
    local: bool,
    /// The job spec (TOML).
    spec: PathBuf,
    /// Compute device: flex (CPU), wgpu or cuda when built with those features.
    #[arg(long, default_value = "flex")]
    device: String,
}

/// Runs `spinctl train --local`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if !args.local {
        bail!("`spinctl train` runs a job in this process and needs `--local`; to run it on a cluster, `spinctl submit JOB.toml` to a coordinator");
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let spec = JobSpec::load(&args.spec, &env)?;
    let device = parse_device(&args.device)?;
    check_inputs(&spec)?;
    tracing::info!(job = %spec.name, objective = ?spec.training.objective, iterations = spec.iterations.len(), output = %spec.output.display(), "starting local run");
    let fresh_output = !spec.output.exists();
    let result = run_local(&spec, &device, log_event);
    if result.is_err() && fresh_output && !holds_files(&spec.output) {
        // A run that failed before writing anything leaves no empty output folder behind.
        let _ = std::fs::remove_dir_all(&spec.output);
    }
    let summary = result.with_context(|| format!("job {}", spec.name))?;
    println!("job {} done", spec.name);
    for (snapshot, metrics) in summary.snapshots.iter().zip(summary.metrics.iter().skip(1)) {
        println!(
            "  {}  held-out loss {:.5}  MMD {:.5}  grid {}",
            snapshot.display(),
            metrics.held_out_loss,
            metrics.mmd,
            metrics.grid.display()
        );
    }
    println!("  metrics: {}", spec.output.join("metrics.json").display());
    Ok(())
}

/// Checks, before anything is written, that the spec's base model and data are there.
fn check_inputs(spec: &JobSpec) -> anyhow::Result<()> {
    let index = spec.base_model.join("model_index.json");
    if !index.is_file() {
        bail!(
            "model.base {}: missing file {} (not a diffusers pipeline folder)",
            spec.base_model.display(),
            index.display()
        );
    }
    spin_common::dataset::shard_files(&spec.train_data)?;
    Ok(())
}

/// Whether `dir` holds any file, however deep (an unreadable folder counts as holding some).
fn holds_files(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().any(|entry| {
            let path = entry.path();
            !path.is_dir() || holds_files(&path)
        }),
        Err(err) => err.kind() != std::io::ErrorKind::NotFound,
    }
}

/// Logs one training event with tracing.
pub fn log_event(event: &TrainEvent) {
    match event {
        TrainEvent::Phase(phase) => tracing::info!(%phase, "phase"),
        TrainEvent::Sampling {
            iteration,
            done,
            total,
        } => {
            tracing::info!(iteration, done, total, "sampling opponents")
        }
        TrainEvent::Step {
            iteration,
            step,
            steps,
            loss,
            lr,
            grad_norm,
            images_per_sec,
            step_time_s,
        } => tracing::info!(
            iteration,
            step,
            steps,
            loss = format!("{loss:.5}"),
            lr,
            grad_norm = format!("{grad_norm:.4}"),
            images_per_sec = format!("{images_per_sec:.1}"),
            step_time_s = format!("{step_time_s:.3}"),
            "step"
        ),
        TrainEvent::Skipped {
            iteration,
            step,
            reason,
        } => tracing::warn!(iteration, step, %reason, "step skipped"),
        TrainEvent::Snapshot { iteration, dir } => {
            tracing::info!(iteration, dir = %dir.display(), "snapshot published")
        }
        TrainEvent::Metrics(m) => {
            tracing::info!(iteration = m.iteration, held_out_loss = format!("{:.5}", m.held_out_loss), mmd = format!("{:.5}", m.mmd), grid = %m.grid.display(), "evaluation")
        }
    }
}

/// Arguments of `spinctl make-toy-dataset`.
#[derive(clap::Args, Debug)]
pub struct ToyDatasetArgs {
    /// Output folder for the parquet shards.
    #[arg(long)]
    out: PathBuf,
    /// Rows (preference pairs) to write.
    #[arg(long, default_value_t = 512)]
    rows: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `spinctl make-toy-dataset`.
pub fn make_toy_dataset(args: ToyDatasetArgs) -> anyhow::Result<()> {
    let files = spin_common::toy::write_toy_dataset(&args.out, args.rows, args.seed)?;
    for file in files {
        println!("wrote {}", file.display());
    }
    Ok(())
}

/// Arguments of `spinctl init-toy-model`.
#[derive(clap::Args, Debug)]
pub struct ToyModelArgs {
    /// Output pipeline folder.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `spinctl init-toy-model`.
pub fn init_toy_model(args: ToyModelArgs) -> anyhow::Result<()> {
    spin_worker::toy_model::write_toy_pipeline(&args.out, &burn::tensor::Device::flex())?;
    println!(
        "wrote randomly initialised toy pipeline {}",
        args.out.display()
    );
    Ok(())
}
