//! Smoke run: one SD-1.5-size UNet forward (random weights, 859,520,964 parameters) at 64x64
//! latents, batch 1, on the flex CPU backend; prints build time, forward time and peak memory.
//!
//! Run: `cargo bench -p spin-worker --bench sd15_unet_smoke --profile dev`.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Distribution, Tensor, TensorData};
use spin_worker::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};

fn main() {
    // SPIN_DEVICE: flex (default), or wgpu / cuda in builds with those features.
    let device_name = std::env::var("SPIN_DEVICE").unwrap_or_else(|_| "flex".into());
    let device = spin_worker::device::parse_device(&device_name).expect("SPIN_DEVICE");
    println!("device: {device_name}");
    let config = UNet2DConditionConfig::default();
    let started = Instant::now();
    let unet = UNet2DConditionModel::new(&config, &device).expect("SD-1.5 config is valid");
    println!("SD-1.5 UNet: {} parameters", unet.num_params());
    let latents = Tensor::<4>::random([1, 4, 64, 64], Distribution::Normal(0.0, 1.0), &device);
    let context = Tensor::<3>::random([1, 77, 768], Distribution::Normal(0.0, 1.0), &device);
    let timesteps = Tensor::<1>::from_data(TensorData::new(vec![500.0f32], [1]), &device);

    // The first forward also materialises the lazily initialised random weights.
    let out = unet.forward(latents.clone(), timesteps.clone(), context.clone());
    let _ = out.sum().into_scalar::<f32>();
    println!(
        "  first forward incl. weight init: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let out = unet.forward(latents.clone(), timesteps.clone(), context.clone());
    let dims = out.dims();
    let checksum = out.sum().into_scalar::<f32>();
    println!(
        "  forward 1x4x64x64: {:.2} s (output {dims:?}, finite: {})",
        started.elapsed().as_secs_f64(),
        checksum.is_finite()
    );
    println!("  peak resident memory: {}", peak_memory());
}

/// `VmHWM` of this process (Linux), in GiB.
fn peak_memory() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown (no /proc)".to_string(),
            |kb| format!("{:.2} GiB", kb / 1024.0 / 1024.0),
        )
}
