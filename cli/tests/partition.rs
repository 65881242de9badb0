//! A worker cut off mid-training without a goodbye (frozen with SIGSTOP: its sockets stay open
//! and nothing resets them, which is what a network partition looks like to its peers). The
//! coordinator drops it after the heartbeat timeout and tells the survivors at once to abort
//! the ring, so training goes on within seconds of the heartbeat timeout instead of waiting
//! for the ring timeout; the frozen worker is then let go on (a stale worker coming back).
//! The job completes within 1e-5 relative L2 of the same job run without the partition.

#![allow(clippy::unwrap_used)]
#![cfg(unix)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{self, Guard};
use common::Shape;
use spin_common::proto::v1;
use v1::job_event::Event;

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
/// Far longer than the heartbeat timeout (5 s in the test coordinator): a ring that waits for
/// it is what this test catches.
const RING_TIMEOUT_S: u64 = 120;

fn signal(worker: &Guard, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(worker.0.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} failed");
}

#[test]
fn survivors_of_a_partitioned_worker_go_on_within_the_heartbeat_timeout() {
    let (data, base) = common::toy_inputs();
    let dir = common::temp_dir("partition");
    let shape = Shape {
        iterations: 1,
        steps: 8,
        batch: 1,
        accumulation: 6,
        checkpoint_every: 2,
        lr: 2e-5,
    };
    let spec_text = common::spec(data, base, &dir.join("reference"), &shape);
    common::run_reference(&dir, &spec_text);

    let (_coordinator, url) = process::coordinator(&dir, "127.0.0.1:0", 3);
    let workers: Vec<Guard> = (0..3)
        .map(|i| process::worker(&url, &dir, &format!("worker-{i}.log"), RING_TIMEOUT_S))
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let job = process::submit(&runtime, &url, &spec_text);
    let deadline = Instant::now() + Duration::from_secs(400);
    let mut frozen_at: Option<Instant> = None;
    let mut lost_after: Option<Duration> = None;
    let mut resumed_after: Option<Duration> = None;
    let outcome = runtime.block_on(async {
        let mut stream = process::watch(&url, &job).await;
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
                Some(Event::Step(m)) => match frozen_at {
                    None if m.step >= 1 => {
                        signal(&workers[2], "STOP");
                        frozen_at = Some(Instant::now());
                        println!("step {}: worker 2 frozen", m.step);
                    }
                    Some(at) if lost_after.is_some() && resumed_after.is_none() => {
                        resumed_after = Some(at.elapsed());
                        println!("step {}: training goes on after {:?}", m.step, at.elapsed());
                        // The stale worker comes back; it must not disturb the job.
                        signal(&workers[2], "CONT");
                    }
                    _ => {}
                },
                Some(Event::WorkerLost(l)) if frozen_at.is_some() && lost_after.is_none() => {
                    let after = frozen_at.map(|at| at.elapsed());
                    println!("worker lost after {after:?}: {}", l.reason);
                    lost_after = after;
                }
                Some(Event::Warning(w)) => println!("warning: {}", w.message),
                Some(Event::Done(_)) => return "done".to_string(),
                Some(Event::Failed(f)) => return format!("failed: {}", f.error),
                Some(Event::Cancelled(_)) => return "cancelled".to_string(),
                _ => {}
            }
        }
    });
    // Never leave a stopped process behind, whatever happened.
    signal(&workers[2], "CONT");
    let logs = || process::cluster_logs(&dir, 3);
    assert_eq!(outcome, "done", "{}", logs());
    let resumed = resumed_after.expect("no step after the partition");
    assert!(
        lost_after.is_some(),
        "the frozen worker was never lost\n{}",
        logs()
    );
    // Heartbeat timeout (5 s) plus the redo of one step on a loaded 2-core machine: far
    // below the ring timeout.
    assert!(
        resumed < Duration::from_secs(RING_TIMEOUT_S / 2),
        "training went on only after {resumed:?}: the survivors waited for the ring timeout\n{}",
        logs()
    );
    let last = "iteration-1";
    let ours = dir.join("store/jobs").join(&job).join(last).join(UNET);
    let reference = dir.join("reference").join(last).join(UNET);
    let rel = common::relative_l2(&ours, &reference);
    println!("relative L2 to the run without the partition: {rel:e}");
    assert!(rel <= 1e-5, "relative L2 {rel:e}\n{}", logs());
}
