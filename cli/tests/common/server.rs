//! A coordinator served in this process on its own thread and tokio runtime, for tests that
//! run the real `spinctl` binary against it. Stopping it joins the thread, so its journal is
//! closed and can be reopened.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use spin_coordinator::{Coordinator, CoordinatorConfig};

/// The longest starting or stopping may take.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A running coordinator; dropped or [`Server::stop`]ped, it shuts down.
pub struct Server {
    /// The bound address.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `config` on `addr` (port 0: any free port).
    pub fn start(config: CoordinatorConfig, addr: &str) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let (bound_tx, bound_rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                let coordinator = Coordinator::open(config.validate().unwrap()).unwrap();
                bound_tx.send(listener.local_addr().unwrap()).unwrap();
                spin_coordinator::serve(coordinator, listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = bound_rx.recv_timeout(TIMEOUT).expect("coordinator started");
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://` and the bound address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts down and waits for the thread (failing the test if it does not stop in time).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + TIMEOUT;
            while !thread.is_finished() {
                assert!(Instant::now() < deadline, "coordinator did not stop");
                std::thread::sleep(Duration::from_millis(10));
            }
            thread.join().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.halt();
        } else if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
