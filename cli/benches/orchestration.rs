//! Orchestration overhead: the training phase of a job run by an embedded coordinator and one
//! worker daemon (sessions, task dispatch, step reports over gRPC, the event stream) against
//! the same steps run by the in-process loop, same spec and shapes.
//!
//! `cargo bench -p spinctl --bench orchestration --profile dev` (env `SPIN_BENCH_STEPS`, default
//! 16). Prints the median step time and the training phase's wall time per step of both, and
//! their ratio (goal: <= 1.03).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use spin_cli::cluster::{ClusterOptions, LocalCluster};
use spin_common::proto::v1;
use spin_common::spec::JobSpec;
use spin_worker::train::self_play::{run_local, TrainEvent};

fn main() -> anyhow::Result<()> {
    let steps: u64 = common::env_or("SPIN_BENCH_STEPS", 16);
    let (dir, data, base) = common::toy_inputs("orchestration", 1)?;
    let bench_job = |output| common::Job {
        name: "orchestration-bench",
        seed: 5,
        output,
        batch: 8,
        accumulation: 1,
        steps,
    };

    // In-process loop.
    let spec_path = dir.join("local.toml");
    let local = dir.join("local");
    std::fs::write(
        &spec_path,
        common::spec(&bench_job(Some(&local)), &data, &base),
    )?;
    let job = JobSpec::load(&spec_path, &HashMap::new())?;
    let mut local_steps = Vec::new();
    let mut phase_start = None;
    let mut local_phase = Duration::ZERO;
    run_local(&job, &burn::tensor::Device::flex(), |event| match event {
        TrainEvent::Phase(p) if p.starts_with("training") => phase_start = Some(Instant::now()),
        TrainEvent::Phase(p) if p.starts_with("snapshot") => {
            local_phase = phase_start.map(|s| s.elapsed()).unwrap_or_default();
        }
        TrainEvent::Step { step_time_s, .. } => local_steps.push(*step_time_s),
        _ => {}
    })?;

    // One worker behind a coordinator.
    let cluster = LocalCluster::start(
        &dir.join("cluster"),
        &ClusterOptions {
            workers: 1,
            min_workers: 1,
            ..ClusterOptions::default()
        },
    )?;
    let id = cluster.submit(common::spec(&bench_job(None), &data, &base))?;
    let url = cluster.url();
    let runtime = tokio::runtime::Runtime::new()?;
    let (cluster_steps, cluster_phase) = runtime.block_on(async {
        let mut client = spin_cli::client::connect(&url).await?;
        let mut stream = client
            .watch_job(v1::WatchJobRequest {
                job_id: id.clone(),
                from_sequence: 0,
            })
            .await?
            .into_inner();
        let mut steps = Vec::new();
        let (mut start, mut phase) = (None, Duration::ZERO);
        while let Some(event) = stream.message().await? {
            match event.event {
                Some(v1::job_event::Event::PhaseChanged(p)) => {
                    let kind = p.to.map(|t| t.kind).unwrap_or_default();
                    if kind == v1::PhaseKind::Training as i32 {
                        start = Some(Instant::now());
                    } else if kind == v1::PhaseKind::Snapshot as i32 {
                        phase = start.map(|s: Instant| s.elapsed()).unwrap_or_default();
                    }
                }
                Some(v1::job_event::Event::Step(m)) => steps.push(m.step_time_s),
                Some(v1::job_event::Event::Done(_)) => break,
                Some(v1::job_event::Event::Failed(f)) => anyhow::bail!("job failed: {}", f.error),
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>((steps, phase))
    })?;
    cluster.stop();

    // The first step pays for lazy allocations in both: leave it out of the medians.
    let local_median = common::median(local_steps.iter().skip(1).copied().collect());
    let cluster_median = common::median(cluster_steps.iter().skip(1).copied().collect());
    let per = |d: Duration| d.as_secs_f64() / steps as f64;
    println!("orchestration overhead, toy UNet, batch 8, {steps} steps, flex CPU");
    println!("                           in-process   1-worker job   ratio");
    println!(
        "median step time (s)       {:>10.4}   {:>12.4}   {:.3}",
        local_median,
        cluster_median,
        cluster_median / local_median
    );
    println!(
        "training phase / step (s)  {:>10.4}   {:>12.4}   {:.3}   (goal <= 1.03)",
        per(local_phase),
        per(cluster_phase),
        per(cluster_phase) / per(local_phase)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
