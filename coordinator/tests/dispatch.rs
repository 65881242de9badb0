//! Task dispatch end to end: the coordinator served on a port-0 listener, fake workers (tokio
//! tasks speaking the real session protocol) that answer every task after a short delay as a
//! script says, and a toy dataset on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spin_common::dataset::JobPrompts;
use spin_common::proto::v1::{
    self, control_service_client::ControlServiceClient, coordinator_message::Message as Down,
    job_event::Event, job_service_client::JobServiceClient, task::Kind, task_result::Outcome,
    worker_message::Message as Up,
};
use spin_coordinator::service::job::parse_spec;
use spin_coordinator::CoordinatorConfig;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Every await of these tests goes through this.
async fn t<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("timed out")
}

/// Waits (under a timeout) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// A coordinator on a port-0 listener with its own journal, store and toy dataset.
struct Sandbox {
    addr: SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), spin_coordinator::CoordinatorError>>>,
}

impl Sandbox {
    async fn start(name: &str, min_workers: usize) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "spin-dispatch-it-{}-{name}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        spin_common::toy::write_toy_dataset(dir.join("data"), 40, 3).unwrap();
        let config = CoordinatorConfig {
            journal_path: dir.join("journal.redb"),
            store: dir.join("store").display().to_string(),
            heartbeat_timeout: Duration::from_millis(1500),
            tick_interval: Duration::from_millis(20),
            min_workers,
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

    async fn jobs(&self) -> JobServiceClient<Channel> {
        let channel = t(Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect())
        .await
        .unwrap();
        JobServiceClient::new(channel)
    }

    /// A job spec over the sandbox's toy dataset: 10 training prompts in shards of 3.
    fn spec(&self, objective: &str, steps: &[u64]) -> String {
        let mut spec = format!(
            "[job]\nname = \"dispatch\"\nseed = 7\n[model]\nbase = \"base\"\n[data]\n\
             train = [\"{}\"]\nheld_out_fraction = 0.2\nmax_prompts = 10\n[sampling]\n\
             shard_size = 3\n[training]\nobjective = \"{objective}\"\n",
            self.dir.join("data").display()
        );
        for s in steps {
            spec.push_str(&format!("[[iteration]]\nlr = 1e-5\nsteps = {s}\n"));
        }
        spec
    }

    /// The job's directory in the store, as workers must be told it.
    fn job_dir(&self, job: &str) -> PathBuf {
        self.dir.join("store").join("jobs").join(job)
    }

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

/// How a fake worker answers a task.
#[derive(Clone, Debug)]
enum Reply {
    /// Success after a short delay, with the outputs a real worker would name.
    Ok,
    /// Failure after `after`.
    Fail {
        error: &'static str,
        retryable: bool,
        completed: u64,
        after: Duration,
    },
    /// End the session without answering (the worker dies).
    Drop,
    /// Never answer (keeps heartbeating).
    Hang,
}

type Script = Arc<dyn Fn(&v1::Task) -> Reply + Send + Sync>;

fn always_ok() -> Script {
    Arc::new(|_| Reply::Ok)
}

/// A fake worker: registered, in session, answering tasks as its script says.
struct Fake {
    id: String,
    log: Arc<Mutex<Vec<Down>>>,
    main: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.main.abort();
    }
}

impl Fake {
    async fn join(sandbox: &Sandbox, name: &str, script: Script) -> Self {
        let channel = t(Channel::from_shared(format!("http://{}", sandbox.addr))
            .unwrap()
            .connect())
        .await
        .unwrap();
        let mut control = ControlServiceClient::new(channel);
        let registered = t(control.register_worker(v1::RegisterWorkerRequest {
            join_token: String::new(),
            collective_address: format!("{name}:7000"),
            device: None,
        }))
        .await
        .unwrap()
        .into_inner();
        let id = registered.worker_id.clone();
        let (up, rx) = mpsc::channel(64);
        t(up.send(message(Up::Hello(v1::Hello {
            worker_id: id.clone(),
        }))))
        .await
        .unwrap();
        let down = t(control.session(ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        let log = Arc::new(Mutex::new(Vec::new()));
        let interval = Duration::from_millis(u64::from(registered.heartbeat_interval_ms));
        let beats = up.clone();
        let heart = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let beat = message(Up::Heartbeat(v1::Heartbeat { sent_at_ms: 0 }));
                if beats.send(beat).await.is_err() {
                    return;
                }
            }
        });
        let main = tokio::spawn(run_fake(down, up, heart, log.clone(), script));
        Self { id, log, main }
    }

