//! The system end to end with real processes: a `spin-coordinator` and two `spin-worker`s on
//! localhost with OS-chosen ports; a job submitted with `spinctl submit`, followed with
//! `spinctl logs --follow` to completion; its snapshots verified and loaded by
//! `spinctl sample`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::process::{self, run_with_timeout, spinctl, Guard};

#[test]
fn a_job_runs_on_a_coordinator_and_two_worker_processes() {
    let (data, base) = common::toy_inputs();
    let dir = common::temp_dir("processes");
    let store = dir.join("store");
    let (coordinator, url) = process::coordinator(&dir, "127.0.0.1:0", 2);
    let workers: Vec<Guard> = (0..2)
        .map(|i| process::worker(&url, &dir, &format!("worker-{i}.log"), 30))
        .collect();

    let spec = dir.join("job.toml");
    std::fs::write(&spec, common::spin_spec(data, base, &dir.join("unused"))).unwrap();
    let mut submit = spinctl(&url);
    submit.arg("submit").arg(&spec);
    let out = run_with_timeout(submit, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!job.is_empty());

    let mut logs = spinctl(&url);
    logs.args(["logs", &job, "--follow"]);
    let out = run_with_timeout(logs, Duration::from_secs(300));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let logs_of = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    assert!(
        out.status.success(),
        "logs --follow: {:?}\n{text}\n{}\ncoordinator:\n{}\nworker 0:\n{}\nworker 1:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        logs_of("coordinator.log"),
        logs_of("worker-0.log"),
        logs_of("worker-1.log"),
    );
    for needle in ["training", "snapshot", "done"] {
        assert!(
            text.to_lowercase().contains(needle),
            "no `{needle}` in:\n{text}"
        );
    }

    let job_dir: PathBuf = store.join("jobs").join(&job);
    for k in 1..=2 {
        let snapshot = job_dir.join(format!("iteration-{k}"));
        spin_common::manifest::verify(&snapshot).unwrap();
    }
    // Both workers took part: each logged training as a rank of a ring of two.
    for i in 0..2 {
        let log = logs_of(&format!("worker-{i}.log"));
        assert!(
            log.contains("world=2"),
            "worker {i} never trained in a ring of 2:\n{log}"
        );
    }
    let mut sample = Command::new(env!("CARGO_BIN_EXE_spinctl"));
    sample
        .arg("sample")
        .arg("--model")
        .arg(job_dir.join("iteration-2"))
        .args([
            "--prompt",
            "a red circle on a blue background",
            "--steps",
            "2",
        ])
        .arg("--out")
        .arg(dir.join("sample.png"));
    let out = run_with_timeout(sample, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("sample.png").exists());
    drop(workers);
    drop(coordinator);
}
