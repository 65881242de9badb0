//! A whole cluster in one process: an embedded coordinator (journal and object store in a
//! folder) and N worker daemons, each with its own compute thread and collective service, all
//! on 127.0.0.1 with ports chosen by the OS. `spinctl demo` and the tests use it; the
//! processes it embeds are the same code `spin-coordinator` and `spin-worker` run.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use spin_common::proto::v1;
use spin_coordinator::{Coordinator, CoordinatorConfig};
use spin_worker::daemon::{self, WorkerConfig};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::logs::{follow, FollowOptions, Outcome};

/// A running coordinator with its workers.
pub struct LocalCluster {
    runtime: Runtime,
    address: SocketAddr,
    stop: watch::Sender<bool>,
    coordinator: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    store: std::path::PathBuf,
}

/// How to start a [`LocalCluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Worker daemons to start.
    pub workers: usize,
    /// A job starts once this many workers are connected.
    pub min_workers: usize,
    /// A worker silent this long is lost.
    pub heartbeat_timeout: Duration,
    /// Ring stall timeout of the workers.
    pub ring_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            min_workers: 2,
            heartbeat_timeout: Duration::from_secs(15),
            ring_timeout: Duration::from_secs(60),
        }
    }
}

impl LocalCluster {
    /// Starts a coordinator with its journal and store under `dir`, then the workers.
    pub fn start(dir: &Path, options: &ClusterOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let store = dir.join("store");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let config = CoordinatorConfig {
            journal_path: dir.join("journal.redb"),
            store: store.display().to_string(),
            min_workers: options.min_workers,
            heartbeat_timeout: options.heartbeat_timeout,
            tick_interval: Duration::from_millis(100),
            ..CoordinatorConfig::default()
        };
        let coordinator = Coordinator::open(config.validate()?)
            .with_context(|| format!("opening the journal in {}", dir.display()))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("binding the coordinator's port")?;
        let address = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let served = runtime.spawn({
            let signal = until_stopped(stopped.clone());
            async move {
                if let Err(err) = spin_coordinator::serve(coordinator, listener, signal).await {
                    tracing::error!(error = %err, "embedded coordinator stopped");
                }
            }
        });
        let url = format!("http://{address}");
        let mut workers = Vec::with_capacity(options.workers);
        for i in 0..options.workers {
            let config = WorkerConfig {
                coordinator: url.clone(),
                ring_timeout: options.ring_timeout,
                ..WorkerConfig::default()
            };
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .with_context(|| format!("binding worker {i}'s collective port"))?;
            let signal = until_stopped(stopped.clone());
            workers.push(runtime.spawn(async move {
                if let Err(err) = daemon::run(config, listener, signal).await {
                    tracing::error!(worker = i, error = %err, "embedded worker stopped");
                }
            }));
        }
        Ok(Self {
            runtime,
            address,
            stop,
            coordinator: Some(served),
            workers,
            store,
        })
    }

    /// The coordinator's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The object store's folder (jobs live under `jobs/<id>`).
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// Submits a spec (TOML with absolute paths); returns the job id.
    pub fn submit(&self, spec_toml: String) -> anyhow::Result<String> {
        let url = self.url();
        self.runtime.block_on(async move {
            let mut client = crate::client::connect(&url).await?;
            let response = client
                .submit_job(v1::SubmitJobRequest { spec_toml })
                .await
                .map_err(|s| anyhow::anyhow!("submit refused: {}", s.message()))?;
            Ok(response.into_inner().job_id)
        })
    }

    /// Renders job `job`'s events to `out` until it ends.
    pub fn follow(&self, job: &str, out: &mut impl std::io::Write) -> anyhow::Result<Outcome> {
        let url = self.url();
        self.runtime.block_on(async move {
            let mut client = crate::client::connect(&url).await?;
            let options = FollowOptions {
                style: crate::logs::Style::for_stdout(),
                ..FollowOptions::default()
            };
            follow(&mut client, job, out, &options).await
        })
    }

    /// Stops the workers and the coordinator and waits for them (each up to 30 s).
    pub fn stop(mut self) {
        self.stop.send_replace(true);
        let workers = std::mem::take(&mut self.workers);
        let coordinator = self.coordinator.take();
        self.runtime.block_on(async move {
            for worker in workers {
                let _ = tokio::time::timeout(Duration::from_secs(30), worker).await;
            }
            if let Some(c) = coordinator {
                let _ = tokio::time::timeout(Duration::from_secs(30), c).await;
            }
        });
    }
}
