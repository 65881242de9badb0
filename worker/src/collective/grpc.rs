//! A gRPC transport for the ring: each rank streams its frames to the right neighbour through
//! one long-lived `CollectiveService.PushChunks` call, and a per-process [`CollectiveInbox`]
//! (the service) routes every incoming stream by collective id into the local ring's bounded
//! queue. With a join token in the options every stream must carry it as bearer metadata; with
//! a certificate the inbox serves TLS, and links dial `https://` neighbours.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use spin_common::auth::{Bearer, ExpectedToken, Refused, Token};
use spin_common::proto::v1::collective_service_client::CollectiveServiceClient;
use spin_common::proto::v1::collective_service_server::{
    CollectiveService, CollectiveServiceServer,
};
use spin_common::proto::v1::{ChunkMessage, PushChunksResponse, RingPhase};
use spin_common::proto::{decode_f32, encode_f32, ProtoError};
use spin_common::tls::{self, TlsSettings};
use tokio::net::TcpListener;
use tokio::runtime::{Builder, Handle, Runtime, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, timeout, timeout_at, Instant};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status, Streaming};

use super::blocking::RingCollective;
use super::error::CollectiveError;
use super::frame::{Frame, FrameHeader, Phase};
use super::ring::RingConfig;
use super::transport::Transport;

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

/// The collective id of [`RingCollective::localhost_ring_grpc`] rings (their inboxes are new).
const LOCALHOST_RING_ID: &str = "localhost-ring";

/// Settings of the gRPC links. Every rank of a ring must use the same values: the schedule's
/// pieces per chunk follow from [`Transport::capacity`].
#[derive(Clone, Debug, PartialEq)]
pub struct GrpcOptions {
    /// Frames queued for the outgoing stream, and again frames an inbox holds per ring.
    pub queue_frames: usize,
    /// How long reaching the right neighbour's server may take (retried until then).
    pub connect_timeout: Duration,
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

/// What reaches a local ring from its left neighbour: a frame, or why the stream failed.
type Inbound = Result<Frame, String>;

/// How a `PushChunks` call ended: frames received by the right neighbour, or why not.
type CallOutcome = Result<u64, CallFailure>;

/// Why a `PushChunks` call failed.
#[derive(Clone, Debug)]
struct CallFailure {
    /// The right neighbour's inbox answered and refused the stream (its ring is closed, or the
    /// stream was malformed or a duplicate), as opposed to a broken connection.
    refused: bool,
    /// The status, for errors.
    reason: String,
}

impl CallFailure {
    fn new(status: &Status) -> Self {
        let refused = matches!(
            status.code(),
            Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::InvalidArgument
                | Code::Unauthenticated
        );
        Self {
            refused,
            reason: format!("{:?}: {}", status.code(), status.message()),
        }
    }
}

/// The receiving side of every ring a worker takes part in: one per process, for its whole
/// life. It serves `CollectiveService`; each incoming `PushChunks` stream is routed by its
/// collective id into a bounded queue that the local [`GrpcTransport`] of that ring reads. The
/// queue is created by whichever comes first, the peer's stream or the local ring. A ring takes
/// one incoming stream (a second is refused with `already_exists`); streams for a ring whose
/// local transport was dropped are refused with `failed_precondition`.
#[derive(Clone, Debug)]
pub struct CollectiveInbox {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    options: GrpcOptions,
    expected: ExpectedToken,
    state: Mutex<InboxState>,
}

/// The rings an inbox routes to, and the ids it refuses.
#[derive(Debug, Default)]
struct InboxState {
    rings: HashMap<String, Slot>,
    closed: VecDeque<String>,
    next_serial: u64,
}

/// One ring's queue. The sender goes to the (single) incoming stream, the receiver to the local
/// transport; each is taken once.
#[derive(Debug)]
struct Slot {
    serial: u64,
    sender: Option<mpsc::Sender<Inbound>>,
    receiver: Option<mpsc::Receiver<Inbound>>,
}

/// Why an incoming stream was refused; mapped to a status code in one place.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Malformed(#[from] ProtoError),
    #[error("field `{field}` changed within the stream (from {first} to {now})")]
    Changed {
        field: &'static str,
        first: String,
        now: String,
    },
    #[error("collective {0} is closed on this worker")]
    Closed(String),
    #[error("collective {0} already has an incoming stream")]
    Attached(String),
    #[error("incoming stream failed: {}", .0.message())]
    Stream(Box<Status>),
    #[error("CollectiveService needs the cluster's join token as `authorization: Bearer` metadata and none was sent")]
    NoToken,
    #[error("CollectiveService: the bearer token sent is not the cluster's join token")]
    WrongToken,
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Malformed(_) | Refusal::Changed { .. } => {
                Status::invalid_argument(refusal.to_string())
            }
            Refusal::Closed(_) => Status::failed_precondition(refusal.to_string()),
            Refusal::Attached(_) => Status::already_exists(refusal.to_string()),
            Refusal::Stream(status) => *status,
            Refusal::NoToken | Refusal::WrongToken => Status::unauthenticated(refusal.to_string()),
        }
    }
}

