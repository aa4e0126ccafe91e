#!/usr/bin/env bash
# A folder of CUDA's libraries to link executables against on a machine without CUDA, for the
# test binaries built with candle-core's `cuda` feature (which links libcuda, cuBLAS, cuBLASLt,
# nvrtc and cuRAND at build time): cuBLAS, nvrtc and cuRAND from PyPI at the versions of
# CUDA 13.0 (what the GPU machines' PyTorch ships), cudart from the nvcc toolchain (for a build
# that asks for it), and a stub libcuda.so.1 that defines the driver API's names, built here from
# the bindings of the cudarc in Cargo.lock (the executables load the driver's own libcuda.so.1
# where they run). Made again when the wheels or cudarc change; prints the export for build.rs
# (which adds the folder to the link search path):
#
#   eval "$(bash scripts/cuda-link-libs.sh)"
#
# Needs the toolchain of scripts/install-cuda-toolchain.sh, gcc, python3 with pip, and cudarc's
# sources in cargo's registry (fetched here when missing).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.toolchain/cuda-link"
lib="$dest/lib"
wheels=(nvidia-cublas==13.0.2.14 nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35)
cudart="$root/.toolchain/cuda/nvidia/cu13/lib/libcudart.so.13"
# the cudarc this crate builds with (Cargo.lock), whose driver bindings the stub follows
cudarc=$(awk '$0 == "name = \"cudarc\"" { getline; gsub(/"/, "", $3); print $3 }' "$root/Cargo.lock")
[ -n "$cudarc" ] || { echo "no cudarc in $root/Cargo.lock" >&2; exit 1; }
[ "$(wc -l <<<"$cudarc")" = 1 ] || { echo "more than one cudarc in $root/Cargo.lock: $(echo $cudarc)" >&2; exit 1; }
# what the folder was made from: made again when that changes
case "$(uname -m)" in
  x86_64) arch=x86_64 ;;
  aarch64 | arm64) arch=aarch64 ;;
  *) echo "no CUDA wheels for $(uname -m)" >&2; exit 1 ;;
esac
made_of="${wheels[*]} cudarc-$cudarc $arch"

if [ "$(cat "$lib/.complete" 2>/dev/null)" != "$made_of" ]; then
  [ -f "$cudart" ] || { echo "no $cudart: run scripts/install-cuda-toolchain.sh first" >&2; exit 1; }
  rm -rf "$dest" && mkdir -p "$lib"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" \
    --platform "manylinux2014_$arch" --platform "manylinux_2_27_$arch" --platform "manylinux_2_28_$arch" \
    "${wheels[@]}" >&2
  for w in "$tmp"/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$dest"
  done
  # the linker's names (libNAME.so) for the versioned files the wheels hold
  for name in cublas cublasLt nvrtc curand; do
    found=$(find "$dest/nvidia" -name "lib$name.so.[0-9]*" ! -name "*builtins*" | sort | head -n 1)
    [ -n "$found" ] || { echo "lib$name.so.* not found in the wheels" >&2; exit 1; }
    ln -sf "$found" "$lib/lib$name.so"
  done
  ln -sf "$cudart" "$lib/libcudart.so"
  # the stub driver: every function cudarc's driver bindings declare, as an empty function
  find_sys() {
    ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc"/src/driver/sys/mod.rs 2>/dev/null | head -n 1 || true
  }
  sys=$(find_sys)
  if [ -z "$sys" ]; then
    (cd "$root" && cargo fetch --quiet) >&2
    sys=$(find_sys)
  fi
  [ -n "$sys" ] || { echo "cudarc's sources are not in cargo's registry, even after cargo fetch" >&2; exit 1; }
  python3 - "$sys" "$tmp/stub.c" <<'PY'
import re, sys
names = sorted(set(re.findall(r"^\s*(?:pub )?fn (cu[A-Za-z0-9_]+)\(", open(sys.argv[1]).read(), re.M)))
assert len(names) > 100, f"only {len(names)} driver functions found in {sys.argv[1]}"
with open(sys.argv[2], "w") as f:
    f.write("/* stub for linking only; the driver's libcuda.so.1 is loaded at run time */\n")
    for n in names:
        f.write(f"int {n}(void) {{ return 999; }}\n")
PY
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$tmp/stub.c"
  echo "$made_of" >"$lib/.complete"
fi
echo "export FWL_CUDA_LINK_DIR=$lib"
