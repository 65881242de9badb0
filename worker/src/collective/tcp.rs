//! A TCP transport: each rank connects to its right neighbour and accepts its left one; frames
//! are a 32-byte header ([`super::frame::encode_header`]) followed by little-endian values.
//! A writer task and a reader task per rank move bytes while the ring reduces, behind bounded
//! queues.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

use super::error::CollectiveError;
use super::frame::{decode_header, encode_header, Frame, WireHeader, WIRE_HEADER_LEN};
use super::transport::Transport;

const HANDSHAKE_MAGIC: &[u8; 8] = b"SPNRING1";

/// Settings of the TCP links.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpOptions {
    /// Frames queued for the writer task, and again frames the reader task may hold.
    pub queue_frames: usize,
    /// How long forming the ring (connect right, accept left, handshake) may take.
    pub connect_timeout: Duration,
    /// The largest frame accepted, in values (guards against a corrupt length).
    pub max_frame_values: usize,
    /// Runtime threads that drive the sockets (for [`super::RingCollective::connect_tcp`]).
    pub io_threads: usize,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            queue_frames: 8,
            connect_timeout: Duration::from_secs(60),
            max_frame_values: 1 << 28,
            io_threads: 2,
        }
    }
}

/// What the writer task is asked to do, in order.
#[derive(Debug)]
enum Outgoing {
    /// Write this frame.
    Frame(Frame),
    /// Report once everything before has been written.
    Flush(oneshot::Sender<()>),
}

/// One rank's TCP links in a ring.
#[derive(Debug)]
pub struct TcpTransport {
    rank: usize,
    world: usize,
    capacity: usize,
    to_writer: Option<mpsc::Sender<Outgoing>>,
    from_reader: Option<mpsc::Receiver<Result<Frame, CollectiveError>>>,
    writer_error: Arc<Mutex<Option<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // The writer drains its queue and closes; the reader may be parked on a read forever.
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

impl TcpTransport {
    /// Forms `rank`'s links: accepts the left neighbour on `listener` (bound by the caller,
    /// port 0 in tests) and connects to the right neighbour's listener at `right`, retrying
    /// until `options.connect_timeout`. Spawns the reader and writer on the current runtime.
    pub async fn connect(
        rank: usize,
        world: usize,
        listener: TcpListener,
        right: SocketAddr,
        options: &TcpOptions,
    ) -> Result<Self, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(CollectiveError::Config(format!(
                "rank {rank} of world {world}"
            )));
        }
        let queue = options.queue_frames.max(1);
        let mut transport = Self {
            rank,
            world,
            capacity: 2 * queue,
            to_writer: None,
            from_reader: None,
            writer_error: Arc::default(),
            reader: None,
        };
        if world == 1 {
            return Ok(transport);
        }
        let left = (rank + world - 1) % world;
        let setup = async {
            tokio::try_join!(
                accept_left(&listener, rank, left, world),
                connect_right(right, rank, world)
            )
        };
        let (left_stream, right_stream) =
            timeout(options.connect_timeout, setup)
                .await
                .map_err(|_| CollectiveError::Setup {
                    rank,
                    reason: format!(
                        "ring not formed within {:?} (left rank {left}, right rank {} at {right})",
                        options.connect_timeout,
                        (rank + 1) % world
                    ),
                })??;

        let (to_writer, frames) = mpsc::channel(queue);
        let writer_error = Arc::clone(&transport.writer_error);
        tokio::spawn(async move {
            if let Err(error) = write_frames(right_stream, frames).await {
                if let Ok(mut slot) = writer_error.lock() {
                    *slot = Some(error.to_string());
                }
            }
        });
        let (incoming, from_reader) = mpsc::channel(queue);
        let max_values = options.max_frame_values;
        let reader = tokio::spawn(read_frames(left_stream, incoming, rank, left, max_values));
        transport.to_writer = Some(to_writer);
        transport.from_reader = Some(from_reader);
        transport.reader = Some(reader);
        Ok(transport)
    }

    fn right(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn left(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn writer_closed(&self) -> CollectiveError {
        let reason = self
            .writer_error
            .lock()
            .ok()
            .and_then(|slot| slot.clone())
            .unwrap_or_else(|| "connection writer stopped".into());
        CollectiveError::PeerClosed {
            rank: self.rank,
            peer: self.right(),
            reason,
        }
    }

    fn no_links(&self) -> CollectiveError {
        CollectiveError::Config(format!("rank {} is alone in its ring", self.rank))
    }
}

impl Transport for TcpTransport {
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
        let Some(to_writer) = &self.to_writer else {
            return Err(self.no_links());
        };
        match to_writer.send(Outgoing::Frame(frame)).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.writer_closed()),
        }
    }

    async fn flush(&mut self) -> Result<(), CollectiveError> {
        let Some(to_writer) = &self.to_writer else {
            return Ok(());
        };
        let (done, written) = oneshot::channel();
        if to_writer.send(Outgoing::Flush(done)).await.is_err() || written.await.is_err() {
            return Err(self.writer_closed());
        }
        Ok(())
    }

    fn try_send(&mut self, frame: Frame) -> Result<(), CollectiveError> {
        let Some(to_writer) = &self.to_writer else {
            return Err(self.no_links());
        };
        to_writer
            .try_send(Outgoing::Frame(frame))
            .map_err(|_| self.writer_closed())
    }

    async fn recv(&mut self) -> Result<Frame, CollectiveError> {
        let left = self.left();
        let rank = self.rank;
        let Some(from_reader) = &mut self.from_reader else {
            return Err(self.no_links());
        };
        match from_reader.recv().await {
            Some(result) => result,
            None => Err(CollectiveError::PeerClosed {
                rank,
                peer: left,
                reason: "connection reader stopped".into(),
            }),
        }
    }
}

