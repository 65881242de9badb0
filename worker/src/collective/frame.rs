//! Frames exchanged between ring neighbours, and their wire header (used by byte-stream
//! transports such as TCP; the in-process transport moves frames as they are).

use std::fmt;

/// The half of the ring all-reduce a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The receiver adds the payload into its copy of the chunk.
    ReduceScatter,
    /// The receiver copies the (already averaged) payload into its buffer.
    AllGather,
}

/// Where a data frame belongs in the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// The all-reduce call this frame belongs to.
    pub round: u64,
    /// The bucket within the buffer.
    pub bucket: u32,
    /// Reduce-scatter or all-gather.
    pub phase: Phase,
    /// The step within the phase.
    pub step: u32,
    /// The chunk within the bucket.
    pub chunk: u32,
    /// The piece within the chunk.
    pub piece: u32,
}

impl fmt::Display for FrameHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "round {} bucket {} {:?} step {} chunk {} piece {}",
            self.round, self.bucket, self.phase, self.step, self.chunk, self.piece
        )
    }
}

/// One message from a rank to its right neighbour.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A piece of a chunk.
    Data {
        /// Where it belongs.
        header: FrameHeader,
        /// The values.
        payload: Vec<f32>,
    },
    /// The sender gave up on `round`; `alive` are the ranks known to have reached this point
    /// (they are stalled, not silent), passed on so every rank can name the silent one.
    Abort {
        /// The failed all-reduce call.
        round: u64,
        /// Ranks that reported themselves alive.
        alive: Vec<u32>,
    },
}

impl Frame {
    /// A short description for errors.
    pub fn describe(&self) -> String {
        match self {
            Frame::Data { header, payload } => format!("{header} ({} values)", payload.len()),
            Frame::Abort { round, alive } => format!("abort of round {round} (alive {alive:?})"),
        }
    }
}

/// The size of a frame header on the wire.
pub const WIRE_HEADER_LEN: usize = 32;

const KIND_DATA: u8 = 0;
const KIND_ABORT: u8 = 1;

/// A decoded wire header: what follows is `len` little-endian f32 values (data) or u32 ranks
/// (abort).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireHeader {
    /// A data frame of `len` values.
    Data {
        /// Where it belongs.
        header: FrameHeader,
        /// The number of f32 values that follow.
        len: usize,
    },
    /// An abort frame listing `len` ranks.
    Abort {
        /// The failed all-reduce call.
        round: u64,
        /// The number of u32 ranks that follow.
        len: usize,
    },
}

/// Encodes the header of `frame`: kind u8, phase u8, two zero bytes, round u64, bucket, step,
/// chunk, piece and the element count as u32, all little-endian.
pub fn encode_header(frame: &Frame) -> [u8; WIRE_HEADER_LEN] {
    let mut out = [0u8; WIRE_HEADER_LEN];
    let (kind, phase, round, fields, len) = match frame {
        Frame::Data { header, payload } => (
            KIND_DATA,
            u8::from(header.phase == Phase::AllGather),
            header.round,
            [header.bucket, header.step, header.chunk, header.piece],
            payload.len(),
        ),
        Frame::Abort { round, alive } => (KIND_ABORT, 0, *round, [0; 4], alive.len()),
    };
    out[0] = kind;
    out[1] = phase;
    out[4..12].copy_from_slice(&round.to_le_bytes());
    for (i, field) in fields.iter().enumerate() {
        out[12 + 4 * i..16 + 4 * i].copy_from_slice(&field.to_le_bytes());
    }
    // Frames are at most a bucket long, far below u32::MAX values.
    out[28..32].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    out
}

/// A wire header that is not one: an unknown kind or phase byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad frame header (kind {kind}, phase {phase})")]
pub struct BadHeader {
    /// The kind byte.
    pub kind: u8,
    /// The phase byte.
    pub phase: u8,
}

/// Decodes a wire header, or says what is wrong with it.
pub fn decode_header(bytes: &[u8; WIRE_HEADER_LEN]) -> Result<WireHeader, BadHeader> {
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut round = [0u8; 8];
    round.copy_from_slice(&bytes[4..12]);
    let round = u64::from_le_bytes(round);
    let len = u32_at(28) as usize;
    match (bytes[0], bytes[1]) {
        (KIND_DATA, phase @ (0 | 1)) => Ok(WireHeader::Data {
            header: FrameHeader {
                round,
                bucket: u32_at(12),
                phase: if phase == 0 {
                    Phase::ReduceScatter
                } else {
                    Phase::AllGather
                },
                step: u32_at(16),
                chunk: u32_at(20),
                piece: u32_at(24),
            },
            len,
        }),
        (KIND_ABORT, _) => Ok(WireHeader::Abort { round, len }),
        (kind, phase) => Err(BadHeader { kind, phase }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let header = FrameHeader {
            round: u64::MAX - 3,
            bucket: 7,
            phase: Phase::AllGather,
            step: 2,
            chunk: 3,
            piece: 11,
        };
        let data = Frame::Data {
            header,
            payload: vec![1.0; 5],
        };
        assert_eq!(
            decode_header(&encode_header(&data)),
            Ok(WireHeader::Data { header, len: 5 })
        );
        let abort = Frame::Abort {
            round: 9,
            alive: vec![1, 2],
        };
        assert_eq!(
            decode_header(&encode_header(&abort)),
            Ok(WireHeader::Abort { round: 9, len: 2 })
        );
        let mut bad = encode_header(&abort);
        bad[0] = 9;
        assert!(decode_header(&bad).is_err());
    }
}
