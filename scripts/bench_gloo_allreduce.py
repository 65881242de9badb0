#!/usr/bin/env python3
"""torch.distributed gloo all_reduce baseline for worker/benches/allreduce.rs.

Spawns `--world` processes on localhost with torch.multiprocessing, all-reduces float32
tensors of each size (sum, then divide by the world size: the mean the Rust ring computes),
and prints one JSON line per size from rank 0:
{"backend": "gloo", "world": 4, "size_mib": 64, "seconds": 0.123, "iters": 5}
`seconds` is the median over iterations of the slowest rank's time.
"""

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank: int, world: int, port: int, sizes_mib: list, iters: int, warmup: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for size_mib in sizes_mib:
            numel = size_mib * (1 << 20) // 4
            tensor = torch.rand(numel, dtype=torch.float32)
            times = []
            for i in range(warmup + iters):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                tensor.div_(world)
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if i >= warmup:
                    times.append(elapsed.item())
            if rank == 0:
                line = {
                    "backend": "gloo",
                    "world": world,
                    "size_mib": size_mib,
                    "seconds": statistics.median(times),
                    "iters": iters,
                }
                print(json.dumps(line), flush=True)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--sizes-mib", default="1,4,16,64,256")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",") if s]
    mp.spawn(
        run,
        args=(args.world, free_port(), sizes, args.iters, args.warmup),
        nprocs=args.world,
        join=True,
    )


if __name__ == "__main__":
    main()
