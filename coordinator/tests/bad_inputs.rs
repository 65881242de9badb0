//! Bad inputs to the coordinator: settings files and environment overrides, and malformed RPC
//! fields sent through tonic clients to a real coordinator on a port-0 listener. Every refusal
//! names the field; a refused submission leaves no job behind. The table in
//! `docs/bad-inputs.md` points at these tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use spin_common::proto::v1::{
    self, control_service_client::ControlServiceClient, job_service_client::JobServiceClient,
    worker_message,
};
use spin_coordinator::CoordinatorConfig;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

const MINIMAL: &str =
    "[model]\nbase = \"base\"\n[data]\ntrain = [\"data\"]\n[[iteration]]\nlr = 2e-5\nsteps = 50\n";

/// Every await of these tests goes through this.
async fn t<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("timed out")
}

/// A fresh folder under the system temp dir, unique per process and call, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spin-coord-bad-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_names(err: &str, things: &[&str]) {
    eprintln!("{err}");
    for thing in things {
        assert!(err.contains(thing), "{thing:?} not named in: {err}");
    }
}

fn config_error(text: Option<&str>, env: &[(&str, &str)]) -> String {
    let scratch = Scratch::new("config");
    let path = scratch.path().join("coordinator.toml");
    if let Some(text) = text {
        std::fs::write(&path, text).unwrap();
    }
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    CoordinatorConfig::load(Some(&path), &env)
        .expect_err("the settings should be refused")
        .to_string()
}

#[test]
fn config_value_of_the_wrong_type_names_the_key_and_file() {
    let err = config_error(Some("heartbeat_timeout_ms = \"soon\"\n"), &[]);
    assert_names(
        &err,
        &["coordinator.toml", "heartbeat_timeout_ms", "\"soon\""],
    );
}

#[test]
fn config_file_that_does_not_exist_is_named() {
    let err = config_error(None, &[]);
    assert_names(&err, &["coordinator config", "coordinator.toml"]);
}

#[test]
fn config_environment_override_out_of_range_names_the_field() {
    let err = config_error(Some(""), &[("SPIN_COORDINATOR__MIN_WORKERS", "0")]);
    assert_names(&err, &["min_workers", "at least 1"]);
}

#[test]
fn config_environment_override_with_an_unknown_field_is_named() {
    let err = config_error(Some(""), &[("SPIN_COORDINATOR__HEARTBEAT_TIMOUT_MS", "5")]);
    assert_names(&err, &["heartbeat_timout_ms", "unknown field"]);
}

/// A coordinator on a port-0 listener with its own journal, stopped on drop.
struct Sandbox {
    addr: SocketAddr,
    _dir: Scratch,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), spin_coordinator::CoordinatorError>>>,
}

