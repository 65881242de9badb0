//! End-to-end tests of the ring over the in-process and TCP transports: exact means for
//! several world sizes and odd lengths, and timeouts that name the silent rank.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

/// Generous bound on any blocking wait in these tests.
const TEST_DEADLINE: Duration = Duration::from_secs(60);

fn small_config() -> RingConfig {
    RingConfig {
        // Odd bucket and piece sizes so buckets, chunks and pieces are all uneven.
        bucket_bytes: 4 * 997,
        piece_bytes: 4 * 31,
        timeout: Duration::from_secs(20),
        abort_grace: Duration::from_millis(500),
    }
}

fn random_buffers(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..world)
        .map(|_| (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect())
        .collect()
}

fn assert_exact_means(inputs: &[Vec<f32>], outputs: &[Vec<f32>]) {
    let world = inputs.len() as f64;
    for (i, got) in outputs[0].iter().enumerate() {
        let sum: f64 = inputs.iter().map(|b| b[i] as f64).sum();
        let scale: f64 = inputs.iter().map(|b| (b[i] as f64).abs()).sum::<f64>() / world;
        let exact = sum / world;
        let error = (*got as f64 - exact).abs();
        assert!(
            error <= 1e-6 * exact.abs().max(scale).max(f64::MIN_POSITIVE),
            "index {i}: got {got}, exact {exact}"
        );
    }
    for (rank, output) in outputs.iter().enumerate() {
        let same = output
            .iter()
            .zip(&outputs[0])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rank {rank} differs from rank 0");
    }
}

/// Runs `all_reduce_mean` on every rank in its own thread (`skip` ranks stay idle but alive)
/// and returns each participant's result, in rank order.
fn run_ranks<C: Collective + 'static>(
    collectives: Vec<C>,
    buffers: Vec<Vec<f32>>,
    calls: usize,
    skip: Option<usize>,
) -> Vec<(usize, Result<Vec<f32>, CollectiveError>)> {
    let (tx, rx) = mpsc::channel();
    let mut idle = Vec::new();
    for (mut collective, mut buffer) in collectives.into_iter().zip(buffers) {
        if Some(collective.rank()) == skip {
            idle.push(collective);
            continue;
        }
        let tx = tx.clone();
        thread::spawn(move || {
            let mut result = Ok(());
            for _ in 0..calls {
                result = result.and_then(|()| collective.all_reduce_mean(&mut buffer));
            }
            let _ = tx.send((collective.rank(), result.map(|()| buffer)));
        });
    }
    drop(tx);
    let mut results: Vec<_> = (0..)
        .map_while(|_| rx.recv_timeout(TEST_DEADLINE).ok())
        .collect();
    drop(idle);
    results.sort_by_key(|(rank, _)| *rank);
    results
}

fn check_means<C: Collective + 'static>(make: impl Fn(usize, RingConfig) -> Vec<C>) {
    for world in [2, 3, 4] {
        for (len, config) in [
            (1, small_config()),
            (3, small_config()),
            (7, small_config()),
            (1001, small_config()),
            (100_003, small_config()),
            (100_003, RingConfig::default()),
        ] {
            let inputs = random_buffers(world, len, (world * 1_000_003 + len) as u64);
            let results = run_ranks(make(world, config), inputs.clone(), 1, None);
            assert_eq!(results.len(), world, "world {world} len {len}: a rank hung");
            let outputs = results
                .into_iter()
                .map(|(rank, r)| r.unwrap_or_else(|e| panic!("rank {rank}: {e}")))
                .collect::<Vec<_>>();
            assert_exact_means(&inputs, &outputs);
        }
    }
}

fn in_process(world: usize, config: RingConfig) -> Vec<RingCollective<MemoryTransport>> {
    RingCollective::in_process(world, 4, config).expect("in-process ring")
}

fn tcp(world: usize, config: RingConfig) -> Vec<RingCollective<TcpTransport>> {
    let options = TcpOptions {
        queue_frames: 3,
        connect_timeout: Duration::from_secs(20),
        io_threads: 1,
        ..TcpOptions::default()
    };
    RingCollective::localhost_ring(world, config, &options).expect("tcp ring")
}

#[test]
fn in_process_ranks_end_with_the_exact_mean() {
    check_means(in_process);
}

#[test]
fn tcp_ranks_end_with_the_exact_mean() {
    check_means(tcp);
}

