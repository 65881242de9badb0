//! The coordinator served in-process on a port-0 listener and driven through tonic clients:
//! health, job submission and validation, watching and cancelling, worker sessions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use spin_common::proto::v1::{
    self, control_service_client::ControlServiceClient, coordinator_message, job_event::Event,
    job_service_client::JobServiceClient, worker_message,
};
use spin_coordinator::CoordinatorConfig;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

const MINIMAL: &str = "[job]\nname = \"toy\"\n[model]\nbase = \"base\"\n[data]\ntrain = [\"data\"]\n[[iteration]]\nlr = 2e-5\nsteps = 50\n";

/// Every await of these tests goes through this.
async fn t<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("timed out")
}

/// A coordinator on a port-0 listener with its own journal, stopped on drop.
struct Sandbox {
    addr: SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), spin_coordinator::CoordinatorError>>>,
}

impl Sandbox {
    async fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "spin-coord-it-{}-{name}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = CoordinatorConfig {
            journal_path: dir.join("journal.redb"),
            store: dir.join("store").display().to_string(),
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
            dir,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// A spec whose dataset exists (a job that starts needs one): toy rows in the sandbox.
    fn runnable_spec(&self) -> String {
        let data = self.dir.join("data");
        spin_common::toy::write_toy_dataset(&data, 8, 1).unwrap();
        MINIMAL.replace("\"data\"", &format!("\"{}\"", data.display()))
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn submit(jobs: &mut JobServiceClient<Channel>, spec: &str) -> String {
    t(jobs.submit_job(v1::SubmitJobRequest {
        spec_toml: spec.into(),
    }))
    .await
    .unwrap()
    .into_inner()
    .job_id
}

fn phase_kind(status: &v1::JobStatus) -> v1::PhaseKind {
    v1::PhaseKind::try_from(status.phase.unwrap().kind).unwrap()
}

#[tokio::test]
async fn health_reports_serving_and_shutdown_is_clean() {
    let sandbox = Sandbox::start("health").await;
    let mut health = HealthClient::new(sandbox.channel().await);
    for service in ["", "spin.v1.JobService", "spin.v1.ControlService"] {
        let status = t(health.check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    sandbox.shutdown().await;
}

#[tokio::test]
async fn submitted_jobs_are_got_and_listed_newest_first() {
    let sandbox = Sandbox::start("submit").await;
    let mut jobs = sandbox.jobs().await;
    let first = submit(&mut jobs, MINIMAL).await;
    let second = submit(&mut jobs, &MINIMAL.replace("toy", "other")).await;
    let status = t(jobs.get_job(v1::GetJobRequest {
        job_id: first.clone(),
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        (status.job_id.as_str(), status.name.as_str()),
        (first.as_str(), "toy")
    );
    assert_eq!(phase_kind(&status), v1::PhaseKind::Pending);
    assert_eq!((status.iterations, status.workers), (1, 0));
    let listed = t(jobs.list_jobs(v1::ListJobsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let ids: Vec<&str> = listed.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(ids, [second.as_str(), first.as_str()]);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_invalid_arguments_naming_the_field() {
    let sandbox = Sandbox::start("invalid").await;
    let mut jobs = sandbox.jobs().await;
    let err = t(jobs.submit_job(v1::SubmitJobRequest {
        spec_toml: format!("{MINIMAL}[training]\nbatch_sise = 4\n"),
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("batch_sise"), "{}", err.message());

    let err = t(jobs.get_job(v1::GetJobRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("GetJobRequest.job_id"),
        "{}",
        err.message()
    );

    let err = t(jobs.cancel_job(v1::CancelJobRequest {
        job_id: "not-a-uuid".into(),
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("CancelJobRequest.job_id"),
        "{}",
        err.message()
    );

    let err = t(jobs.get_job(v1::GetJobRequest {
        job_id: spin_common::ids::JobId::new().to_string(),
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let err = t(sandbox
        .control()
        .await
        .register_worker(v1::RegisterWorkerRequest::default()))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("collective_address"),
        "{}",
        err.message()
    );
    sandbox.shutdown().await;
}

fn phase_change(event: &v1::JobEvent) -> Option<(Option<i32>, i32)> {
    match &event.event {
        Some(Event::PhaseChanged(p)) => Some((p.from.map(|f| f.kind), p.to.unwrap().kind)),
        _ => None,
    }
}

#[tokio::test]
async fn watchers_see_events_in_order_and_the_stream_ends_on_cancel() {
    use v1::PhaseKind as K;
    let sandbox = Sandbox::start("watch").await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, MINIMAL).await;
    let mut stream = t(jobs.watch_job(v1::WatchJobRequest {
        job_id: id.clone(),
        from_sequence: 0,
    }))
    .await
    .unwrap()
    .into_inner();
    let first = t(stream.message()).await.unwrap().unwrap();
    assert_eq!((first.job_id.as_str(), first.sequence), (id.as_str(), 0));
    assert_eq!(phase_change(&first), Some((None, K::Pending as i32)));

    let cancelled = t(jobs.cancel_job(v1::CancelJobRequest { job_id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.phase.unwrap().kind, K::Cancelled as i32);

    let change = t(stream.message()).await.unwrap().unwrap();
    assert_eq!(change.sequence, 1);
    assert_eq!(
        phase_change(&change),
        Some((Some(K::Pending as i32), K::Cancelled as i32))
    );
    let end = t(stream.message()).await.unwrap().unwrap();
    assert_eq!(end.sequence, 2);
    assert!(matches!(end.event, Some(Event::Cancelled(_))), "{end:?}");
    assert!(
        t(stream.message()).await.unwrap().is_none(),
        "stream should end"
    );

    // Cancelling again leaves it cancelled; a late watcher replays from its sequence and ends.
    let again = t(jobs.cancel_job(v1::CancelJobRequest { job_id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.phase.unwrap().kind, K::Cancelled as i32);
    let mut late = t(jobs.watch_job(v1::WatchJobRequest {
        job_id: id.clone(),
        from_sequence: 1,
    }))
    .await
    .unwrap()
    .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = t(late.message()).await.unwrap() {
        seen.push(event.sequence);
    }
    assert_eq!(seen, [1, 2]);
    sandbox.shutdown().await;
}

/// A registered worker with an open session.
struct Worker {
    id: String,
    up: mpsc::Sender<v1::WorkerMessage>,
    down: tonic::Streaming<v1::CoordinatorMessage>,
}

async fn join(control: &mut ControlServiceClient<Channel>) -> Worker {
    let registered = t(control.register_worker(v1::RegisterWorkerRequest {
        join_token: String::new(),
        collective_address: "127.0.0.1:9999".into(),
        device: Some(v1::DeviceInfo {
            backend: "flex".into(),
            name: "cpu".into(),
            memory_bytes: 0,
        }),
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(registered.heartbeat_interval_ms, 200);
    let (up, rx) = mpsc::channel(8);
    t(up.send(v1::WorkerMessage {
        message: Some(worker_message::Message::Hello(v1::Hello {
            worker_id: registered.worker_id.clone(),
        })),
    }))
    .await
    .unwrap();
    let down = t(control.session(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    Worker {
        id: registered.worker_id,
        up,
        down,
    }
}

fn heartbeat() -> v1::WorkerMessage {
    v1::WorkerMessage {
        message: Some(worker_message::Message::Heartbeat(v1::Heartbeat {
            sent_at_ms: 0,
        })),
    }
}

/// The next `WorkerLost` event of `stream`.
async fn next_lost(stream: &mut tonic::Streaming<v1::JobEvent>) -> v1::WorkerLost {
    loop {
        let event = t(stream.message()).await.unwrap().expect("stream ended");
        if let Some(Event::WorkerLost(lost)) = event.event {
            return lost;
        }
    }
}

#[tokio::test]
async fn heartbeats_keep_a_worker_and_a_dropped_session_loses_it() {
    let sandbox = Sandbox::start("session").await;
    let mut control = sandbox.control().await;
    let mut jobs = sandbox.jobs().await;
    let mut worker = join(&mut control).await;

    // A pending job is started once a worker is connected, and assigned to it.
    let job = submit(&mut jobs, &sandbox.runnable_spec()).await;
    let assigned = t(worker.down.message()).await.unwrap().unwrap();
    match assigned.message {
        Some(coordinator_message::Message::AssignJob(a)) => {
            assert_eq!(a.job_id, job);
            assert!(a.spec_toml.contains("toy"));
        }
        other => panic!("expected an assignment, got {other:?}"),
    }
    let mut events = t(jobs.watch_job(v1::WatchJobRequest {
        job_id: job.clone(),
        from_sequence: 0,
    }))
    .await
    .unwrap()
    .into_inner();

    // Three heartbeat timeouts of heartbeats: still a member.
    for _ in 0..9 {
        t(worker.up.send(heartbeat())).await.unwrap();
        t(tokio::time::sleep(Duration::from_millis(200))).await;
    }
    let status = t(jobs.get_job(v1::GetJobRequest {
        job_id: job.clone(),
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(phase_kind(&status), v1::PhaseKind::Preparing);
    assert_eq!(status.workers, 1);

    // Dropping the session loses the worker at once, long before a heartbeat timeout.
    drop(worker.up);
    drop(worker.down);
    let lost = next_lost(&mut events).await;
    assert_eq!(
        (lost.worker_id.as_str(), lost.world),
        (worker.id.as_str(), 0)
    );
    let status = t(jobs.get_job(v1::GetJobRequest { job_id: job }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.workers, 0);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_silent_worker_is_lost_and_its_session_ended() {
    let sandbox = Sandbox::start("silent").await;
    let mut control = sandbox.control().await;
    let mut jobs = sandbox.jobs().await;
    let job = submit(&mut jobs, &sandbox.runnable_spec()).await;
    let mut events = t(jobs.watch_job(v1::WatchJobRequest {
        job_id: job,
        from_sequence: 0,
    }))
    .await
    .unwrap()
    .into_inner();
    let mut worker = join(&mut control).await;
    let lost = next_lost(&mut events).await;
    assert_eq!(lost.worker_id, worker.id);
    assert_eq!(lost.reason, "missed heartbeats");
    // The coordinator ended the session from its side.
    while let Ok(Some(_)) = t(worker.down.message()).await {}
    sandbox.shutdown().await;
}
