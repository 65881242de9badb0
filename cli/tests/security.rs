//! The real `spinctl` binary against an in-process coordinator that requires an API token (and,
//! in the TLS cases, serves TLS with certificates made at test time): a wrong or missing token
//! exits 2 saying the coordinator refused it, the right one (flag or `SPIN_TOKEN`) works; an
//! https coordinator works with `--tls-ca` (and `--tls-cert`/`--tls-key` under mutual TLS).
//! Then `spin-worker` names a certificate file it cannot read, and a job runs end to end on a
//! `spin-coordinator` and two `spin-worker` processes with TLS everywhere, mutual TLS to the
//! coordinator and both tokens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::Server;
use spin_common::test_pki::TestPki;
use spin_coordinator::CoordinatorConfig;

/// The longest any one wait of these tests may take.
const TIMEOUT: Duration = Duration::from_secs(20);

const TOKEN: &str = "spinctl-test-token-93";

fn config(dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        journal_path: dir.join("journal.redb"),
        store: dir.join("store").display().to_string(),
        api_token: TOKEN.into(),
        ..CoordinatorConfig::default()
    }
}

/// What a finished process gave.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `command` without the `SPIN_*` variables of this process.
fn without_spin_env(command: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars() {
        if key.starts_with("SPIN_") {
            command.env_remove(key);
        }
    }
    command
}