impl Sandbox {
    async fn start(name: &str) -> Self {
        let dir = Scratch::new(name);
        let config = CoordinatorConfig {
            journal_path: dir.path().join("journal.redb"),
            store: dir.path().join("store").display().to_string(),
            heartbeat_timeout: Duration::from_millis(600),
            tick_interval: Duration::from_millis(50),
            ..CoordinatorConfig::default()
        };
        let listener = t(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(spin_coordinator::run(config, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            _dir: dir,
            stop: Some(stop),
            server: Some(server),
        }
    }

    async fn channel(&self) -> Channel {
        t(Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect())
        .await
        .unwrap()
    }

    async fn jobs(&self) -> JobServiceClient<Channel> {
        JobServiceClient::new(self.channel().await)
    }

    async fn control(&self) -> ControlServiceClient<Channel> {
        ControlServiceClient::new(self.channel().await)
    }

    /// The ids of every job the coordinator holds.
    async fn job_ids(&self) -> Vec<String> {
        t(self.jobs().await.list_jobs(v1::ListJobsRequest {}))
            .await
            .unwrap()
            .into_inner()
            .jobs
            .into_iter()
            .map(|j| j.job_id)
            .collect()
    }

    /// Stops the server and waits for it to end cleanly.
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        t(self.server.take().unwrap()).await.unwrap().unwrap();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn assert_status(status: &Status, code: Code, things: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_names(status.message(), things);
}

async fn submit(sandbox: &Sandbox, spec: String) -> Status {
    t(sandbox
        .jobs()
        .await
        .submit_job(v1::SubmitJobRequest { spec_toml: spec }))
    .await
    .expect_err("the submission should be refused")
}

#[tokio::test]
async fn refused_submissions_name_the_field_and_leave_no_job() {
    let sandbox = Sandbox::start("submit").await;
    let field = "SubmitJobRequest.spec_toml";

    let err = submit(&sandbox, String::new()).await;
    assert_status(&err, Code::InvalidArgument, &[field, "is empty"]);

    let err = submit(&sandbox, " \n\t\n".into()).await;
    assert_status(&err, Code::InvalidArgument, &[field, "is empty"]);

    // 2 MiB: under tonic's 4 MiB message limit, over the spec limit.
    let huge = format!("{MINIMAL}# {}\n", "x".repeat(2 << 20));
    let err = submit(&sandbox, huge).await;
    assert_status(
        &err,
        Code::InvalidArgument,
        &[field, "over the 1048576-byte limit"],
    );
    assert!(err.message().len() < 200, "the spec is not echoed back");

    let long_name = format!("[job]\nname = \"{}\"\n{MINIMAL}", "n".repeat(100_000));
    let err = submit(&sandbox, long_name).await;
    assert_status(
        &err,
        Code::InvalidArgument,
        &[field, "job.name", "1 to 200"],
    );
    assert!(err.message().len() < 300, "the name is not echoed back");

    let err = submit(
        &sandbox,
        format!("{MINIMAL}[training]\nobjective = \"spinn\"\n"),
    )
    .await;
    assert_status(
        &err,
        Code::InvalidArgument,
        &[field, "spinn", "training.objective"],
    );

    assert!(sandbox.job_ids().await.is_empty(), "no job was recorded");
    sandbox.shutdown().await;
}

#[tokio::test]
async fn job_ids_that_are_empty_or_malformed_name_the_field() {
    let sandbox = Sandbox::start("ids").await;
    let mut jobs = sandbox.jobs().await;

    let err = t(jobs.watch_job(v1::WatchJobRequest {
        job_id: String::new(),
        from_sequence: 0,
    }))
    .await
    .unwrap_err();
    assert_status(
        &err,
        Code::InvalidArgument,
        &["WatchJobRequest.job_id", "is empty"],
    );

    let err = t(jobs.watch_job(v1::WatchJobRequest {
        job_id: "job-1".into(),
        from_sequence: 0,
    }))
    .await
    .unwrap_err();
    assert_status(
        &err,
        Code::InvalidArgument,
        &["WatchJobRequest.job_id", "job-1"],
    );

    let err = t(jobs.cancel_job(v1::CancelJobRequest {
        job_id: "  ".into(),
    }))
    .await
    .unwrap_err();
    assert_status(
        &err,
        Code::InvalidArgument,
        &["CancelJobRequest.job_id", "is empty"],
    );

    // A well-formed id nobody submitted.
    let unknown = spin_common::ids::JobId::new().to_string();
    let err = t(jobs.watch_job(v1::WatchJobRequest {
        job_id: unknown.clone(),
        from_sequence: 0,
    }))
    .await
    .unwrap_err();
    assert_status(&err, Code::NotFound, &[&unknown, "not known"]);

    // 4 KiB and 64 KiB ids: refused as malformed, naming the field, with a short message
    // (a message echoing the whole value would outgrow the client's header limit).
    for len in [4 << 10, 64 << 10] {
        let err = t(jobs.get_job(v1::GetJobRequest {
            job_id: "7".repeat(len),
        }))
        .await
        .unwrap_err();
        assert_status(&err, Code::InvalidArgument, &["GetJobRequest.job_id"]);
        assert!(err.message().len() < 4096, "{len}: {}", err.message().len());
    }
    // A spec with a 64 KiB unknown key: refused naming the field, not a dropped connection.
    let key = "k".repeat(64 << 10);
    let err = submit(&sandbox, format!("[training]\n{key} = 1\n")).await;
    assert_status(&err, Code::InvalidArgument, &["SubmitJobRequest.spec_toml"]);

    sandbox.shutdown().await;
}

fn hello(worker_id: &str) -> v1::WorkerMessage {
    v1::WorkerMessage {
        message: Some(worker_message::Message::Hello(v1::Hello {
            worker_id: worker_id.into(),
        })),
    }
}

/// Opens a session whose first messages are `first`; the refusal it gets.
async fn session_refusal(sandbox: &Sandbox, first: Vec<v1::WorkerMessage>) -> Status {
    let (up, rx) = mpsc::channel(8);
    for message in first {
        t(up.send(message)).await.unwrap();
    }
    drop(up);
    let mut control = sandbox.control().await;
    match t(control.session(ReceiverStream::new(rx))).await {
        Err(status) => status,
        Ok(response) => {
            let mut down = response.into_inner();
            match t(down.message()).await {
                Err(status) => status,
                Ok(message) => panic!("the session was accepted: {message:?}"),
            }
        }
    }
}

#[tokio::test]
async fn worker_registrations_and_sessions_refuse_bad_fields() {
    let sandbox = Sandbox::start("control").await;
    let mut control = sandbox.control().await;

    let err = t(control.register_worker(v1::RegisterWorkerRequest {
        collective_address: " ".into(),
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_status(
        &err,
        Code::InvalidArgument,
        &["RegisterWorkerRequest.collective_address", "is empty"],
    );

    for address in ["not an address".to_string(), "h".repeat(1 << 20) + ":1"] {
        let err = t(control.register_worker(v1::RegisterWorkerRequest {
            collective_address: address,
            ..Default::default()
        }))
        .await
        .unwrap_err();
        assert_status(
            &err,
            Code::InvalidArgument,
            &["RegisterWorkerRequest.collective_address"],
        );
    }

    let heartbeat = v1::WorkerMessage {
        message: Some(worker_message::Message::Heartbeat(v1::Heartbeat {
            sent_at_ms: 0,
        })),
    };
    let err = session_refusal(&sandbox, vec![heartbeat]).await;
    assert_status(
        &err,
        Code::FailedPrecondition,
        &["first message", "`hello`"],
    );

    let err = session_refusal(&sandbox, vec![]).await;
    assert_status(&err, Code::FailedPrecondition, &["ended before `hello`"]);

    let err = session_refusal(&sandbox, vec![hello("")]).await;
    assert_status(
        &err,
        Code::InvalidArgument,
        &["Hello.worker_id", "is empty"],
    );

    let err = session_refusal(&sandbox, vec![hello("worker-7")]).await;
    assert_status(
        &err,
        Code::InvalidArgument,
        &["Hello.worker_id", "worker-7"],
    );

    let stranger = spin_common::ids::WorkerId::new().to_string();
    let err = session_refusal(&sandbox, vec![hello(&stranger)]).await;
    assert_status(&err, Code::NotFound, &[&stranger, "not registered"]);
    sandbox.shutdown().await;
}