impl InboxState {
    fn slot(&mut self, id: &str, queue: usize) -> &mut Slot {
        let serial = &mut self.next_serial;
        self.rings.entry(id.to_owned()).or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(queue);
            *serial += 1;
            Slot {
                serial: *serial,
                sender: Some(sender),
                receiver: Some(receiver),
            }
        })
    }

    fn is_closed(&self, id: &str) -> bool {
        self.closed.iter().any(|closed| closed == id)
    }

    /// The queue an incoming stream for `id` forwards into.
    fn attach(&mut self, id: &str, queue: usize) -> Result<(u64, mpsc::Sender<Inbound>), Refusal> {
        if self.is_closed(id) {
            return Err(Refusal::Closed(id.to_owned()));
        }
        let slot = self.slot(id, queue);
        match slot.sender.take() {
            Some(sender) => Ok((slot.serial, sender)),
            None => Err(Refusal::Attached(id.to_owned())),
        }
    }

    /// An incoming stream ended: forget its queue unless a local ring reads it.
    fn detach(&mut self, id: &str, serial: u64) {
        let unread = self
            .rings
            .get(id)
            .is_some_and(|slot| slot.serial == serial && slot.receiver.is_some());
        if unread {
            self.rings.remove(id);
        }
    }

    /// The queue the local ring `id` reads.
    fn register(
        &mut self,
        id: &str,
        queue: usize,
    ) -> Result<(u64, mpsc::Receiver<Inbound>), String> {
        if self.is_closed(id) {
            return Err(format!(
                "collective id {id} was already used on this worker"
            ));
        }
        let slot = self.slot(id, queue);
        match slot.receiver.take() {
            Some(receiver) => Ok((slot.serial, receiver)),
            None => Err(format!("collective {id} already has a local rank")),
        }
    }

    /// The local ring `id` is gone: drop its queue and refuse its late streams.
    fn close(&mut self, id: &str, serial: u64) {
        if self.rings.get(id).is_some_and(|slot| slot.serial == serial) {
            self.rings.remove(id);
        }
        if !self.is_closed(id) {
            if self.closed.len() == CLOSED_IDS_KEPT {
                self.closed.pop_front();
            }
            self.closed.push_back(id.to_owned());
        }
    }
}

/// A local ring's hold on its queue; dropping it closes the ring's id in the inbox.
#[derive(Debug)]
struct InboxLink {
    inbox: CollectiveInbox,
    id: String,
    serial: u64,
    frames: mpsc::Receiver<Inbound>,
}

impl Drop for InboxLink {
    fn drop(&mut self) {
        self.inbox.state().close(&self.id, self.serial);
    }
}

/// An incoming stream's hold on its ring's queue; dropping it (also when hyper drops the call
/// because the peer reset it) forgets a queue nobody reads.
struct Attachment {
    inbox: CollectiveInbox,
    id: String,
    serial: u64,
    frames: mpsc::Sender<Inbound>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.inbox.state().detach(&self.id, self.serial);
    }
}

impl CollectiveInbox {
    /// An inbox with no rings; per-ring queues hold `options.queue_frames` frames; streams
    /// must carry `options.join_token` when it is set.
    pub fn new(options: &GrpcOptions) -> Self {
        Self {
            shared: Arc::new(Shared {
                options: options.clone(),
                expected: ExpectedToken::new(&options.join_token),
                state: Mutex::default(),
            }),
        }
    }

    /// The options it was made with (links of this worker's rings use them too).
    pub fn options(&self) -> &GrpcOptions {
        &self.shared.options
    }

    /// Frames each ring's queue holds.
    pub fn queue_frames(&self) -> usize {
        self.shared.options.queue_frames.max(1)
    }

    /// The tonic service, to add to the worker daemon's server next to its other services.
    /// Handlers wait while a ring's queue is full (that is the flow control), so a server's
    /// graceful shutdown waits for the local rings to read or drop their queues.
    pub fn service(&self) -> CollectiveServiceServer<CollectiveInbox> {
        let limit = self.shared.options.max_message_bytes;
        CollectiveServiceServer::new(self.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    /// Serves the inbox and `grpc.health.v1` on `listener` (bound by the caller, port 0 in
    /// tests) until `shutdown` resolves, with the HTTP/2 windows of the inbox's options, over
    /// TLS when they hold an identity.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CollectiveError> {
        let options = &self.shared.options;
        let mut server = Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(options.stream_window_bytes)
            .initial_connection_window_size(options.connection_window_bytes)
            .max_frame_size(options.max_frame_bytes);
        if let Some(identity) = &options.tls.identity {
            server = tls::serve_tls(server, identity, None)
                .map_err(|e| CollectiveError::Config(format!("collective inbox: {e}")))?;
        }
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<CollectiveServiceServer<CollectiveInbox>>()
            .await;
        server
            .add_service(health)
            .add_service(self.service())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await
            .map_err(|error| {
                CollectiveError::Io(std::io::Error::other(format!(
                    "collective inbox server: {}",
                    error_chain(&error)
                )))
            })
    }

    fn state(&self) -> MutexGuard<'_, InboxState> {
        // The state stays consistent between statements, so a panic elsewhere cannot spoil it.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, id: &str, rank: usize) -> Result<InboxLink, CollectiveError> {
        let (serial, frames) = self
            .state()
            .register(id, self.queue_frames())
            .map_err(|reason| CollectiveError::Setup { rank, reason })?;
        Ok(InboxLink {
            inbox: self.clone(),
            id: id.to_owned(),
            serial,
            frames,
        })
    }

    fn attach(&self, id: &str) -> Result<Attachment, Refusal> {
        let (serial, frames) = self.state().attach(id, self.queue_frames())?;
        Ok(Attachment {
            inbox: self.clone(),
            id: id.to_owned(),
            serial,
            frames,
        })
    }

    /// Rings with a queue right now (registered, or with a stream whose ring has not come).
    #[cfg(test)]
    fn open_rings(&self) -> usize {
        self.state().rings.len()
    }
}

