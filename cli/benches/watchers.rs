//! 200 concurrent `WatchJob` streams on a training job: every watcher must see every event
//! (sequence numbers contiguous from 0 to the job's end, the same events as a lone watcher),
//! and the step time with 200 watchers is compared with the step time with one.
//!
//! `cargo bench -p spinctl --bench watchers --profile dev` (env `SPIN_BENCH_WATCHERS`, default
//! 200; `SPIN_BENCH_STEPS`, default 16). Goal: step time change <= 5%.

mod common;

use std::time::Duration;

use spin_cli::cluster::{ClusterOptions, LocalCluster};
use spin_common::proto::v1;

/// Watches `job` to its end; returns (sequences seen, step times).
async fn watch(url: String, job: String) -> anyhow::Result<(Vec<u64>, Vec<f64>)> {
    let mut client = spin_cli::client::connect(&url).await?;
    let mut stream = client
        .watch_job(v1::WatchJobRequest {
            job_id: job,
            from_sequence: 0,
        })
        .await?
        .into_inner();
    let (mut seen, mut steps) = (Vec::new(), Vec::new());
    while let Some(event) =
        tokio::time::timeout(Duration::from_secs(600), stream.message()).await??
    {
        seen.push(event.sequence);
        match event.event {
            Some(v1::job_event::Event::Step(m)) => steps.push(m.step_time_s),
            Some(
                v1::job_event::Event::Done(_)
                | v1::job_event::Event::Failed(_)
                | v1::job_event::Event::Cancelled(_),
            ) => break,
            _ => {}
        }
    }
    Ok((seen, steps))
}

fn main() -> anyhow::Result<()> {
    let watchers: usize = common::env_or("SPIN_BENCH_WATCHERS", 200);
    let steps: u64 = common::env_or("SPIN_BENCH_STEPS", 16);
    let (dir, data, base) = common::toy_inputs("watchers", 2)?;
    let job = common::Job {
        name: "watchers-bench",
        seed: 9,
        output: None,
        batch: 4,
        accumulation: 2,
        steps,
    };
    let cluster = LocalCluster::start(
        &dir.join("cluster"),
        &ClusterOptions {
            workers: 2,
            min_workers: 2,
            ..ClusterOptions::default()
        },
    )?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut results = Vec::new();
    for n in [1, watchers] {
        let id = cluster.submit(common::spec(&job, &data, &base))?;
        let url = cluster.url();
        let outcome = runtime.block_on(async {
            let tasks: Vec<_> = (0..n)
                .map(|_| tokio::spawn(watch(url.clone(), id.clone())))
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.push(t.await??);
            }
            Ok::<_, anyhow::Error>(all)
        })?;
        let reference = &outcome[0].0;
        let contiguous = reference.iter().enumerate().all(|(i, s)| *s == i as u64);
        let lost = outcome.iter().filter(|(seen, _)| seen != reference).count();
        let step_time = common::median(outcome[0].1.iter().skip(1).copied().collect());
        println!(
            "{n:>4} watcher(s): {} events each, contiguous from 0: {contiguous}, watchers that \
             missed or reordered an event: {lost}, median step time {step_time:.4} s",
            reference.len()
        );
        if !contiguous || lost > 0 {
            anyhow::bail!("events were lost with {n} watchers");
        }
        results.push(step_time);
    }
    cluster.stop();
    println!(
        "step time with {watchers} watchers / with 1: {:.3} (goal <= 1.05)",
        results[1] / results[0]
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
