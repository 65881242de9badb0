//! The inbox's routing: [`CollectiveInbox`] and its per-ring queues, the holds a local ring and
//! an incoming stream keep on a queue, and why a stream is refused.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use spin_common::auth::{ExpectedToken, Refused, Token};
use spin_common::proto::v1::collective_service_server::CollectiveServiceServer;
use spin_common::proto::ProtoError;
use spin_common::tls;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::Status;

use super::runtime::error_chain;
use super::{GrpcOptions, CLOSED_IDS_KEPT};
use crate::collective::error::CollectiveError;
use crate::collective::frame::Frame;

/// What reaches a local ring from its left neighbour: a frame, or why the stream failed.
pub(super) type Inbound = Result<Frame, InboundError>;

/// Why the stream from the left neighbour failed, as its local ring learns it.
#[derive(Clone, Debug, thiserror::Error)]
pub(super) enum InboundError {
    /// The incoming stream broke; the status message.
    #[error("incoming stream failed: {0}")]
    Stream(String),
    /// The left neighbour sent a frame the inbox refused; why.
    #[error("rank {sender} sent a bad frame: {reason}")]
    BadFrame { sender: u32, reason: String },
}

/// A local ring's queue and its abort signal.
struct Registered {
    serial: u64,
    frames: mpsc::Receiver<Inbound>,
    aborted: watch::Receiver<Option<String>>,
}

/// Why a local ring could not take its queue.
#[derive(Debug, thiserror::Error)]
enum RegisterError {
    #[error("collective id {0} was already used on this worker")]
    Used(String),
    #[error("collective {0} already has a local rank")]
    Taken(String),
}