#[tonic::async_trait]
impl CollectiveService for CollectiveInbox {
    async fn push_chunks(
        &self,
        request: Request<Streaming<ChunkMessage>>,
    ) -> Result<Response<PushChunksResponse>, Status> {
        self.shared
            .expected
            .check_metadata(request.metadata())
            .map_err(|refused| match refused {
                Refused::Missing => Refusal::NoToken,
                Refused::Wrong => Refusal::WrongToken,
            })?;
        let named = request
            .metadata()
            .get(COLLECTIVE_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .filter(|id| !id.is_empty())
            .map(str::to_owned);
        let mut messages = request.into_inner();
        let (id, first) = match named {
            Some(id) => (id, None),
            None => {
                let Some(first) = messages.message().await? else {
                    return Ok(Response::new(PushChunksResponse { chunks_received: 0 }));
                };
                (first.collective_id.clone(), Some(first))
            }
        };
        if id.is_empty() {
            let missing = ProtoError::Missing {
                field: "ChunkMessage.collective_id",
            };
            return Err(Refusal::from(missing).into());
        }
        let attachment = self.attach(&id)?;
        let chunks_received = forward(&attachment, first, messages).await?;
        Ok(Response::new(PushChunksResponse { chunks_received }))
    }
}

/// Moves the frames of one stream into its ring's queue, in order; a bad message or a broken
/// stream ends it, and the ring learns why.
async fn forward(
    attachment: &Attachment,
    mut first: Option<ChunkMessage>,
    mut messages: Streaming<ChunkMessage>,
) -> Result<u64, Refusal> {
    let frames = &attachment.frames;
    let mut sender_rank = None;
    let mut received = 0;
    loop {
        let message = match first.take() {
            Some(message) => message,
            None => match messages.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(received),
                Err(status) => {
                    let refusal = Refusal::Stream(Box::new(status));
                    // Best effort: a full queue still ends with the stream's close.
                    let _ = frames.try_send(Err(refusal.to_string()));
                    return Err(refusal);
                }
            },
        };
        let sender = *sender_rank.get_or_insert(message.sender_rank);
        let frame = same_stream(&message, &attachment.id, sender)
            .and_then(|()| frame_from_message(message).map_err(Refusal::from));
        let frame = match frame {
            Ok(frame) => frame,
            Err(refusal) => {
                let _ = frames.try_send(Err(format!("rank {sender} sent a bad frame: {refusal}")));
                return Err(refusal);
            }
        };
        if frames.send(Ok(frame)).await.is_err() {
            return Err(Refusal::Closed(attachment.id.clone()));
        }
        received += 1;
    }
}

/// A stream carries one ring's frames from one sender.
fn same_stream(message: &ChunkMessage, id: &str, sender_rank: u32) -> Result<(), Refusal> {
    if message.collective_id != id {
        return Err(Refusal::Changed {
            field: "ChunkMessage.collective_id",
            first: id.to_owned(),
            now: message.collective_id.clone(),
        });
    }
    if message.sender_rank != sender_rank {
        return Err(Refusal::Changed {
            field: "ChunkMessage.sender_rank",
            first: sender_rank.to_string(),
            now: message.sender_rank.to_string(),
        });
    }
    Ok(())
}

/// `values` as the little-endian payload bytes; on little-endian hosts the vector becomes the
/// buffer, without a copy.
fn payload_bytes(values: Vec<f32>) -> Bytes {
    struct LittleEndian(Vec<f32>);
    impl AsRef<[u8]> for LittleEndian {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }
    if cfg!(target_endian = "little") {
        Bytes::from_owner(LittleEndian(values))
    } else {
        encode_f32(&values)
    }
}

/// The values of a little-endian payload: one copy into the new vector on little-endian hosts.
fn payload_values(payload: &[u8]) -> Result<Vec<f32>, ProtoError> {
    const FIELD: &str = "ChunkMessage.payload";
    if cfg!(target_endian = "big") {
        return decode_f32(FIELD, payload);
    }
    let size = std::mem::size_of::<f32>();
    if !payload.len().is_multiple_of(size) {
        return Err(ProtoError::Payload {
            field: FIELD,
            len: payload.len(),
        });
    }
    // The zero fill is cheap next to the copy (large allocations get fresh, zeroed pages).
    let mut values = vec![0f32; payload.len() / size];
    bytemuck::cast_slice_mut::<f32, u8>(&mut values).copy_from_slice(payload);
    Ok(values)
}

/// `frame` as `sender_rank` sends it on ring `collective_id`.
fn message_from_frame(collective_id: &str, sender_rank: u32, frame: Frame) -> ChunkMessage {
    match frame {
        Frame::Data { header, payload } => ChunkMessage {
            collective_id: collective_id.to_owned(),
            sender_rank,
            round: header.round,
            bucket: header.bucket,
            phase: match header.phase {
                Phase::ReduceScatter => RingPhase::ReduceScatter,
                Phase::AllGather => RingPhase::AllGather,
            } as i32,
            ring_step: header.step,
            chunk: header.chunk,
            piece: header.piece,
            payload: payload_bytes(payload),
            abort: false,
            alive: Vec::new(),
        },
        Frame::Abort { round, alive } => ChunkMessage {
            collective_id: collective_id.to_owned(),
            sender_rank,
            round,
            abort: true,
            alive,
            ..ChunkMessage::default()
        },
    }
}

/// The frame `message` carries, or which field is wrong.
fn frame_from_message(message: ChunkMessage) -> Result<Frame, ProtoError> {
    if message.abort {
        return Ok(Frame::Abort {
            round: message.round,
            alive: message.alive,
        });
    }
    let phase = match RingPhase::try_from(message.phase) {
        Ok(RingPhase::ReduceScatter) => Phase::ReduceScatter,
        Ok(RingPhase::AllGather) => Phase::AllGather,
        Ok(RingPhase::Unspecified) | Err(_) => {
            return Err(ProtoError::Enum {
                field: "ChunkMessage.phase",
                value: message.phase,
            })
        }
    };
    Ok(Frame::Data {
        header: FrameHeader {
            round: message.round,
            bucket: message.bucket,
            phase,
            step: message.ring_step,
            chunk: message.chunk,
            piece: message.piece,
        },
        payload: payload_values(&message.payload)?,
    })
}

/// What the task that feeds the `PushChunks` call is asked to do, in order.
#[derive(Debug)]
enum Outgoing {
    /// Stream this message.
    Message(ChunkMessage),
    /// Report once everything before has been handed to the HTTP/2 stream.
    Flush(oneshot::Sender<()>),
}

