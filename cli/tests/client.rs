//! The real `spinctl` binary against an in-process coordinator on a port-0 listener (no
//! workers, so jobs stay pending until cancelled): submit, list, status, logs, cancel,
//! `logs --follow` across a coordinator restart, and the refusals (bad spec, unknown job,
//! unreachable coordinator); then the `spin-coordinator` binary with `--address-file`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::server::Server;
use spin_coordinator::CoordinatorConfig;

/// The longest any one wait of these tests may take.
const TIMEOUT: Duration = Duration::from_secs(20);

const SPEC: &str = "[job]\nname = \"toy-it\"\n[model]\nbase = \"base\"\n[data]\ntrain = [\"data\"]\n[[iteration]]\nlr = 2e-5\nsteps = 50\n";

/// A coordinator on `addr` with its journal in `dir`.
fn start(dir: &Path, addr: &str) -> Server {
    let config = CoordinatorConfig {
        journal_path: dir.join("journal.redb"),
        tick_interval: Duration::from_millis(50),
        ..CoordinatorConfig::default()
    };
    Server::start(config, addr)
}

/// What a finished `spinctl` run gave.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn spinctl_command(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spinctl"));
    command
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .env_remove("SPIN_COORDINATOR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("SPIN_JOB__") {
            command.env_remove(key);
        }
    }
    command
}

/// Reads a pipe to the end on a thread.
fn drain(pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(pipe).read_to_string(&mut text);
        text
    })
}

/// Waits for `child` (killed after `TIMEOUT`) and collects its output.
fn finish(mut child: Child, stdout: JoinHandle<String>) -> Ran {
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("spinctl ran past {TIMEOUT:?}: {:?}", stderr.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ran {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn spinctl(url: &str, args: &[&str]) -> Ran {
    let mut child = spinctl_command(url, args).spawn().unwrap();
    let stdout = drain(child.stdout.take().unwrap());
    finish(child, stdout)
}

/// A `spinctl` left running whose stdout lines arrive on a channel as it prints them.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    reader: JoinHandle<()>,
}

impl Running {
    fn spawn(url: &str, args: &[&str]) -> Self {
        let mut child = spinctl_command(url, args).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            reader,
        }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no line with {needle:?}; saw {:?}", self.seen);
                }
            }
        }
    }

    fn finish(self) -> Ran {
        let Self {
            child,
            lines,
            seen,
            reader,
        } = self;
        let stdout = std::thread::spawn(move || {
            let _ = reader.join();
            let mut text: String = seen.iter().map(|l| format!("{l}\n")).collect();
            text.extend(lines.try_iter().map(|l| format!("{l}\n")));
            text
        });
        finish(child, stdout)
    }
}

