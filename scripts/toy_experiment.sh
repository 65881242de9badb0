#!/usr/bin/env bash
# The toy experiment of issue 3, one command from the repository root:
#   scripts/toy_experiment.sh
# 1. the synthetic dataset and a random pixel-space 32x32 toy pipeline,
# 2. the SFT base model (examples/toy-sft-base.toml),
# 3. three SPIN iterations from the base (examples/toy-spin.toml),
# 4. the control: SFT continued from the base with the same examples seen (examples/toy-sft-continued.toml),
# then prints the table of held-out denoising loss and MMD per iteration (docs/toy-experiment.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# A private copy: a rebuild during the run must not swap the binary under it.
# SPINCTL=path skips the build and uses that binary.
spinctl="${TMPDIR:-/tmp}/spinctl-toy-$$"
if [ -z "${SPINCTL:-}" ]; then cargo build -p spinctl; SPINCTL=target/debug/spinctl; fi
cp "$SPINCTL" "$spinctl"
[ -e spin-runs/toy/data/toy-00000.parquet ] || $spinctl make-toy-dataset --out spin-runs/toy/data --rows 1024 --seed 0
[ -e spin-runs/toy/init/model_index.json ] || $spinctl init-toy-model --out spin-runs/toy/init
if [ ! -e spin-runs/toy/base/manifest.json ]; then
  $spinctl train --local examples/toy-sft-base.toml
  rm -rf spin-runs/toy/base
  cp -r spin-runs/toy/base-run/iteration-1 spin-runs/toy/base
fi
$spinctl train --local examples/toy-spin.toml
$spinctl train --local examples/toy-sft-continued.toml
python3 - <<'PY'
import json
spin = json.load(open("spin-runs/toy/spin/metrics.json"))
sft = json.load(open("spin-runs/toy/sft-continued/metrics.json"))
print("| iteration | SPIN held-out loss | SPIN MMD | SFT-continued held-out loss | SFT-continued MMD |")
print("|---|---|---|---|---|")
for a, b in zip(spin, sft):
    print(f"| {a['iteration']} | {a['held_out_loss']:.5f} | {a['mmd']:.5f} | {b['held_out_loss']:.5f} | {b['mmd']:.5f} |")
PY
