//! The same job on one worker and on two (same global batch: micro-batches shared out) ends
//! with the same UNet up to float summation order, and the one-worker job matches the
//! in-process loop (`train --local`) exactly: they run the same tasks.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use spin_cli::cluster::{ClusterOptions, LocalCluster};
use spin_cli::logs::Outcome;
use spin_common::spec::JobSpec;

const UNET: &str = "iteration-2/unet/diffusion_pytorch_model.safetensors";

fn run_on_cluster(name: &str, workers: usize) -> std::path::PathBuf {
    let (data, base) = common::toy_inputs();
    let dir = common::temp_dir(name);
    let cluster = LocalCluster::start(
        &dir.join("cluster"),
        &ClusterOptions {
            workers,
            min_workers: workers,
            heartbeat_timeout: Duration::from_secs(15),
            ring_timeout: Duration::from_secs(30),
        },
    )
    .unwrap();
    let id = cluster
        .submit(common::spin_spec(data, base, &dir.join("unused")))
        .unwrap();
    let mut log = Vec::new();
    let outcome = cluster.follow(&id, &mut log).unwrap();
    let store = cluster.store().to_path_buf();
    cluster.stop();
    let log = String::from_utf8_lossy(&log);
    assert!(
        matches!(outcome, Outcome::Done { .. }),
        "{outcome:?}\n{log}"
    );
    store.join("jobs").join(id)
}

#[test]
fn one_and_two_workers_and_the_local_loop_agree() {
    let one = run_on_cluster("one-worker", 1);
    let two = run_on_cluster("two-workers", 2);
    let rel = common::relative_l2(&two.join(UNET), &one.join(UNET));
    println!("relative L2 between the 1-worker and 2-worker UNets: {rel:e}");
    assert!(rel <= 1e-5, "relative L2 {rel:e}");
    // The weights moved: the comparison is not between two copies of the base.
    let (data, base) = common::toy_inputs();
    let moved = common::relative_l2(
        &one.join(UNET),
        &base.join("unet/diffusion_pytorch_model.safetensors"),
    );
    assert!(
        moved > 1e-4,
        "training left the UNet at the base ({moved:e})"
    );

    // The local loop runs the same tasks with a ring of one.
    let dir = common::temp_dir("local");
    let spec_path = dir.join("spec.toml");
    std::fs::write(&spec_path, common::spin_spec(data, base, &dir.join("out"))).unwrap();
    let spec = JobSpec::load(&spec_path, &HashMap::new()).unwrap();
    let device = burn::tensor::Device::flex();
    spin_worker::train::self_play::run_local(&spec, &device, |_| {}).unwrap();
    let rel = common::relative_l2(&dir.join("out").join(UNET), &one.join(UNET));
    assert_eq!(rel, 0.0, "local loop vs 1-worker job: relative L2 {rel:e}");
}
