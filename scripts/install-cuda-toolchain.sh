#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI wheels into .toolchain/cuda (git-ignored), idempotently, and
# prints the environment to export. No CUDA driver or GPU is needed to compile kernels.
#
#   bash scripts/install-cuda-toolchain.sh            # install if missing, print exports
#   eval "$(bash scripts/install-cuda-toolchain.sh --env)"
#
# bindgen (used by build.rs for kernels/params.h) also needs libclang:
#   apt-get update && apt-get install -y libclang-dev     (this script does it when run as root)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.toolchain/cuda"
cu="$dest/nvidia/cu13"
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85)
quiet=0
[ "${1:-}" = "--env" ] && quiet=1
log() { [ "$quiet" = 1 ] || echo "$@" >&2; }

if [ ! -x "$cu/bin/nvcc" ] || ! "$cu/bin/nvcc" --version >/dev/null 2>&1; then
  log "installing nvcc 13.0 wheels into $dest"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" \
    --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    "${wheels[@]}" >&2
  mkdir -p "$dest"
  for w in "$tmp"/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$dest"
  done
  chmod +x "$cu"/bin/* "$cu"/nvvm/bin/* 2>/dev/null || true
  "$cu/bin/nvcc" --version >&2
fi

if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-[0-9]*.so* >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing libclang-dev for bindgen"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev) >&2
  else
    log "warning: libclang not found; bindgen needs it (apt-get install libclang-dev)"
  fi
fi

echo "export NVCC=$cu/bin/nvcc"
echo "export CUDA_HOME=$cu"
echo "export PATH=$cu/bin:\$PATH"
