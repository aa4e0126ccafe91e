#!/usr/bin/env bash
# The main job on the best backend this machine has: the CUDA kernels when a GPU and its driver
# are present (nvcc is installed from PyPI for the build), the CPU backend otherwise.
#   bash scripts/bench.sh [bench options, e.g. --dtype bf16 --shape 8x1024x128256 --json]
set -euo pipefail
cd "$(dirname "$0")/.."
features=cli
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  eval "$(bash scripts/install-cuda-toolchain.sh --env)"
  features=cli,cuda
fi
# the binary where cargo put it (CARGO_TARGET_DIR or a configured target-dir move it)
exe=$(cargo build --release --quiet --features "$features" --bin fused-weighted-loss --message-format=json |
  python3 -c '
import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable")]
print(exes[-1])')
exec "$exe" bench "$@"