    fn tasks(&self) -> Vec<v1::Task> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                Down::Task(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    fn assignments(&self) -> Vec<v1::AssignJob> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                Down::AssignJob(a) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }

    fn cancels(&self) -> Vec<v1::CancelTasks> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|m| match m {
                Down::Cancel(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }
}

fn message(m: Up) -> v1::WorkerMessage {
    v1::WorkerMessage { message: Some(m) }
}

/// The fake's session loop: record every message, answer every task.
async fn run_fake(
    mut down: tonic::Streaming<v1::CoordinatorMessage>,
    up: mpsc::Sender<v1::WorkerMessage>,
    heart: tokio::task::JoinHandle<()>,
    log: Arc<Mutex<Vec<Down>>>,
    script: Script,
) {
    let mut prefix = String::new();
    while let Ok(Some(m)) = down.message().await {
        let Some(m) = m.message else { continue };
        log.lock().unwrap().push(m.clone());
        let task = match m {
            Down::AssignJob(a) => {
                prefix = a.store_prefix;
                continue;
            }
            Down::Task(task) => task,
            _ => continue,
        };
        let outcome = match script(&task) {
            Reply::Drop => break,
            Reply::Hang => continue,
            Reply::Fail {
                error,
                retryable,
                completed,
                after,
            } => {
                tokio::time::sleep(after).await;
                Outcome::Failed(v1::TaskFailed {
                    error: error.into(),
                    retryable,
                    completed_steps: completed,
                })
            }
            Reply::Ok => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Outcome::Succeeded(succeed(&task, &prefix, &up).await)
            }
        };
        let result = message(Up::Result(v1::TaskResult {
            task_id: task.task_id,
            outcome: Some(outcome),
        }));
        if up.send(result).await.is_err() {
            break;
        }
    }
    heart.abort();
}

/// What a real worker reports on success; rank 0 of a ring also sends step metrics.
async fn succeed(
    task: &v1::Task,
    prefix: &str,
    up: &mpsc::Sender<v1::WorkerMessage>,
) -> v1::TaskSucceeded {
    let mut done = v1::TaskSucceeded::default();
    match &task.kind {
        Some(Kind::Encode(e)) if e.held_out => {
            done.outputs = vec![format!("{prefix}/cache/latents/held-out.safetensors")];
            done.metrics = vec![v1::EvalMetrics {
                iteration: 0,
                held_out_loss: 0.9,
                mmd: 0.3,
                grid_path: format!("{prefix}/eval-0/grid.png"),
            }];
        }
        Some(Kind::Encode(e)) => {
            done.outputs = vec![format!("{prefix}/cache/latents/shard-{:05}", e.shard)];
        }
        Some(Kind::Sample(s)) => {
            done.outputs = vec![format!(
                "{prefix}/cache/opponents/iteration-{}/shard-{:05}",
                s.iteration, s.shard
            )];
        }
        Some(Kind::Train(steps)) => {
            if steps.rank == 0 {
                for step in steps.first_step..(steps.first_step + 2).min(steps.last_step + 1) {
                    let metrics = v1::StepMetrics {
                        iteration: steps.iteration,
                        step,
                        steps: steps.last_step + 1,
                        loss: 0.69,
                        ..Default::default()
                    };
                    let _ = up.send(message(Up::Step(metrics))).await;
                }
            }
            done.completed_steps = steps.last_step - steps.first_step + 1;
        }
        Some(Kind::Snapshot(s)) => {
            let k = s.iteration + 1;
            done.outputs = vec![format!("{prefix}/iteration-{k}")];
            done.metrics = vec![v1::EvalMetrics {
                iteration: k,
                held_out_loss: 0.8,
                mmd: 0.2,
                grid_path: format!("{prefix}/eval-{k}/grid.png"),
            }];
        }
        None => {}
    }
    done
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

/// Every event of job `id` until its last one.
async fn events_until_end(jobs: &mut JobServiceClient<Channel>, id: &str) -> Vec<Event> {
    let mut stream = t(jobs.watch_job(v1::WatchJobRequest {
        job_id: id.into(),
        from_sequence: 0,
    }))
    .await
    .unwrap()
    .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = t(stream.message()).await.unwrap() {
        seen.push(event.event.unwrap());
    }
    seen
}

fn phases(events: &[Event]) -> Vec<(v1::PhaseKind, u32)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::PhaseChanged(p) => {
                let to = p.to.unwrap();
                Some((v1::PhaseKind::try_from(to.kind).unwrap(), to.iteration))
            }
            _ => None,
        })
        .collect()
}

