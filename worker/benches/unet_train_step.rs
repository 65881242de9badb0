//! Benchmark: one UNet training step (forward + MSE + backward + AdamW) of the tiny-a fixture
//! UNet on the flex CPU backend, beside PyTorch's on the same shapes.
//!
//! Run: `cargo bench -p spin-worker --bench unet_train_step --profile dev` (the test profile:
//! no second build of burn). PyTorch's number comes from `scripts/bench_torch_train_step.py`,
//! run live when `python3` can import torch and diffusers, else read from the committed
//! `worker/benches/torch_train_step.json` (and the output says which).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use burn::tensor::{Distribution, Tensor, TensorData};
use spin_worker::models::unet_2d_condition::UNet2DConditionModel;
use spin_worker::train::{AdamW, AdamWConfig, ParamGrads};

const BATCH: usize = 4;
const WARMUP: usize = 3;
const STEPS: usize = 20;

#[derive(Default, Clone, Copy)]
struct Split {
    forward: Duration,
    backward: Duration,
    optimizer: Duration,
}

fn main() {
    // SPIN_REPO: the repository root when the binary runs elsewhere than it was built.
    let root = std::env::var_os("SPIN_REPO").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
        PathBuf::from,
    );
    // SPIN_DEVICE: flex (default), or wgpu / cuda in builds with those features.
    let device_name = std::env::var("SPIN_DEVICE").unwrap_or_else(|_| "flex".into());
    let device = spin_worker::device::parse_device(&device_name)
        .expect("SPIN_DEVICE")
        .autodiff();
    let (mut unet, config) =
        UNet2DConditionModel::load(&root.join("worker/tests/fixtures/tiny-a/unet"), &device)
            .expect("tiny-a unet");
    let (size, _) = config.latent_size();
    let channels = config.in_channels;
    let context_dim = config.context_dim();
    let mut optimizer = AdamW::new(AdamWConfig::default());

    let mut step = |unet: UNet2DConditionModel| -> (UNet2DConditionModel, Split) {
        let latents = Tensor::<4>::random(
            [BATCH, channels, size, size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let context = Tensor::<3>::random(
            [BATCH, 77, context_dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let target = Tensor::<4>::random(
            [BATCH, channels, size, size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let t: Vec<f32> = (0..BATCH).map(|i| ((i * 337 + 11) % 1000) as f32).collect();
        let timesteps = Tensor::<1>::from_data(TensorData::new(t, [BATCH]), &device);

        let started = Instant::now();
        let pred = unet.forward(latents, timesteps, context);
        let loss = (pred - target).powi_scalar(2).mean();
        let _ = loss.clone().into_scalar::<f32>();
        let forward = started.elapsed();

        let started = Instant::now();
        let gradients = loss.backward();
        let grads = ParamGrads::collect(&unet, &gradients);
        let backward = started.elapsed();

        let started = Instant::now();
        let unet = optimizer.step(unet, &grads, 1e-4);
        // Force the lazy update to run before the clock stops.
        let _ = grads
            .entries()
            .first()
            .map(|(_, g)| g.clone().sum().into_scalar::<f32>());
        let optimizer_time = started.elapsed();
        (
            unet,
            Split {
                forward,
                backward,
                optimizer: optimizer_time,
            },
        )
    };

    for _ in 0..WARMUP {
        unet = step(unet).0;
    }
    let mut splits = Vec::with_capacity(STEPS);
    for _ in 0..STEPS {
        let (next, split) = step(unet);
        unet = next;
        splits.push(split);
    }
    let total = |s: &Split| (s.forward + s.backward + s.optimizer).as_secs_f64() * 1e3;
    splits.sort_by(|a, b| total(a).total_cmp(&total(b)));
    let median = splits[STEPS / 2];
    let ours = total(&median);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    println!("tiny-a UNet train step, batch {BATCH}, latents {channels}x{size}x{size}, context [{BATCH}, 77, {context_dim}]");
    println!(
        "  burn {device_name} ({threads} CPU threads): {ours:.1} ms/step (median of {STEPS}; forward {:.1} ms, backward {:.1} ms, AdamW {:.1} ms)",
        median.forward.as_secs_f64() * 1e3,
        median.backward.as_secs_f64() * 1e3,
        median.optimizer.as_secs_f64() * 1e3
    );
    match pytorch_ms(&root, threads).filter(|_| device_name == "flex") {
        Some((torch, source)) => {
            println!("  pytorch ({source}): {torch:.1} ms/step");
            println!("  ratio burn / pytorch: {:.2}x (goal <= 1.00x)", ours / torch);
        }
        None => println!("  pytorch: no measurement (install torch + diffusers, or commit worker/benches/torch_train_step.json)"),
    }
}

/// PyTorch's ms/step: measured now if possible, else the committed file.
fn pytorch_ms(root: &std::path::Path, threads: usize) -> Option<(f64, String)> {
    let script = root.join("scripts/bench_torch_train_step.py");
    let live = Command::new("python3")
        .arg(&script)
        .args(["--threads", &threads.to_string()])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| parse_ms(&String::from_utf8_lossy(&o.stdout)));
    if let Some(ms) = live {
        return Some((ms, format!("measured now, {threads} threads")));
    }
    let committed =
        std::fs::read_to_string(root.join("worker/benches/torch_train_step.json")).ok()?;
    parse_ms(&committed).map(|ms| {
        (
            ms,
            "committed worker/benches/torch_train_step.json".to_string(),
        )
    })
}

fn parse_ms(text: &str) -> Option<f64> {
    let line = text.lines().rev().find(|l| l.contains("ms_per_step"))?;
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    value["ms_per_step"].as_f64()
}