fn write_spec(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Submits `SPEC` and returns the id `spinctl submit` printed.
fn submit(url: &str, dir: &Path) -> String {
    let spec = write_spec(dir, SPEC);
    let ran = spinctl(url, &["submit", spec.to_str().unwrap()]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let id = ran.stdout.trim_end_matches('\n');
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{ran:?}"
    );
    id.to_string()
}

#[test]
fn a_job_is_submitted_listed_watched_and_cancelled() {
    let dir = common::temp_dir("lifecycle");
    let server = start(&dir, "127.0.0.1:0");
    let url = server.url();
    let id = submit(&url, &dir);

    let list = spinctl(&url, &["list"]);
    assert_eq!(list.code, Some(0), "{list:?}");
    let row = list.stdout.lines().find(|l| l.contains(&id)).unwrap();
    assert!(
        row.contains("toy-it") && row.contains("PENDING"),
        "{list:?}"
    );
    assert!(list.stdout.starts_with("ID "), "{list:?}");

    let all = spinctl(&url, &["status"]);
    assert!(all.code == Some(0) && all.stdout.contains(&id), "{all:?}");
    let one = spinctl(&url, &["status", &id]);
    assert_eq!(one.code, Some(0), "{one:?}");
    assert!(
        one.stdout.contains("PENDING") && one.stdout.contains("toy-it"),
        "{one:?}"
    );

    // Without --follow: the kept events, then exit 0 though the job goes on.
    let logs = spinctl(&url, &["logs", &id]);
    assert_eq!(logs.code, Some(0), "{logs:?}");
    assert!(logs.stdout.contains("phase PENDING"), "{logs:?}");

    let mut follow = Running::spawn(&url, &["logs", &id, "--follow"]);
    follow.wait_for("phase PENDING");
    let cancel = spinctl(&url, &["cancel", &id]);
    assert_eq!(
        (cancel.code, cancel.stdout.as_str()),
        (Some(0), "CANCELLED\n"),
        "{cancel:?}"
    );
    let followed = follow.finish();
    assert_eq!(followed.code, Some(1), "{followed:?}");
    assert!(
        followed.stdout.contains("phase PENDING -> CANCELLED"),
        "{followed:?}"
    );
    assert!(followed.stdout.contains("cancelled: "), "{followed:?}");
    assert!(followed.stderr.contains("cancelled"), "{followed:?}");

    // A finished job: its whole log, and its outcome as the exit code.
    let logs = spinctl(&url, &["logs", &id]);
    assert_eq!(logs.code, Some(1), "{logs:?}");
    assert!(logs.stdout.contains("cancelled"), "{logs:?}");
    let from = spinctl(&url, &["logs", &id, "--from", "1"]);
    assert!(!from.stdout.contains("phase PENDING\n"), "{from:?}");
    let again = spinctl(&url, &["cancel", &id]);
    assert_eq!(again.stdout, "CANCELLED\n", "{again:?}");
    server.stop();
}

#[test]
fn submit_follow_prints_the_id_then_the_events() {
    let dir = common::temp_dir("submit-follow");
    let server = start(&dir, "127.0.0.1:0");
    let url = server.url();
    let spec = write_spec(&dir, SPEC);
    let mut follow = Running::spawn(&url, &["submit", spec.to_str().unwrap(), "--follow"]);
    // The first line is the id alone.
    let id = follow.wait_for("-");
    follow.wait_for("phase PENDING");
    let cancel = spinctl(&url, &["cancel", &id]);
    assert_eq!(cancel.code, Some(0), "{cancel:?}");
    let ran = follow.finish();
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stdout.starts_with(&format!("{id}\n")), "{ran:?}");
    server.stop();
}

#[test]
fn follow_reconnects_after_a_coordinator_restart() {
    let dir = common::temp_dir("restart");
    let server = start(&dir, "127.0.0.1:0");
    let url = server.url();
    let addr = server.addr.to_string();
    let id = submit(&url, &dir);
    let mut follow = Running::spawn(&url, &["logs", &id, "--follow"]);
    follow.wait_for("phase PENDING");
    server.stop();
    follow.wait_for("reconnecting");
    // The same journal on the same port: the job is still there, still pending.
    let server = start(&dir, &addr);
    let cancel = spinctl(&url, &["cancel", &id]);
    assert_eq!(cancel.code, Some(0), "{cancel:?}");
    let ran = follow.finish();
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stdout.contains("cancelled"), "{ran:?}");
    // The event seen before the restart is not printed twice.
    assert_eq!(ran.stdout.matches("phase PENDING\n").count(), 1, "{ran:?}");
    server.stop();
}

#[test]
fn a_bad_spec_exits_2_naming_the_field() {
    let dir = common::temp_dir("bad-spec");
    let server = start(&dir, "127.0.0.1:0");
    let url = server.url();
    let spec = write_spec(&dir, &format!("{SPEC}[training]\nbatch_sise = 4\n"));
    let ran = spinctl(&url, &["submit", spec.to_str().unwrap()]);
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(
        ran.stderr.contains("batch_sise") && ran.stdout.is_empty(),
        "{ran:?}"
    );
    let spec = write_spec(&dir, &SPEC.replace("steps = 50", "steps = 0"));
    let ran = spinctl(&url, &["submit", spec.to_str().unwrap()]);
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(ran.stderr.contains("iteration[0].steps"), "{ran:?}");
    let list = spinctl(&url, &["list"]);
    assert_eq!(list.stdout, "no jobs\n", "{list:?}");
    server.stop();
}

