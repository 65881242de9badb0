//! Shared by the cluster benchmarks: the toy inputs, a small SPIN job spec, settings from the
//! environment, medians.

use std::path::{Path, PathBuf};

/// A fresh folder `spin-NAME-bench-PID` holding the toy dataset (64 rows, `seed`) and a
/// randomly initialised toy pipeline; returns (folder, data, base).
pub fn toy_inputs(name: &str, seed: u64) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("spin-{name}-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    spin_common::toy::write_toy_dataset(&data, 64, seed)?;
    let base = dir.join("base");
    spin_worker::toy_model::write_toy_pipeline(&base, &burn::tensor::Device::flex())?;
    Ok((dir, data, base))
}

/// The shape of a benchmark job.
pub struct Job<'a> {
    /// `job.name`.
    pub name: &'a str,
    /// `job.seed`.
    pub seed: u64,
    /// `job.output` (`train --local` only).
    pub output: Option<&'a Path>,
    /// Pairs per micro-batch.
    pub batch: usize,
    /// Micro-batches per step.
    pub accumulation: usize,
    /// Steps of the one iteration.
    pub steps: u64,
}

/// A one-iteration SPIN job on 32 toy prompts, shards of 16, 2 sampling steps, a minimal eval.
pub fn spec(job: &Job, data: &Path, base: &Path) -> String {
    let output = job
        .output
        .map(|o| format!("output = \"{}\"\n", o.display()))
        .unwrap_or_default();
    format!(
        r#"[job]
name = "{name}"
seed = {seed}
{output}[model]
base = "{base}"
[data]
train = ["{data}"]
resolution = 32
held_out_fraction = 0.1
max_prompts = 32
[sampling]
steps = 2
guidance = 3.0
batch_size = 16
shard_size = 16
[training]
objective = "spin"
batch_size = {batch}
gradient_accumulation = {accumulation}
lr_schedule = "constant"
warmup_steps = 0
checkpoint_every = 0
[[iteration]]
lr = 1e-4
beta = 2000.0
steps = {steps}
[eval]
samples = 1
loss_timesteps = 1
grid_columns = 1
"#,
        name = job.name,
        seed = job.seed,
        base = base.display(),
        data = data.display(),
        batch = job.batch,
        accumulation = job.accumulation,
        steps = job.steps,
    )
}

/// The environment variable `name` parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
