//! `spinctl demo`: the synthetic dataset and a toy base model (made if absent), then a
//! 2-iteration SPIN job, run the way a cluster runs it: an embedded coordinator (journal and
//! object store under the demo folder) and two worker daemons in this process, the jobs
//! submitted over gRPC and followed through the job's event stream.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use spin_common::store::layout;

use crate::cluster::{ClusterOptions, LocalCluster};
use crate::logs::Outcome;

/// Arguments of `spinctl demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Where everything goes.
    #[arg(long, default_value = "spin-runs/demo")]
    out: PathBuf,
    /// Worker daemons to start.
    #[arg(long, default_value_t = 2)]
    workers: usize,
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
batch_size = 16
shard_size = 16
[training]
objective = "{objective}"
batch_size = 4
gradient_accumulation = 2
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
    let workers = args.workers.max(1);
    let cluster = LocalCluster::start(
        &out.join("cluster"),
        &ClusterOptions {
            workers,
            min_workers: workers,
            ..ClusterOptions::default()
        },
    )?;
    println!(
        "coordinator at {} with {workers} workers; object store {}",
        cluster.url(),
        cluster.store().display()
    );
    let result = demo_jobs(&cluster, &out, &init);
    cluster.stop();
    result
}

fn demo_jobs(cluster: &LocalCluster, out: &Path, init: &Path) -> anyhow::Result<()> {
    let run = |name: &str, text: String| -> anyhow::Result<PathBuf> {
        let path = out.join(format!("{name}.toml"));
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        let id = cluster.submit(text)?;
        println!("\nsubmitted {name} ({}) as job {id}", path.display());
        let outcome = cluster.follow(&id, &mut std::io::stdout())?;
        match outcome {
            Outcome::Done { .. } => Ok(cluster.store().join("jobs").join(&id)),
            Outcome::Failed { error } => bail!("job {id} ({name}) failed: {error}"),
            Outcome::Cancelled { reason } => bail!("job {id} ({name}) was cancelled: {reason}"),
            Outcome::Running { .. } => bail!("job {id} ({name}) is still running"),
        }
    };
    let base = out.join("base");
    if !base.join("manifest.json").exists() {
        let job = run(
            "base-sft",
            spec_text(
                out,
                init,
                "sft",
                "[[iteration]]\nlr = 1e-3\nsteps = 12\n",
                "base-run",
            ),
        )?;
        let snapshot = job.join(layout::snapshot(1));
        if base.exists() {
            std::fs::remove_dir_all(&base).ok();
        }
        copy_dir(&snapshot, &base).context("copying the SFT snapshot into place")?;
    }
    let iterations = "[[iteration]]\nlr = 1e-4\nbeta = 2000.0\nsteps = 4\n[[iteration]]\nlr = 1e-4\nbeta = 2000.0\nsteps = 4\n";
    let job = run("spin", spec_text(out, &base, "spin", iterations, "spin"))?;
    println!(
        "\ndemo done: 2 SPIN iterations from the toy base model, in {}",
        job.display()
    );
    for k in 0..=2u32 {
        let metrics = job.join(layout::eval(k)).join("metrics.json");
        let text = std::fs::read_to_string(&metrics).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let model = if k == 0 {
            format!("base {}", base.display())
        } else {
            format!("snapshot {}", job.join(layout::snapshot(k)).display())
        };
        println!("  {model}");
        println!(
            "    held-out loss {:.5}, MMD {:.5}, samples {}",
            value["held_out_loss"].as_f64().unwrap_or(f64::NAN),
            value["mmd"].as_f64().unwrap_or(f64::NAN),
            job.join(layout::eval(k)).join("samples.png").display()
        );
    }
    println!(
        "  try: spinctl sample --model {} --prompt \"a red circle on a blue background\" --guidance 3 --steps 20 --out red-circle.png",
        job.join(layout::snapshot(2)).display()
    );
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
