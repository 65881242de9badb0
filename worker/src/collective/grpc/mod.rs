//! A gRPC transport for the ring: each rank streams its frames to the right neighbour through
//! one long-lived `CollectiveService.PushChunks` call, and a per-process [`CollectiveInbox`]
//! (the service) routes every incoming stream by collective id into the local ring's bounded
//! queue. With a join token in the options every stream must carry it as bearer metadata; with
//! a certificate the inbox serves TLS, and links dial `https://` neighbours.
//!
//! This module holds the options, the constants and the [`RingCollective`] constructors; the
//! inbox's routing state is in `inbox`, its tonic service in `service`, the conversions between
//! frames and messages in `wire`, the outgoing call in `call`, the transport in `transport`, and
//! runtime helpers in `runtime`.

use std::sync::Arc;
use std::time::Duration;

use spin_common::auth::Token;
use spin_common::tls::TlsSettings;
use tokio::net::TcpListener;

use super::blocking::RingCollective;
use super::error::CollectiveError;
use super::ring::RingConfig;
use runtime::{io_runtime, ServerRuntime};

mod call;
mod inbox;
mod runtime;
mod service;
mod transport;
mod wire;

pub use inbox::CollectiveInbox;
pub use transport::GrpcTransport;

/// How many ids of dropped rings an inbox remembers, to refuse their late streams.
const CLOSED_IDS_KEPT: usize = 1024;

/// The pause between attempts to reach the right neighbour's server.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// How long a failed send waits for the call's status, to report why the stream closed.
const OUTCOME_WAIT: Duration = Duration::from_secs(1);

/// Request metadata naming the stream's ring, so the inbox routes it before its first frame
/// (and a peer that leaves before sending is noticed). Streams without it are routed by the
/// first message's `collective_id`.
pub const COLLECTIVE_ID_HEADER: &str = "spin-collective-id";

/// Request metadata carrying the ring's secret (`TrainSteps.ring_secret`): an inbox attaches
/// a stream only to a ring assigned to it, and only with that ring's secret.
pub const RING_SECRET_HEADER: &str = "spin-ring-secret";

/// The collective id of [`RingCollective::localhost_ring_grpc`] rings (their inboxes are new).
const LOCALHOST_RING_ID: &str = "localhost-ring";

/// Settings of the gRPC links. Every rank of a ring must use the same values: the schedule's
/// pieces per chunk follow from [`Transport::capacity`].
///
/// [`Transport::capacity`]: super::transport::Transport::capacity
#[derive(Clone, Debug, PartialEq)]
pub struct GrpcOptions {
    /// Frames queued for the outgoing stream, and again frames an inbox holds per ring.
    pub queue_frames: usize,
    /// How long reaching the right neighbour's server may take (retried until then).
    pub connect_timeout: Duration,
    /// How long an incoming stream waits for its ring to be assigned here (the local rank
    /// to register it) before it is refused with `not_found`.
    pub accept_timeout: Duration,
    /// How long dropping a transport right after a flush waits for the right neighbour to
    /// confirm the stream (see [`GrpcTransport`]).
    pub close_timeout: Duration,
    /// The largest `ChunkMessage` sent or accepted, in bytes.
    pub max_message_bytes: usize,
    /// Runtime threads that drive the streams (for [`RingCollective::connect_grpc`]).
    pub io_threads: usize,
    /// The HTTP/2 stream receive window [`CollectiveInbox::serve`] advertises.
    pub stream_window_bytes: u32,
    /// The HTTP/2 connection receive window [`CollectiveInbox::serve`] advertises.
    pub connection_window_bytes: u32,
    /// The largest HTTP/2 DATA frame [`CollectiveInbox::serve`] accepts (16 KiB to 16 MiB).
    pub max_frame_bytes: u32,
    /// The token every stream carries as `authorization: Bearer` metadata: an inbox refuses
    /// streams without it (`unauthenticated`), a link sends it. Empty: none.
    pub join_token: Token,
    /// With an identity, [`CollectiveInbox::serve`] serves TLS only. Links verify `https://`
    /// neighbours with the CA (and dial `https://` for an address without a scheme whenever
    /// any TLS material is set).
    pub tls: TlsSettings,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        Self {
            queue_frames: 8,
            connect_timeout: Duration::from_secs(60),
            accept_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(10),
            max_message_bytes: 1 << 30,
            io_threads: 2,
            stream_window_bytes: 8 << 20,
            connection_window_bytes: 16 << 20,
            max_frame_bytes: 1 << 20,
            join_token: Token::default(),
            tls: TlsSettings::default(),
        }
    }
}

impl RingCollective<GrpcTransport> {
    /// Forms `rank`'s gRPC links on ring `collective_id` with its `secret` (see
    /// [`GrpcTransport::connect`]) on a runtime of its own; `inbox` is this process's, served by
    /// the caller. Call it from a plain thread. Unlike TCP it does not wait for the left
    /// neighbour, which may join later.
    #[allow(clippy::too_many_arguments)]
    pub fn connect_grpc(
        rank: usize,
        world: usize,
        collective_id: &str,
        secret: &Token,
        right_address: &str,
        inbox: &CollectiveInbox,
        config: RingConfig,
        options: &GrpcOptions,
    ) -> Result<Self, CollectiveError> {
        let runtime = io_runtime(options.io_threads)?;
        let transport = runtime.block_on(GrpcTransport::connect(
            rank,
            world,
            collective_id,
            secret,
            right_address,
            inbox,
            options,
        ))?;
        Self::new(transport, config, runtime)
    }

    /// All `world` ranks of a gRPC ring on 127.0.0.1 (ports chosen by the OS), index = rank.
    /// The `world` inboxes are served on one runtime that lives until the last rank is dropped;
    /// each rank drives its stream on a runtime of its own, as with [`Self::connect_grpc`].
    pub fn localhost_ring_grpc(
        world: usize,
        config: RingConfig,
        options: &GrpcOptions,
    ) -> Result<Vec<Self>, CollectiveError> {
        let server_runtime = io_runtime(options.io_threads.max(1) * world.max(1))?;
        let mut inboxes = Vec::with_capacity(world);
        let mut addresses = Vec::with_capacity(world);
        for _ in 0..world {
            let listener = server_runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
            addresses.push(listener.local_addr()?.to_string());
            let inbox = CollectiveInbox::new(options);
            let server = inbox.clone().serve(listener, std::future::pending());
            server_runtime.spawn(async move {
                if let Err(error) = server.await {
                    tracing::error!(%error, "localhost ring inbox stopped");
                }
            });
            inboxes.push(inbox);
        }
        let servers = Arc::new(ServerRuntime(Some(server_runtime)));
        inboxes
            .iter()
            .enumerate()
            .map(|(rank, inbox)| {
                let runtime = io_runtime(options.io_threads)?;
                let right = &addresses[(rank + 1) % world];
                let mut transport = runtime.block_on(GrpcTransport::connect(
                    rank,
                    world,
                    LOCALHOST_RING_ID,
                    &Token::default(),
                    right,
                    inbox,
                    options,
                ))?;
                transport.servers = Some(Arc::clone(&servers));
                Self::new(transport, config.clone(), runtime)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
