//! Multi-host chaos (issue 15): a `spin-coordinator` and three `spin-worker`s, each in its own
//! network namespace made by the test (its own address, a veth pair to a bridge; see
//! `common::netns`), with a join token, a 3 s heartbeat timeout and a 30 s ring timeout, as the
//! issue's tester ran them. A partition drops every packet of a host both ways without a
//! reset. One job per fault:
//! - a worker cut off for 12 s, shorter than the ring timeout;
//! - a worker cut off for 35 s, longer than the ring timeout, then back (a stale worker);
//! - the coordinator cut off from every worker for 5 s longer than the heartbeat timeout;
//! - a rogue client holding the join token that registers and heartbeats but never works,
//!   present when the job is submitted.
//!
//! Every job completes, and its final UNet is within 1e-5 relative L2 of the same job run
//! without faults in this process. After a worker's partition training goes on within a bound
//! tied to the heartbeat timeout (well under the ring timeout and the partition itself); the
//! rogue is dropped within one task deadline of its task. Where namespaces cannot be made (not
//! root, no `ip`) each test prints `SKIPPED: <reason>` and passes.

#![allow(clippy::unwrap_used)]
#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::netns::{Net, Settings};
use common::process::{self, Guard};
use common::Shape;
use spin_common::auth::{Bearer, Token};
use spin_common::proto::v1::{
    self, control_service_client::ControlServiceClient, coordinator_message::Message as Down,
    job_event::Event, worker_message::Message as Up,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
const WORKERS: usize = 3;
const JOIN_TOKEN: &str = "multihost-join-token-15";
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
const RING_TIMEOUT_S: u64 = 30;
/// A shard task's deadline: several times an honest shard's time between progress reports
/// here (a sampling batch of 2 prompts; a whole 8-prompt shard took 7 to 12 s with three
/// workers on 2 busy cores, which a 10 s deadline did not survive).
const TASK_DEADLINE: Duration = Duration::from_secs(15);
/// How long after a worker is cut off training may take to go on: the heartbeat timeout, the
/// coordinator's tick, the abort and re-forming of the ring and the redo of the interrupted
/// step on a loaded 2-core machine. Below the 12 s partition and far below the ring timeout,
/// so a ring that waits for either fails the test.
const RESUME_BOUND: Duration = Duration::from_secs(HEARTBEAT_TIMEOUT.as_secs() + 7);
/// The longest a job of these tests may take.
const JOB_LIMIT: Duration = Duration::from_secs(300);

fn settings(min_workers: usize) -> Settings {
    Settings {
        join_token: JOIN_TOKEN,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        task_deadline: TASK_DEADLINE,
        ring_timeout_s: RING_TIMEOUT_S,
        min_workers,
    }
}

/// One iteration of 36 steps (45 to 65 s on 2 cores: training outlasts the 35 s partition and
/// the worker's return), 3 micro-batches shared out over the ring, a checkpoint every 2 steps.
fn shape() -> Shape {
    Shape {
        iterations: 1,
        steps: 36,
        batch: 1,
        accumulation: 3,
        checkpoint_every: 2,
        // The paper's learning rate (see chaos.rs on why the tolerance scales with it).
        lr: 2e-5,
    }
}

/// The job every test submits and its final UNet run without faults, made once per binary.
fn reference() -> &'static (String, PathBuf) {
    static REFERENCE: OnceLock<(String, PathBuf)> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let (data, base) = common::toy_inputs();
        let dir = common::temp_dir("multihost-reference");
        let spec_text = common::spec(data, base, &dir.join("reference"), &shape());
        // Sampling batches of 2 prompts: a shard reports progress every batch, well within
        // the task deadline, while a shard in one batch of 8 takes about as long as it.
        let one_batch = "batch_size = 8\nshard_size = 8";
        assert!(spec_text.contains(one_batch), "{spec_text}");
        let spec_text = spec_text.replace(one_batch, "batch_size = 2\nshard_size = 8");
        let started = Instant::now();
        common::run_reference(&dir, &spec_text);
        eprintln!("reference run: {:.1} s", started.elapsed().as_secs_f64());
        let last = format!("iteration-{}", shape().iterations);
        (spec_text, dir.join("reference").join(last).join(UNET))
    })
}

/// The namespaces and the daemons in them. Fields drop in order: the processes go before
/// their namespaces.
struct Cluster {
    workers: Vec<Guard>,
    _coordinator: Guard,
    net: Net,
    dir: PathBuf,
    started: Instant,
    runtime: tokio::runtime::Runtime,
}

