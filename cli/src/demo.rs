//! `spinctl demo`: the synthetic dataset and a toy base model (made if absent), then a
//! 2-iteration SPIN job, all in this process on the CPU.
//!
//! It runs the in-process self-play loop (`train --local`); the coordinator + two workers
//! version of the demo comes with the distributed system.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use spin_common::spec::JobSpec;
use spin_worker::train::self_play::run_local;

/// Arguments of `spinctl demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Where everything goes.
    #[arg(long, default_value = "spin-runs/demo")]
    out: PathBuf,
}

fn spec_text(out: &Path, base: &Path, objective: &str, iterations: &str, output: &str) -> String {
    format!(
        r#"[job]
name = "demo-{objective}"
seed = 3
output = "{output}"
[model]
base = "{base}"
[data]
train = ["{data}"]
resolution = 32
held_out_fraction = 0.1
max_prompts = 64
[sampling]
steps = 8
guidance = 3.0
batch_size = 32
[training]
objective = "{objective}"
batch_size = 8
gradient_accumulation = 1
lr_schedule = "constant"
warmup_steps = 1
checkpoint_every = 0
{iterations}
[eval]
samples = 8
grid_columns = 4
"#,
        base = base.display(),
        data = out.join("data").display(),
        output = out.join(output).display(),
    )
}

/// Runs `spinctl demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let out = std::path::absolute(&args.out).context("output folder")?;
    let data = out.join("data");
    if !data.join("toy-00000.parquet").exists() {
        spin_common::toy::write_toy_dataset(&data, 256, 0)?;
        println!("wrote the synthetic dataset to {}", data.display());
    }
    let init = out.join("init");
    if !init.join("model_index.json").exists() {
        spin_worker::toy_model::write_toy_pipeline(&init, &burn::tensor::Device::flex())?;
        println!(
            "wrote a randomly initialised toy pipeline to {}",
            init.display()
        );
    }
    let device = burn::tensor::Device::flex();
    let run = |name: &str, text: String| -> anyhow::Result<_> {
        let path = out.join(format!("{name}.toml"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        let spec = JobSpec::load(&path, &HashMap::new())?;
        println!(
            "running {} ({} iteration(s))",
            spec.name,
            spec.iterations.len()
        );
        run_local(&spec, &device, crate::train::log_event)
            .with_context(|| format!("job {}", spec.name))
    };
    let base = out.join("base");
    if !base.join("manifest.json").exists() {
        let sft = run(
            "base-sft",
            spec_text(
                &out,
                &init,
                "sft",
                "[[iteration]]\nlr = 1e-3\nsteps = 12\n",
                "base-run",
            ),
        )?;
        let snapshot = sft
            .snapshots
            .last()
            .context("the SFT run wrote no snapshot")?;
        if base.exists() {
            std::fs::remove_dir_all(&base).ok();
        }
        std::fs::rename(snapshot, &base).context("moving the SFT snapshot into place")?;
    }
    let iterations = "[[iteration]]\nlr = 1e-4\nbeta = 2000.0\nsteps = 4\n[[iteration]]\nlr = 1e-4\nbeta = 2000.0\nsteps = 4\n";
    let summary = run("spin", spec_text(&out, &base, "spin", iterations, "spin"))?;
    println!("\ndemo done: 2 SPIN iterations from the toy base model");
    for (snapshot, metrics) in summary.snapshots.iter().zip(summary.metrics.iter().skip(1)) {
        println!("  snapshot {}", snapshot.display());
        println!(
            "    held-out loss {:.5}, MMD {:.5}, samples {}",
            metrics.held_out_loss,
            metrics.mmd,
            metrics.grid.display()
        );
    }
    println!("  metrics {}", out.join("spin/metrics.json").display());
    println!("  try: spinctl sample --model {} --prompt \"a red circle on a blue background\" --guidance 3 --steps 20 --out red-circle.png", summary.snapshots.last().map_or(base.clone(), Clone::clone).display());
    Ok(())
}