/// One rank's gRPC links: frames go to the right neighbour over one `PushChunks` call, frames
/// from the left arrive through this process's [`CollectiveInbox`].
///
/// The link to the right holds `queue_frames` frames in the outgoing queue and as many again
/// in the right neighbour's inbox queue (plus whatever HTTP/2 flow control lets through), so
/// [`Transport::capacity`] is their sum.
///
/// Dropping the transport ends the stream after the frames already queued. When it is dropped
/// right after a successful [`Transport::flush`] (an all-reduce that completed) and outside an
/// async context, it waits up to `close_timeout` for the right neighbour to answer the call,
/// i.e. until every frame sits in the neighbour's inbox queue: otherwise frames still buffered
/// by HTTP/2 would die with the runtime.
#[derive(Debug)]
pub struct GrpcTransport {
    rank: usize,
    world: usize,
    capacity: usize,
    collective_id: String,
    right_address: String,
    close_timeout: Duration,
    /// Set by a flush, cleared by every send.
    flushed: bool,
    links: Option<Links>,
    /// The inbox servers of a localhost ring, shared by its ranks; dropped after `links`.
    servers: Option<Arc<ServerRuntime>>,
}

/// The runtime serving a localhost ring's inboxes; shut down once its last rank is gone (so a
/// rank that finishes first does not take its inbox away from a neighbour still flushing).
#[derive(Debug)]
struct ServerRuntime(Option<Runtime>);

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside async code; this does not.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

#[derive(Debug)]
struct Links {
    to_right: mpsc::Sender<Outgoing>,
    call: watch::Receiver<Option<CallOutcome>>,
    from_left: InboxLink,
    /// Told (or dropped) when the call has ended.
    call_ended: std_mpsc::Receiver<()>,
    flavor: RuntimeFlavor,
}

impl Drop for GrpcTransport {
    fn drop(&mut self) {
        let Some(Links {
            to_right,
            call_ended,
            from_left,
            flavor,
            ..
        }) = self.links.take()
        else {
            return;
        };
        drop(from_left);
        // Ends the request stream once the queued messages are out.
        drop(to_right);
        // Blocking is fine on a compute thread, never inside async code; and a current-thread
        // runtime makes no progress unless someone drives it.
        let may_block = Handle::try_current().is_err() && flavor == RuntimeFlavor::MultiThread;
        if !(self.flushed && may_block) {
            return;
        }
        // Disconnected means the call's task is gone (its runtime stopped): nothing to wait for.
        if let Err(std_mpsc::RecvTimeoutError::Timeout) =
            call_ended.recv_timeout(self.close_timeout)
        {
            tracing::warn!(
                rank = self.rank,
                collective = %self.collective_id,
                "right neighbour did not answer the stream within {:?}",
                self.close_timeout
            );
        }
    }
}

impl GrpcTransport {
    /// Forms `rank`'s links on ring `collective_id`: registers the ring in `inbox` (where the
    /// left neighbour's frames arrive) and opens the stream to the right neighbour's inbox at
    /// `right_address` (`host:port` or a URI), retrying until `options.connect_timeout`. Spawns
    /// the stream on the current runtime. Does not wait for the left neighbour.
    #[tracing::instrument(level = "debug", skip(inbox, options))]
    pub async fn connect(
        rank: usize,
        world: usize,
        collective_id: &str,
        right_address: &str,
        inbox: &CollectiveInbox,
        options: &GrpcOptions,
    ) -> Result<Self, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(CollectiveError::Config(format!(
                "rank {rank} of world {world}"
            )));
        }
        if collective_id.is_empty() {
            return Err(CollectiveError::Config("empty collective id".into()));
        }
        let queue = options.queue_frames.max(1);
        let mut transport = Self {
            rank,
            world,
            capacity: queue + inbox.queue_frames(),
            collective_id: collective_id.to_owned(),
            right_address: right_address.to_owned(),
            close_timeout: options.close_timeout,
            flushed: false,
            links: None,
            servers: None,
        };
        if world == 1 {
            return Ok(transport);
        }
        let bearer = Bearer::new("join token", &options.join_token)
            .map_err(|e| CollectiveError::Config(e.to_string()))?;
        let from_left = inbox.register(collective_id, rank)?;
        let channel = connect_right(rank, (rank + 1) % world, right_address, options).await?;
        let client = CollectiveServiceClient::new(channel)
            .max_encoding_message_size(options.max_message_bytes)
            .max_decoding_message_size(options.max_message_bytes);
        let (to_right, outgoing) = mpsc::channel(queue);
        let (outcome, call) = watch::channel(None);
        let (ended, call_ended) = std_mpsc::channel();
        let id = collective_id.to_owned();
        tokio::spawn(async move {
            push_chunks(client, id, bearer, outgoing, outcome).await;
            let _ = ended.send(());
        });
        transport.links = Some(Links {
            to_right,
            call,
            from_left,
            call_ended,
            flavor: Handle::current().runtime_flavor(),
        });
        Ok(transport)
    }

    fn right(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn left(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn no_links(&self) -> CollectiveError {
        CollectiveError::Config(format!("rank {} is alone in its ring", self.rank))
    }

    /// Why the stream to the right is gone, from the call's status when it has one.
    fn stream_closed(&self) -> CollectiveError {
        let why = match self.links.as_ref().map(|links| links.call.borrow().clone()) {
            Some(Some(Err(failure))) => failure.reason,
            Some(Some(Ok(received))) => format!("the call ended after {received} frames"),
            Some(None) | None => "the stream closed".into(),
        };
        CollectiveError::PeerClosed {
            rank: self.rank,
            peer: self.right(),
            reason: format!("stream to {}: {why}", self.right_address),
        }
    }

    /// Like [`Self::stream_closed`], after giving the call a moment to report its status.
    async fn stream_closed_after_outcome(&mut self) -> CollectiveError {
        if let Some(links) = &mut self.links {
            let _ = timeout(OUTCOME_WAIT, links.call.wait_for(Option::is_some)).await;
        }
        self.stream_closed()
    }

    fn message(&self, frame: Frame) -> ChunkMessage {
        // Ranks are far below u32::MAX (the proto's type).
        message_from_frame(&self.collective_id, self.rank as u32, frame)
    }
}

impl Transport for GrpcTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    async fn send(&mut self, frame: Frame) -> Result<(), CollectiveError> {
        self.flushed = false;
        let message = Outgoing::Message(self.message(frame));
        let Some(links) = &self.links else {
            return Err(self.no_links());
        };
        if links.to_right.send(message).await.is_err() {
            return Err(self.stream_closed_after_outcome().await);
        }
        Ok(())
    }

    fn try_send(&mut self, frame: Frame) -> Result<(), CollectiveError> {
        self.flushed = false;
        let message = Outgoing::Message(self.message(frame));
        let Some(links) = &self.links else {
            return Err(self.no_links());
        };
        links
            .to_right
            .try_send(message)
            .map_err(|_| self.stream_closed())
    }

    async fn recv(&mut self) -> Result<Frame, CollectiveError> {
        let (rank, left) = (self.rank, self.left());
        let Some(links) = &mut self.links else {
            return Err(self.no_links());
        };
        let Links {
            from_left, call, ..
        } = links;
        // A refused stream to the right means the round cannot complete there: fail now rather
        // than at the timeout. A broken connection does not count, since a right neighbour
        // that finished may exit while this rank still waits for its left one.
        let refused = async {
            call.wait_for(|outcome| matches!(outcome, Some(Err(f)) if f.refused))
                .await
                .is_ok()
        };
        let inbound = tokio::select! {
            biased;
            inbound = from_left.frames.recv() => inbound,
            true = refused => return Err(self.stream_closed()),
        };
        let reason = match inbound {
            Some(Ok(frame)) => return Ok(frame),
            Some(Err(reason)) => reason,
            None => format!("the stream from rank {left} ended"),
        };
        Err(CollectiveError::PeerClosed {
            rank,
            peer: left,
            reason,
        })
    }

    /// Waits until every frame sent before has been taken from the outgoing queue, encoded and
    /// handed to this process's HTTP/2 connection for the stream. It may still sit in the
    /// HTTP/2 send buffer waiting for flow-control credit, which is why a flushed transport
    /// waits for the right neighbour's answer when dropped (see [`GrpcTransport`]).
    ///
    /// When the call has already ended (the right neighbour finished and left, or failed) there
    /// is nothing left to hand over and this returns `Ok`: this rank's result does not depend on
    /// it, a right neighbour still missing frames reports that itself, and the next send here
    /// fails with [`CollectiveError::PeerClosed`].
    async fn flush(&mut self) -> Result<(), CollectiveError> {
        let Some(links) = &self.links else {
            return Ok(());
        };
        let (done, handed) = oneshot::channel();
        if links.to_right.send(Outgoing::Flush(done)).await.is_ok() {
            // An error means the call ended and dropped the marker.
            let _ = handed.await;
        }
        self.flushed = true;
        Ok(())
    }
}

