//! The outgoing `PushChunks` call to the right neighbour: dialling its server, feeding the
//! outgoing queue into the call, and recording how the call ended.

use spin_common::auth::{Bearer, Token};
use spin_common::proto::v1::collective_service_client::CollectiveServiceClient;
use spin_common::proto::v1::ChunkMessage;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, timeout_at, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::runtime::error_chain;
use super::{GrpcOptions, COLLECTIVE_ID_HEADER, CONNECT_RETRY, RING_SECRET_HEADER};
use crate::collective::error::CollectiveError;

/// How a `PushChunks` call ended: frames received by the right neighbour, or why not.
pub(super) type CallOutcome = Result<u64, CallFailure>;

/// Why a `PushChunks` call failed.
#[derive(Clone, Debug)]
pub(super) struct CallFailure {
    /// The right neighbour's inbox answered and refused the stream (its ring is closed, or the
    /// stream was malformed or a duplicate), as opposed to a broken connection.
    pub(super) refused: bool,
    /// The status, for errors.
    pub(super) reason: String,
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

/// What the task that feeds the `PushChunks` call is asked to do, in order.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// Stream this message.
    Message(ChunkMessage),
    /// Report once everything before has been handed to the HTTP/2 stream.
    Flush(oneshot::Sender<()>),
}

/// Opens a channel to the right neighbour's server, retrying while it is not up yet. An address
/// without a scheme is dialled over TLS when the options hold TLS material.
pub(super) async fn connect_right(
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
pub(super) async fn push_chunks(
    mut client: CollectiveServiceClient<Channel>,
    collective_id: String,
    secret: Token,
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
    // The coordinator's secrets are hex; one that cannot travel as a header goes without (and
    // the right neighbour refuses the stream, naming the ring).
    if let Ok(value) = secret.expose().parse() {
        request.metadata_mut().insert(RING_SECRET_HEADER, value);
    }
    let result = client
        .push_chunks(request)
        .await
        .map(|response| response.into_inner().chunks_received)
        .map_err(|status| CallFailure::new(&status));
    outcome.send_replace(Some(result));
}