/// The receiving side of every ring a worker takes part in: one per process, for its whole
/// life. It serves `CollectiveService`; each incoming `PushChunks` stream is routed by its
/// collective id into a bounded queue that the local [`GrpcTransport`] of that ring reads.
/// Only rings assigned to this worker are served: the local ring registers its id with the
/// secret the coordinator gave its members, and a stream is attached only once its ring is
/// registered here and only if it carries that secret (`permission_denied` otherwise, and the
/// ring is left untouched, so a stranger that guesses an id cannot take a ring's place). A
/// stream that comes before its ring waits for it up to the options' `accept_timeout`, then
/// is refused with `not_found`. A ring takes one incoming stream (a second is refused with
/// `already_exists`); streams for a ring whose local transport was dropped are refused with
/// `failed_precondition`.
///
/// [`GrpcTransport`]: super::GrpcTransport
#[derive(Clone, Debug)]
pub struct CollectiveInbox {
    pub(super) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(super) struct Shared {
    options: GrpcOptions,
    pub(super) expected: ExpectedToken,
    state: Mutex<InboxState>,
    /// Woken whenever a local ring registers (streams waiting for their ring look again).
    registered: Notify,
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
    /// Set (with the coordinator's reason) when the coordinator aborts the ring.
    abort: watch::Sender<Option<String>>,
    /// The ring's secret, once the local ring registered (a slot made by an early abort has
    /// none, and takes no stream until then).
    secret: Option<ExpectedToken>,
}

/// Why an incoming stream was refused; mapped to a status code in one place.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
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
    #[error("collective {id} is not assigned to this worker (no ring of that id registered here within {waited:?})")]
    Unassigned {
        id: String,
        waited: std::time::Duration,
    },
    #[error("collective {0}: the stream did not carry the ring's secret")]
    WrongSecret(String),
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
            Refusal::Unassigned { .. } => Status::not_found(refusal.to_string()),
            Refusal::WrongSecret(_) => Status::permission_denied(refusal.to_string()),
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
                abort: watch::channel(None).0,
                secret: None,
            }
        })
    }

    fn is_closed(&self, id: &str) -> bool {
        self.closed.iter().any(|closed| closed == id)
    }

    /// The queue an incoming stream for `id` carrying `secret` forwards into; `None` while
    /// no local ring `id` has registered.
    fn attach(
        &mut self,
        id: &str,
        secret: Option<&str>,
    ) -> Result<Option<(u64, mpsc::Sender<Inbound>)>, Refusal> {
        if self.is_closed(id) {
            return Err(Refusal::Closed(id.to_owned()));
        }
        let Some(slot) = self.rings.get_mut(id) else {
            return Ok(None);
        };
        let Some(expected) = &slot.secret else {
            return Ok(None);
        };
        if let Err(Refused::Missing | Refused::Wrong) = expected.check(secret) {
            return Err(Refusal::WrongSecret(id.to_owned()));
        }
        match slot.sender.take() {
            Some(sender) => Ok(Some((slot.serial, sender))),
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

    /// The queue the local ring `id` reads; its streams must carry `secret`.
    fn register(
        &mut self,
        id: &str,
        queue: usize,
        secret: &Token,
    ) -> Result<Registered, RegisterError> {
        if self.is_closed(id) {
            return Err(RegisterError::Used(id.to_owned()));
        }
        let slot = self.slot(id, queue);
        match slot.receiver.take() {
            Some(frames) => {
                slot.secret = Some(ExpectedToken::new(secret));
                Ok(Registered {
                    serial: slot.serial,
                    frames,
                    aborted: slot.abort.subscribe(),
                })
            }
            None => Err(RegisterError::Taken(id.to_owned())),
        }
    }

    /// Aborts ring `id` (made now if it has not come yet, so it starts aborted); a ring that
    /// already ended is left alone. Returns whether a ring was aborted.
    fn abort(&mut self, id: &str, queue: usize, reason: &str) -> bool {
        if self.is_closed(id) {
            return false;
        }
        self.slot(id, queue)
            .abort
            .send_replace(Some(reason.to_owned()));
        true
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
pub(super) struct InboxLink {
    inbox: CollectiveInbox,
    id: String,
    serial: u64,
    pub(super) frames: mpsc::Receiver<Inbound>,
    /// Holds the coordinator's reason once it aborts the ring.
    pub(super) aborted: watch::Receiver<Option<String>>,
}

impl InboxLink {
    /// Resolves with the coordinator's reason once it aborts the ring (never, if it does not).
    pub(super) fn aborted(&self) -> impl Future<Output = String> + 'static {
        let mut aborted = self.aborted.clone();
        async move {
            let reason = aborted
                .wait_for(Option::is_some)
                .await
                .ok()
                .map(|reason| reason.clone().unwrap_or_default());
            match reason {
                Some(reason) => reason,
                // The inbox is gone: nobody can abort any more.
                None => std::future::pending().await,
            }
        }
    }
}

impl Drop for InboxLink {
    fn drop(&mut self) {
        self.inbox.state().close(&self.id, self.serial);
    }
}

/// An incoming stream's hold on its ring's queue; dropping it (also when hyper drops the call
/// because the peer reset it) forgets a queue nobody reads.
pub(super) struct Attachment {
    inbox: CollectiveInbox,
    pub(super) id: String,
    serial: u64,
    pub(super) frames: mpsc::Sender<Inbound>,
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
                registered: Notify::new(),
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

    /// Registers the local rank `rank` of ring `id`, whose streams carry `secret`.
    pub(super) fn register(
        &self,
        id: &str,
        rank: usize,
        secret: &Token,
    ) -> Result<InboxLink, CollectiveError> {
        let registered = self
            .state()
            .register(id, self.queue_frames(), secret)
            .map_err(|error| CollectiveError::Setup {
                rank,
                reason: error.to_string(),
            })?;
        self.shared.registered.notify_waiters();
        Ok(InboxLink {
            inbox: self.clone(),
            id: id.to_owned(),
            serial: registered.serial,
            frames: registered.frames,
            aborted: registered.aborted,
        })
    }

    /// Aborts this worker's rank of ring `id` at once: its sends and receives fail with the
    /// coordinator's `reason` instead of waiting for a peer the coordinator knows is gone. A
    /// ring that has not started here yet starts aborted; one that ended is left alone.
    /// Returns whether a ring was aborted.
    pub fn abort(&self, id: &str, reason: &str) -> bool {
        let queue = self.queue_frames();
        self.state().abort(id, queue, reason)
    }

    /// The hold of an incoming stream carrying `secret` on ring `id`'s queue, once that ring
    /// has registered here (waiting for it up to the options' `accept_timeout`).
    pub(super) async fn attach(
        &self,
        id: &str,
        secret: Option<&str>,
    ) -> Result<Attachment, Refusal> {
        let waited = self.shared.options.accept_timeout;
        let deadline = tokio::time::Instant::now() + waited;
        loop {
            // Armed before looking, so a registration in between is not missed.
            let registered = self.shared.registered.notified();
            tokio::pin!(registered);
            registered.as_mut().enable();
            if let Some((serial, frames)) = self.state().attach(id, secret)? {
                return Ok(Attachment {
                    inbox: self.clone(),
                    id: id.to_owned(),
                    serial,
                    frames,
                });
            }
            if tokio::time::timeout_at(deadline, registered).await.is_err() {
                return Err(Refusal::Unassigned {
                    id: id.to_owned(),
                    waited,
                });
            }
        }
    }

    /// Rings with a queue right now (registered, or with a stream whose ring has not come).
    #[cfg(test)]
    pub(super) fn open_rings(&self) -> usize {
        self.state().rings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aborted_ring_says_why_even_if_it_registers_later_and_an_ended_one_is_left_alone() {
        let mut state = InboxState::default();
        let secret = Token::from("s");
        let running = state.register("running", 2, &secret).expect("registered");
        assert!(state.abort("running", 2, "worker w lost"));
        assert_eq!(running.aborted.borrow().as_deref(), Some("worker w lost"));
        assert!(state.abort("early", 2, "rank 1 lost"));
        let early = state
            .register("early", 2, &secret)
            .expect("registered after the abort");
        assert_eq!(early.aborted.borrow().as_deref(), Some("rank 1 lost"));
        state.close("running", running.serial);
        assert!(
            !state.abort("running", 2, "late"),
            "an ended ring is not made again"
        );
        assert!(!state.rings.contains_key("running"));
    }

    #[test]
    fn inbox_ids_are_used_once_and_remembered_within_bounds() {
        let mut state = InboxState::default();
        let secret = Token::from("s");
        let serial = state
            .register("a", 2, &secret)
            .expect("first registration")
            .serial;
        assert!(
            state.register("a", 2, &secret).is_err(),
            "a second local rank"
        );
        assert!(matches!(state.attach("a", Some("s")), Ok(Some(_))));
        assert!(matches!(
            state.attach("a", Some("s")),
            Err(Refusal::Attached(_))
        ));
        state.close("a", serial);
        assert!(state.rings.is_empty());
        assert!(state.register("a", 2, &secret).is_err(), "a closed id");
        assert!(matches!(
            state.attach("a", Some("s")),
            Err(Refusal::Closed(_))
        ));
        for i in 0..CLOSED_IDS_KEPT {
            state.close(&format!("x{i}"), 0);
        }
        assert_eq!(state.closed.len(), CLOSED_IDS_KEPT);
        assert!(!state.is_closed("a"));
    }

    #[test]
    fn a_stream_is_attached_only_to_a_registered_ring_and_only_with_its_secret() {
        let mut state = InboxState::default();
        // Before the ring is assigned here: nothing to attach to, and no queue is made.
        assert!(matches!(state.attach("r", Some("s")), Ok(None)));
        assert!(state.rings.is_empty());
        // An early abort makes the slot, but it takes no stream before the ring registers.
        assert!(state.abort("r", 2, "lost"));
        assert!(matches!(state.attach("r", Some("s")), Ok(None)));
        let _link = state
            .register("r", 2, &Token::from("s"))
            .expect("registered");
        // A stranger without the secret is refused and takes nothing away.
        for wrong in [None, Some(""), Some("guess")] {
            assert!(matches!(
                state.attach("r", wrong),
                Err(Refusal::WrongSecret(_))
            ));
        }
        assert!(matches!(state.attach("r", Some("s")), Ok(Some(_))));
    }
}
