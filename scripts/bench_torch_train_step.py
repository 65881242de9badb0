#!/usr/bin/env python3
"""PyTorch baseline for the worker's UNet training-step benchmark.

Times one training step -- UNet forward, MSE loss against a random target, backward,
torch.optim.AdamW step -- of the tiny-a UNet (worker/tests/fixtures/tiny-a/unet, written by
scripts/make_fixtures.py) on CPU with batch 4, latents 4x16x16, encoder states [4, 77, 32] and
random timesteps in [0, 1000).  3 warm-up steps, then the median of 20 timed steps.

Run from the repository root:

    python scripts/bench_torch_train_step.py [--threads N] [--out worker/benches/torch_train_step.json]

Prints one JSON line:
    {"framework": "pytorch", "torch": ..., "threads": N, "batch": 4, "ms_per_step": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_DIR = os.path.join(REPO_ROOT, "worker", "tests", "fixtures", "tiny-a", "unet")
BATCH = 4
WARMUP = 3
STEPS = 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all CPUs)")
    ap.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    ap.add_argument("--unet", default=UNET_DIR, help="UNet folder (default: tiny-a fixture)")
    args = ap.parse_args()

    import diffusers
    from diffusers import UNet2DConditionModel

    diffusers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    unet = UNet2DConditionModel.from_pretrained(args.unet, dtype=torch.float32)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    cfg = unet.config
    size = cfg.sample_size

    def step() -> float:
        latents = torch.randn(BATCH, cfg.in_channels, size, size)
        ehs = torch.randn(BATCH, 77, cfg.cross_attention_dim)
        t = torch.randint(0, 1000, (BATCH,), dtype=torch.int64)
        target = torch.randn(BATCH, cfg.out_channels, size, size)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        pred = unet(latents, t, ehs).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        loss.backward()
        opt.step()
        return (time.perf_counter() - t0) * 1000.0

    for _ in range(WARMUP):
        step()
    times = [step() for _ in range(STEPS)]

    result = {
        "framework": "pytorch",
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": BATCH,
        "ms_per_step": round(statistics.median(times), 3),
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
