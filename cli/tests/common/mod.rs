//! Shared by the cluster tests: a toy dataset, a toy base pipeline and a small job spec.

#![allow(dead_code, clippy::unwrap_used)]

pub mod netns;
pub mod process;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The daemon binary `name` (`spin-coordinator`, `spin-worker`): each is built by its own
/// crate into the same folder as `spinctl`, so `cargo test --workspace` builds it; a test run
/// of this crate alone says how to get it.
pub fn daemon_binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_spinctl"))
        .with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: the daemons are built by their own crates; run `cargo test --workspace` \
         or `cargo build --bins` first",
        path.display()
    );
    path
}

/// Writes `spec_text` to `dir/job.toml` and runs that job in this process without faults: the
/// reference a cluster run is compared with.
pub fn run_reference(dir: &Path, spec_text: &str) {
    let spec_path = dir.join("job.toml");
    std::fs::write(&spec_path, spec_text).unwrap();
    let spec = spin_common::spec::JobSpec::load(&spec_path, &Default::default()).unwrap();
    spin_worker::train::self_play::run_local(&spec, &burn::tensor::Device::flex(), |_| {}).unwrap();
}

/// A fresh folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spin-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The toy dataset and a randomly initialised toy pipeline, made once per test binary.
pub fn toy_inputs() -> &'static (PathBuf, PathBuf) {
    static INPUTS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    INPUTS.get_or_init(|| {
        let dir = temp_dir("inputs");
        let data = dir.join("data");
        spin_common::toy::write_toy_dataset(&data, 48, 5).unwrap();
        let base = dir.join("base");
        spin_worker::toy_model::write_toy_pipeline(&base, &burn::tensor::Device::flex()).unwrap();
        (data, base)
    })
}

/// The size of a test job.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Self-play iterations.
    pub iterations: usize,
    /// Optimizer steps per iteration.
    pub steps: u64,
    /// Pairs per micro-batch.
    pub batch: usize,
    /// Micro-batches per step (shared out over the workers).
    pub accumulation: usize,
    /// Checkpoint every N steps (0: only at each iteration's end).
    pub checkpoint_every: u64,
    /// Learning rate of every iteration.
    pub lr: f64,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            iterations: 2,
            steps: 2,
            batch: 2,
            accumulation: 2,
            checkpoint_every: 0,
            lr: 1e-3,
        }
    }
}

/// A 2-iteration SPIN job of 2 steps each, global batch 2 x 2 micro-batches, 3 shards.
pub fn spin_spec(data: &Path, base: &Path, output: &Path) -> String {
    spec(data, base, output, &Shape::default())
}

/// A SPIN job of `shape` on the toy data, 3 shards of prompts.
pub fn spec(data: &Path, base: &Path, output: &Path, shape: &Shape) -> String {
    let iterations: String = (0..shape.iterations)
        .map(|_| {
            format!(
                "[[iteration]]\nlr = {:e}\nbeta = 2000.0\nsteps = {}\n",
                shape.lr, shape.steps
            )
        })
        .collect();
    format!(
        r#"[job]
name = "cluster-test"
seed = 17
output = "{output}"
[model]
base = "{base}"
[data]
train = ["{data}"]
resolution = 32
held_out_fraction = 0.1
max_prompts = 20
[sampling]
steps = 3
guidance = 3.0
batch_size = 8
shard_size = 8
[training]
objective = "spin"
batch_size = {batch}
gradient_accumulation = {accumulation}
lr_schedule = "constant"
warmup_steps = 0
checkpoint_every = {checkpoint_every}
{iterations}
[eval]
samples = 2
loss_timesteps = 2
grid_columns = 2
"#,
        output = output.display(),
        base = base.display(),
        data = data.display(),
        batch = shape.batch,
        accumulation = shape.accumulation,
        checkpoint_every = shape.checkpoint_every,
    )
}

/// Every tensor of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// ||a - b|| / ||b|| over every tensor of two UNet weight files.
pub fn relative_l2(a: &Path, b: &Path) -> f64 {
    let (a, b) = (read_tensors(a), read_tensors(b));
    assert_eq!(a.len(), b.len(), "different tensor sets");
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len(), "{na}");
        for (x, y) in va.iter().zip(vb) {
            diff += f64::from(x - y).powi(2);
            norm += f64::from(*y).powi(2);
        }
    }
    (diff / norm).sqrt()
}
