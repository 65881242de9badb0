//! Ring all-reduce over localhost TCP and over gRPC (`CollectiveService`) against
//! torch.distributed gloo on the same machine.
//!
//! `cargo bench -p spin-worker --bench allreduce --profile dev`. Environment: `ALLREDUCE_MAX_MIB`
//! caps the sizes (default 256), `ALLREDUCE_ITERS` timed iterations per size (default 5, after
//! one warm-up), `ALLREDUCE_WORLDS` (default `2,4`), `ALLREDUCE_SKIP_GLOO=1` skips the baseline,
//! `ALLREDUCE_SKIP_GRPC=1` the gRPC transport, `ALLREDUCE_IO_THREADS` socket threads per rank
//! (default 1), `ALLREDUCE_PIECE_KIB` (default 1024).
//! Times are the median over iterations of the slowest rank; algbw = bytes / time and
//! busbw = algbw * 2(n-1)/n, as nccl-tests defines them.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use spin_worker::collective::{Collective, GrpcOptions, RingCollective, RingConfig, TcpOptions};

const SIZES_MIB: [usize; 5] = [1, 4, 16, 64, 256];
const GOAL_WORLD: usize = 4;
const GOAL_MIB: usize = 64;
const GOAL_RATIO: f64 = 1.5;

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(value) => value.parse().with_context(|| format!("{name}={value}")),
        Err(_) => Ok(default),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn ring_config() -> Result<RingConfig> {
    Ok(RingConfig {
        piece_bytes: env_usize("ALLREDUCE_PIECE_KIB", 1024)? << 10,
        ..RingConfig::default()
    })
}

/// Median seconds per size for the ring over `world` localhost TCP ranks.
fn bench_tcp(world: usize, sizes: &[usize], iters: usize) -> Result<BTreeMap<usize, f64>> {
    let options = TcpOptions {
        io_threads: env_usize("ALLREDUCE_IO_THREADS", 1)?,
        ..TcpOptions::default()
    };
    let ranks = RingCollective::localhost_ring(world, ring_config()?, &options)?;
    bench_ranks(ranks, sizes, iters)
}

/// Median seconds per size for the ring over `world` localhost gRPC ranks, or why there are
/// none.
fn bench_grpc(world: usize, sizes: &[usize], iters: usize) -> Result<BTreeMap<usize, f64>, String> {
    if std::env::var("ALLREDUCE_SKIP_GRPC").is_ok_and(|v| v == "1") {
        return Err("skipped (ALLREDUCE_SKIP_GRPC=1)".into());
    }
    let run = || -> Result<BTreeMap<usize, f64>> {
        let options = GrpcOptions {
            io_threads: env_usize("ALLREDUCE_IO_THREADS", 1)?,
            ..GrpcOptions::default()
        };
        let ranks = RingCollective::localhost_ring_grpc(world, ring_config()?, &options)?;
        bench_ranks(ranks, sizes, iters)
    };
    run().map_err(|e| format!("{e:#}"))
}

/// Median over iterations of the slowest rank's seconds, per size; each rank on its own thread.
fn bench_ranks<C: Collective + 'static>(
    ranks: Vec<C>,
    sizes: &[usize],
    iters: usize,
) -> Result<BTreeMap<usize, f64>> {
    let world = ranks.len();
    let barrier = Arc::new(Barrier::new(world));
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for mut rank in ranks {
        let (barrier, tx, sizes) = (Arc::clone(&barrier), tx.clone(), sizes.to_vec());
        handles.push(thread::spawn(move || -> Result<()> {
            for size_mib in sizes {
                let len = size_mib * (1 << 20) / 4;
                let mut buffer: Vec<f32> = (0..len)
                    .map(|i| (i % 977) as f32 + rank.rank() as f32)
                    .collect();
                for iter in 0..iters + 1 {
                    barrier.wait();
                    let start = Instant::now();
                    rank.all_reduce_mean(&mut buffer)?;
                    let seconds = start.elapsed().as_secs_f64();
                    if iter > 0 {
                        let _ = tx.send((size_mib, iter, seconds));
                    }
                }
            }
            Ok(())
        }));
    }
    drop(tx);
    let mut slowest: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for (size, iter, seconds) in rx {
        let entry = slowest.entry((size, iter)).or_default();
        *entry = entry.max(seconds);
    }
    for handle in handles {
        match handle.join() {
            Ok(result) => result?,
            Err(_) => bail!("a rank thread panicked"),
        }
    }
    let mut per_size: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for ((size, _), seconds) in slowest {
        per_size.entry(size).or_default().push(seconds);
    }
    Ok(per_size.into_iter().map(|(s, t)| (s, median(t))).collect())
}