fn setup_error(rank: usize, what: String) -> CollectiveError {
    CollectiveError::Setup { rank, reason: what }
}

fn handshake(rank: usize, world: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(HANDSHAKE_MAGIC);
    out[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    out[12..].copy_from_slice(&(world as u32).to_le_bytes());
    out
}

/// Accepts connections until one handshakes as rank `left` of `world`.
async fn accept_left(
    listener: &TcpListener,
    rank: usize,
    left: usize,
    world: usize,
) -> Result<TcpStream, CollectiveError> {
    loop {
        let (mut stream, addr) = listener
            .accept()
            .await
            .map_err(|e| setup_error(rank, format!("accepting left rank {left}: {e}")))?;
        let mut hello = [0u8; 16];
        if let Err(error) = stream.read_exact(&mut hello).await {
            tracing::warn!(%addr, %error, "ring handshake failed");
            continue;
        }
        if hello == handshake(left, world) {
            stream.set_nodelay(true)?;
            return Ok(stream);
        }
        tracing::warn!(%addr, expected_rank = left, "ring handshake from an unexpected peer");
    }
}

/// Connects to the right neighbour, retrying while its listener is not up yet.
async fn connect_right(
    right: SocketAddr,
    rank: usize,
    world: usize,
) -> Result<TcpStream, CollectiveError> {
    let mut stream = loop {
        match TcpStream::connect(right).await {
            Ok(stream) => break stream,
            Err(error) => {
                tracing::debug!(%right, %error, "right neighbour not reachable yet");
                sleep(Duration::from_millis(50)).await;
            }
        }
    };
    stream.set_nodelay(true)?;
    stream
        .write_all(&handshake(rank, world))
        .await
        .map_err(|e| setup_error(rank, format!("handshake with {right}: {e}")))?;
    Ok(stream)
}

/// The values of `values` as little-endian bytes, without a copy on little-endian hosts.
fn to_le_bytes<T: bytemuck::Pod>(values: &[T]) -> Cow<'_, [u8]> {
    let bytes: &[u8] = bytemuck::cast_slice(values);
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytes)
    } else {
        let size = std::mem::size_of::<T>();
        let swapped = bytes
            .chunks_exact(size)
            .flat_map(|word| word.iter().rev().copied())
            .collect();
        Cow::Owned(swapped)
    }
}

/// Turns little-endian wire bytes in place into native values.
fn from_le_in_place<T: bytemuck::Pod>(values: &mut [T]) {
    if cfg!(target_endian = "big") {
        let size = std::mem::size_of::<T>();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(values);
        for word in bytes.chunks_exact_mut(size) {
            word.reverse();
        }
    }
}

async fn write_frames(
    mut stream: TcpStream,
    mut frames: mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    while let Some(outgoing) = frames.recv().await {
        let frame = match outgoing {
            Outgoing::Frame(frame) => frame,
            Outgoing::Flush(done) => {
                stream.flush().await?;
                let _ = done.send(());
                continue;
            }
        };
        stream.write_all(&encode_header(&frame)).await?;
        let body = match &frame {
            Frame::Data { payload, .. } => to_le_bytes(payload.as_slice()),
            Frame::Abort { alive, .. } => to_le_bytes(alive.as_slice()),
        };
        stream.write_all(&body).await?;
    }
    stream.shutdown().await
}

async fn read_frames(
    mut stream: TcpStream,
    frames: mpsc::Sender<Result<Frame, CollectiveError>>,
    rank: usize,
    left: usize,
    max_values: usize,
) {
    loop {
        let closed = |reason: String| CollectiveError::PeerClosed {
            rank,
            peer: left,
            reason,
        };
        let result = match read_frame(&mut stream, max_values).await {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(closed("connection closed by peer".into())),
            Err(error) => Err(closed(error.to_string())),
        };
        let stop = result.is_err();
        if frames.send(result).await.is_err() || stop {
            return;
        }
    }
}

/// Reads one frame; `None` at a clean end of stream.
async fn read_frame(stream: &mut TcpStream, max_values: usize) -> std::io::Result<Option<Frame>> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut header = [0u8; WIRE_HEADER_LEN];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let frame = match decode_header(&header).map_err(|e| invalid(e.to_string()))? {
        WireHeader::Data { len, .. } | WireHeader::Abort { len, .. } if len > max_values => {
            return Err(invalid(format!(
                "frame of {len} values exceeds {max_values}"
            )));
        }
        WireHeader::Data { header, len } => {
            let mut payload = vec![0f32; len];
            stream
                .read_exact(bytemuck::cast_slice_mut(&mut payload))
                .await?;
            from_le_in_place(&mut payload);
            Frame::Data { header, payload }
        }
        WireHeader::Abort { round, len } => {
            let mut alive = vec![0u32; len];
            stream
                .read_exact(bytemuck::cast_slice_mut(&mut alive))
                .await?;
            from_le_in_place(&mut alive);
            Frame::Abort { round, alive }
        }
    };
    Ok(Some(frame))
}