fn warnings(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Warning(w) => Some(w.message.clone()),
            _ => None,
        })
        .collect()
}

fn encodes(tasks: &[v1::Task]) -> Vec<v1::EncodeShard> {
    tasks
        .iter()
        .filter_map(|t| match &t.kind {
            Some(Kind::Encode(e)) => Some(*e),
            _ => None,
        })
        .collect()
}

fn samples(tasks: &[v1::Task], k: u32) -> Vec<v1::SampleShard> {
    tasks
        .iter()
        .filter_map(|t| match &t.kind {
            Some(Kind::Sample(s)) if s.iteration == k => Some(*s),
            _ => None,
        })
        .collect()
}

fn trains(tasks: &[v1::Task]) -> Vec<v1::TrainSteps> {
    tasks
        .iter()
        .filter_map(|t| match &t.kind {
            Some(Kind::Train(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn snapshots(tasks: &[v1::Task]) -> Vec<u32> {
    tasks
        .iter()
        .filter_map(|t| match &t.kind {
            Some(Kind::Snapshot(s)) => Some(s.iteration),
            _ => None,
        })
        .collect()
}

/// Training shards the toy spec plans, and whether it has held-out prompts.
fn shard_count(spec: &str) -> u32 {
    let prompts = JobPrompts::read(&parse_spec(spec).unwrap()).unwrap();
    assert!(!prompts.held_out.is_empty());
    u32::try_from(prompts.train.len().div_ceil(3)).unwrap()
}

#[tokio::test]
async fn a_spin_job_runs_every_phase_on_two_workers() {
    use v1::PhaseKind as K;
    let sandbox = Sandbox::start("spin", 2).await;
    let a = Fake::join(&sandbox, "a", always_ok()).await;
    let b = Fake::join(&sandbox, "b", always_ok()).await;
    let mut jobs = sandbox.jobs().await;
    let spec = sandbox.spec("spin", &[4, 3]);
    let n = shard_count(&spec);
    assert_eq!(n, 4, "10 prompts in shards of 3");
    let id = submit(&mut jobs, &spec).await;
    let events = events_until_end(&mut jobs, &id).await;

    assert_eq!(
        phases(&events),
        [
            (K::Pending, 0),
            (K::Preparing, 0),
            (K::Sampling, 0),
            (K::Training, 0),
            (K::Snapshot, 0),
            (K::Sampling, 1),
            (K::Training, 1),
            (K::Snapshot, 1),
            (K::Done, 0)
        ]
    );
    // Workers were told the job's absolute store directory.
    let dir = sandbox.job_dir(&id);
    for fake in [&a, &b] {
        let assigned = fake.assignments();
        assert_eq!(assigned.len(), 1);
        assert_eq!(assigned[0].job_id, id);
        assert_eq!(Path::new(&assigned[0].store_prefix), dir);
        assert!(Path::new(&assigned[0].store_prefix).is_absolute());
    }
    let all: Vec<v1::Task> = a.tasks().into_iter().chain(b.tasks()).collect();
    assert!(all.iter().all(|t| t.job_id == id));
    let ids: BTreeSet<&str> = all.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "task ids are unique");

    // Every shard encoded exactly once, the held-out one last; every shard sampled once per
    // iteration, with the job seed.
    let mut encoded: Vec<(u32, bool)> = encodes(&all)
        .iter()
        .map(|e| (e.shard, e.held_out))
        .collect();
    encoded.sort();
    let expected: Vec<(u32, bool)> = (0..=n).map(|i| (i, i == n)).collect();
    assert_eq!(encoded, expected);
    for k in 0..2 {
        let mut sampled: Vec<u32> = samples(&all, k).iter().map(|s| s.shard).collect();
        sampled.sort();
        assert_eq!(sampled, (0..n).collect::<Vec<_>>(), "iteration {k}");
        assert!(samples(&all, k).iter().all(|s| s.seed == 7));
    }
    // Both iterations trained by one ring of two, rank 0 the first worker to join.
    let (ta, tb) = (trains(&a.tasks()), trains(&b.tasks()));
    assert_eq!((ta.len(), tb.len()), (2, 2));
    for k in 0..2 {
        let (x, y) = (&ta[k], &tb[k]);
        assert_eq!((x.rank, y.rank, x.world, y.world), (0, 1, 2, 2));
        assert_eq!(x.collective_id, y.collective_id);
        assert_eq!((x.iteration, x.first_step), (k as u32, 0));
        assert_eq!(x.last_step, [3, 2][k]);
        assert_eq!(x.peer_addresses, ["a:7000", "b:7000"]);
    }
    assert_ne!(ta[0].collective_id, ta[1].collective_id);
    assert_eq!(snapshots(&a.tasks()), [0, 1]);
    assert!(snapshots(&b.tasks()).is_empty());

    // Progress, evaluations and snapshots in order; the final model is the last snapshot.
    let story: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Shards(p) => Some(format!("shards {}/{}", p.done, p.total)),
            Event::Metrics(m) => Some(format!("eval {}", m.iteration)),
            Event::SnapshotPublished(s) => Some(format!("snapshot {} {}", s.iteration, s.path)),
            Event::Done(d) => Some(format!("done {}", d.model_path)),
            _ => None,
        })
        .collect();
    let mut expected: Vec<String> = (1..=n + 1)
        .map(|d| format!("shards {d}/{}", n + 1))
        .collect();
    expected.push("eval 0".into());
    for k in 0..2u32 {
        expected.extend((1..=n).map(|d| format!("shards {d}/{n}")));
        expected.push(format!(
            "snapshot {k} {}",
            dir.join(format!("iteration-{}", k + 1)).display()
        ));
        expected.push(format!("eval {}", k + 1));
    }
    expected.push(format!("done {}", dir.join("iteration-2").display()));
    assert_eq!(story, expected);
    assert!(events.iter().any(|e| matches!(e, Event::Step(_))));
    sandbox.shutdown().await;
}

#[tokio::test]
async fn an_sft_job_skips_sampling() {
    use v1::PhaseKind as K;
    let sandbox = Sandbox::start("sft", 1).await;
    let a = Fake::join(&sandbox, "a", always_ok()).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[3])).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert_eq!(
        phases(&events),
        [
            (K::Pending, 0),
            (K::Preparing, 0),
            (K::Training, 0),
            (K::Snapshot, 0),
            (K::Done, 0)
        ]
    );
    assert!(samples(&a.tasks(), 0).is_empty());
    let steps = trains(&a.tasks());
    assert_eq!(
        steps
            .iter()
            .map(|s| (s.rank, s.world, s.first_step, s.last_step))
            .collect::<Vec<_>>(),
        [(0, 1, 0, 2)]
    );
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_retryable_shard_failure_is_retried_and_the_job_completes() {
    let sandbox = Sandbox::start("retry", 1).await;
    let failed_once = Arc::new(AtomicBool::new(false));
    let script: Script = Arc::new(move |task| match &task.kind {
        Some(Kind::Encode(e)) if e.shard == 1 && !failed_once.swap(true, Ordering::SeqCst) => {
            Reply::Fail {
                error: "flaky disk",
                retryable: true,
                completed: 0,
                after: Duration::from_millis(5),
            }
        }
        _ => Reply::Ok,
    });
    let a = Fake::join(&sandbox, "a", script).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[2])).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    let ones = encodes(&a.tasks()).iter().filter(|e| e.shard == 1).count();
    assert_eq!(ones, 2, "shard 1 was tried twice");
    let warned = warnings(&events);
    assert!(
        warned
            .iter()
            .any(|w| w.contains("encode shard 1") && w.contains("flaky disk")),
        "{warned:?}"
    );
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_fatal_shard_failure_fails_the_job_and_cancels_its_tasks() {
    let sandbox = Sandbox::start("fatal", 1).await;
    let script: Script = Arc::new(|task| match &task.kind {
        Some(Kind::Sample(s)) if s.shard == 0 => Reply::Fail {
            error: "disk full",
            retryable: false,
            completed: 0,
            after: Duration::from_millis(5),
        },
        _ => Reply::Ok,
    });
    let a = Fake::join(&sandbox, "a", script).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("spin", &[2])).await;
    let events = events_until_end(&mut jobs, &id).await;
    let Some(Event::Failed(failed)) = events.last() else {
        panic!("{events:?}")
    };
    for part in [
        "sampling shard 0 of iteration 0",
        "disk full",
        a.id.as_str(),
    ] {
        assert!(failed.error.contains(part), "{}", failed.error);
    }
    until("the cancel message", || !a.cancels().is_empty()).await;
    let cancels = a.cancels();
    assert_eq!(cancels[0].job_id, id);
    assert!(cancels[0].reason.contains("disk full"));
    let status = t(jobs.get_job(v1::GetJobRequest { job_id: id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.phase.unwrap().kind, v1::PhaseKind::Failed as i32);
    assert!(status.error.contains("disk full"));
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_shard_of_a_worker_lost_mid_sampling_goes_to_the_other_worker() {
    let sandbox = Sandbox::start("lost-sampling", 2).await;
    let a = Fake::join(&sandbox, "a", always_ok()).await;
    let dies: Script = Arc::new(|task| match &task.kind {
        Some(Kind::Sample(_)) => Reply::Drop,
        _ => Reply::Ok,
    });
    let b = Fake::join(&sandbox, "b", dies).await;
    let mut jobs = sandbox.jobs().await;
    let spec = sandbox.spec("spin", &[2]);
    let n = shard_count(&spec);
    let id = submit(&mut jobs, &spec).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::WorkerLost(l) if l.worker_id == b.id)));
    let dropped = samples(&b.tasks(), 0);
    assert_eq!(dropped.len(), 1);
    let mut sampled: Vec<u32> = samples(&a.tasks(), 0).iter().map(|s| s.shard).collect();
    sampled.sort();
    assert_eq!(sampled, (0..n).collect::<Vec<_>>(), "A sampled every shard");
    assert!(sampled.contains(&dropped[0].shard));
    let steps = trains(&a.tasks());
    assert_eq!((steps[0].rank, steps[0].world), (0, 1));
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_worker_lost_mid_training_leaves_the_survivor_to_resume_from_its_step() {
    let sandbox = Sandbox::start("lost-training", 2).await;
    let script: Script = Arc::new(|task| match &task.kind {
        Some(Kind::Train(s)) if s.world == 2 && s.rank == 1 => Reply::Drop,
        Some(Kind::Train(s)) if s.world == 2 => Reply::Fail {
            error: "collective: peer closed the stream",
            retryable: true,
            completed: 2,
            after: Duration::from_millis(100),
        },
        _ => Reply::Ok,
    });
    let a = Fake::join(&sandbox, "a", script.clone()).await;
    let b = Fake::join(&sandbox, "b", script).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[6])).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    let steps = trains(&a.tasks());
    let shape: Vec<(u32, u32, u64, u64)> = steps
        .iter()
        .map(|s| (s.rank, s.world, s.first_step, s.last_step))
        .collect();
    assert_eq!(shape, [(0, 2, 0, 5), (0, 1, 2, 5)]);
    assert_ne!(steps[0].collective_id, steps[1].collective_id);
    assert_eq!(steps[1].peer_addresses, ["a:7000"]);
    let warned = warnings(&events);
    assert!(
        warned
            .iter()
            .any(|w| w.contains(&b.id) && w.contains("step 2")),
        "{warned:?}"
    );
    assert_eq!(snapshots(&a.tasks()), [0]);
    sandbox.shutdown().await;
}