/// Opens a channel to the right neighbour's server, retrying while it is not up yet. An address
/// without a scheme is dialled over TLS when the options hold TLS material.
async fn connect_right(
    rank: usize,
    right: usize,
    address: &str,
    options: &GrpcOptions,
) -> Result<Channel, CollectiveError> {
    let setup = |reason: String| CollectiveError::Setup {
        rank,
        reason: format!("right rank {right} at {address}: {reason}"),
    };
    let uri = if address.contains("://") {
        address.to_owned()
    } else if options.tls.is_configured() {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let endpoint = options
        .tls
        .endpoint(&uri)
        .map_err(|error| setup(error.to_string()))?
        .tcp_nodelay(true)
        .connect_timeout(options.connect_timeout);
    let deadline = Instant::now() + options.connect_timeout;
    let not_reached = |why: String| {
        setup(format!(
            "not reachable within {:?}: {why}",
            options.connect_timeout
        ))
    };
    loop {
        let error = match timeout_at(deadline, endpoint.connect()).await {
            Ok(Ok(channel)) => return Ok(channel),
            Ok(Err(error)) => error_chain(&error),
            Err(_) => return Err(not_reached("connect attempt timed out".into())),
        };
        if Instant::now() + CONNECT_RETRY >= deadline {
            return Err(not_reached(error));
        }
        tracing::debug!(address, %error, "right neighbour not reachable yet");
        sleep(CONNECT_RETRY).await;
    }
}

/// Feeds the outgoing queue into one `PushChunks` call and records how it ended.
async fn push_chunks(
    mut client: CollectiveServiceClient<Channel>,
    collective_id: String,
    bearer: Bearer,
    outgoing: mpsc::Receiver<Outgoing>,
    outcome: watch::Sender<Option<CallOutcome>>,
) {
    // tonic's encoder pulls messages until none is ready, then hands the encoded bytes to
    // HTTP/2; a flush marker it pulls therefore follows frames that are on their way.
    let messages = ReceiverStream::new(outgoing).filter_map(|outgoing| match outgoing {
        Outgoing::Message(message) => Some(message),
        Outgoing::Flush(done) => {
            let _ = done.send(());
            None
        }
    });
    let mut request = Request::new(messages);
    bearer.apply(&mut request);
    // Ids that are not visible ASCII go without the header (routed by their first frame).
    if let Ok(value) = collective_id.parse() {
        request.metadata_mut().insert(COLLECTIVE_ID_HEADER, value);
    }
    let result = client
        .push_chunks(request)
        .await
        .map(|response| response.into_inner().chunks_received)
        .map_err(|status| CallFailure::new(&status));
    outcome.send_replace(Some(result));
}

/// `error` with its sources (tonic's transport errors say little at the top).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

fn io_runtime(io_threads: usize) -> Result<Runtime, CollectiveError> {
    Ok(Builder::new_multi_thread()
        .worker_threads(io_threads.max(1))
        .thread_name("spin-collective")
        .enable_all()
        .build()?)
}

impl RingCollective<GrpcTransport> {
    /// Forms `rank`'s gRPC links on ring `collective_id` (see [`GrpcTransport::connect`]) on a
    /// runtime of its own; `inbox` is this process's, served by the caller. Call it from a plain
    /// thread. Unlike TCP it does not wait for the left neighbour, which may join later.
    pub fn connect_grpc(
        rank: usize,
        world: usize,
        collective_id: &str,
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
mod tests {
    use std::thread;
    use std::time::Instant as StdInstant;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use tonic::transport::Endpoint;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    use super::*;
    use crate::collective::Collective;

    /// Bound on any wait in these tests.
    const DEADLINE: Duration = Duration::from_secs(20);

    type Result<T> = std::result::Result<T, CollectiveError>;

    fn options() -> GrpcOptions {
        GrpcOptions {
            queue_frames: 3,
            connect_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(2),
            io_threads: 1,
            ..GrpcOptions::default()
        }
    }

    fn small_config() -> RingConfig {
        RingConfig {
            // Odd bucket and piece sizes so buckets, chunks and pieces are all uneven.
            bucket_bytes: 4 * 997,
            piece_bytes: 4 * 31,
            timeout: Duration::from_secs(10),
            abort_grace: Duration::from_millis(300),
        }
    }

    fn random_buffers(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..world)
            .map(|_| (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect())
            .collect()
    }

    /// Forms each rank on its own thread with its maker (rank `r` starts `r * stagger` late)
    /// and runs `rounds` all-reduces on it; the results in rank order.
    fn run_ranks<C, F>(
        makers: Vec<F>,
        inputs: &[Vec<f32>],
        rounds: usize,
        stagger: Duration,
    ) -> Vec<Result<Vec<f32>>>
    where
        C: Collective,
        F: FnOnce() -> Result<C> + Send + 'static,
    {
        let (tx, rx) = std_mpsc::channel();
        let handles: Vec<_> = makers
            .into_iter()
            .zip(inputs.iter().cloned())
            .enumerate()
            .map(|(rank, (make, mut buffer))| {
                let tx = tx.clone();
                thread::spawn(move || {
                    thread::sleep(stagger * rank as u32);
                    let result = make().and_then(|mut collective| {
                        for _ in 0..rounds {
                            collective.all_reduce_mean(&mut buffer)?;
                        }
                        Ok(buffer)
                    });
                    let _ = tx.send((rank, result));
                })
            })
            .collect();
        drop(tx);
        let mut results: Vec<_> = handles
            .iter()
            .map(|_| rx.recv_timeout(DEADLINE).expect("a rank hung"))
            .collect();
        // The ranks are dropped (and their streams closed) on their threads.
        for handle in handles {
            handle.join().expect("rank thread");
        }
        results.sort_by_key(|(rank, _)| *rank);
        results.into_iter().map(|(_, result)| result).collect()
    }

    fn premade<C: Send + 'static>(ranks: Vec<C>) -> Vec<impl FnOnce() -> Result<C> + Send> {
        ranks.into_iter().map(|rank| move || Ok(rank)).collect()
    }

    /// The in-process ring's result on `inputs`, with the gRPC links' capacity.
    fn reference(inputs: &[Vec<f32>], config: &RingConfig, rounds: usize) -> Vec<f32> {
        let capacity = 2 * options().queue_frames;
        let ranks = RingCollective::in_process(inputs.len(), capacity, config.clone())
            .expect("in-process ring");
        let mut results = run_ranks(premade(ranks), inputs, rounds, Duration::ZERO);
        results.swap_remove(0).expect("in-process all-reduce")
    }

    fn assert_bitwise(expected: &[f32], results: Vec<Result<Vec<f32>>>) {
        for (rank, result) in results.into_iter().enumerate() {
            let got = result.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
            let same = got.len() == expected.len()
                && got
                    .iter()
                    .zip(expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "rank {rank} differs from the in-process ring");
        }
    }

    /// Inboxes served on a runtime of the test's, as worker daemons serve theirs.
    struct Inboxes {
        runtime: Runtime,
        inboxes: Vec<CollectiveInbox>,
        addresses: Vec<String>,
    }

    impl Inboxes {
        fn start(count: usize) -> Self {
            let runtime = io_runtime(1).expect("runtime");
            let (mut inboxes, mut addresses) = (Vec::new(), Vec::new());
            for _ in 0..count {
                let bind = async { timeout(DEADLINE, TcpListener::bind("127.0.0.1:0")).await };
                let listener = runtime.block_on(bind).expect("bind in time").expect("bind");
                addresses.push(listener.local_addr().expect("address").to_string());
                let inbox = CollectiveInbox::new(&options());
                runtime.spawn(inbox.clone().serve(listener, std::future::pending()));
                inboxes.push(inbox);
            }
            // Like any client of a daemon, wait until each answers its health check.
            for address in &addresses {
                let uri = format!("http://{address}");
                let serving = runtime.block_on(async {
                    timeout(DEADLINE, async {
                        let endpoint = Endpoint::from_shared(uri).expect("uri");
                        let channel = endpoint.connect().await.expect("connect");
                        let mut health = HealthClient::new(channel);
                        let request = HealthCheckRequest {
                            service: "spin.v1.CollectiveService".into(),
                        };
                        health
                            .check(request)
                            .await
                            .expect("health")
                            .into_inner()
                            .status
                    })
                    .await
                });
                assert_eq!(
                    serving.expect("health in time"),
                    ServingStatus::Serving as i32
                );
            }
            Self {
                runtime,
                inboxes,
                addresses,
            }
        }

        /// Makes rank `rank` of ring `id` over these inboxes.
        fn maker(
            &self,
            rank: usize,
            world: usize,
            id: &str,
            config: &RingConfig,
        ) -> impl FnOnce() -> Result<RingCollective<GrpcTransport>> + Send + 'static {
            let inbox = self.inboxes[rank].clone();
            let right = self.addresses[(rank + 1) % world].clone();
            let (id, config) = (id.to_owned(), config.clone());
            move || {
                RingCollective::connect_grpc(rank, world, &id, &right, &inbox, config, &options())
            }
        }

        /// Streams `messages` to inbox `index` in one call; its answer.
        fn push(
            &self,
            index: usize,
            messages: Vec<ChunkMessage>,
        ) -> std::result::Result<u64, Status> {
            let uri = format!("http://{}", self.addresses[index]);
            let call = async {
                let mut client = CollectiveServiceClient::connect(uri)
                    .await
                    .expect("connect");
                let response = client.push_chunks(tokio_stream::iter(messages)).await?;
                Ok(response.into_inner().chunks_received)
            };
            self.runtime
                .block_on(async { timeout(DEADLINE, call).await })
                .expect("push in time")
        }

        /// Waits until no inbox holds a ring's queue.
        fn wait_all_closed(&self) {
            let start = StdInstant::now();
            loop {
                let open: Vec<usize> = self
                    .inboxes
                    .iter()
                    .map(CollectiveInbox::open_rings)
                    .collect();
                if open.iter().all(|&n| n == 0) {
                    return;
                }
                assert!(
                    start.elapsed() < DEADLINE,
                    "rings left open per inbox: {open:?}"
                );
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn data_message(id: &str, sender_rank: u32, payload: Bytes) -> ChunkMessage {
        ChunkMessage {
            collective_id: id.to_owned(),
            sender_rank,
            phase: RingPhase::ReduceScatter as i32,
            payload,
            ..ChunkMessage::default()
        }
    }

    #[test]
    fn grpc_rings_match_the_in_process_ring_bitwise() {
        for world in [1, 2, 3] {
            for (len, config, rounds) in [
                (1, small_config(), 1),
                (2, small_config(), 1),
                (7, small_config(), 1),
                (1001, small_config(), 2),
                (30_011, small_config(), 1),
                (30_011, RingConfig::default(), 1),
            ] {
                let inputs = random_buffers(world, len, (world * 1_000_003 + len) as u64);
                let expected = reference(&inputs, &config, rounds);
                let ranks = RingCollective::localhost_ring_grpc(world, config, &options())
                    .expect("grpc ring");
                let results = run_ranks(premade(ranks), &inputs, rounds, Duration::ZERO);
                assert_bitwise(&expected, results);
            }
        }
    }

    #[test]
    fn re_formed_rings_on_the_same_inboxes_stay_apart() {
        let inboxes = Inboxes::start(3);
        let config = small_config();
        let inputs = random_buffers(3, 5003, 21);
        let makers = (0..3)
            .map(|r| inboxes.maker(r, 3, "step-1", &config))
            .collect();
        let results = run_ranks(makers, &inputs, 1, Duration::ZERO);
        assert_bitwise(&reference(&inputs, &config, 1), results);
        inboxes.wait_all_closed();

        // A late stream of the dropped ring is refused and does not bring it back.
        let stale = || vec![data_message("step-1", 0, payload_bytes(vec![1e30; 4]))];
        let late = inboxes.push(1, stale()).expect_err("late stream");
        assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
        // A stream for a ring that never forms here leaves nothing behind when it ends.
        let stray = vec![data_message("elsewhere", 0, payload_bytes(vec![1.0; 4]))];
        assert_eq!(inboxes.push(2, stray).expect("stray stream"), 1);
        inboxes.wait_all_closed();

        // The next ring on the same inboxes. Each rank starts reducing before its right
        // neighbour has joined, and an old-id stream arrives while the ring runs.
        let inputs = random_buffers(3, 5003, 22);
        let makers = (0..3)
            .map(|r| inboxes.maker(r, 3, "step-2", &config))
            .collect();
        thread::scope(|scope| {
            let late = scope.spawn(|| {
                thread::sleep(Duration::from_millis(30));
                inboxes.push(0, stale())
            });
            let results = run_ranks(makers, &inputs, 1, Duration::from_millis(50));
            assert_bitwise(&reference(&inputs, &config, 1), results);
            let late = late.join().expect("late stream thread");
            let late = late.expect_err("late stream");
            assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
        });
        inboxes.wait_all_closed();
    }

    #[test]
    fn a_rank_that_never_arrives_is_named() {
        // Rank 2's worker serves its inbox but never joins the ring.
        let inboxes = Inboxes::start(3);
        let config = RingConfig {
            timeout: Duration::from_millis(400),
            ..small_config()
        };
        let inputs = random_buffers(2, 4001, 5);
        let makers = (0..2)
            .map(|r| inboxes.maker(r, 3, "lonely", &config))
            .collect();
        let start = StdInstant::now();
        let results = run_ranks(makers, &inputs, 1, Duration::ZERO);
        let bound = 3 * config.timeout + config.abort_grace + Duration::from_secs(1);
        assert!(start.elapsed() < bound, "took {:?}", start.elapsed());
        for (rank, result) in results.into_iter().enumerate() {
            match result {
                Err(error @ CollectiveError::Timeout { .. }) => {
                    let message = error.to_string();
                    assert!(
                        message.contains("did not send: [2]"),
                        "rank {rank}: {message}"
                    );
                }
                other => panic!("rank {rank}: expected a timeout, got {other:?}"),
            }
        }
        // Rank 1's stream into rank 2's inbox left with rank 1.
        inboxes.wait_all_closed();
    }

    #[test]
    fn malformed_messages_are_refused_naming_the_field() {
        let inboxes = Inboxes::start(1);
        let bad_phase = ChunkMessage {
            phase: RingPhase::Unspecified as i32,
            ..data_message("ring", 0, Bytes::new())
        };
        let odd_payload = data_message("ring", 0, Bytes::from_static(&[0; 5]));
        let no_id = data_message("", 0, Bytes::new());
        let good = || data_message("ring", 0, payload_bytes(vec![0.5; 2]));
        let other_sender = data_message("ring", 1, Bytes::new());
        for (messages, field) in [
            (vec![bad_phase], "ChunkMessage.phase"),
            (vec![odd_payload.clone()], "ChunkMessage.payload"),
            (vec![no_id], "ChunkMessage.collective_id"),
            (vec![good(), other_sender], "ChunkMessage.sender_rank"),
        ] {
            let status = inboxes.push(0, messages).expect_err(field);
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains(field), "{status:?}");
            inboxes.wait_all_closed();
        }

        // A local ring whose left neighbour sends a bad frame learns why its stream ended.
        let mut link = inboxes.inboxes[0].register("ring", 1).expect("register");
        let status = inboxes
            .push(0, vec![good(), odd_payload])
            .expect_err("bad frame");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let first = link.frames.try_recv().expect("first frame");
        assert!(matches!(first, Ok(Frame::Data { .. })), "{first:?}");
        let why = link
            .frames
            .try_recv()
            .expect("reason")
            .expect_err("a reason");
        assert!(why.contains("ChunkMessage.payload"), "{why}");
        // One stream per ring; after the ring is dropped its id is refused.
        let again = inboxes.push(0, vec![good()]).expect_err("second stream");
        assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
        drop(link);
        let late = inboxes.push(0, vec![good()]).expect_err("closed ring");
        assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
        inboxes.wait_all_closed();
    }

    #[test]
    fn a_departed_rank_closes_the_link() {
        let mut ranks =
            RingCollective::localhost_ring_grpc(2, small_config(), &options()).expect("ring");
        drop(ranks.pop());
        let mut buffer = vec![1.0; 1000];
        let result = ranks[0].all_reduce_mean(&mut buffer);
        assert!(
            matches!(result, Err(CollectiveError::PeerClosed { peer: 1, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn an_unreachable_neighbour_fails_setup_naming_it() {
        let address = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address").to_string()
        };
        let inbox = CollectiveInbox::new(&options());
        let options = GrpcOptions {
            connect_timeout: Duration::from_millis(300),
            ..options()
        };
        let start = StdInstant::now();
        let result =
            RingCollective::connect_grpc(0, 2, "r", &address, &inbox, small_config(), &options);
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        match result {
            Err(CollectiveError::Setup { rank: 0, reason }) => {
                assert!(
                    reason.contains("right rank 1") && reason.contains(&address),
                    "{reason}"
                );
            }
            other => panic!("expected a setup error, got {other:?}"),
        }
        assert_eq!(inbox.open_rings(), 0);
    }

    #[test]
    fn a_flushed_rank_that_leaves_at_once_still_delivers() {
        // More frames than the HTTP/2 window, read slowly: when the flush returns, the last
        // frames still wait in the sender's HTTP/2 buffer, and its runtime stops right after.
        const FRAMES: u32 = 24;
        let inboxes = Inboxes::start(2);
        let mut link = inboxes.inboxes[1].register("leaving", 1).expect("register");
        let reader = thread::spawn(move || {
            let runtime = Builder::new_current_thread().enable_time().build();
            let runtime = runtime.expect("reader runtime");
            let mut pieces = Vec::new();
            for _ in 0..FRAMES {
                thread::sleep(Duration::from_millis(5));
                let next = runtime.block_on(async { timeout(DEADLINE, link.frames.recv()).await });
                match next.expect("frame in time") {
                    Some(Ok(Frame::Data { header, payload })) => {
                        assert_eq!(payload.len(), 1 << 18);
                        pieces.push(header.piece);
                    }
                    other => panic!("after {} frames: {other:?}", pieces.len()),
                }
            }
            pieces
        });
        let runtime = io_runtime(1).expect("sender runtime");
        let (right, inbox, options) = (&inboxes.addresses[1], &inboxes.inboxes[0], options());
        let mut transport = runtime
            .block_on(async {
                let connect = GrpcTransport::connect(0, 2, "leaving", right, inbox, &options);
                timeout(DEADLINE, connect).await
            })
            .expect("connect in time")
            .expect("connect");
        runtime.block_on(async {
            for piece in 0..FRAMES {
                let header = FrameHeader {
                    round: 0,
                    bucket: 0,
                    phase: Phase::ReduceScatter,
                    step: 0,
                    chunk: 0,
                    piece,
                };
                let frame = Frame::Data {
                    header,
                    payload: vec![piece as f32; 1 << 18],
                };
                let sent = timeout(DEADLINE, transport.send(frame)).await;
                sent.expect("send in time").expect("send");
            }
            let flushed = timeout(DEADLINE, transport.flush()).await;
            flushed.expect("flush in time").expect("flush");
        });
        drop(transport);
        drop(runtime);
        let pieces = reader.join().expect("reader");
        assert_eq!(pieces, (0..FRAMES).collect::<Vec<_>>());
    }

    #[test]
    fn inbox_ids_are_used_once_and_remembered_within_bounds() {
        let mut state = InboxState::default();
        let (serial, _frames) = state.register("a", 2).expect("first registration");
        assert!(state.register("a", 2).is_err(), "a second local rank");
        assert!(state.attach("a", 2).is_ok());
        assert!(matches!(state.attach("a", 2), Err(Refusal::Attached(_))));
        state.close("a", serial);
        assert!(state.rings.is_empty());
        assert!(state.register("a", 2).is_err(), "a closed id");
        assert!(matches!(state.attach("a", 2), Err(Refusal::Closed(_))));
        for i in 0..CLOSED_IDS_KEPT {
            state.close(&format!("x{i}"), 0);
        }
        assert_eq!(state.closed.len(), CLOSED_IDS_KEPT);
        assert!(!state.is_closed("a"));
    }

    #[test]
    fn frames_survive_the_message_round_trip() {
        let header = FrameHeader {
            round: 7,
            bucket: 2,
            phase: Phase::AllGather,
            step: 1,
            chunk: 3,
            piece: 4,
        };
        let frames = [
            Frame::Data {
                header,
                payload: vec![1.5, -0.0, f32::MIN_POSITIVE, f32::NAN],
            },
            Frame::Abort {
                round: 9,
                alive: vec![0, 2],
            },
        ];
        for frame in frames {
            let message = message_from_frame("ring", 1, frame.clone());
            assert_eq!(
                (message.collective_id.as_str(), message.sender_rank),
                ("ring", 1)
            );
            let back = frame_from_message(message).expect("valid message");
            // NaN != NaN, so compare the debug forms.
            assert_eq!(format!("{back:?}"), format!("{frame:?}"));
        }
    }
}
