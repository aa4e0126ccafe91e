#!/usr/bin/env bash
# GPU validation in two steps.
#
#   bash scripts/gpu-check.sh prepare   # here (no GPU needed): builds release test and bench
#                                       # binaries with --features cuda and collects them, the
#                                       # Python package's wheel (with the CUDA kernels) and the
#                                       # Liger-Kernel wheel, in gpu-bundle/, and packs that into
#                                       # gpu-bundle.tar.xz (both git-ignored): the folder is about
#                                       # 90 MB (each binary embeds the kernels' 6 MB fatbin), the
#                                       # archive about 16 MiB, under the device's 64 MiB for what travels
#   bash scripts/gpu-check.sh current   # here: exit 0 if gpu-bundle.tar.xz was built from the
#                                       # code of this work tree (its commit, no change since but
#                                       # to *.md files), else 1 and what changed: prepare again
#   bash scripts/gpu-check.sh run       # on the GPU machine, from the repo root, with
#                                       # gpu-bundle.tar.xz carried (unpacked there by python3):
#                                       # GPU parity with FWL_REQUIRE_CUDA=1 (the logits path, the fused
#                                       # linear path, the vocabulary- and data-parallel split with NCCL:
#                                       # world size 1, one rank per GPU when there are several; the
#                                       # fused linear path again under its tiled schedule),
#                                       # the candle ops on CUDA tensors, compute-sanitizer memcheck
#                                       # and racecheck on a small case, the same for the rows kernel's
#                                       # tuning variants, a sweep of its launch configurations
#                                       # (benches/sweep_cuda.py, at most 80 s; the prefetching kernels right after
#                                       # the default, then Nsight Compute on them where ncu is
#                                       # there), the Python package's CUDA tests
#                                       # (FWL_REQUIRE_CUDA=1), its per-call overhead and its fused linear
#                                       # entry against F.linear + the course function, the fused
#                                       # linear table (benches/compare_linear.py: N=8192 H=4096 V=128256
#                                       # bf16 against torch eager on hidden@W^T and Liger-Kernel's fused
#                                       # linear cross-entropy + the weighting, time and peak memory), the
#                                       # crate's fused linear time at chunk budgets of 160 and 256 MiB
#                                       # and under the tiled schedule (blocks of 4096 columns), one
#                                       # rank's split against the one-device pass (bench-split),
#                                       # then one bench table (printed last): this crate (CLI and, in process on
#                                       # the same tensors, the Python package, checked against float64),
#                                       # the course function in torch eager and under torch.compile,
#                                       # Liger-Kernel's cross-entropy + the weighting, and the device copy
#                                       # bandwidth, all in the same call. At most FWL_GPU_CHECK_S
#                                       # seconds (default 450, so 8 min with the machine's start):
#                                       # checks first, benches after (the sweep before the Python
#                                       # package's), the final table in the budget's last 110 s.
#
# The run step needs nvidia-smi, python3 with torch and pytest (and triton for Liger and
# torch.compile); compute-sanitizer is used when present. No Rust there: the package comes as a
# wheel, installed into a temporary folder. After printing everything it exits 1 if any check
# failed, else 3 if any was skipped or cut short for time (an incomplete run is no pass), else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle

# Copies the executables of KIND (test or bin) that cargo's JSON messages (stdin) name into the
# bundle as PREFIX + their target's name: keep test test- (the test binaries), keep bin "" (the CLI).
# The compiler's own messages (errors, warnings) go to stderr as cargo would print them.
keep() {
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-message":
        sys.stderr.write(m["message"].get("rendered") or "")
        continue
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe and m["target"]["kind"] == [sys.argv[2]]:
        shutil.copy(exe, sys.argv[1] + "/bin/" + sys.argv[3] + m["target"]["name"])
' "$bundle" "$1" "$2"
}

