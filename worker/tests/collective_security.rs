//! The collective port's join token and TLS, with certificates made at test time: a push
//! without the token (or with another) is refused as unauthenticated, a plain-text client
//! cannot reach a TLS inbox, a TLS ring of two with tokens all-reduces correctly, and a rank
//! with the wrong token fails at once, saying why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use spin_common::auth::{Bearer, Token};
use spin_common::proto::v1::collective_service_client::CollectiveServiceClient;
use spin_common::proto::v1::{ChunkMessage, RingPhase};
use spin_common::test_pki::TestPki;
use spin_common::tls::{PemFile, TlsSettings};
use spin_worker::collective::{
    Collective, CollectiveError, CollectiveInbox, GrpcOptions, RingCollective, RingConfig,
};
use tokio::runtime::Runtime;
use tonic::{Code, Request, Status};

/// Bound on any wait in these tests.
const DEADLINE: Duration = Duration::from_secs(20);

const TOKEN: &str = "ring-token-5d1";

async fn t<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .expect("timed out")
}

fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "spin-collective-sec-{}-{name}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The worker-side TLS settings of the test PKI: its CA, and the server certificate (valid for
/// 127.0.0.1) as the worker's own.
fn worker_tls(pki: &TestPki) -> TlsSettings {
    TlsSettings::load(
        Some(&pki.ca),
        Some(&pki.server_cert),
        Some(&pki.server_key),
        ["cert", "key"],
    )
    .unwrap()
}

/// The secret of the rings formed here.
fn secret() -> Token {
    Token::from("ring-secret")
}

fn options(token: &str, tls: TlsSettings) -> GrpcOptions {
    GrpcOptions {
        queue_frames: 3,
        connect_timeout: Duration::from_secs(5),
        accept_timeout: Duration::from_millis(300),
        close_timeout: Duration::from_secs(2),
        io_threads: 1,
        join_token: token.into(),
        tls,
        ..GrpcOptions::default()
    }
}

fn small_ring() -> RingConfig {
    RingConfig {
        bucket_bytes: 4 * 997,
        piece_bytes: 4 * 31,
        timeout: Duration::from_secs(10),
        abort_grace: Duration::from_millis(300),
    }
}

/// Serves an inbox with `options` on a port-0 listener of `runtime`; its `host:port`.
fn serve(runtime: &Runtime, options: &GrpcOptions) -> (CollectiveInbox, String) {
    let listener = runtime
        .block_on(t(tokio::net::TcpListener::bind("127.0.0.1:0")))
        .unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let inbox = CollectiveInbox::new(options);
    runtime.spawn(inbox.clone().serve(listener, std::future::pending()));
    (inbox, address)
}

fn message() -> ChunkMessage {
    ChunkMessage {
        collective_id: "stray".into(),
        sender_rank: 0,
        phase: RingPhase::ReduceScatter as i32,
        payload: Bytes::from(vec![0u8; 8]),
        ..ChunkMessage::default()
    }
}

/// One `PushChunks` call to `url` dialled with `tls`, carrying `token` (none when empty).
fn push(runtime: &Runtime, url: &str, tls: &TlsSettings, token: &str) -> Result<u64, Status> {
    runtime.block_on(async {
        let endpoint = tls.endpoint(url).unwrap();
        let channel = t(endpoint.connect())
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e:?}")))?;
        let mut client = CollectiveServiceClient::new(channel);
        let mut request = Request::new(tokio_stream::iter(vec![message()]));
        Bearer::new("token", &token.into())
            .unwrap()
            .apply(&mut request);
        let response = t(client.push_chunks(request)).await?;
        Ok(response.into_inner().chunks_received)
    })
}

#[test]
fn a_push_without_the_join_token_is_unauthenticated() {
    let runtime = Runtime::new().unwrap();
    let (_inbox, address) = serve(&runtime, &options(TOKEN, TlsSettings::default()));
    let url = format!("http://{address}");
    let plain = TlsSettings::default();
    for (token, says) in [("", "none was sent"), ("wrong", "not the")] {
        let status = push(&runtime, &url, &plain, token).expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("join token"), "{status:?}");
        assert!(status.message().contains(says), "{status:?}");
        assert!(!status.message().contains(TOKEN), "{status:?}");
    }
    // With the token the stream gets past authentication; its ring is not assigned here.
    let unassigned = push(&runtime, &url, &plain, TOKEN).expect_err("no such ring here");
    assert_eq!(unassigned.code(), Code::NotFound, "{unassigned:?}");
}

