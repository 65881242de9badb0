//! Conversions between ring [`Frame`]s and the `ChunkMessage`s that carry them, and between f32
//! values and little-endian payload bytes.

use bytes::Bytes;
use spin_common::proto::v1::{ChunkMessage, RingPhase};
use spin_common::proto::{decode_f32, encode_f32, ProtoError};

use crate::collective::frame::{Frame, FrameHeader, Phase};

/// `values` as the little-endian payload bytes; on little-endian hosts the vector becomes the
/// buffer, without a copy.
pub(super) fn payload_bytes(values: Vec<f32>) -> Bytes {
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
pub(super) fn payload_values(payload: &[u8]) -> Result<Vec<f32>, ProtoError> {
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
pub(super) fn message_from_frame(
    collective_id: &str,
    sender_rank: u32,
    frame: Frame,
) -> ChunkMessage {
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
pub(super) fn frame_from_message(message: ChunkMessage) -> Result<Frame, ProtoError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
