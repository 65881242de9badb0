//! Real processes for the cluster tests: children killed on drop, commands with a time limit.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Kills the child when dropped (a failing test leaves no process behind).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `command` to completion, killing it after `limit`.
pub fn run_with_timeout(mut command: Command, limit: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(id.to_string()).status();
            panic!("{command:?} did not finish within {limit:?}");
        }
    }
}

pub fn wait_for_file(path: &Path, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text.trim().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn spinctl(url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spinctl"));
    c.arg("--coordinator").arg(url);
    c
}

/// `dir/name`, opened for appending (a daemon's stderr).
pub fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .unwrap()
}

/// Starts `spin-coordinator` on `listen` (e.g. `127.0.0.1:0`) with its journal and store
/// under `dir`; returns it and its URL once its address file appeared.
pub fn coordinator(dir: &Path, listen: &str, min_workers: usize) -> (Guard, String) {
    let address_file = dir.join("coordinator.addr");
    let _ = std::fs::remove_file(&address_file);
    let child = Command::new(super::daemon_binary("spin-coordinator"))
        .args(["--listen", listen, "--address-file"])
        .arg(&address_file)
        .arg("--journal")
        .arg(dir.join("journal.redb"))
        .env("SPIN_COORDINATOR__STORE", dir.join("store"))
        .env("SPIN_COORDINATOR__MIN_WORKERS", min_workers.to_string())
        .env("SPIN_COORDINATOR__TICK_INTERVAL_MS", "100")
        .env("SPIN_COORDINATOR__HEARTBEAT_TIMEOUT_MS", "5000")
        .stderr(log_file(dir, "coordinator.log"))
        .spawn()
        .unwrap();
    let guard = Guard(child);
    let url = format!(
        "http://{}",
        wait_for_file(&address_file, Duration::from_secs(30))
    );
    (guard, url)
}

/// Starts a `spin-worker` for the coordinator at `url`, logging to `dir/log`.
pub fn worker(url: &str, dir: &Path, log: &str, ring_timeout_s: u64) -> Guard {
    Guard(
        Command::new(super::daemon_binary("spin-worker"))
            .arg("--coordinator")
            .arg(url)
            .args(["--ring-timeout-s", &ring_timeout_s.to_string()])
            .args(["--connect-timeout-s", "60"])
            .stderr(log_file(dir, log))
            .spawn()
            .unwrap(),
    )
}

/// The text of `dir/name` (empty if absent), for failure messages.
pub fn read_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Submits `spec_toml` to the coordinator at `url`; returns the job id.
pub fn submit(runtime: &tokio::runtime::Runtime, url: &str, spec_toml: &str) -> String {
    runtime.block_on(async {
        let mut client = spin_cli::client::connect(url).await.unwrap();
        client
            .submit_job(spin_common::proto::v1::SubmitJobRequest {
                spec_toml: spec_toml.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .job_id
    })
}

/// Job `job`'s event stream from its first event.
pub async fn watch(url: &str, job: &str) -> tonic::Streaming<spin_common::proto::v1::JobEvent> {
    let mut client = spin_cli::client::connect(url).await.unwrap();
    client
        .watch_job(spin_common::proto::v1::WatchJobRequest {
            job_id: job.to_string(),
            from_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The coordinator's and `workers` workers' logs in `dir`, for failure messages.
pub fn cluster_logs(dir: &Path, workers: usize) -> String {
    let mut text = format!("coordinator:\n{}", read_log(dir, "coordinator.log"));
    for i in 0..workers {
        text.push_str(&format!(
            "\nworker {i}:\n{}",
            read_log(dir, &format!("worker-{i}.log"))
        ));
    }
    text
}

/// How job event `event` ends the job, if it does: "done", "failed: REASON" or "cancelled".
pub fn outcome(event: &spin_common::proto::v1::JobEvent) -> Option<String> {
    use spin_common::proto::v1::job_event::Event;
    match &event.event {
        Some(Event::Done(_)) => Some("done".into()),
        Some(Event::Failed(f)) => Some(format!("failed: {}", f.error)),
        Some(Event::Cancelled(_)) => Some("cancelled".into()),
        _ => None,
    }
}

/// Follows job `job` at `url` from event `from` (connecting again until `deadline` while the
/// coordinator is not up yet), handing each event to `on`, until `on` says stop (true), a
/// final event, or the stream's end. Returns the events seen; panics at `deadline`.
pub async fn follow(
    url: &str,
    job: &str,
    from: u64,
    deadline: Instant,
    mut on: impl FnMut(&spin_common::proto::v1::JobEvent) -> bool,
) -> Vec<spin_common::proto::v1::JobEvent> {
    let mut client = loop {
        match spin_cli::client::connect(url).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("coordinator unreachable: {e}"),
        }
    };
    let mut stream = client
        .watch_job(spin_common::proto::v1::WatchJobRequest {
            job_id: job.to_string(),
            from_sequence: from,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = tokio::time::timeout(left, stream.message())
            .await
            .expect("the job did not get there in time")
            .unwrap()
        else {
            return seen;
        };
        let stop = on(&event) || outcome(&event).is_some();
        seen.push(event);
        if stop {
            return seen;
        }
    }
}
