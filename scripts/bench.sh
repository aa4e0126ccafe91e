#!/usr/bin/env bash
# The main job on the best backend this machine has: the CUDA kernels when a GPU and its driver
# are present (nvcc is installed from PyPI for the build), the CPU backend otherwise.
#   bash scripts/bench.sh [bench options, e.g. --dtype bf16 --shape 8x1024x128256 --json]
set -euo pipefail
cd "$(dirname "$0")/.."
features=cli
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  toolchain_env=$(bash scripts/install-cuda-toolchain.sh --env)  # (a failed install stops here)
  eval "$toolchain_env"
  features=cli,cuda
fi
# the binary where cargo put it (CARGO_TARGET_DIR or a configured target-dir move it)
exe=$(cargo build --release --quiet --features "$features" --bin fused-weighted-loss --message-format=json |
  python3 -c '
import json, sys
exes = []
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        exes.append(m["executable"])
    elif m.get("reason") == "compiler-message":
        # (the compiler'"'"'s errors and warnings, which the JSON format carries instead of printing)
        print(m["message"].get("rendered", ""), end="", file=sys.stderr)
if not exes:
    sys.exit("bench.sh: the build made no binary (see the messages above)")
print(exes[-1])')
exec "$exe" bench "$@"