#[test]
fn an_unknown_job_exits_2() {
    let dir = common::temp_dir("unknown");
    let server = start(&dir, "127.0.0.1:0");
    let url = server.url();
    let id = spin_common::ids::JobId::new().to_string();
    for args in [
        vec!["status", id.as_str()],
        vec!["cancel", id.as_str()],
        vec!["logs", id.as_str()],
        vec!["logs", id.as_str(), "--follow"],
    ] {
        let ran = spinctl(&url, &args);
        assert_eq!(ran.code, Some(2), "{args:?}: {ran:?}");
        assert!(
            ran.stderr.contains(&id) && ran.stderr.contains("not known"),
            "{args:?}: {ran:?}"
        );
    }
    let ran = spinctl(&url, &["status", "nope"]);
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(ran.stderr.contains("invalid job id"), "{ran:?}");
    server.stop();
}

#[test]
fn an_unreachable_coordinator_exits_2_naming_the_url() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    for args in [
        vec!["list"],
        vec!["logs", "6f1c1f36-8a8b-4f63-9d4e-0a1b2c3d4e5f"],
    ] {
        let ran = spinctl(&url, &args);
        assert_eq!(ran.code, Some(2), "{ran:?}");
        assert!(
            ran.stderr.contains(&url) && ran.stderr.contains("--coordinator"),
            "{ran:?}"
        );
    }
}

#[test]
fn the_coordinator_binary_writes_its_address_file() {
    let dir = common::temp_dir("binary");
    let address_file = dir.join("address");
    let mut child = Command::new(common::daemon_binary("spin-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--address-file")
        .arg(&address_file)
        .arg("--journal")
        .arg(dir.join("journal.redb"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let address = loop {
        if let Ok(text) = std::fs::read_to_string(&address_file) {
            break text.trim().to_string();
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("no address file from spin-coordinator");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let addr: SocketAddr = address.parse().unwrap();
    assert_ne!(addr.port(), 0);
    // Without a scheme, as a script might pass it.
    let list = spinctl(&address, &["list"]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        (list.code, list.stdout.as_str()),
        (Some(0), "no jobs\n"),
        "{list:?}"
    );
}

#[test]
fn follow_as_a_library_call_returns_the_outcome_or_gives_up() {
    use spin_cli::logs::{follow, Backoff, FollowOptions, Outcome};

    let dir = common::temp_dir("library");
    let server = start(&dir, "127.0.0.1:0");
    let url = server.url();
    let ended = submit(&url, &dir);
    let live = submit(&url, &dir);
    let cancel = spinctl(&url, &["cancel", &ended]);
    assert_eq!(cancel.code, Some(0), "{cancel:?}");
    let opts = FollowOptions {
        backoff: Backoff {
            first: Duration::from_millis(10),
            max: Duration::from_millis(20),
            attempts: 2,
        },
        ..FollowOptions::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (outcome, text, mut client) = runtime.block_on(async {
        let mut client = tokio::time::timeout(TIMEOUT, spin_cli::client::connect(&url))
            .await
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        let outcome = tokio::time::timeout(TIMEOUT, follow(&mut client, &ended, &mut out, &opts))
            .await
            .unwrap()
            .unwrap();
        (outcome, String::from_utf8(out).unwrap(), client)
    });
    assert!(matches!(outcome, Outcome::Cancelled { .. }), "{outcome:?}");
    assert!(text.contains("phase PENDING -> CANCELLED"), "{text}");

    // A live job whose coordinator goes away for good: a few retries, then an error.
    let following = runtime.spawn(async move {
        let mut out = Vec::new();
        let result = follow(&mut client, &live, &mut out, &opts).await;
        (
            result.map_err(|e| format!("{e:#}")),
            String::from_utf8(out).unwrap(),
        )
    });
    server.stop();
    let (result, text) = runtime
        .block_on(async { tokio::time::timeout(TIMEOUT, following).await })
        .unwrap()
        .unwrap();
    let err = result.unwrap_err();
    assert!(err.contains("gave up after 2 attempts"), "{err}");
    assert!(text.contains("reconnecting"), "{text}");
}