#[test]
fn repeated_rounds_stay_in_step() {
    let inputs = random_buffers(3, 5003, 7);
    let results = run_ranks(tcp(3, small_config()), inputs.clone(), 3, None);
    let outputs: Vec<_> = results
        .into_iter()
        .map(|(_, r)| r.expect("three rounds"))
        .collect();
    // The mean of identical buffers is the buffer itself (up to rounding).
    let once = run_ranks(in_process(3, small_config()), inputs, 1, None);
    for (a, b) in outputs[0]
        .iter()
        .zip(once[0].1.as_ref().expect("one round"))
    {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0));
    }
}

#[test]
fn world_of_one_is_a_noop() {
    let mut solo = in_process(1, RingConfig::default());
    let mut buffer = vec![1.5, -2.0, 3.25];
    solo[0].all_reduce_mean(&mut buffer).expect("no-op");
    assert_eq!(buffer, vec![1.5, -2.0, 3.25]);
    let mut solo = tcp(1, RingConfig::default());
    solo[0].all_reduce_mean(&mut buffer).expect("no-op");
    assert_eq!(buffer, vec![1.5, -2.0, 3.25]);
}

fn stalled_config() -> RingConfig {
    RingConfig {
        timeout: Duration::from_millis(400),
        abort_grace: Duration::from_millis(400),
        ..small_config()
    }
}

fn assert_names_silent(results: Vec<(usize, Result<Vec<f32>, CollectiveError>)>, silent: usize) {
    assert!(!results.is_empty());
    for (rank, result) in results {
        match result {
            Err(CollectiveError::Timeout { silent: named, .. }) => {
                assert_eq!(named, vec![silent], "rank {rank}")
            }
            other => panic!("rank {rank}: expected a timeout, got {other:?}"),
        }
    }
}

#[test]
fn a_silent_rank_is_named_in_process() {
    let inputs = random_buffers(3, 4001, 3);
    let results = run_ranks(in_process(3, stalled_config()), inputs, 1, Some(1));
    assert_eq!(results.len(), 2);
    assert_names_silent(results, 1);
}

#[test]
fn a_silent_rank_is_named_over_tcp() {
    let inputs = random_buffers(4, 4001, 4);
    let results = run_ranks(tcp(4, stalled_config()), inputs, 1, Some(2));
    assert_eq!(results.len(), 3);
    let message = match &results[0].1 {
        Err(error) => error.to_string(),
        Ok(_) => String::new(),
    };
    assert!(message.contains("did not send: [2]"), "{message}");
    assert_names_silent(results, 2);
}

#[test]
fn a_failed_collective_stays_broken() {
    let mut ranks = in_process(2, stalled_config());
    let mut buffer = vec![1.0; 10];
    let first = ranks[0].all_reduce_mean(&mut buffer);
    assert!(
        matches!(first, Err(CollectiveError::Timeout { .. })),
        "{first:?}"
    );
    let second = ranks[0].all_reduce_mean(&mut buffer);
    assert!(
        matches!(second, Err(CollectiveError::Broken { rank: 0 })),
        "{second:?}"
    );
}

#[test]
fn a_departed_rank_closes_the_link() {
    let mut ranks = tcp(2, small_config());
    drop(ranks.pop());
    let mut buffer = vec![1.0; 1000];
    let result = ranks[0].all_reduce_mean(&mut buffer);
    assert!(
        matches!(result, Err(CollectiveError::PeerClosed { peer: 1, .. })),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_rings_run_as_tasks() {
    let inputs = random_buffers(4, 30_011, 11);
    let mut tasks = tokio::task::JoinSet::new();
    for (transport, mut buffer) in MemoryTransport::ring(4, 3).into_iter().zip(inputs.clone()) {
        let mut ring = Ring::new(transport, small_config()).expect("config");
        tasks.spawn(async move {
            ring.all_reduce_mean(&mut buffer)
                .await
                .map(|()| (ring.rank(), buffer))
        });
    }
    let mut outputs = vec![Vec::new(); 4];
    while let Some(joined) = tokio::time::timeout(TEST_DEADLINE, tasks.join_next())
        .await
        .expect("ring finished in time")
    {
        let (rank, buffer) = joined.expect("task").expect("all-reduce");
        outputs[rank] = buffer;
    }
    assert_exact_means(&inputs, &outputs);
}
