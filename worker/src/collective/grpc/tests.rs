//! The gRPC links end to end: rings over served inboxes against the in-process ring, late and
//! stray streams, departed and missing ranks, malformed messages, and delivery on a quick exit.

use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::{Duration, Instant as StdInstant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use bytes::Bytes;
use spin_common::proto::v1::collective_service_client::CollectiveServiceClient;
use spin_common::proto::v1::{ChunkMessage, RingPhase};
use tokio::net::TcpListener;
use tokio::runtime::{Builder, Runtime};
use tokio::time::timeout;
use tonic::{Code, Status};

use super::runtime::io_runtime;
use super::wire::payload_bytes;
use super::*;
use crate::collective::frame::{Frame, FrameHeader, Phase};
use crate::collective::transport::Transport;
use crate::collective::Collective;

/// Bound on any wait in these tests.
const DEADLINE: Duration = Duration::from_secs(20);

type Result<T> = std::result::Result<T, CollectiveError>;

/// The secret of the rings these tests form.
const RING_SECRET: &str = "ring-secret";

fn options() -> GrpcOptions {
    GrpcOptions {
        queue_frames: 3,
        connect_timeout: Duration::from_secs(5),
        accept_timeout: Duration::from_secs(1),
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
            let secret = Token::from(RING_SECRET);
            RingCollective::connect_grpc(
                rank,
                world,
                &id,
                &secret,
                &right,
                &inbox,
                config,
                &options(),
            )
        }
    }

    /// Streams `messages` to inbox `index` in one call; its answer.
    fn push(&self, index: usize, messages: Vec<ChunkMessage>) -> std::result::Result<u64, Status> {
        self.push_with(index, None, messages)
    }

    /// Streams `messages` to inbox `index` in one call carrying `secret` as the ring's
    /// secret; its answer.
    fn push_with(
        &self,
        index: usize,
        secret: Option<&str>,
        messages: Vec<ChunkMessage>,
    ) -> std::result::Result<u64, Status> {
        let uri = format!("http://{}", self.addresses[index]);
        let call = async {
            let mut client = CollectiveServiceClient::connect(uri)
                .await
                .expect("connect");
            let mut request = tonic::Request::new(tokio_stream::iter(messages));
            if let Some(secret) = secret {
                let value = secret.parse().expect("ascii secret");
                request.metadata_mut().insert(RING_SECRET_HEADER, value);
            }
            let response = client.push_chunks(request).await?;
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
            let ranks =
                RingCollective::localhost_ring_grpc(world, config, &options()).expect("grpc ring");
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
    // A stream for a ring that never forms here is refused once it has waited for it, and
    // leaves nothing behind.
    let stray = vec![data_message("elsewhere", 0, payload_bytes(vec![1.0; 4]))];
    let stray = inboxes.push(2, stray).expect_err("stray stream");
    assert_eq!(stray.code(), Code::NotFound, "{stray:?}");
    assert!(stray.message().contains("not assigned"), "{stray:?}");
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
fn a_stranger_claiming_a_ring_id_first_is_refused_and_the_ring_runs() {
    // The ids are predictable: a stranger opens streams for the next ring on every inbox
    // before its ranks arrive, with a wrong secret and with none.
    let inboxes = Inboxes::start(3);
    let config = small_config();
    let claim = |index: usize, secret: Option<&'static str>| {
        let inboxes = &inboxes;
        move || {
            inboxes.push_with(
                index,
                secret,
                vec![data_message("next", 2, payload_bytes(vec![1e30; 4]))],
            )
        }
    };
    let inputs = random_buffers(3, 3001, 31);
    thread::scope(|scope| {
        let claims: Vec<_> = (0..3)
            .flat_map(|i| {
                [
                    scope.spawn(claim(i, Some("guessed"))),
                    scope.spawn(claim(i, None)),
                ]
            })
            .collect();
        thread::sleep(Duration::from_millis(100));
        let makers = (0..3)
            .map(|r| inboxes.maker(r, 3, "next", &config))
            .collect();
        let results = run_ranks(makers, &inputs, 1, Duration::ZERO);
        assert_bitwise(&reference(&inputs, &config, 1), results);
        for claim in claims {
            let refused = claim
                .join()
                .expect("claim thread")
                .expect_err("claim refused");
            assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
            assert!(refused.message().contains("secret"), "{refused:?}");
        }
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
    let bad_phase = |id: &str| ChunkMessage {
        phase: RingPhase::Unspecified as i32,
        ..data_message(id, 0, Bytes::new())
    };
    let odd = |id: &str| data_message(id, 0, Bytes::from_static(&[0; 5]));
    let good = |id: &str| data_message(id, 0, payload_bytes(vec![0.5; 2]));
    let other_sender = |id: &str| data_message(id, 1, Bytes::new());
    let no_id = vec![data_message("", 0, Bytes::new())];
    let status = inboxes.push(0, no_id).expect_err("no id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("ChunkMessage.collective_id"));
    for (n, (messages, field)) in [
        (vec![bad_phase("ring-0")], "ChunkMessage.phase"),
        (vec![odd("ring-1")], "ChunkMessage.payload"),
        (
            vec![good("ring-2"), other_sender("ring-2")],
            "ChunkMessage.sender_rank",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        // Each on a ring of its own, assigned here with no secret.
        let link = inboxes.inboxes[0]
            .register(&format!("ring-{n}"), 1, &Token::default())
            .expect("register");
        let status = inboxes.push(0, messages).expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{status:?}");
        drop(link);
        inboxes.wait_all_closed();
    }
    let odd_payload = odd("ring");
    let good = || good("ring");

    // A local ring whose left neighbour sends a bad frame learns why its stream ended.
    let mut link = inboxes.inboxes[0]
        .register("ring", 1, &Token::default())
        .expect("register");
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
        .expect_err("a reason")
        .to_string();
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
    let secret = Token::from(RING_SECRET);
    let result = RingCollective::connect_grpc(
        0,
        2,
        "r",
        &secret,
        &address,
        &inbox,
        small_config(),
        &options,
    );
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
    let mut link = inboxes.inboxes[1]
        .register("leaving", 1, &Token::from(RING_SECRET))
        .expect("register");
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
            let secret = Token::from(RING_SECRET);
            let connect = GrpcTransport::connect(0, 2, "leaving", &secret, right, inbox, &options);
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