/// Median seconds per size for gloo, or why there are none.
fn bench_gloo(world: usize, sizes: &[usize], iters: usize) -> Result<BTreeMap<usize, f64>, String> {
    if std::env::var("ALLREDUCE_SKIP_GLOO").is_ok_and(|v| v == "1") {
        return Err("skipped (ALLREDUCE_SKIP_GLOO=1)".into());
    }
    let has_torch = Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_torch {
        return Err("python3 cannot import torch; no gloo baseline".into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_gloo_allreduce.py");
    let sizes_arg = sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--world", &world.to_string(), "--sizes-mib", &sizes_arg])
        .args(["--iters", &iters.to_string()])
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "gloo script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut times = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{line}: {e}"))?;
        if let (Some(size), Some(seconds)) = (value["size_mib"].as_u64(), value["seconds"].as_f64())
        {
            times.insert(size as usize, seconds);
        }
    }
    Ok(times)
}

fn busbw(world: usize, size_mib: usize, seconds: f64) -> (f64, f64) {
    let algbw = (size_mib << 20) as f64 / seconds / 1e9;
    (algbw, algbw * 2.0 * (world - 1) as f64 / world as f64)
}

/// One table row: `seconds` for `transport`, against gloo and (for gRPC) against TCP's
/// `tcp_seconds`.
fn print_row(
    world: usize,
    size: usize,
    transport: &str,
    seconds: f64,
    gloo_seconds: Option<f64>,
    tcp_seconds: Option<f64>,
) {
    let (algbw, bus) = busbw(world, size, seconds);
    let (gloo_ms, gloo_bus, ratio) = match gloo_seconds {
        Some(g) => {
            let (_, gbus) = busbw(world, size, g);
            (
                format!("{:.2}", g * 1e3),
                format!("{gbus:.3}"),
                format!("{:.2}", bus / gbus),
            )
        }
        None => ("-".into(), "-".into(), "-".into()),
    };
    let versus_tcp = tcp_seconds.map_or("-".into(), |t| {
        format!("{:.2}", bus / busbw(world, size, t).1)
    });
    println!(
        "{world:>5} {size:>8} {transport:>9} {:>10.2} {algbw:>9.3} {bus:>9.3} {gloo_ms:>10} \
         {gloo_bus:>9} {ratio:>7} {versus_tcp:>8}",
        seconds * 1e3
    );
}

fn main() -> Result<()> {
    let max_mib = env_usize("ALLREDUCE_MAX_MIB", 256)?;
    let iters = env_usize("ALLREDUCE_ITERS", 5)?.max(1);
    let worlds: Vec<usize> = std::env::var("ALLREDUCE_WORLDS")
        .unwrap_or_else(|_| "2,4".into())
        .split(',')
        .map(|w| w.trim().parse().context("ALLREDUCE_WORLDS"))
        .collect::<Result<_>>()?;
    let sizes: Vec<usize> = SIZES_MIB.into_iter().filter(|&s| s <= max_mib).collect();
    println!(
        "ring all-reduce (localhost TCP and gRPC, 25 MiB buckets) vs gloo; {} cores; sizes \
         {sizes:?} MiB; {iters} iterations after 1 warm-up; GB/s = 1e9 B/s; grpc/tcp compares busbw",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>5} {:>8} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>7} {:>8}",
        "world",
        "MiB",
        "transport",
        "ring ms",
        "algbw",
        "busbw",
        "gloo ms",
        "busbw",
        "ratio",
        "grpc/tcp"
    );
    let mut goal = None;
    for &world in &worlds {
        let tcp = bench_tcp(world, &sizes, iters)?;
        let grpc = bench_grpc(world, &sizes, iters);
        if let Err(why) = &grpc {
            println!("world {world}: grpc transport: {why}");
        }
        let gloo = bench_gloo(world, &sizes, iters);
        if let Err(why) = &gloo {
            println!("world {world}: gloo baseline: {why}");
        }
        for (&size, &seconds) in &tcp {
            let gloo_seconds = gloo.as_ref().ok().and_then(|g| g.get(&size)).copied();
            let grpc_seconds = grpc.as_ref().ok().and_then(|g| g.get(&size)).copied();
            print_row(world, size, "tcp", seconds, gloo_seconds, None);
            if let Some(grpc_seconds) = grpc_seconds {
                print_row(
                    world,
                    size,
                    "grpc",
                    grpc_seconds,
                    gloo_seconds,
                    Some(seconds),
                );
            }
            if world == GOAL_WORLD && size == GOAL_MIB {
                goal =
                    gloo_seconds.map(|g| busbw(world, size, seconds).1 / busbw(world, size, g).1);
            }
        }
    }
    match goal {
        Some(ratio) => println!(
            "goal (busbw >= {GOAL_RATIO}x gloo at {GOAL_MIB} MiB, {GOAL_WORLD} workers): {:.2}x, {}",
            ratio,
            if ratio >= GOAL_RATIO { "met" } else { "NOT met" }
        ),
        None => println!(
            "goal (busbw >= {GOAL_RATIO}x gloo at {GOAL_MIB} MiB, {GOAL_WORLD} workers): not measured \
             (needs world {GOAL_WORLD}, ALLREDUCE_MAX_MIB >= {GOAL_MIB} and the gloo baseline)"
        ),
    }
    Ok(())
}