prepare() {
  set -e
  toolchain_env=$(bash scripts/install-cuda-toolchain.sh --env)  # (a failed install stops here)
  eval "$toolchain_env"
  # CUDA's libraries to link candle's CUDA tests against (below), set for every build here so
  # that build.rs, which reruns when the folder's variable changes, runs once
  local link_env
  link_env=$(bash scripts/cuda-link-libs.sh)
  eval "$link_env"
  # (an archive of an earlier prepare must not outlive a failed build of this one)
  rm -f "$bundle.tar.xz" "$bundle.tar.xz.tmp"
  rm -rf "$bundle" && mkdir -p "$bundle/bin" "$bundle/wheels"
  # what it is built from (for `current` here and `run` there): the commit, and the code files
  # that differed from it (the build takes the work tree as it is)
  {
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "prepared $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    code_changes HEAD | sed 's/^/changed /'
  } >"$bundle/SOURCE"
  # (the executable cargo names, wherever CARGO_TARGET_DIR or a config puts it)
  cargo build --release --features cli,cuda --bin fused-weighted-loss --message-format=json | keep bin ""
  [ -x "$bundle/bin/fused-weighted-loss" ]
  cargo test --release --features cli,cuda,nccl --test gpu --test gpu_linear --test gpu_parallel --test gpu_parallel_linear --test large \
    --no-run --message-format=json \
    | keep test test-
  # the candle ops on CUDA tensors: candle-core's `cuda` links CUDA's libraries at build time,
  # here against the folder of scripts/cuda-link-libs.sh (a stub driver; where they run, the
  # driver's libcuda and PyTorch's CUDA 13 libraries are loaded)
  # (candle's own kernels for sm_90 only: the lent machines are H100s and H200s)
  CUDA_COMPUTE_CAP=90 cargo test --release --features cli,candle-cuda --test candle --test candle_linear \
    --no-run --message-format=json | keep test test-
  strip "$bundle"/bin/*
  # the Python package with the CUDA kernels (abi3: any CPython >= 3.9 there); same target dir
  python3 -m maturin build --release --manifest-path python/Cargo.toml --features cuda --target-dir "${CARGO_TARGET_DIR:-target}" \
    --out "$bundle/wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$bundle/wheels" liger-kernel==0.8.5  # (the version of BENCHMARKS.md)
  ls -l "$bundle/bin" "$bundle/wheels"
  du -sh "$bundle"
  # what travels: the binaries share most of their bytes (the fatbin), which a long-window xz
  # finds; written to a temporary name, renamed once whole
  tar -cf - "$bundle" | xz -9 -T2 --lzma2=preset=9,dict=128MiB >"$bundle.tar.xz.tmp"
  mv "$bundle.tar.xz.tmp" "$bundle.tar.xz"
  local bytes
  bytes=$(stat -c %s "$bundle.tar.xz")
  echo "$bundle.tar.xz: $((bytes / 1048576)) MiB (carry it: run's carry [\"$bundle.tar.xz\"])"
  if ((bytes > 56 * 1048576)); then
    echo "$bundle.tar.xz is over 56 MiB: with the working tree it would not fit the device's 64 MiB" >&2
    exit 1
  fi
}

# The code files (not *.md) of the work tree that differ from commit $1, tracked or not ignored.
code_changes() {
  { git diff --name-only "$1" -- && git ls-files --others --exclude-standard; } | { grep -v '\.md$' || true; } | sort -u
}

# Whether the archive holds binaries of this work tree's code (see the usage at the top).
current() {
  if [ ! -f "$bundle.tar.xz" ]; then
    echo "no $bundle.tar.xz: run prepare"
    return 1
  fi
  local src commit built changed
  src=$(tar -xJOf "$bundle.tar.xz" "$bundle/SOURCE" 2>/dev/null) || {
    echo "$bundle.tar.xz has no SOURCE record (packed before the record existed): run prepare"
    return 1
  }
  echo "$src" | sed 's/^/  /'
  commit=$(echo "$src" | sed -n 's/^commit //p')
  built=$(echo "$src" | sed -n 's/^changed //p')
  if [ -n "$built" ]; then
    echo "stale: built from a work tree with changes beside commit $commit (not reproducible): run prepare"
    return 1
  fi
  if ! changed=$(code_changes "$commit" 2>/dev/null); then
    echo "stale: commit $commit is not in this repository: run prepare"
    return 1
  fi
  if [ -n "$changed" ]; then
    echo "stale: code changed since $commit:"
    echo "$changed" | sed 's/^/  /'
    return 1
  fi
  echo "current: built from $commit, no code change since (only *.md files may differ)"
}

# gpu-bundle/ from the carried archive, replacing any left there by an earlier call (a warm
# machine keeps ignored folders): unpacked beside it, then swapped in (python3's tarfile: no xz
# binary needed there)
unpack() {
  if [ -f "$bundle.tar.xz" ]; then
    rm -rf "$bundle.new" && mkdir "$bundle.new" || return 1
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$bundle.tar.xz" "$bundle.new" ||
      return 1
    rm -rf "$bundle" && mv "$bundle.new/$bundle" "$bundle" && rmdir "$bundle.new" || return 1
  fi
  [ -d "$bundle/bin" ]
}

run() {
  local fail=0 skipped=0 cut=0 start=$SECONDS
  # The whole run fits in FWL_GPU_CHECK_S seconds (default 450): the steps come in order of
  # importance, each under its own timeout cut to what is left, and the final bench table keeps
  # FWL_GPU_CHECK_FINAL_S of it (default 110: the table took 43 s on the H200 of 2026-12-04, its
  # torch.compile included, while the checks before it ran out of time) for itself. A step with under 15 s left is skipped
  # and said so; a step that runs past its own limit counts as failed, one stopped by what was
  # left of the budget is counted apart ("cut short") and the summary says the checks are
  # incomplete. Its messages go to stderr: a step whose stdout is a file (the benches' JSON) gets
  # nothing but the command's own output there (the log, 2>&1, still shows them).
  local total=${FWL_GPU_CHECK_S:-450} final_s=${FWL_GPU_CHECK_FINAL_S:-110}
  step() { echo; echo "== $* ($((SECONDS - start)) s)"; }
  within() {
    local want=$1 left rc
    shift
    left=$((total - final_s - (SECONDS - start)))
    if ((left < 15)); then
      echo "skipped, out of time: $*" >&2
      skipped=$((skipped + 1))
      return 0
    fi
    timeout $((want < left ? want : left)) "$@"
    rc=$?
    if [ $rc = 124 ] && ((want > left)); then
      # stopped by what was left of the budget, not by its own limit: incomplete, not failed
      echo "cut short by the time budget (${left} s left of its ${want} s): $*" >&2
      cut=$((cut + 1))
      return 0
    fi
    [ $rc = 124 ] && echo "timed out after its ${want} s: $*" >&2
    return $rc
  }
  if ! unpack; then
    echo "no $bundle/ and no $bundle.tar.xz to unpack: run 'prepare' here and carry $bundle.tar.xz" >&2
    return 1
  fi
  step "bundle"
  cat "$bundle/SOURCE" 2>/dev/null || echo "(no SOURCE record in $bundle)"
  # the CUDA libraries PyTorch's wheels ship (cuBLAS, NCCL), after LD_LIBRARY_PATH's own folders
  # (the system's default folders still come after both)
  local libs
  libs=$(python3 -c 'import glob, site; print(":".join(sorted({p for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/*/lib") + glob.glob(d + "/nvidia/*/*/lib")})))' 2>/dev/null)
  [ -n "$libs" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$libs"
  step "device"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || fail=1
  export FWL_REQUIRE_CUDA=1
  step "GPU parity (FWL_REQUIRE_CUDA=1)"
  within 90 "$bundle/bin/test-gpu" --test-threads=1 || fail=1
  step "GPU parity of the fused linear path (FWL_REQUIRE_CUDA=1)"
  within 60 "$bundle/bin/test-gpu_linear" --test-threads=1 || fail=1
  step "vocabulary-/data-parallel split on the GPU, NCCL with the ranks this machine has (FWL_REQUIRE_CUDA=1)"
  # NCCL as PyTorch ships it (libnccl.so.2 in its nvidia-nccl wheel) unless the system has one
  local nccl
  nccl=$(python3 -c 'import glob, site; print(next(iter(sorted(p for d in site.getsitepackages() for p in glob.glob(d + "/nvidia/**/libnccl.so*", recursive=True))), ""))' 2>/dev/null)
  within 90 env FWL_NCCL_LIBRARY="${FWL_NCCL_LIBRARY:-$nccl}" "$bundle/bin/test-gpu_parallel" --test-threads=1 || fail=1
  step "the fused linear split on the GPU: ranks as threads, each with its stream and cuBLAS handle (FWL_REQUIRE_CUDA=1)"
  within 90 "$bundle/bin/test-gpu_parallel_linear" --test-threads=1 || fail=1

  # the rows kernel's tuning variants (see README, "CUDA tuning knobs"): the same parity tests,
  # right after the default's (on sm_90 the lean kernels with two blocks per SM: the lean plain
  # kernels, 32 registers, run two with half the shared memory each; the lean options kernels
  # fit one and keep the whole of it)
  local variant
  # (the prefetching lean plain kernels; the lean plain kernels without the L2 hints of sm_90's
  # default; the earlier default,
  # fwl_rows_* with one block per SM, which other architectures keep; the lean plain kernels
  # with two loads in flight)
  # (FWL_CUDA_ROW_LEAN=1 where a knob needs the lean kernels: only sm_90 has them by default)
  for variant in "FWL_CUDA_ROW_LEAN=1 FWL_CUDA_ROW_PREFETCH=1" "FWL_CUDA_ROW_LEAN=1 FWL_CUDA_ROW_HINTS=0" \
                 "FWL_CUDA_ROW_LEAN=0 FWL_CUDA_BLOCKS_PER_SM=1" \
                 "FWL_CUDA_ROW_LEAN=1 FWL_CUDA_ROW_UNROLL=2 FWL_CUDA_BLOCKS_PER_SM=1"; do
    step "GPU parity with $variant"
    within 60 env $variant "$bundle/bin/test-gpu" --test-threads=1 || fail=1
  done
  # (f32 chunk logits into 16-bit gradients: the lean statistics with the default gradient loop;
  # the lean kernels are sm_90's default, which the first run of these tests took)
  step "GPU parity of the fused linear path with the fwl_rows_* kernels"
  within 60 env FWL_CUDA_ROW_LEAN=0 "$bundle/bin/test-gpu_linear" --test-threads=1 || fail=1
  step "GPU parity of the fused linear path with the prefetching kernels (FWL_CUDA_ROW_PREFETCH=1)"
  within 60 env FWL_CUDA_ROW_LEAN=1 FWL_CUDA_ROW_PREFETCH=1 "$bundle/bin/test-gpu_linear" --test-threads=1 || fail=1
  # (the tiled schedule, LinearSchedule::Tiles: the split's kernels on vocabulary blocks of 37
  # columns, so that the small shapes have several blocks too, and the narrowing kernel)
  step "GPU parity of the fused linear path, tiled schedule (FWL_CUDA_LINEAR_TILES=37)"
  within 90 env FWL_CUDA_LINEAR_TILES=37 "$bundle/bin/test-gpu_linear" --test-threads=1 || fail=1

  step "candle ops on CUDA tensors: weighted_loss and weighted_linear_loss (FWL_REQUIRE_CUDA=1)"
  # (their CPU cases run in CI; these binaries are linked against CUDA 13.0's libraries)
  within 60 "$bundle/bin/test-candle" --test-threads=1 || fail=1
  within 60 "$bundle/bin/test-candle_linear" --test-threads=1 || fail=1

  step "B·T·V > 2^31 on the GPU (4.4 GB of bf16 in place, FWL_REQUIRE_CUDA=1)"
  within 40 "$bundle/bin/test-large" --exact more_than_2_pow_31_elements_cuda || fail=1

  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
  small=(bench --backend cuda --shape 2x9x5003 --iters 1 --warmup 0 --reference-iters 0)
  if [ -n "$cs" ]; then
    for tool in memcheck racecheck; do
      for dt in bf16 f32; do
        step "compute-sanitizer --tool $tool, $dt, the fwl_rows_* kernels (FWL_CUDA_ROW_LEAN=0)"
        within 30 env FWL_CUDA_ROW_LEAN=0 "$cs" --tool "$tool" --error-exitcode 3 "$bundle/bin/fused-weighted-loss" \
          "${small[@]}" --dtype "$dt" || fail=1
      done
      # (the options' lean kernel with soft-capping for bf16, without it for f32: both of its
      # instantiations under each tool)
      for dt in bf16 f32; do
        local cap_opt=""
        [ "$dt" = bf16 ] && cap_opt="--softcap 30"
        step "compute-sanitizer --tool $tool, $dt, the lean loops (FWL_CUDA_ROW_LEAN=1), plain and with options"
        within 30 env FWL_CUDA_ROW_LEAN=1 "$cs" --tool "$tool" --error-exitcode 3 "$bundle/bin/fused-weighted-loss" \
          "${small[@]}" --dtype "$dt" || fail=1
        within 30 env FWL_CUDA_ROW_LEAN=1 "$cs" --tool "$tool" --error-exitcode 3 "$bundle/bin/fused-weighted-loss" \
          "${small[@]}" --dtype "$dt" --z-loss 1e-4 --label-smoothing 0.1 $cap_opt --token-weights || fail=1
        step "compute-sanitizer --tool $tool, $dt, the lean loops without L2 hints (FWL_CUDA_ROW_HINTS=0)"
        within 30 env FWL_CUDA_ROW_LEAN=1 FWL_CUDA_ROW_HINTS=0 "$cs" --tool "$tool" --error-exitcode 3 "$bundle/bin/fused-weighted-loss" \
          "${small[@]}" --dtype "$dt" || fail=1
        # (400 rows: each block takes several, so the next row's copies run)
        step "compute-sanitizer --tool $tool, $dt, the prefetching lean loops (FWL_CUDA_ROW_PREFETCH=1), 2x200x5003"
        within 30 env FWL_CUDA_ROW_LEAN=1 FWL_CUDA_ROW_PREFETCH=1 "$cs" --tool "$tool" --error-exitcode 3 "$bundle/bin/fused-weighted-loss" \
          bench --backend cuda --shape 2x200x5003 --iters 1 --warmup 0 --reference-iters 0 --dtype "$dt" || fail=1
      done
    done
    # (--bias: the bias's products and d bias; --f32-grads with bf16: the f32 d hidden that the
    # tiled schedule accumulates into directly, no narrowing kernel)
    local lin
    step "compute-sanitizer --tool memcheck, fused linear path (cuBLAS + rows kernel), bf16, f32 with a bias"
    for lin in "bf16" "f32 --bias"; do
      # shellcheck disable=SC2086 # (the dtype and its flags, split on purpose)
      within 40 "$cs" --tool memcheck --error-exitcode 3 "$bundle/bin/fused-weighted-loss" bench-linear --backend cuda \
        --tokens 2x9 --hidden 40 --vocab 5003 --dtype $lin --chunk-rows 5 --iters 1 --warmup 0 || fail=1
    done
    step "compute-sanitizer --tool memcheck, fused linear path, tiled schedule (blocks of 1000 columns): bf16, bf16 with a bias and f32 gradients, f32 with a bias"
    for lin in "bf16" "bf16 --bias --f32-grads" "f32 --bias"; do
      # shellcheck disable=SC2086
      within 40 env FWL_CUDA_LINEAR_TILES=1000 "$cs" --tool memcheck --error-exitcode 3 "$bundle/bin/fused-weighted-loss" \
        bench-linear --backend cuda --tokens 2x9 --hidden 40 --vocab 5003 --dtype $lin --chunk-rows 5 --iters 1 \
        --warmup 0 || fail=1
    done
  else
    step "compute-sanitizer: not found, skipped"
  fi

  step "Python package: install the wheel, its CUDA tests (FWL_REQUIRE_CUDA=1)"
  local pkg site=/tmp/fwl-site have_pkg=0
  # (emptied first: pip --target leaves a package folder that is already there as it was, and a
  # warm machine keeps /tmp between calls)
  rm -rf "$site"
  pkg=$(ls "$bundle"/wheels/fused_weighted_loss-*.whl 2>/dev/null | head -1)
  if [ -n "$pkg" ] && python3 -m pip install --quiet --no-deps --no-index --target "$site" "$pkg"; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    have_pkg=1
    # every CUDA test (test_cuda.py and the [cuda] cases of the others); the CPU ones run in CI
    within 150 python3 -m pytest -q -rs -p no:cacheprovider python/tests -k cuda || fail=1
    step "Python package: vocabulary-/data-parallel under torchrun with 4 CPU ranks (gloo; NCCL ran above)"
    within 90 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k gloo || fail=1
  else
    echo "no installable fused_weighted_loss wheel in $bundle/wheels (run prepare)"; fail=1
  fi

  local liger
  liger=$(ls "$bundle"/wheels/liger_kernel-*.whl 2>/dev/null | head -1)
  step "bench: fused linear + weighted loss vs torch eager on hidden@W^T and Liger-Kernel's fused linear CE"
  within 90 env PYTHONUNBUFFERED=1 python3 benches/compare_linear.py --device cuda --bin "$bundle/bin/fused-weighted-loss" \
    --tokens 8x1024 --hidden 4096 --vocab 128256 --dtype bf16 --iters 10 \
    ${liger:+--liger-wheel "$liger"} --json "${OUT:-/tmp}/gpu-linear-bench.json" || fail=1

  step "fused linear, chunk budget (the logits product's rows are a quarter of the chunk's): time and scratch"
  local mib
  # (96 MiB, the default until 2026-12-04, took 79.0 ms there; 160 MiB 58.5, 256 MiB 48.2)
  for mib in 160 256; do
    : >/tmp/fwl-linear-budget.json
    within 30 "$bundle/bin/fused-weighted-loss" bench-linear --backend cuda --tokens 8x1024 --hidden 4096 \
      --vocab 128256 --dtype bf16 --iters 5 --budget-mib "$mib" --json >/tmp/fwl-linear-budget.json || fail=1
    [ -s /tmp/fwl-linear-budget.json ] || continue
    python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); print("budget %s MiB: %d rows, %d chunks, median %.2f ms, min %.2f ms, scratch %.1f MiB" % (sys.argv[2], j["chunk_rows"], j["chunks"], j["median_ms"], j["min_ms"], j["scratch_bytes"] / 2**20))' \
      /tmp/fwl-linear-budget.json "$mib" || fail=1
  done

  step "fused linear, tiled schedule (FWL_CUDA_LINEAR_TILES: vocabulary blocks of that many columns)"
  local cols
  # (on 2026-12-04 blocks of 1024 and 2048 columns were slower than 4096, all slower than the
  # chunks at 160 MiB: the one left, at the default budget)
  for cols in 4096; do
    for mib in 160; do
      : >/tmp/fwl-linear-tiles.json
      within 30 env FWL_CUDA_LINEAR_TILES=$cols "$bundle/bin/fused-weighted-loss" bench-linear --backend cuda \
        --tokens 8x1024 --hidden 4096 --vocab 128256 --dtype bf16 --iters 5 --budget-mib "$mib" --json \
        >/tmp/fwl-linear-tiles.json || fail=1
      # (an empty file: the run was skipped or cut short for time, already counted)
      [ -s /tmp/fwl-linear-tiles.json ] || continue
      python3 -c 'import json, sys; j = json.load(open(sys.argv[1])); print("tiles of %d columns, budget %s MiB: %d rows, %d chunks, median %.2f ms, min %.2f ms, scratch %.1f MiB, peak %.2f GiB" % (j["tile_cols"], sys.argv[2], j["chunk_rows"], j["chunks"], j["median_ms"], j["min_ms"], j["scratch_bytes"] / 2**20, (j["peak_bytes"] or 0) / 2**30))' \
        /tmp/fwl-linear-tiles.json "$mib" || fail=1
    done
  done

  step "the split per rank: one rank's slice through the split's kernels vs the one-device pass (issue 13: <= 1.1x)"
  local sp
  # (not yet run on a GPU; the CPU's figures are in BENCHMARKS.md, 2026-12-05)
  for sp in 8x256x50000:4:f32 8x256x50000:8:f32 8x1024x128256:8:bf16; do
    within 30 "$bundle/bin/fused-weighted-loss" bench-split --backend cuda --shape "${sp%%:*}" \
      --ranks "$(cut -d: -f2 <<<"$sp")" --dtype "${sp##*:}" --iters 20 || fail=1
  done

  step "loss options: plain vs z-loss + label smoothing + soft-cap + token weights, default and lean kernels"
  local shp lean
  for shp in 8x1024x128256:bf16 32x128x50000:f32; do
    for lean in 0 1; do
      for opts in "" "--z-loss 1e-4 --label-smoothing 0.1 --softcap 30 --token-weights"; do
        # (not in a pipeline: `within` counts skipped steps in this shell)
        : >/tmp/fwl-options-row.txt
        within 30 env FWL_CUDA_ROW_LEAN=$lean "$bundle/bin/fused-weighted-loss" bench --backend cuda \
          --shape "${shp%%:*}" --dtype "${shp##*:}" --iters 20 --reference-iters 0 $opts >/tmp/fwl-options-row.txt || fail=1
        sed -n '3,4p' /tmp/fwl-options-row.txt | sed "s|^|${shp} lean=${lean} ${opts:-plain}: |"
      done
    done
  done

  step "rows kernel launch sweep (tuning knobs; each configuration in its own process), at most 80 s"
  # (before the Python package's benches, which get what is left: the sweep picks the defaults;
  # Nsight Compute, after it, keeps 45 s of the checks' time where ncu is there)
  local ncu_bin ncu_s=0
  ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
  [ -n "$ncu_bin" ] && ncu_s=75
  local sweep_s=$((total - final_s - (SECONDS - start) - 5 - ncu_s))
  ((sweep_s > 80)) && sweep_s=80
  if ((sweep_s >= 20)); then
    python3 benches/sweep_cuda.py --bin "$bundle/bin/fused-weighted-loss" --budget-s "$sweep_s" \
      --json "${OUT:-/tmp}/gpu-sweep.json" || fail=1
  else
    echo "skipped, out of time: the sweep"; skipped=$((skipped + 1))
  fi

  # where the rows kernels' time goes (2026-12-04: the lean kernel's gradient pass read the rows'
  # uncached parts again from DRAM, 1.17 GB; with the L2 hints 0.51 GB; the prefetching kernel
  # reads exactly the logits' bytes, but neither got past ~60% of the SM's issue slots or of
  # DRAM): profiles and not checks (a failure is not counted)
  if [ -n "$ncu_bin" ] && ((total - final_s - (SECONDS - start) < ncu_s)); then
    # (the final bench's time is its own: a profile does not take it)
    step "Nsight Compute: out of time, skipped (a profile, not a check: not counted)"
  elif [ -n "$ncu_bin" ]; then
    # (the prefetching kernels and sm_90's default, each one launch, then the default's stall
    # reasons: where its warps wait, which the summary sections do not say)
    local ncu_metrics=dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum,smsp__inst_executed.sum
    local ncu_bench=(bench --backend cuda --shape 8x1024x128256 --dtype bf16 --iters 1 --warmup 0 --reference-iters 0)
    step "Nsight Compute: the prefetching lean rows kernel (FWL_CUDA_ROW_PREFETCH=1), 8x1024x128256 bf16, one launch"
    timeout 25 env FWL_CUDA_ROW_LEAN=1 FWL_CUDA_ROW_PREFETCH=1 "$ncu_bin" --clock-control none --kernel-name regex:fwl_rows \
      --launch-count 1 --section SpeedOfLight --section WarpStateStats --metrics "$ncu_metrics" \
      "$bundle/bin/fused-weighted-loss" "${ncu_bench[@]}" || echo "(ncu failed or timed out: a profile, not a check; not counted)"
    step "Nsight Compute: sm_90's default rows kernel (lean, L2 hints), the same launch, and its stall reasons"
    timeout 25 "$ncu_bin" --clock-control none --kernel-name regex:fwl_rows --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --metrics "$ncu_metrics" \
      "$bundle/bin/fused-weighted-loss" "${ncu_bench[@]}" || echo "(ncu failed or timed out: a profile, not a check; not counted)"
    # (warps stalled on each reason per issued instruction)
    local stalls="" reason
    for reason in long_scoreboard short_scoreboard barrier mio_throttle lg_throttle wait math_pipe_throttle \
      not_selected no_instruction; do
      stalls+="${stalls:+,}smsp__average_warps_issue_stalled_${reason}_per_issue_active.ratio"
    done
    timeout 25 "$ncu_bin" --clock-control none --kernel-name regex:fwl_rows --launch-count 1 --metrics "$stalls" \
      "$bundle/bin/fused-weighted-loss" "${ncu_bench[@]}" || echo "(ncu failed or timed out: a profile, not a check; not counted)"
  else
    step "Nsight Compute: not found, skipped"
  fi


  if [ $have_pkg = 1 ]; then
    step "Python package: per-call overhead over the Rust call, same tensors (benches/python_overhead.py)"
    for dt in bf16 f32; do
      within 45 python3 benches/python_overhead.py --device cuda --shape 32x128x50000 --dtype "$dt" \
        --json "${OUT:-/tmp}/gpu-overhead-$dt.json" || fail=1
    done
    step "Python package: float16 logits, float32 vs float16 kept gradient, upstream 1 and 65536 (benches/float16_scale.py)"
    within 40 python3 benches/float16_scale.py --device cuda --shape 8x1024x32000 --iters 5 \
      --json "${OUT:-/tmp}/gpu-float16-scale.json" || fail=1
    step "Python package: weighted_linear_loss vs F.linear + the course function, same tensors (benches/python_linear.py)"
    within 60 python3 benches/python_linear.py --device cuda --tokens 8x1024 --hidden 4096 --vocab 128256 \
      --dtype bf16 --iters 10 --rounds 2 --json "${OUT:-/tmp}/gpu-python-linear.json" || fail=1
  fi

  echo
  # (what the exit status will say, as far as the checks have gone)
  verdict() {
    if ((fail > 0)); then echo 'FAILED (see above)'
    elif ((skipped + cut > 0)); then echo "INCOMPLETE ($skipped skipped for time, $cut cut short by the time budget)"
    else echo passed; fi
  }
  echo "== checks so far $(verdict), in $((SECONDS - start)) s (the final bench below counts too)"
  step "bench: this crate vs torch eager / torch.compile / Liger-Kernel, and the device copy (table last)"
  local final_left=$((total - (SECONDS - start)))
  ((final_left < 60)) && final_left=60
  PYTHONUNBUFFERED=1 timeout "$final_left" python3 benches/compare_torch.py --device cuda \
    --bin "$bundle/bin/fused-weighted-loss" \
    --shapes 32x128x50000:f32,32x128x50000:bf16,8x1024x128256:bf16 --iters 20 \
    --compile-budget-s $((final_left * 2 / 3)) \
    ${liger:+--liger-wheel "$liger"} --json "${OUT:-/tmp}/gpu-bench.json"
  case $? in
    0) ;;
    # stopped by the budget: the table is incomplete, which is not a failed check (the bench has
    # the rest of the budget, so a hang in it also ends here and reads as INCOMPLETE, not FAIL:
    # its log, which prints each shape as it ends, tells the two apart)
    124) echo "cut short by the time budget (${final_left} s): the final bench" >&2; cut=$((cut + 1)) ;;
    *) fail=1 ;;
  esac
  echo "== gpu-check done in $((SECONDS - start)) s (budget $total s): $(verdict)"
  ((fail > 0)) && return 1
  ((skipped + cut > 0)) && return 3
  return 0
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  current) current ;;
  *) echo "usage: $0 prepare|current|run" >&2; exit 2 ;;
esac
