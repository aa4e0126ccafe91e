#!/usr/bin/env python3
"""Times the CUDA rows kernel under each launch configuration of its tuning knobs.

Runs `fused-weighted-loss bench --backend cuda --json` once per configuration and shape, with
FWL_CUDA_ROW_THREADS / FWL_CUDA_BLOCKS_PER_SM / FWL_CUDA_ROW_UNROLL / FWL_CUDA_ROW_LEAN /
FWL_CUDA_ROW_HINTS / FWL_CUDA_ROW_PREFETCH set, and
prints one table: median ms, the device copy of the same bytes measured in the same process,
and the fraction of the copy bandwidth reached. Each process generates the same seeded data, so
configurations that differ only in blocks per multiprocessor, loads in flight, L2 hints or
prefetching must give the same loss bit for bit (the script fails otherwise), and every
configuration must agree with the default to 1e-5 relative. The first configuration is the
default on sm_90 (with L2 eviction hints), the second the prefetching kernels (one block of
1024 threads per multiprocessor, the whole shared memory), the third the default without the
hints.

    python3 benches/sweep_cuda.py --bin target/release/fused-weighted-loss [--json out.json]
"""

import argparse
import json
import os
import subprocess
import sys
import time

# (threads, blocks per SM, loads in flight, lean loops, L2 hints, prefetching); the first is
# sm_90's default (the lean kernels with L2 eviction hints, fwl_rowslh_*), the second the
# prefetching kernels (fwl_rowslp_*), the third the default without the hints, the fifth the
# earlier default (other architectures'); loads in flight, hints and prefetching are the lean
# plain kernels' only
CONFIGS = [
    (1024, 2, 1, 1, 1, 0),
    (1024, 1, 1, 1, 0, 1),
    (1024, 2, 1, 1, 0, 0),
    (512, 2, 1, 1, 0, 1),
    (1024, 1, 1, 0, 0, 0),
    (1024, 1, 1, 1, 1, 0),
    (1024, 1, 2, 1, 0, 0),
    (1024, 1, 1, 1, 0, 0),
]


def run(binary, shape, dtype, cfg, iters):
    threads, blocks, unroll, lean, hints, prefetch = cfg
    env = dict(
        os.environ,
        FWL_CUDA_ROW_THREADS=str(threads),
        FWL_CUDA_BLOCKS_PER_SM=str(blocks),
        FWL_CUDA_ROW_UNROLL=str(unroll),
        FWL_CUDA_ROW_LEAN=str(lean),
        FWL_CUDA_ROW_HINTS=str(hints),
        FWL_CUDA_ROW_PREFETCH=str(prefetch),
    )
    cmd = [binary, "bench", "--backend", "cuda", "--shape", shape, "--dtype", dtype, "--iters", str(iters),
           "--warmup", "3", "--reference-iters", "0", "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} with {cfg}: exit {out.returncode}: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="the fused-weighted-loss binary built with --features cli,cuda")
    ap.add_argument("--shapes", default="8x1024x128256:bf16,32x128x50000:f32", help="BxTxV:dtype,...")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=240, help="stop starting new runs after this long")
    ap.add_argument("--json", help="write every result here")
    a = ap.parse_args()

    start, results, failures = time.time(), [], []
    shapes = [tuple(item.split(":")) for item in a.shapes.split(",")]
    # configuration by configuration, every shape of each, so that a short budget still covers
    # the first configurations at every shape
    by_key = {s: {} for s in shapes}
    default_loss = {s: None for s in shapes}
    spent = False
    for cfg in CONFIGS:
        for shape, dtype in shapes:
            if time.time() - start > a.budget_s:
                print(f"budget of {a.budget_s:.0f} s spent: {cfg} at {shape} {dtype} and later skipped", flush=True)
                spent = True
                break
            try:
                r = run(a.bin, shape, dtype, cfg, a.iters)
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                failures.append(f"{shape} {dtype} {cfg}: {e}")
                print(f"FAILED {shape} {dtype} {cfg}: {e}", flush=True)
                continue
            got = tuple(r.get("row_launch", []))
            if got != cfg:
                failures.append(f"{shape} {dtype}: asked for {cfg}, the kernels ran {got}")
            loss, first = r["loss"], default_loss[(shape, dtype)]
            if first is None:
                default_loss[(shape, dtype)] = loss
            elif not abs(loss - first) <= 1e-5 * abs(first):
                failures.append(f"{shape} {dtype} {cfg}: loss {loss!r} vs default {first!r}")
            seen = by_key[(shape, dtype)]
            key = (cfg[0], cfg[3])  # same block size and loops: the same bits
            if key in seen and seen[key][1] != loss:
                failures.append(f"{shape} {dtype} {cfg}: loss {loss!r} differs in bits from {seen[key][0]} ({seen[key][1]!r})")
            seen.setdefault(key, (cfg, loss))
            row = dict(shape=shape, dtype=dtype, threads=cfg[0], blocks_per_sm=cfg[1], unroll=cfg[2],
                       lean=cfg[3], hints=cfg[4], prefetch=cfg[5], median_ms=r["median_ms"], copy_ms=r["floor_median_ms"], loss=loss,
                       device=r.get("device"))
            results.append(row)
            print(f"  {shape} {dtype} {cfg}: {row['median_ms']:.3f} ms, copy {row['copy_ms']:.3f} ms", flush=True)
        if spent:
            break

    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "failures": failures}, f, indent=1)
    device = results[0]["device"] if results else "?"
    print(f"\nrows kernel launch sweep on {device} (medians of {a.iters}; copy = device copy of the same bytes, same process)")
    print(f"{'shape':<16}{'dtype':<6}{'threads':>8}{'blk/SM':>7}{'unroll':>7}{'lean':>5}{'hints':>6}{'pref':>5}{'ms':>9}"
          f"{'copy ms':>9}{'% copy':>8}")
    for r in results:
        pct = 100 * r["copy_ms"] / r["median_ms"]
        print(f"{r['shape']:<16}{r['dtype']:<6}{r['threads']:>8}{r['blocks_per_sm']:>7}{r['unroll']:>7}"
              f"{r['lean']:>5}{r['hints']:>6}{r['prefetch']:>5}{r['median_ms']:>9.3f}{r['copy_ms']:>9.3f}{pct:>7.0f}%")
    for shape_dtype in dict.fromkeys((r["shape"], r["dtype"]) for r in results):
        rows = [r for r in results if (r["shape"], r["dtype"]) == shape_dtype]
        best = min(rows, key=lambda r: r["median_ms"])
        print(f"fastest at {shape_dtype[0]} {shape_dtype[1]}: threads {best['threads']}, blocks/SM {best['blocks_per_sm']}, "
              f"unroll {best['unroll']}, lean {best['lean']}, hints {best['hints']}, prefetch {best['prefetch']}: {best['median_ms']:.3f} ms "
              f"({100 * best['copy_ms'] / best['median_ms']:.0f}% of copy; default {rows[0]['median_ms']:.3f} ms)")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