/// Runs `command` with no `SPIN_*` variables but `env`, killed after `TIMEOUT`.
fn run(mut command: Command, env: &[(&str, &str)]) -> Ran {
    without_spin_env(&mut command)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} ran past {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ran {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn spinctl(coordinator: &str, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spinctl"));
    command.arg("--coordinator").arg(coordinator).args(args);
    run(command, env)
}

#[test]
fn spinctl_sends_the_api_token_and_says_when_it_is_refused() {
    let dir = common::temp_dir("token");
    let server = Server::start(config(&dir), "127.0.0.1:0");
    let url = format!("http://{}", server.addr);

    let wrong = spinctl(&url, &["--token", "wrong", "list"], &[]);
    assert_eq!(wrong.code, Some(2), "{wrong:?}");
    assert!(
        wrong.stderr.contains("refused the token") && wrong.stderr.contains("API token"),
        "{wrong:?}"
    );
    assert!(!wrong.stderr.contains(TOKEN), "{wrong:?}");

    let missing = spinctl(&url, &["list"], &[]);
    assert_eq!(missing.code, Some(2), "{missing:?}");
    assert!(
        missing.stderr.contains("none was sent") && missing.stderr.contains("--token"),
        "{missing:?}"
    );

    let right = spinctl(&url, &["--token", TOKEN, "list"], &[]);
    assert_eq!(right.code, Some(0), "{right:?}");
    assert_eq!(right.stdout, "no jobs\n", "{right:?}");
    let from_env = spinctl(&url, &["list"], &[("SPIN_TOKEN", TOKEN)]);
    assert_eq!(from_env.code, Some(0), "{from_env:?}");

    // `logs` says the same through its own path.
    let id = "00000000-0000-4000-8000-000000000000";
    let logs = spinctl(&url, &["--token", "wrong", "logs", id], &[]);
    assert_eq!(logs.code, Some(2), "{logs:?}");
    assert!(logs.stderr.contains("refused the token"), "{logs:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spinctl_reaches_a_tls_coordinator_with_its_ca_and_a_client_certificate() {
    let dir = common::temp_dir("tls");
    let pki = TestPki::generate(&dir.join("pki"));
    let server = Server::start(
        CoordinatorConfig {
            tls_cert: Some(pki.server_cert.clone()),
            tls_key: Some(pki.server_key.clone()),
            tls_client_ca: Some(pki.ca.clone()),
            ..config(&dir)
        },
        "127.0.0.1:0",
    );
    let port = server.addr.port();
    let ca = pki.ca.display().to_string();
    let (cert, key) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let env = [
        ("SPIN_TOKEN", TOKEN),
        ("SPIN_TLS_CERT", cert.as_str()),
        ("SPIN_TLS_KEY", key.as_str()),
    ];

    // No scheme and a CA: https.
    let bare = format!("localhost:{port}");
    let ok = spinctl(&bare, &["--tls-ca", &ca, "list"], &env);
    assert_eq!(
        (ok.code, ok.stdout.as_str()),
        (Some(0), "no jobs\n"),
        "{ok:?}"
    );

    let https = format!("https://127.0.0.1:{port}");
    let no_ca = spinctl(&https, &["list"], &env);
    assert_eq!(no_ca.code, Some(2), "{no_ca:?}");
    assert!(no_ca.stderr.contains("--tls-ca"), "{no_ca:?}");

    let no_cert = spinctl(&https, &["--tls-ca", &ca, "list"], &[("SPIN_TOKEN", TOKEN)]);
    assert_eq!(no_cert.code, Some(2), "{no_cert:?}");
    assert!(no_cert.stderr.contains("--tls-cert"), "{no_cert:?}");

    let plain = spinctl(&format!("http://127.0.0.1:{port}"), &["list"], &env);
    assert_eq!(plain.code, Some(2), "{plain:?}");
    // The call breaks (or, rarely, the connection): either way no answer came.
    let says = ["https://", "cannot reach"];
    assert!(says.iter().any(|s| plain.stderr.contains(s)), "{plain:?}");

    let missing = dir.join("missing-ca.pem").display().to_string();
    let unreadable = spinctl(&https, &["--tls-ca", &missing, "list"], &env);
    assert_eq!(unreadable.code, Some(2), "{unreadable:?}");
    assert!(
        unreadable.stderr.contains("missing-ca.pem"),
        "{unreadable:?}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spin_worker_names_a_certificate_it_cannot_read() {
    let dir = common::temp_dir("worker");
    let cert = dir.join("absent-cert.pem");
    let mut command = Command::new(common::daemon_binary("spin-worker"));
    command.args(["--coordinator", "https://127.0.0.1:1"]);
    let cert_text = cert.display().to_string();
    let key_text = dir.join("absent.key").display().to_string();
    let ran = run(
        command,
        &[
            ("SPIN_WORKER_TLS_CERT", cert_text.as_str()),
            ("SPIN_WORKER_TLS_KEY", key_text.as_str()),
        ],
    );
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(ran.stderr.contains("absent-cert.pem"), "{ran:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_job_runs_over_tls_with_tokens_on_a_coordinator_and_two_worker_processes() {
    use common::process::{run_with_timeout, wait_for_file, Guard};

    let (data, base) = common::toy_inputs();
    let dir = common::temp_dir("cluster");
    let pki = TestPki::generate(&dir.join("pki"));
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let read_log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let join_token = "cluster-join-token-4e";

    let address_file = dir.join("coordinator.addr");
    let mut command = Command::new(common::daemon_binary("spin-coordinator"));
    without_spin_env(&mut command)
        .args(["--listen", "127.0.0.1:0", "--address-file"])
        .arg(&address_file)
        .arg("--journal")
        .arg(dir.join("journal.redb"))
        .arg("--tls-cert")
        .arg(&pki.server_cert)
        .arg("--tls-key")
        .arg(&pki.server_key)
        .arg("--tls-client-ca")
        .arg(&pki.ca)
        .env("SPIN_COORDINATOR__API_TOKEN", TOKEN)
        .env("SPIN_COORDINATOR__JOIN_TOKEN", join_token)
        .env("SPIN_COORDINATOR__STORE", dir.join("store"))
        .env("SPIN_COORDINATOR__MIN_WORKERS", "2")
        .env("SPIN_COORDINATOR__TICK_INTERVAL_MS", "100")
        .env("SPIN_COORDINATOR__HEARTBEAT_TIMEOUT_MS", "5000")
        .stderr(log("coordinator.log"));
    let coordinator = Guard(command.spawn().unwrap());
    let url = format!(
        "https://{}",
        wait_for_file(&address_file, Duration::from_secs(30))
    );

    let workers: Vec<Guard> = (0..2)
        .map(|i| {
            let mut command = Command::new(common::daemon_binary("spin-worker"));
            without_spin_env(&mut command)
                .args(["--coordinator", &url, "--ring-timeout-s", "30"])
                .env("SPIN_JOIN_TOKEN", join_token)
                .env("SPIN_WORKER_TLS_CA", &pki.ca)
                .env("SPIN_WORKER_TLS_CERT", &pki.server_cert)
                .env("SPIN_WORKER_TLS_KEY", &pki.server_key)
                .stderr(log(&format!("worker-{i}.log")));
            Guard(command.spawn().unwrap())
        })
        .collect();

    let spinctl = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spinctl"));
        without_spin_env(&mut command)
            .args(["--coordinator", &url])
            .args(args)
            .env("SPIN_TOKEN", TOKEN)
            .env("SPIN_TLS_CA", &pki.ca)
            .env("SPIN_TLS_CERT", &pki.client_cert)
            .env("SPIN_TLS_KEY", &pki.client_key);
        command
    };
    let spec = dir.join("job.toml");
    std::fs::write(&spec, common::spin_spec(data, base, &dir.join("unused"))).unwrap();
    let out = run_with_timeout(
        spinctl(&["submit", &spec.display().to_string()]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let out = run_with_timeout(
        spinctl(&["logs", &job, "--follow"]),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.to_lowercase().contains("done"),
        "logs --follow: {:?}\n{text}\n{}\ncoordinator:\n{}\nworker 0:\n{}\nworker 1:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        read_log("coordinator.log"),
        read_log("worker-0.log"),
        read_log("worker-1.log"),
    );
    // Both workers trained as ranks of a ring of two: the ring ran over TLS with the token.
    for i in 0..2 {
        let log = read_log(&format!("worker-{i}.log"));
        assert!(log.contains("world=2"), "worker {i}:\n{log}");
        assert!(log.contains("collective=https://"), "worker {i}:\n{log}");
    }
    drop(workers);
    drop(coordinator);
    let _ = std::fs::remove_dir_all(&dir);
}