impl Cluster {
    /// Makes the namespaces of test `test` and starts the coordinator in its own; None (after
    /// saying why on stderr) where namespaces cannot be made.
    fn start(test: u8, name: &str, min_workers: usize) -> Option<Self> {
        let net = match Net::create(test, WORKERS) {
            Ok(net) => net,
            Err(reason) => {
                eprintln!("SKIPPED: {name}: cannot make network namespaces here: {reason}");
                return None;
            }
        };
        eprintln!("{name}: partitions cut with {:?}", net.cut_kind);
        // The reference first: the daemons must not share the 2 cores with it.
        reference();
        let dir = common::temp_dir(&format!("multihost-{name}"));
        let coordinator = net.start_coordinator(&dir, &settings(min_workers));
        Some(Self {
            workers: Vec::new(),
            _coordinator: coordinator,
            net,
            dir,
            started: Instant::now(),
            runtime: tokio::runtime::Runtime::new().unwrap(),
        })
    }

    fn start_workers(&mut self) {
        for i in 0..WORKERS {
            let worker = self.net.start_worker(i, &self.dir, &settings(WORKERS));
            self.workers.push(worker);
        }
    }

    fn logs(&self) -> String {
        process::cluster_logs(&self.dir, WORKERS)
    }

    fn submit(&self) -> String {
        let url = self.net.management_url();
        process::submit(&self.runtime, &url, &reference().0)
    }

