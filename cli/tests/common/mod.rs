//! Shared by the cluster tests: a toy dataset, a toy base pipeline and a small job spec.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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

/// A 2-iteration SPIN job of 2 steps each, global batch 2 x 2 micro-batches, 3 shards.
pub fn spin_spec(data: &Path, base: &Path, output: &Path) -> String {
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
batch_size = 2
gradient_accumulation = 2
lr_schedule = "constant"
warmup_steps = 0
checkpoint_every = 0
[[iteration]]
lr = 1e-3
beta = 2000.0
steps = 2
[[iteration]]
lr = 1e-3
beta = 2000.0
steps = 2
[eval]
samples = 2
loss_timesteps = 2
grid_columns = 2
"#,
        output = output.display(),
        base = base.display(),
        data = data.display(),
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