#[test]
fn a_tls_inbox_refuses_plain_text_and_unverified_clients() {
    let dir = temp_dir("inbox");
    let pki = TestPki::generate(&dir);
    let runtime = Runtime::new().unwrap();
    let (_inbox, address) = serve(&runtime, &options(TOKEN, worker_tls(&pki)));
    let plain = push(
        &runtime,
        &format!("http://{address}"),
        &TlsSettings::default(),
        TOKEN,
    );
    assert!(plain.is_err(), "plain text answered: {plain:?}");
    let other = TlsSettings {
        ca: Some(PemFile::certificates("CA", &pki.other_ca).unwrap()),
        identity: None,
    };
    let url = format!("https://{address}");
    let unverified = push(&runtime, &url, &other, TOKEN).expect_err("unknown issuer");
    assert!(
        unverified.message().contains("UnknownIssuer"),
        "{unverified:?}"
    );
    let verified = TlsSettings {
        ca: Some(PemFile::certificates("CA", &pki.ca).unwrap()),
        identity: None,
    };
    let unassigned = push(&runtime, &url, &verified, TOKEN).expect_err("no such ring here");
    assert_eq!(unassigned.code(), Code::NotFound, "{unassigned:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs one all-reduce on each rank, on a thread of its own; the results in rank order.
fn all_reduce<C: Collective + 'static>(
    ranks: Vec<C>,
    inputs: Vec<Vec<f32>>,
) -> Vec<Result<Vec<f32>, CollectiveError>> {
    let (tx, rx) = mpsc::channel();
    for (rank, (mut collective, mut buffer)) in ranks.into_iter().zip(inputs).enumerate() {
        let tx = tx.clone();
        thread::spawn(move || {
            let result = collective.all_reduce_mean(&mut buffer).map(|()| buffer);
            let _ = tx.send((rank, result));
        });
    }
    drop(tx);
    let mut results: Vec<_> = (0..2)
        .map(|_| rx.recv_timeout(DEADLINE).expect("a rank hung"))
        .collect();
    results.sort_by_key(|(rank, _)| *rank);
    results.into_iter().map(|(_, result)| result).collect()
}

#[test]
fn a_tls_ring_of_two_with_tokens_all_reduces() {
    let dir = temp_dir("ring");
    let pki = TestPki::generate(&dir);
    let options = options(TOKEN, worker_tls(&pki));
    let ranks = RingCollective::localhost_ring_grpc(2, small_ring(), &options).expect("ring");
    let len = 5003;
    let inputs: Vec<Vec<f32>> = (0..2)
        .map(|r| (0..len).map(|i| (i * (r + 1)) as f32).collect())
        .collect();
    let expected: Vec<f32> = (0..len)
        .map(|i| (i as f32 + 2.0 * i as f32) / 2.0)
        .collect();
    for (rank, result) in all_reduce(ranks, inputs).into_iter().enumerate() {
        let values = result.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert_eq!(values, expected, "rank {rank}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_with_the_wrong_token_fails_saying_why() {
    let dir = temp_dir("wrong");
    let pki = TestPki::generate(&dir);
    let runtime = Runtime::new().unwrap();
    let good = options(TOKEN, worker_tls(&pki));
    let (inbox0, address0) = serve(&runtime, &good);
    let (inbox1, address1) = serve(&runtime, &good);
    // Rank 0 dials rank 1 with a token rank 1 does not accept.
    let wrong = GrpcOptions {
        join_token: "not-the-token".into(),
        ..good.clone()
    };
    let ring = RingConfig {
        timeout: Duration::from_secs(3),
        ..small_ring()
    };
    let (config0, config1) = (ring.clone(), ring);
    let rank0 = thread::spawn(move || {
        RingCollective::connect_grpc(0, 2, "r", &secret(), &address1, &inbox0, config0, &wrong)
    });
    let rank1 = thread::spawn(move || {
        RingCollective::connect_grpc(1, 2, "r", &secret(), &address0, &inbox1, config1, &good)
    });
    let ranks = vec![
        rank0.join().unwrap().expect("rank 0 links"),
        rank1.join().unwrap().expect("rank 1 links"),
    ];
    let results = all_reduce(ranks, vec![vec![1.0; 1000], vec![2.0; 1000]]);
    let error = results[0].as_ref().expect_err("rank 0 is refused");
    let text = error.to_string();
    assert!(
        text.contains("Unauthenticated") && text.contains("join token"),
        "{text}"
    );
    assert!(results[1].is_err(), "rank 1 cannot finish alone");
    let _ = std::fs::remove_dir_all(&dir);
}