    /// Seconds since the cluster started, for the event log.
    fn at(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Watches `job` until it ends ("done", "failed: ..." or "cancelled"), calling `on` with
    /// each event as it arrives and with None every 100 ms (for faults on a timer).
    fn drive(&self, job: &str, mut on: impl FnMut(Option<&Event>)) -> String {
        let url = self.net.management_url();
        let job = job.to_string();
        self.runtime.block_on(async {
            let (tx, mut rx) = mpsc::channel(256);
            let watcher = tokio::spawn(async move {
                let mut stream = process::watch(&url, &job).await;
                loop {
                    let message = stream.message().await;
                    let end = !matches!(message, Ok(Some(_)));
                    if tx.send(message).await.is_err() || end {
                        return;
                    }
                }
            });
            let deadline = tokio::time::Instant::now() + JOB_LIMIT;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let outcome = loop {
                let message = tokio::select! {
                    m = rx.recv() => m,
                    _ = tick.tick() => {
                        on(None);
                        continue;
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        break format!("not finished within {JOB_LIMIT:?}");
                    }
                };
                let event = match message {
                    Some(Ok(Some(event))) => event,
                    Some(Ok(None)) | None => break "the event stream ended".to_string(),
                    Some(Err(status)) => break format!("the event stream broke: {status}"),
                };
                let Some(event) = event.event else { continue };
                self.log_event(&event);
                on(Some(&event));
                match event {
                    Event::Done(_) => break "done".to_string(),
                    Event::Failed(f) => break format!("failed: {}", f.error),
                    Event::Cancelled(_) => break "cancelled".to_string(),
                    _ => {}
                }
            };
            watcher.abort();
            outcome
        })
    }

    fn log_event(&self, event: &Event) {
        let at = self.at();
        match event {
            Event::PhaseChanged(p) => eprintln!("{at:6.1} s phase {:?} -> {:?}", p.from, p.to),
            Event::Step(m) => eprintln!(
                "{at:6.1} s step {}/{} of iteration {} ({:.2} s)",
                m.step, m.steps, m.iteration, m.step_time_s
            ),
            Event::WorkerJoined(j) => {
                eprintln!(
                    "{at:6.1} s worker {} joined, world {}",
                    j.worker_id, j.world
                )
            }
            Event::WorkerLost(l) => eprintln!(
                "{at:6.1} s worker {} lost, world {}: {}",
                l.worker_id, l.world, l.reason
            ),
            Event::Warning(w) => eprintln!("{at:6.1} s warning: {}", w.message),
            _ => {}
        }
    }

    /// Reports the store writes refused to fenced-off workers (a stale worker's late
    /// checkpoint or shard), then asserts the job's final UNet equals the fault-free reference
    /// within 1e-5.
    fn finish(&self, job: &str) {
        let refused: Vec<String> = (0..WORKERS)
            .flat_map(|i| {
                let log = process::read_log(&self.dir, &format!("worker-{i}.log"));
                log.lines()
                    .filter(|l| l.contains("fenced write refused"))
                    .map(|l| format!("worker {i}: {}", l.chars().take(300).collect::<String>()))
                    .collect::<Vec<_>>()
            })
            .collect();
        eprintln!(
            "{} store writes refused to fenced-off workers",
            refused.len()
        );
        for line in &refused {
            eprintln!("  {line}");
        }
        let last = format!("iteration-{}", shape().iterations);
        let ours = self.dir.join("store/jobs").join(job).join(last).join(UNET);
        assert!(
            ours.is_file(),
            "{} is missing\n{}",
            ours.display(),
            self.logs()
        );
        let rel = common::relative_l2(&ours, &reference().1);
        eprintln!("relative L2 to the fault-free run: {rel:e}");
        assert!(rel <= 1e-5, "relative L2 {rel:e}\n{}", self.logs());
    }
}

/// The worker ids worker `i` registered under so far (one per session), from its log.
fn worker_ids(dir: &Path, i: usize) -> Vec<String> {
    process::read_log(dir, &format!("worker-{i}.log"))
        .lines()
        .filter(|line| line.contains("session open"))
        .filter_map(|line| field(line, "worker"))
        .collect()
}

/// The value of `name=value` in a log line.
fn field(line: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=");
    let start = line.find(&key)? + key.len();
    let value = line[start..].split_whitespace().next()?;
    Some(value.to_string())
}

/// Which worker holds `rank` (of `world`) in the ring each worker most recently joined,
/// from the workers' logs.
fn worker_with_rank(dir: &Path, rank: impl Fn(u64) -> u64) -> Option<usize> {
    (0..WORKERS).find(|&i| {
        let log = process::read_log(dir, &format!("worker-{i}.log"));
        let Some(line) = log.lines().rev().find(|l| l.contains(": training ")) else {
            return false;
        };
        let number = |name| field(line, name).and_then(|v| v.parse::<u64>().ok());
        matches!((number("rank"), number("world")), (Some(r), Some(w)) if r == rank(w))
    })
}

/// Cuts worker `rank`'s host off once training is under way, for `cut_for`, then lets it
/// back; asserts the survivors go on within RESUME_BOUND of the cut and the job ends with the
/// reference weights.
fn partition_a_worker(test: u8, name: &str, cut_for: Duration, rank: fn(u64) -> u64) {
    let Some(mut cluster) = Cluster::start(test, name, WORKERS) else {
        return;
    };
    cluster.start_workers();
    let job = cluster.submit();
    let dir = cluster.dir.clone();
    let mut cut: Option<(usize, Instant)> = None;
    let mut healed = false;
    let mut back: Option<v1::WorkerJoined> = None;
    let mut lost: Option<(Duration, v1::WorkerLost)> = None;
    let mut resumed: Option<Duration> = None;
    let mut before_cut: Vec<f64> = Vec::new();
    let outcome = cluster.drive(&job, |event| match (event, cut) {
        (Some(Event::Step(m)), None) => {
            before_cut.push(m.step_time_s);
            if m.step >= 1 {
                let victim = worker_with_rank(&dir, rank).unwrap_or_else(|| {
                    eprintln!("no worker log names the rank: cutting worker 0");
                    0
                });
                cluster.net.cut(&cluster.net.workers[victim]);
                cut = Some((victim, Instant::now()));
                eprintln!("{:6.1} s worker {victim} cut off", cluster.at());
            }
        }
        (Some(Event::Step(_)), Some((_, at))) if lost.is_some() && resumed.is_none() => {
            resumed = Some(at.elapsed());
        }
        (Some(Event::WorkerLost(l)), Some((_, at))) if lost.is_none() => {
            lost = Some((at.elapsed(), l.clone()));
        }
        (Some(Event::WorkerJoined(j)), Some(_)) if healed && back.is_none() => {
            back = Some(j.clone());
        }
        (None, Some((victim, at))) if !healed && at.elapsed() >= cut_for => {
            cluster.net.heal(&cluster.net.workers[victim]);
            healed = true;
            eprintln!("{:6.1} s worker {victim} back", cluster.at());
        }
        _ => {}
    });
    let logs = || cluster.logs();
    assert_eq!(outcome, "done", "{}", logs());
    let (victim, _) = cut.expect("the job never trained");
    eprintln!(
        "{name}: worker {victim} cut for {cut_for:?}; steps before took {before_cut:?} s; \
         lost after {:?}, training went on after {resumed:?} (bound {RESUME_BOUND:?}, \
         heartbeat timeout {HEARTBEAT_TIMEOUT:?}, ring timeout {RING_TIMEOUT_S} s)",
        lost.as_ref().map(|l| l.0),
    );
    let (_, lost) = lost.unwrap_or_else(|| panic!("no worker was lost\n{}", logs()));
    let victim_ids = worker_ids(&dir, victim);
    assert!(
        victim_ids.contains(&lost.worker_id),
        "worker {} was lost, not the cut-off worker {victim} ({victim_ids:?})\n{}",
        lost.worker_id,
        logs()
    );
    // The stale worker came back (under a new id) while the job still ran.
    let back = back.unwrap_or_else(|| panic!("worker {victim} never came back\n{}", logs()));
    assert!(
        victim_ids.contains(&back.worker_id) && back.worker_id != lost.worker_id,
        "{} joined after the partition, not worker {victim} again ({victim_ids:?})\n{}",
        back.worker_id,
        logs()
    );
    let resumed =
        resumed.unwrap_or_else(|| panic!("no step after the worker was lost\n{}", logs()));
    assert!(
        resumed <= RESUME_BOUND,
        "training went on {resumed:?} after the partition, over {RESUME_BOUND:?}: the \
         survivors waited for the ring or the partition\n{}",
        logs()
    );
    cluster.finish(&job);
}

#[test]
fn a_worker_cut_off_for_less_than_the_ring_timeout() {
    // Rank 0 writes the checkpoints: the stale worker published one after its drop.
    partition_a_worker(0, "short", Duration::from_secs(12), |_| 0);
}

#[test]
fn a_worker_cut_off_for_longer_than_the_ring_timeout_comes_back() {
    partition_a_worker(1, "long", Duration::from_secs(35), |world| world - 1);
}

#[test]
fn the_coordinator_cut_off_from_every_worker() {
    let Some(mut cluster) = Cluster::start(2, "coordinator", WORKERS) else {
        return;
    };
    cluster.start_workers();
    let job = cluster.submit();
    let cut_for = HEARTBEAT_TIMEOUT + Duration::from_secs(5);
    let mut cut: Option<Instant> = None;
    let mut healed: Option<Instant> = None;
    let mut lost: Vec<String> = Vec::new();
    let mut resumed: Option<Duration> = None;
    let outcome = cluster.drive(&job, |event| match (event, cut) {
        (Some(Event::Step(m)), None) if m.step >= 1 => {
            cluster.net.cut(cluster.net.coordinator_host());
            cut = Some(Instant::now());
            eprintln!("{:6.1} s coordinator cut off", cluster.at());
        }
        (Some(Event::WorkerLost(l)), Some(_)) if healed.is_none() => {
            lost.push(l.worker_id.clone());
        }
        (Some(Event::Step(_)), Some(_)) if resumed.is_none() => {
            if let Some(at) = healed {
                resumed = Some(at.elapsed());
            }
        }
        (None, Some(at)) if healed.is_none() && at.elapsed() >= cut_for => {
            cluster.net.heal(cluster.net.coordinator_host());
            healed = Some(Instant::now());
            eprintln!("{:6.1} s coordinator back", cluster.at());
        }
        _ => {}
    });
    let logs = || cluster.logs();
    assert_eq!(outcome, "done", "{}", logs());
    eprintln!(
        "coordinator cut for {cut_for:?}: {} workers lost during the cut; first step {resumed:?} \
         after it was healed",
        lost.len()
    );
    assert!(cut.is_some(), "the job never trained");
    // None of them could heartbeat for longer than the heartbeat timeout.
    for i in 0..WORKERS {
        let ids = worker_ids(&cluster.dir, i);
        assert!(
            lost.iter().any(|l| ids.contains(l)),
            "worker {i} ({ids:?}) was not lost while the coordinator was cut off (lost: \
             {lost:?})\n{}",
            logs()
        );
    }
    assert!(
        resumed.is_some(),
        "no step after the coordinator came back\n{}",
        logs()
    );
    cluster.finish(&job);
}

/// A client holding the join token that registers, opens its session and heartbeats, and
/// answers no task. Its collective port accepts connections and never reads them.
struct Rogue {
    id: String,
    /// Every task it was sent, and when.
    tasks: Arc<Mutex<Vec<(Instant, v1::Task)>>>,
    _collective: std::net::TcpListener,
    session: tokio::task::JoinHandle<()>,
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.session.abort();
    }
}

