//! Chaos: a 3-worker job whose workers are killed with SIGKILL at random steps (and started
//! again) completes, and its final UNet is within 1e-5 relative L2 of the same job run
//! without kills (the in-process loop: the same global batch, so the same math up to float
//! summation order). `SPIN_CHAOS_KILLS` (default 3) sets how many kills; the long run is
//! `SPIN_CHAOS_KILLS=20 cargo test -p spinctl --test chaos -- --nocapture`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::process::{self, Guard};
use common::Shape;
use rand::{Rng, SeedableRng};
use spin_common::proto::v1;

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";

#[test]
fn a_job_survives_workers_killed_at_random_steps() {
    let kills: usize = std::env::var("SPIN_CHAOS_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("SPIN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        });
    println!("chaos: {kills} kills, seed {seed} (SPIN_CHAOS_SEED to replay)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (data, base) = common::toy_inputs();
    let dir = common::temp_dir("chaos");
    // Enough steps for the kills: they land on distinct steps, a few steps apart.
    let iterations = 3;
    let steps = ((kills as u64 * 3).div_ceil(iterations as u64)).max(4);
    let shape = Shape {
        iterations,
        steps,
        batch: 1,
        accumulation: 6,
        checkpoint_every: 2,
        // The paper's learning rate. AdamW turns gradients at float-noise level into full
        // +-lr steps, so a different summation order (another ring size) moves those elements
        // by ~lr: the tolerance of the comparison scales with lr.
        lr: 2e-5,
    };
    let spec_text = common::spec(data, base, &dir.join("reference"), &shape);

    // The reference: the same job without kills, in this process.
    common::run_reference(&dir, &spec_text);

    let (_coordinator, url) = process::coordinator(&dir, "127.0.0.1:0", 3);
    let mut workers: Vec<Guard> = (0..3)
        .map(|i| process::worker(&url, &dir, &format!("worker-{i}.log"), 3))
        .collect();
    let total_steps = steps * iterations as u64;
    // Kill on distinct global steps, spread over the job.
    let mut kill_at: Vec<u64> = Vec::new();
    while kill_at.len() < kills.min(total_steps as usize) {
        let s = rng.random_range(0..total_steps);
        if !kill_at.contains(&s) {
            kill_at.push(s);
        }
    }
    kill_at.sort_unstable();
    println!("killing a random worker when global steps {kill_at:?} are reported");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let job = process::submit(&runtime, &url, &spec_text);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut killed = 0;
    let mut restarts = 0;
    let outcome = runtime.block_on(async {
        let mut stream = process::watch(&url, &job).await;
        let mut next_kill = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = tokio::time::timeout(left, stream.message())
                .await
                .expect("the job did not finish in time")
                .unwrap();
            let Some(event) = event else {
                return "stream ended".to_string();
            };
            match event.event {
                Some(v1::job_event::Event::Step(m)) if m.skipped.is_empty() => {
                    let global = u64::from(m.iteration) * steps + m.step;
                    if next_kill < kill_at.len() && global >= kill_at[next_kill] {
                        next_kill += 1;
                        let victim = rng.random_range(0..workers.len());
                        let pid = workers[victim].0.id();
                        // SIGKILL: no goodbye, no flush.
                        let _ = workers[victim].0.kill();
                        let _ = workers[victim].0.wait();
                        killed += 1;
                        println!("step {global}: killed worker {victim} (pid {pid})");
                        restarts += 1;
                        workers[victim] =
                            process::worker(&url, &dir, &format!("worker-{victim}.log"), 3);
                    }
                }
                Some(v1::job_event::Event::Warning(w)) => println!("warning: {}", w.message),
                Some(v1::job_event::Event::Done(_)) => return "done".to_string(),
                Some(v1::job_event::Event::Failed(f)) => return format!("failed: {}", f.error),
                Some(v1::job_event::Event::Cancelled(_)) => return "cancelled".to_string(),
                _ => {}
            }
        }
    });
    let logs = || process::cluster_logs(&dir, 3);
    assert_eq!(outcome, "done", "{}", logs());
    assert!(
        killed >= kills.min(total_steps as usize),
        "only {killed} kills happened"
    );
    println!("{killed} kills, {restarts} restarts; job done");
    let last = format!("iteration-{iterations}");
    let ours = dir.join("store/jobs").join(&job).join(&last).join(UNET);
    let reference = dir.join("reference").join(&last).join(UNET);
    let rel = common::relative_l2(&ours, &reference);
    println!("relative L2 to the run without kills: {rel:e}");
    assert!(rel <= 1e-5, "relative L2 {rel:e}\n{}", logs());
}
