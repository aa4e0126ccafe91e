#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI wheels into .toolchain/cuda (git-ignored), idempotently, and
# prints the environment to export. No CUDA driver or GPU is needed to compile kernels.
#
#   bash scripts/install-cuda-toolchain.sh            # install if missing, print exports
#   env=$(bash scripts/install-cuda-toolchain.sh --env) && eval "$env"
#   (in a script: `eval "$(...)"` would hide a failed install, eval of nothing succeeding)
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

# the wheels a tree was installed from: a tree without this stamp (an install cut short: nvcc
# unpacks before nvvm's cicc, and its --version works without it) or with other wheels is
# installed anew
stamp="$dest/.installed-wheels"
if [ "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ] || ! "$cu/bin/nvcc" --version >/dev/null 2>&1; then
  log "installing nvcc 13.0 wheels into $dest"
  case "$(uname -m)" in
    x86_64) arch=x86_64 ;;
    aarch64 | arm64) arch=aarch64 ;;
    *) echo "no CUDA wheels for $(uname -m)" >&2; exit 1 ;;
  esac
  # unpacked beside the destination (one file system), stamped, then moved into place whole
  mkdir -p "$root/.toolchain"
  tmp="$(mktemp -d "$root/.toolchain/.cuda-install.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp/wheels" \
    --platform "manylinux2014_$arch" --platform "manylinux_2_27_$arch" --platform "manylinux_2_28_$arch" \
    "${wheels[@]}" >&2
  for w in "$tmp"/wheels/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$tmp/tree"
  done
  chmod +x "$tmp/tree/nvidia/cu13"/bin/* "$tmp/tree/nvidia/cu13"/nvvm/bin/* 2>/dev/null || true
  "$tmp/tree/nvidia/cu13/bin/nvcc" --version >&2
  echo "${wheels[*]}" >"$tmp/tree/.installed-wheels"
  rm -rf "$dest"
  mv "$tmp/tree" "$dest"
fi

# (each pattern on its own: `ls A B` fails when either matches nothing; LIBCLANG_PATH is where
# bindgen looks first)
have_libclang() {
  local pattern
  [ -f "${LIBCLANG_PATH:-}" ] && return 0  # (the library file itself)
  for pattern in "${LIBCLANG_PATH:-/nonexistent}"/libclang*.so* /usr/lib/llvm-*/lib/libclang.so* \
    /usr/lib/*/libclang-[0-9]*.so* /usr/lib/*/libclang.so*; do
    compgen -G "$pattern" >/dev/null && return 0
  done
  return 1
}
if ! have_libclang; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing libclang-dev for bindgen"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev) >&2
  else
    # (on stderr with --env too: the build that follows fails on it)
    echo "warning: libclang not found; bindgen needs it (apt-get install libclang-dev)" >&2
  fi
fi

# quoted for the shell that evaluates them (a path with spaces)
printf 'export NVCC=%q\n' "$cu/bin/nvcc"
printf 'export CUDA_HOME=%q\n' "$cu"
printf 'export PATH=%q:"$PATH"\n' "$cu/bin"