impl Rogue {
    async fn join(url: &str, collective: std::net::TcpListener) -> Self {
        let limit = Duration::from_secs(20);
        let address = collective.local_addr().unwrap().to_string();
        let channel = tokio::time::timeout(
            limit,
            tonic::transport::Channel::from_shared(url.to_string())
                .unwrap()
                .connect(),
        )
        .await
        .expect("connecting timed out")
        .unwrap();
        let bearer = Bearer::new("join token", &Token::from(JOIN_TOKEN)).unwrap();
        let mut control = ControlServiceClient::with_interceptor(channel, bearer);
        let registered = tokio::time::timeout(
            limit,
            control.register_worker(v1::RegisterWorkerRequest {
                join_token: JOIN_TOKEN.to_string(),
                collective_address: address,
                device: Some(v1::DeviceInfo {
                    backend: "flex".into(),
                    name: "rogue".into(),
                    memory_bytes: 0,
                }),
            }),
        )
        .await
        .expect("registering timed out")
        .unwrap()
        .into_inner();
        let id = registered.worker_id.clone();
        let message = |m| v1::WorkerMessage { message: Some(m) };
        let (up, rx) = mpsc::channel(64);
        up.send(message(Up::Hello(v1::Hello {
            worker_id: id.clone(),
        })))
        .await
        .unwrap();
        let mut down = tokio::time::timeout(limit, control.session(ReceiverStream::new(rx)))
            .await
            .expect("opening the session timed out")
            .unwrap()
            .into_inner();
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let log = tasks.clone();
        let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms));
        let session = tokio::spawn(async move {
            let mut beat = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    m = down.message() => match m {
                        Ok(Some(v1::CoordinatorMessage { message: Some(Down::Task(task)) })) => {
                            log.lock().unwrap().push((Instant::now(), task));
                        }
                        Ok(Some(_)) => {}
                        // Dropped: a rogue that does not come back.
                        Ok(None) | Err(_) => return,
                    },
                    _ = beat.tick() => {
                        let heartbeat = Up::Heartbeat(v1::Heartbeat { sent_at_ms: 0 });
                        if up.send(message(heartbeat)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            id,
            tasks,
            _collective: collective,
            session,
        }
    }
}

/// Waits until worker `i`'s log says its session is open.
fn wait_for_session(dir: &Path, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker_ids(dir, i).is_empty() {
        assert!(
            Instant::now() < deadline,
            "worker {i} never opened a session\n{}",
            process::cluster_logs(dir, WORKERS)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_rogue_registered_client_that_never_works() {
    let Some(mut cluster) = Cluster::start(3, "rogue", WORKERS) else {
        return;
    };
    // The rogue's collective port, on the bridge where the workers can dial it: connections
    // are accepted by the kernel and never read.
    let collective = std::net::TcpListener::bind(cluster.net.root_address(0)).unwrap();
    let url = cluster.net.management_url();
    let rogue = cluster.runtime.block_on(Rogue::join(&url, collective));
    eprintln!("rogue registered as {}", rogue.id);
    cluster.start_workers();
    for i in 0..WORKERS {
        wait_for_session(&cluster.dir, i);
    }
    let job = cluster.submit();
    let mut lost: Option<(Instant, v1::WorkerLost)> = None;
    let outcome = cluster.drive(&job, |event| {
        if let Some(Event::WorkerLost(l)) = event {
            if l.worker_id == rogue.id && lost.is_none() {
                lost = Some((Instant::now(), l.clone()));
            }
        }
    });
    let logs = || cluster.logs();
    assert_eq!(outcome, "done", "{}", logs());
    let tasks = rogue.tasks.lock().unwrap().clone();
    let kinds: Vec<String> = tasks
        .iter()
        .map(|(_, t)| format!("{:?}", t.kind).chars().take(60).collect())
        .collect();
    eprintln!("the rogue was sent {} tasks: {kinds:?}", tasks.len());
    let (first, _) = tasks
        .first()
        .unwrap_or_else(|| panic!("the rogue was never given a task\n{}", logs()));
    let (lost_at, lost) = lost.unwrap_or_else(|| panic!("the rogue was never dropped\n{}", logs()));
    let held = lost_at.duration_since(*first);
    eprintln!(
        "the rogue held its task {held:?} (task deadline {TASK_DEADLINE:?}): {}",
        lost.reason
    );
    assert!(
        lost.reason.contains("deadline"),
        "the rogue was dropped for another reason: {}\n{}",
        lost.reason,
        logs()
    );
    // The deadline, the coordinator's tick and the event's way to this process.
    assert!(
        held <= TASK_DEADLINE + Duration::from_secs(3),
        "the rogue held its task {held:?}, over the task deadline {TASK_DEADLINE:?}\n{}",
        logs()
    );
    cluster.finish(&job);
}
