//! A full disk under the job's store, on a real filesystem: the store directory is a small
//! tmpfs mounted by the test (root only; skipped with a message elsewhere) that the test fills
//! up mid-training. The first time space comes back while the checkpoint write is being
//! retried, so the job waits, warning with the path, and goes on; the second time the disk
//! stays full, so the job fails naming the path and leaves no temporary files. Once space is
//! back, `spinctl resume` finishes the job from its last verified checkpoint, with the same
//! final weights (within 1e-5) as the job run on a roomy disk.

#![allow(clippy::unwrap_used)]
#![cfg(unix)]

mod common;

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{self, Guard};
use common::Shape;
use spin_common::proto::v1;
use v1::job_event::Event;

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
/// The store's filesystem: room for the job's caches, checkpoints and snapshots.
const STORE_BYTES: u64 = 96 << 20;

/// A tmpfs at `dir`, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, bytes: u64) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` with `dir/filler` until a write fails for want of space.
fn fill(dir: &Path) -> u64 {
    let mut file = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0u8; 1 << 16];
    let mut written = 0u64;
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = file.sync_all();
    written
}

fn free(dir: &Path) {
    std::fs::remove_file(dir.join("filler")).unwrap();
}

/// Every path under `dir` whose name marks a temporary.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.contains(".tmp") {
            found.push(path.clone());
        }
        if path.is_dir() {
            found.extend(temporaries(&path));
        }
    }
    found
}

/// What the watch saw of one run of the job.
#[derive(Default)]
struct Seen {
    warnings: Vec<String>,
    outcome: String,
    /// The sequence number of the last event seen.
    last: u64,
}

/// Watches `job` from event `from` until it ends, calling `on_step` with each step and
/// `on_warning` with each warning.
fn watch(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    (job, from): (&str, u64),
    limit: Duration,
    mut on_step: impl FnMut(u64),
    mut on_warning: impl FnMut(&str),
) -> Seen {
    let deadline = Instant::now() + limit;
    let events = runtime.block_on(process::follow(url, job, from, deadline, |event| {
        match &event.event {
            Some(Event::Step(m)) => on_step(m.step),
            Some(Event::Warning(w)) => {
                println!("warning: {}", w.message);
                on_warning(&w.message);
            }
            _ => {}
        }
        false
    }));
    Seen {
        warnings: events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::Warning(w)) => Some(w.message.clone()),
                _ => None,
            })
            .collect(),
        outcome: events
            .last()
            .and_then(process::outcome)
            .unwrap_or_else(|| "stream ended".into()),
        last: events.last().map_or(from, |e| e.sequence),
    }
}

#[test]
fn a_full_disk_is_waited_out_or_fails_naming_the_path_and_resume_finishes_the_job() {
    let (data, base) = common::toy_inputs();
    let dir = common::temp_dir("full-disk");
    let shape = Shape {
        iterations: 1,
        steps: 10,
        batch: 1,
        accumulation: 2,
        checkpoint_every: 2,
        lr: 2e-5,
    };
    let spec_text = common::spec(data, base, &dir.join("reference"), &shape);
    let store = dir.join("store");
    let _mount = match Mount::tmpfs(&store, STORE_BYTES) {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("SKIPPED: a tmpfs cannot be mounted here ({reason}); this test needs root");
            return;
        }
    };
    common::run_reference(&dir, &spec_text);

    let (_coordinator, url) = process::coordinator(&dir, "127.0.0.1:0", 2);
    let _workers: Vec<Guard> = (0..2)
        .map(|i| process::worker(&url, &dir, &format!("worker-{i}.log"), 120))
        .collect();
    let logs = || process::cluster_logs(&dir, 2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let job = process::submit(&runtime, &url, &spec_text);

    // First full disk: freed while the checkpoint write is retried; the job waits it out.
    // Second: left full; the job fails.
    let filled_at: RefCell<Vec<u64>> = RefCell::default();
    let freed = Cell::new(false);
    let seen = watch(
        &runtime,
        &url,
        (&job, 0),
        Duration::from_secs(600),
        |step| {
            let mut filled = filled_at.borrow_mut();
            let due = match filled.as_slice() {
                [] => step >= 1,
                [first] => freed.get() && step >= first + 3,
                _ => false,
            };
            if due {
                let bytes = fill(&store);
                println!("step {step}: store filled ({bytes} bytes)");
                filled.push(step);
            }
        },
        |message| {
            if filled_at.borrow().len() == 1 && !freed.get() && message.contains("No space left") {
                free(&store);
                freed.set(true);
                println!("space freed");
            }
        },
    );
    let filled_at_step = filled_at.into_inner();
    let freed = freed.get();
    assert!(
        seen.outcome.starts_with("failed"),
        "the job should fail on the second full disk: {}\n{}",
        seen.outcome,
        logs()
    );
    assert!(freed, "no warning about the first full disk\n{}", logs());
    let job_dir = store.join("jobs").join(&job);
    // The warnings and the failure name the path that could not be written.
    assert!(
        seen.warnings
            .iter()
            .any(|w| w.contains("No space left") && w.contains(&job_dir.display().to_string())),
        "{:?}",
        seen.warnings
    );
    assert!(
        seen.outcome.contains("checkpoints") && seen.outcome.contains("No space left"),
        "{}",
        seen.outcome
    );
    let left = temporaries(&store);
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // Space back: resume finishes the job from its last verified checkpoint.
    free(&store);
    let output = process::run_with_timeout(
        {
            let mut c = process::spinctl(&url);
            c.args(["resume", &job]);
            c
        },
        Duration::from_secs(60),
    );
    let said = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "spinctl resume: {said}");
    println!("spinctl resume: {said}");
    let failed_at = seen.last;
    let mut first_step_after_resume = None;
    let seen = watch(
        &runtime,
        &url,
        (&job, failed_at + 1),
        Duration::from_secs(600),
        |step| {
            first_step_after_resume.get_or_insert(step);
        },
        |_| {},
    );
    assert_eq!(seen.outcome, "done", "{}", logs());
    // From the last verified checkpoint, not from the start of the iteration.
    let resumed_at = first_step_after_resume.expect("no step after the resume");
    println!("resumed at step {resumed_at}; the disk filled at steps {filled_at_step:?}");
    assert!(resumed_at >= 2, "resumed at step {resumed_at}\n{}", logs());
    let last = "iteration-1";
    let ours = job_dir.join(last).join(UNET);
    let reference = dir.join("reference").join(last).join(UNET);
    let rel = common::relative_l2(&ours, &reference);
    println!("relative L2 to the run on a roomy disk: {rel:e}");
    assert!(rel <= 1e-5, "relative L2 {rel:e}\n{}", logs());
    assert!(temporaries(&store).is_empty());
}
