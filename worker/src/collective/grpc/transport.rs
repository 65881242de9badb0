//! [`GrpcTransport`]: one rank's links, frames to the right over a `PushChunks` call and frames
//! from the left through the process's [`CollectiveInbox`], and its [`Transport`] impl.

use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use spin_common::auth::{Bearer, Token};
use spin_common::proto::v1::collective_service_client::CollectiveServiceClient;
use spin_common::proto::v1::ChunkMessage;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;

use super::call::{connect_right, push_chunks, CallOutcome, Outgoing};
use super::inbox::{CollectiveInbox, InboxLink};
use super::runtime::ServerRuntime;
use super::wire::message_from_frame;
use super::{GrpcOptions, OUTCOME_WAIT};
use crate::collective::error::CollectiveError;
use crate::collective::frame::Frame;
use crate::collective::transport::Transport;

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
    pub(super) servers: Option<Arc<ServerRuntime>>,
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
    /// left neighbour's frames arrive, on a stream that must carry `secret`) and opens the
    /// stream, carrying `secret`, to the right neighbour's inbox at
    /// `right_address` (`host:port` or a URI), retrying until `options.connect_timeout`. Spawns
    /// the stream on the current runtime. Does not wait for the left neighbour.
    #[tracing::instrument(level = "debug", skip(inbox, options))]
    pub async fn connect(
        rank: usize,
        world: usize,
        collective_id: &str,
        secret: &Token,
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
        let from_left = inbox.register(collective_id, rank, secret)?;
        let channel = connect_right(rank, (rank + 1) % world, right_address, options).await?;
        let client = CollectiveServiceClient::new(channel)
            .max_encoding_message_size(options.max_message_bytes)
            .max_decoding_message_size(options.max_message_bytes);
        let (to_right, outgoing) = mpsc::channel(queue);
        let (outcome, call) = watch::channel(None);
        // The call's task sends one notice, so it never waits for room.
        let (ended, call_ended) = std_mpsc::sync_channel(1);
        let id = collective_id.to_owned();
        let secret = secret.clone();
        tokio::spawn(async move {
            push_chunks(client, id, secret, bearer, outgoing, outcome).await;
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
        let aborted = links.from_left.aborted();
        let sent = tokio::select! {
            biased;
            reason = aborted => return Err(CollectiveError::Aborted { rank: self.rank, reason }),
            sent = links.to_right.send(message) => sent,
        };
        if sent.is_err() {
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
        let aborted = from_left.aborted();
        let inbound = tokio::select! {
            biased;
            reason = aborted => return Err(CollectiveError::Aborted { rank, reason }),
            inbound = from_left.frames.recv() => inbound,
            true = refused => return Err(self.stream_closed()),
        };
        let reason = match inbound {
            Some(Ok(frame)) => return Ok(frame),
            Some(Err(error)) => error.to_string(),
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
