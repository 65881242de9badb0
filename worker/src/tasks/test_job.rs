//! A toy job for the task tests: the toy dataset and a randomly initialised toy pipeline
//! (made once per test binary), a small SPIN spec over them with its own store, and runners on
//! the flex device.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use burn::tensor::Device;
use spin_common::shards::Shard;
use spin_common::spec::RawJobSpec;
use spin_common::store::Store;

use super::{JobRunner, StepReport};
use crate::collective::Solo;

/// The toy dataset folder and the toy pipeline folder.
fn inputs() -> &'static (PathBuf, PathBuf) {
    static INPUTS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("spin-tasks-inputs-{}", std::process::id()));
        let (data, base) = (root.join("data"), root.join("base"));
        spin_common::toy::write_toy_dataset(&data, 24, 5).expect("toy dataset");
        crate::toy_model::write_toy_pipeline(&base, &Device::flex()).expect("toy pipeline");
        (data, base)
    })
}

/// A folder name no other test of this process uses.
fn unique(name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("spin-tasks-{name}-{}-{n}", std::process::id()))
}

/// The knobs the task tests turn.
pub(crate) struct Shape {
    pub objective: &'static str,
    pub steps: u64,
    pub checkpoint_every: u64,
    pub nonfinite: &'static str,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            objective: "spin",
            steps: 2,
            checkpoint_every: 0,
            nonfinite: "skip",
        }
    }
}

/// One toy job with its own output folder (removed on drop).
pub(crate) struct ToyJob {
    pub output: PathBuf,
    text: String,
}

impl ToyJob {
    /// A job named `name` of `shape`.
    pub fn new(name: &str, shape: &Shape) -> Self {
        let (data, base) = inputs();
        let output = unique(name);
        let text = format!(
            r#"[job]
name = "{name}"
seed = 17
output = "{output}"
[model]
base = "{base}"
[data]
train = ["{data}"]
resolution = 32
held_out_fraction = 0.2
max_prompts = 12
[sampling]
steps = 2
guidance = 3.0
batch_size = 4
shard_size = 4
[training]
objective = "{objective}"
batch_size = 1
gradient_accumulation = 2
lr_schedule = "constant"
warmup_steps = 0
checkpoint_every = {every}
nonfinite = "{nonfinite}"
[[iteration]]
lr = 1e-3
beta = 2000.0
steps = {steps}
[eval]
samples = 2
loss_timesteps = 2
grid_columns = 2
"#,
            output = output.display(),
            base = base.display(),
            data = data.display(),
            objective = shape.objective,
            every = shape.checkpoint_every,
            nonfinite = shape.nonfinite,
            steps = shape.steps,
        );
        Self { output, text }
    }

    /// A fresh runner of this job (a new replica over the same store).
    pub fn runner(&self) -> JobRunner {
        let raw = RawJobSpec::parse(&self.text, Path::new("test.toml"), &Default::default())
            .expect("spec parses");
        let spec = raw.validate(Path::new("")).expect("spec is valid");
        let store = Store::open(&self.output.to_string_lossy()).expect("store opens");
        JobRunner::open(spec, store, &Device::flex()).expect("runner opens")
    }
}

impl Drop for ToyJob {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.output);
    }
}

/// The first encode shard of the job's training prompts.
pub(crate) fn first_shard() -> Shard {
    Shard {
        index: 0,
        first: 0,
        end: 4,
    }
}

/// Encodes shard 0 (the only cached shard of these tests) and samples its opponents.
pub(crate) fn prepared(runner: &mut JobRunner) {
    runner
        .encode_shard(&first_shard(), |_, _| {})
        .expect("encode");
    if runner.spec().training.objective.self_play() {
        runner.sample_shard(0, 0, |_, _| {}).expect("sample");
    }
}

/// Runs steps `first..=last` of iteration 0 alone; returns the steps applied and the reports.
pub(crate) fn train_alone(
    runner: &mut JobRunner,
    first: u64,
    last: u64,
) -> Result<(u64, Vec<StepReport>), super::TrainFailure> {
    let mut reports = Vec::new();
    let never = AtomicBool::new(false);
    let done = runner.train_steps(0, first, last, &mut Solo, &never, |r| {
        reports.push(r.clone())
    })?;
    Ok((done, reports))
}

/// theta as saved in diffusers layout: every file's bytes, in name order.
pub(crate) fn theta_bytes(runner: &JobRunner) -> Vec<u8> {
    let dir = unique("theta");
    runner
        .theta()
        .save(&runner.unet_config, &dir)
        .expect("theta saves");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("saved folder")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    let bytes = names
        .iter()
        .flat_map(|p| std::fs::read(p).expect("saved file"))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}
