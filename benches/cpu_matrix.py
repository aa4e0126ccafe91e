#!/usr/bin/env python3
"""The CPU figures of BENCHMARKS.md in one command: `fused-weighted-loss bench --json` for every
instruction-set level, dtype and thread count asked for, each against the fastest copy of the same
bytes picked in the same run (the bench's floor), repeated `--runs` times; prints a markdown table
of medians and ratios, and the CPU model.

    python3 benches/cpu_matrix.py [--bin target/release/fused-weighted-loss] [--shape 8x128x50000]
        [--simd avx512,avx2] [--dtypes f32,bf16,f16] [--threads 2,1] [--runs 3] [--iters 15]
        [--extra="--z-loss 1e-4 ..."] [--json out.json]   (--extra= with "=": a value beginning with "-")
"""
import argparse, json, os, platform, statistics, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"),
                                                  "release", "fused-weighted-loss"))
    ap.add_argument("--shape", default="8x128x50000")
    ap.add_argument("--simd", default="avx512,avx2")
    ap.add_argument("--dtypes", default="f32,bf16,f16")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--extra", default="", help="more bench flags, e.g. the loss options")
    ap.add_argument("--json", help="write every run's JSON here")
    a = ap.parse_args()
    if not os.path.isfile(a.bin):
        sys.exit(f"{a.bin}: no such file (build the CLI: cargo build --release --features cli, or pass --bin)")
    rows, raw = [], []
    print(f"CPU: {cpu_model()}; shape {a.shape}; {a.runs} runs of {a.iters} iterations; extra flags: {a.extra or '-'}")
    for simd in a.simd.split(","):
        for dtype in a.dtypes.split(","):
            for threads in a.threads.split(","):
                cmd = [a.bin, "bench", "--shape", a.shape, "--dtype", dtype, "--simd", simd, "--threads", threads,
                       "--iters", str(a.iters), "--reference-iters", "0", "--json", *a.extra.split()]
                runs = []
                for _ in range(a.runs):
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        print(f"skipped {simd} {dtype} {threads}: {out.stderr.strip()}", file=sys.stderr)
                        break
                    runs.append(json.loads(out.stdout))
                if not runs:
                    continue
                raw.extend(runs)
                fused = [r["median_ms"] for r in runs]
                floor = [r["floor_median_ms"] for r in runs]
                ratio = [r["x_floor"] for r in runs]
                methods = sorted({r.get("floor_method", "?") for r in runs})
                rows.append((simd, dtype, threads, fused, floor, ratio, methods))
    print("\n| simd | dtype | threads | fused ms (runs) | floor ms (runs) | x floor (runs) | median x floor | floor method |")
    print("|---|---|---|---|---|---|---|---|")
    for simd, dtype, threads, fused, floor, ratio, methods in rows:
        f = lambda xs, p: " / ".join(f"{x:.{p}f}" for x in xs)
        print(f"| {simd} | {dtype} | {threads} | {f(fused, 2)} | {f(floor, 2)} | {f(ratio, 2)} | "
              f"{statistics.median(ratio):.2f} | {'; '.join(methods)} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"cpu": cpu_model(), "runs": raw}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
