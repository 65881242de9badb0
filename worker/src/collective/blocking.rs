//! The blocking handle the training loop calls: a [`Ring`] plus the tokio runtime that drives
//! its links. The reduction runs on the calling (compute) thread inside `block_on`; the socket
//! tasks run on the runtime's own threads, so compute never stalls them.

use std::net::{SocketAddr, TcpListener};
use std::thread;

use tokio::runtime::{Builder, Runtime};

use super::error::CollectiveError;
use super::memory::MemoryTransport;
use super::ring::{Ring, RingConfig};
use super::tcp::{TcpOptions, TcpTransport};
use super::transport::Transport;
use super::Collective;

/// A ring rank with its own runtime; implements [`Collective`]. Call it from a plain thread,
/// never from inside an async runtime (`block_on` would panic there).
#[derive(Debug)]
pub struct RingCollective<T> {
    ring: Ring<T>,
    runtime: Runtime,
}

fn runtime(io_threads: usize) -> Result<Runtime, CollectiveError> {
    Ok(Builder::new_multi_thread()
        .worker_threads(io_threads.max(1))
        .thread_name("spin-collective")
        .enable_all()
        .build()?)
}

impl<T: Transport> RingCollective<T> {
    /// A rank over `transport`, driven by `runtime` (the one the transport's tasks run on).
    pub fn new(
        transport: T,
        config: RingConfig,
        runtime: Runtime,
    ) -> Result<Self, CollectiveError> {
        Ok(Self {
            ring: Ring::new(transport, config)?,
            runtime,
        })
    }
}

impl RingCollective<MemoryTransport> {
    /// All `world` ranks of an in-process ring (index = rank); each link buffers `capacity`
    /// frames. Move each into its own thread.
    pub fn in_process(
        world: usize,
        capacity: usize,
        config: RingConfig,
    ) -> Result<Vec<Self>, CollectiveError> {
        MemoryTransport::ring(world, capacity)
            .into_iter()
            .map(|transport| {
                let runtime = Builder::new_current_thread().enable_time().build()?;
                Self::new(transport, config.clone(), runtime)
            })
            .collect()
    }
}

impl RingCollective<TcpTransport> {
    /// Forms `rank`'s TCP links (see [`TcpTransport::connect`]); blocks until the neighbours
    /// have connected too, so every rank must call this concurrently.
    pub fn connect_tcp(
        rank: usize,
        world: usize,
        listener: TcpListener,
        right: SocketAddr,
        config: RingConfig,
        options: &TcpOptions,
    ) -> Result<Self, CollectiveError> {
        let runtime = runtime(options.io_threads)?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let transport =
            runtime.block_on(TcpTransport::connect(rank, world, listener, right, options))?;
        Self::new(transport, config, runtime)
    }

    /// All `world` ranks of a TCP ring on 127.0.0.1 (ports chosen by the OS), index = rank.
    pub fn localhost_ring(
        world: usize,
        config: RingConfig,
        options: &TcpOptions,
    ) -> Result<Vec<Self>, CollectiveError> {
        let listeners = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<Result<Vec<_>, _>>()?;
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let right = addrs[(rank + 1) % world];
                let (config, options) = (config.clone(), options.clone());
                thread::spawn(move || {
                    Self::connect_tcp(rank, world, listener, right, config, &options)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle.join().unwrap_or_else(|_| {
                    Err(CollectiveError::Setup {
                        rank: usize::MAX,
                        reason: "ring setup thread panicked".into(),
                    })
                })
            })
            .collect()
    }
}

impl<T: Transport> Collective for RingCollective<T> {
    fn rank(&self) -> usize {
        self.ring.rank()
    }

    fn world(&self) -> usize {
        self.ring.world()
    }

    fn all_reduce_mean(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        self.runtime.block_on(self.ring.all_reduce_mean(buffer))
    }
}