#[tokio::test]
async fn a_job_waits_for_min_workers() {
    let sandbox = Sandbox::start("min-workers", 2).await;
    let a = Fake::join(&sandbox, "a", always_ok()).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("sft", &[1])).await;
    // Many ticks later the job is still pending and nobody was assigned it.
    t(tokio::time::sleep(Duration::from_millis(300))).await;
    let status = t(jobs.get_job(v1::GetJobRequest { job_id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.phase.unwrap().kind, v1::PhaseKind::Pending as i32);
    assert!(a.assignments().is_empty());
    let b = Fake::join(&sandbox, "b", always_ok()).await;
    let events = events_until_end(&mut jobs, &id).await;
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    assert_eq!((a.assignments().len(), b.assignments().len()), (1, 1));
    sandbox.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_running_job_cancels_its_tasks() {
    let sandbox = Sandbox::start("cancel", 2).await;
    let hang: Script = Arc::new(|_| Reply::Hang);
    let a = Fake::join(&sandbox, "a", hang.clone()).await;
    let b = Fake::join(&sandbox, "b", hang).await;
    let mut jobs = sandbox.jobs().await;
    let id = submit(&mut jobs, &sandbox.spec("spin", &[1])).await;
    until("a task on each worker", || {
        !a.tasks().is_empty() && !b.tasks().is_empty()
    })
    .await;
    let cancelled = t(jobs.cancel_job(v1::CancelJobRequest { job_id: id.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.phase.unwrap().kind,
        v1::PhaseKind::Cancelled as i32
    );
    until("cancel messages", || {
        !a.cancels().is_empty() && !b.cancels().is_empty()
    })
    .await;
    for fake in [&a, &b] {
        let c = &fake.cancels()[0];
        assert_eq!(
            (c.job_id.as_str(), c.reason.as_str()),
            (id.as_str(), "cancelled on request")
        );
    }
    let events = events_until_end(&mut jobs, &id).await;
    assert!(
        matches!(events.last(), Some(Event::Cancelled(_))),
        "{events:?}"
    );
    sandbox.shutdown().await;
}
