//! The generated `spin.v1` gRPC code and the conversions at its boundary: ids parsed into
//! their newtypes, required fields checked, chunk payloads to and from `f32`.

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::ids::IdError;

/// Generated messages, clients and servers of package `spin.v1` (see `proto/spin/v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("spin.v1");
}

/// Why a message from the wire was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// An id field does not parse.
    #[error("field `{field}`: {source}")]
    Id {
        /// `message.field`.
        field: &'static str,
        /// What was wrong with it.
        #[source]
        source: IdError,
    },
    /// A required message field or oneof is absent.
    #[error("field `{field}` is missing")]
    Missing {
        /// `message.field`.
        field: &'static str,
    },
    /// A chunk payload is not a whole number of `f32`s.
    #[error("field `{field}`: {len} bytes is not a whole number of f32 values")]
    Payload {
        /// `message.field`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A field holds a value outside what the protocol allows (e.g. a rank past its world).
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// `message.field`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An enum field holds a value this build does not know.
    #[error("field `{field}`: unknown enum value {value}")]
    Enum {
        /// `message.field`.
        field: &'static str,
        /// The number sent.
        value: i32,
    },
}

impl From<ProtoError> for tonic::Status {
    fn from(err: ProtoError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

/// Parses the id in `field` (a `JobId` or `WorkerId`).
pub fn parse_id<T>(field: &'static str, value: &str) -> Result<T, ProtoError>
where
    T: FromStr<Err = IdError>,
{
    value
        .parse()
        .map_err(|source| ProtoError::Id { field, source })
}

/// The value of an optional message field that the protocol requires.
pub fn required<T>(field: &'static str, value: Option<T>) -> Result<T, ProtoError> {
    value.ok_or(ProtoError::Missing { field })
}

/// `values` as little-endian bytes, as `ChunkMessage.payload` carries them.
pub fn encode_f32(values: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// The `f32` values of a payload written by [`encode_f32`].
pub fn decode_f32(field: &'static str, payload: &[u8]) -> Result<Vec<f32>, ProtoError> {
    if !payload.len().is_multiple_of(4) {
        return Err(ProtoError::Payload {
            field,
            len: payload.len(),
        });
    }
    Ok(payload
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Adds the payload's values into `acc` element by element (the reduce-scatter step), without
/// an intermediate vector.
pub fn add_f32_into(
    field: &'static str,
    payload: &[u8],
    acc: &mut [f32],
) -> Result<(), ProtoError> {
    if payload.len() != acc.len() * 4 {
        return Err(ProtoError::Payload {
            field,
            len: payload.len(),
        });
    }
    for (a, c) in acc.iter_mut().zip(payload.chunks_exact(4)) {
        *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

/// The ring phase of a chunk, refusing values this build does not know.
pub fn ring_phase(value: i32) -> Result<v1::RingPhase, ProtoError> {
    match v1::RingPhase::try_from(value) {
        Ok(v1::RingPhase::Unspecified) | Err(_) => Err(ProtoError::Enum {
            field: "ChunkMessage.phase",
            value,
        }),
        Ok(phase) => Ok(phase),
    }
}

/// `time` as unix milliseconds, the wire's timestamp (0 before the epoch).
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::ids::{JobId, WorkerId};

    #[test]
    fn ids_parse_and_bad_ids_name_the_field() {
        let id = JobId::new();
        let parsed: JobId = parse_id("GetJobRequest.job_id", &id.to_string()).unwrap();
        assert_eq!(parsed, id);
        let err = parse_id::<WorkerId>("Hello.worker_id", "x").unwrap_err();
        assert!(err.to_string().contains("Hello.worker_id"), "{err}");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn payloads_round_trip_and_odd_lengths_are_refused() {
        let values = [1.0f32, -2.5, f32::MIN_POSITIVE, 3.0e7];
        let bytes = encode_f32(&values);
        assert_eq!(decode_f32("p", &bytes).unwrap(), values);
        assert!(decode_f32("p", &bytes[..5]).is_err());
        let mut acc = [1.0f32; 4];
        add_f32_into("p", &bytes, &mut acc).unwrap();
        assert_eq!(acc, [2.0, -1.5, 1.0 + f32::MIN_POSITIVE, 3.0e7 + 1.0]);
        assert!(add_f32_into("p", &bytes, &mut [0.0; 3]).is_err());
    }

    #[test]
    fn messages_round_trip_through_the_wire_format() {
        let chunk = v1::ChunkMessage {
            collective_id: "ring-1".into(),
            sender_rank: 0,
            round: 2,
            bucket: 3,
            phase: v1::RingPhase::AllGather as i32,
            ring_step: 1,
            chunk: 1,
            piece: 0,
            payload: encode_f32(&[0.5, 0.25]),
            abort: false,
            alive: Vec::new(),
        };
        let decoded = v1::ChunkMessage::decode(chunk.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, chunk);
        assert_eq!(ring_phase(decoded.phase).unwrap(), v1::RingPhase::AllGather);
        assert!(ring_phase(0).is_err());
        assert!(ring_phase(99).is_err());

        let task = v1::CoordinatorMessage {
            message: Some(v1::coordinator_message::Message::Task(v1::Task {
                task_id: "t".into(),
                job_id: JobId::new().to_string(),
                kind: Some(v1::task::Kind::Sample(v1::SampleShard {
                    iteration: 1,
                    shard: 4,
                    first_prompt: 400,
                    end_prompt: 500,
                    seed: 42,
                })),
            })),
        };
        let decoded = v1::CoordinatorMessage::decode(task.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, task);
    }
}
