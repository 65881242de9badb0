//! The `CollectiveService` of a [`CollectiveInbox`]: each `PushChunks` stream is checked and its
//! frames forwarded, in order, into its ring's queue.

use spin_common::auth::Refused;
use spin_common::proto::v1::collective_service_server::CollectiveService;
use spin_common::proto::v1::{ChunkMessage, PushChunksResponse};
use spin_common::proto::ProtoError;
use tonic::{Request, Response, Status, Streaming};

use super::inbox::{Attachment, CollectiveInbox, InboundError, Refusal};
use super::wire::frame_from_message;
use super::{COLLECTIVE_ID_HEADER, RING_SECRET_HEADER};

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
        let secret = request
            .metadata()
            .get(RING_SECRET_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
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
        let attachment = self.attach(&id, secret.as_deref()).await?;
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
                    let broken = InboundError::Stream(status.message().to_owned());
                    // Best effort: a full queue still ends with the stream's close.
                    let _ = frames.try_send(Err(broken));
                    return Err(Refusal::Stream(Box::new(status)));
                }
            },
        };
        let sender = *sender_rank.get_or_insert(message.sender_rank);
        let frame = same_stream(&message, &attachment.id, sender)
            .and_then(|()| frame_from_message(message).map_err(Refusal::from));
        let frame = match frame {
            Ok(frame) => frame,
            Err(refusal) => {
                let reason = refusal.to_string();
                let _ = frames.try_send(Err(InboundError::BadFrame { sender, reason }));
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
