//! What the dispatch and restart tests share: a coordinator served on a port-0 listener (and
//! restarted on the same journal and store), fake workers (tokio tasks speaking the real
//! session protocol) that answer every task after a short delay as a script says, a toy
//! dataset on disk, and helpers that pick tasks and events apart.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spin_common::dataset::JobPrompts;
use spin_common::proto::v1::{
    self, control_service_client::ControlServiceClient, coordinator_message::Message as Down,
    job_event::Event, job_service_client::JobServiceClient, task::Kind, task_result::Outcome,
    worker_message::Message as Up,
};
use spin_coordinator::service::job::parse_spec;
use spin_coordinator::{Coordinator, CoordinatorConfig, CoordinatorError};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
/// Every await of these tests goes through this.
pub async fn t<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("timed out")
}

/// Waits (under a timeout) until `cond` holds.
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// A coordinator on a port-0 listener with its own journal, store and toy dataset; it can be
/// stopped and opened again on the same journal and store.
pub struct Sandbox {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config: CoordinatorConfig,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), CoordinatorError>>>,
}

impl Sandbox {
    pub async fn start(name: &str, min_workers: usize) -> Self {
        Self::start_with(name, min_workers, |_| {}).await
    }

    /// [`Sandbox::start`] with `configure` applied to the settings first.
    pub async fn start_with(
        name: &str,
        min_workers: usize,
        configure: impl FnOnce(&mut CoordinatorConfig),
    ) -> Self {
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
        let mut config = CoordinatorConfig {
            journal_path: dir.join("journal.redb"),
            store: dir.join("store").display().to_string(),
            heartbeat_timeout: Duration::from_millis(1500),
            tick_interval: Duration::from_millis(20),
            min_workers,
            ..CoordinatorConfig::default()
        };
        configure(&mut config);
        let config = config.validate().unwrap();
        let mut sandbox = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            config,
            stop: None,
            server: None,
        };
        sandbox.serve().await;
        sandbox
    }

    /// Opens the coordinator on the sandbox's journal and store and serves it on a new port.
    async fn serve(&mut self) {
        let coordinator = open_when_released(&self.config).await;
        let listener = t(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .await
            .unwrap();
        self.addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        self.stop = Some(stop);
        self.server = Some(tokio::spawn(spin_coordinator::serve(
            coordinator,
            listener,
            async {
                let _ = stopped.await;
            },
        )));
    }

    /// Stops the coordinator (every session and watcher ends), drops it, then opens a new
    /// one on the same journal and store, serving on a new port.
    pub async fn restart(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        t(self.server.take().unwrap()).await.unwrap().unwrap();
        self.serve().await;
    }

    pub async fn jobs(&self) -> JobServiceClient<Channel> {
        let channel = t(Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect())
        .await
        .unwrap();
        JobServiceClient::new(channel)
    }

    /// A job spec over the sandbox's toy dataset: 10 training prompts in shards of 3.
    pub fn spec(&self, objective: &str, steps: &[u64]) -> String {
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
    pub fn job_dir(&self, job: &str) -> PathBuf {
        self.dir.join("store").join("jobs").join(job)
    }

    pub async fn shutdown(mut self) {
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

/// Opens a coordinator with `config`, waiting (under a timeout) while a stopped one's last
/// handles (session tasks finishing) still hold the journal open.
pub async fn open_when_released(config: &CoordinatorConfig) -> Coordinator {
    let open = async {
        loop {
            match Coordinator::open(config.clone()) {
                Ok(coordinator) => return coordinator,
                Err(err) if err.to_string().contains("already open") => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(err) => panic!("coordinator did not open: {err}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), open)
        .await
        .expect("the stopped coordinator never released its journal")
}

/// How a fake worker answers a task.
#[derive(Clone, Debug)]
pub enum Reply {
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
    /// Report the first steps of a training task as rank 0 does, then never answer.
    Stall,
}

pub type Script = Arc<dyn Fn(&v1::Task) -> Reply + Send + Sync>;

pub fn always_ok() -> Script {
    Arc::new(|_| Reply::Ok)
}

/// A fake worker: registered, in session, answering tasks as its script says.
pub struct Fake {
    pub id: String,
    log: Arc<Mutex<Vec<Down>>>,
    main: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.main.abort();
    }
}

impl Fake {
    pub async fn join(sandbox: &Sandbox, name: &str, script: Script) -> Self {
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

    pub fn tasks(&self) -> Vec<v1::Task> {
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

    pub fn assignments(&self) -> Vec<v1::AssignJob> {
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

    pub fn cancels(&self) -> Vec<v1::CancelTasks> {
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

pub fn message(m: Up) -> v1::WorkerMessage {
    v1::WorkerMessage { message: Some(m) }
}

/// The fake's session loop: record every message, answer every task.
pub async fn run_fake(
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
            Reply::Stall => {
                if let Some(Kind::Train(steps)) = &task.kind {
                    send_steps(steps, &up).await;
                }
                continue;
            }
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

/// As rank 0 of a ring: metrics of the task's first two steps.
async fn send_steps(steps: &v1::TrainSteps, up: &mpsc::Sender<v1::WorkerMessage>) {
    if steps.rank != 0 {
        return;
    }
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

/// What a real worker reports on success; rank 0 of a ring also sends step metrics.
pub async fn succeed(
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
            send_steps(steps, up).await;
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

pub async fn submit(jobs: &mut JobServiceClient<Channel>, spec: &str) -> String {
    t(jobs.submit_job(v1::SubmitJobRequest {
        spec_toml: spec.into(),
    }))
    .await
    .unwrap()
    .into_inner()
    .job_id
}

/// Job `id`'s event stream from sequence `from`.
pub async fn watch(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
    from: u64,
) -> tonic::Streaming<v1::JobEvent> {
    t(jobs.watch_job(v1::WatchJobRequest {
        job_id: id.into(),
        from_sequence: from,
    }))
    .await
    .unwrap()
    .into_inner()
}

/// Job `id`'s events from sequence `from` until its last one, numbered.
pub async fn job_events_until_end(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
    from: u64,
) -> Vec<v1::JobEvent> {
    let mut stream = watch(jobs, id, from).await;
    let mut seen = Vec::new();
    while let Some(event) = t(stream.message()).await.unwrap() {
        seen.push(event);
    }
    seen
}

/// The events of `numbered`.
pub fn bare(numbered: &[v1::JobEvent]) -> Vec<Event> {
    numbered.iter().filter_map(|e| e.event.clone()).collect()
}

/// Publishes a checkpoint after `step` of iteration `k` in the job folder `job_dir`, as rank 0
/// does (files, `state.json`, then the manifest).
pub fn write_checkpoint(job_dir: &Path, k: u32, step: u64) -> PathBuf {
    use spin_common::checkpoint::{self, CheckpointState};
    let dir = job_dir.join(checkpoint::key(k, step));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(checkpoint::WEIGHTS),
        format!("theta after step {step}"),
    )
    .unwrap();
    std::fs::write(dir.join(checkpoint::OPTIMIZER), "moments").unwrap();
    let state = CheckpointState {
        iteration: k,
        step,
        optimizer_steps: step + 1,
        skipped_steps: 0,
    };
    std::fs::write(
        dir.join(checkpoint::STATE),
        serde_json::to_string(&state).unwrap(),
    )
    .unwrap();
    spin_common::manifest::publish(&dir, "test checkpoint").unwrap();
    dir
}

/// Writes an empty file at `key` under `job_dir` (a cached shard, as a worker leaves it).
pub fn write_file(job_dir: &Path, key: &str) {
    let path = job_dir.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"cached").unwrap();
}

/// Every event of job `id` until its last one.
pub async fn events_until_end(jobs: &mut JobServiceClient<Channel>, id: &str) -> Vec<Event> {
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

pub fn phases(events: &[Event]) -> Vec<(v1::PhaseKind, u32)> {
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

pub fn warnings(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Warning(w) => Some(w.message.clone()),
            _ => None,
        })
        .collect()
}

pub fn encodes(tasks: &[v1::Task]) -> Vec<v1::EncodeShard> {
    tasks
        .iter()
        .filter_map(|t| match &t.kind {
            Some(Kind::Encode(e)) => Some(*e),
            _ => None,
        })
        .collect()
}

pub fn samples(tasks: &[v1::Task], k: u32) -> Vec<v1::SampleShard> {
    tasks
        .iter()
        .filter_map(|t| match &t.kind {
            Some(Kind::Sample(s)) if s.iteration == k => Some(*s),
            _ => None,
        })
        .collect()
}

/// The (first step, last step, rank, world) of each train task in `tasks`.
pub fn train_ranks(tasks: &[v1::Task]) -> Vec<(u64, u64, u32, u32)> {
    trains(tasks)
        .iter()
        .map(|s| (s.first_step, s.last_step, s.rank, s.world))
        .collect()
}

pub fn trains(tasks: &[v1::Task]) -> Vec<v1::TrainSteps> {
    tasks
        .iter()
        .filter_map(|t| match &t.kind {
            Some(Kind::Train(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

pub fn snapshots(tasks: &[v1::Task]) -> Vec<u32> {
    tasks
        .iter()
        .filter_map(|t| match &t.kind {
            Some(Kind::Snapshot(s)) => Some(s.iteration),
            _ => None,
        })
        .collect()
}

/// Training shards the toy spec plans, and whether it has held-out prompts.
pub fn shard_count(spec: &str) -> u32 {
    let prompts = JobPrompts::read(&parse_spec(spec).unwrap()).unwrap();
    assert!(!prompts.held_out.is_empty());
    u32::try_from(prompts.train.len().div_ceil(3)).unwrap()
}
