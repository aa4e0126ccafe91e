#!/usr/bin/env bash
# Builds the library with `candle-cuda`: candle-core's own `cuda` feature beside this crate's
# (cudarc then takes `dynamic-linking` as well as `fallback-dynamic-loading`), and the candle op's
# CUDA half compiled. No GPU needed: the library is compiled, not linked against CUDA.
#
# Not in CI: this build took 8 min on a 2-core Zen 5 and 22 min on a 2-core Zen 3, most of it
# candle-kernels compiling its CUDA sources with nvcc, and CI had reached 77-85 min of its 90.
# Run it before landing a change to src/candle*, src/cuda/, build.rs, or the versions or features
# of cudarc and candle in Cargo.toml. `scripts/gpu-check.sh prepare` builds the candle tests with
# this feature too (linked against the libraries of scripts/cuda-link-libs.sh).
#
# Usage: bash scripts/candle-cuda-check.sh   (installs nvcc from PyPI when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain_env=$(bash scripts/install-cuda-toolchain.sh --env)  # (a failed install stops here)
eval "$toolchain_env"
# no GPU here, so no nvidia-smi for candle-kernels to ask the compute capability
CUDA_COMPUTE_CAP=80 cargo build --release --lib --features candle-cuda
echo "candle-cuda: the library builds"
