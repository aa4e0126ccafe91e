#!/usr/bin/env python3
"""Time the course's keyword-weighted loss in PyTorch (eager and torch.compile, forward + backward)
against this crate's fused `bench --json`, at the same shapes, in one run, and print the ratios.

Usage: python3 benches/compare_torch.py [--bin target/release/fused-weighted-loss]
           [--shapes 8x128x50000] [--dtypes f32,bf16] [--iters 10] [--no-compile] [--json out.json]
Needs torch; build the binary first (cargo build --release --features cli).
"""
import argparse, json, os, statistics, subprocess, sys, time

import torch
from torch.nn import CrossEntropyLoss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def course_loss(inputs, logits, keytoken_ids, alpha=1.0):
    """The course function: shifted per-token CE, mean per sample, keyword weights, batch mean."""
    shift_labels = inputs[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    loss_fct = CrossEntropyLoss(reduction="none")
    loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    loss_per_sample = loss.view(shift_logits.size(0), shift_logits.size(1)).mean(axis=1)
    weights = torch.stack([(inputs == kt).float() for kt in keytoken_ids]).sum(axis=[0, 2])
    weights = alpha * (1.0 + weights)
    return (loss_per_sample * weights).mean()


def time_step(fn, logits, inputs, keys, warmup, iters):
    def step():
        logits.grad = None
        fn(inputs, logits, keys).backward()
    for _ in range(warmup):
        step()
    runs = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "fused-weighted-loss"))
    ap.add_argument("--shapes", default="8x128x50000")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for shape in a.shapes.split(","):
        b, t, v = (int(x) for x in shape.lower().split("x"))
        for dt in a.dtypes.split(","):
            torch.manual_seed(0)
            logits = (torch.rand(b, t, v) * 8 - 4).to(DTYPES[dt]).requires_grad_()
            inputs = torch.randint(0, v, (b, t))
            keys = [0, 1, 2]
            eager = time_step(course_loss, logits, inputs, keys, 2, a.iters)
            compiled = None
            if not a.no_compile:
                fn = torch.compile(course_loss)
                compiled = time_step(fn, logits, inputs, keys, 3, a.iters)
            ours = json.loads(subprocess.run([a.bin, "bench", "--shape", shape, "--dtype", dt, "--json",
                                              "--iters", str(max(a.iters, 15)), "--reference-iters", "0"],
                                             check=True, capture_output=True, text=True).stdout)
            rows.append(dict(shape=shape, dtype=dt, threads=torch.get_num_threads(), torch_eager_ms=eager,
                             torch_compile_ms=compiled, fused_ms=ours["median_ms"], floor_ms=ours["floor_median_ms"],
                             x_floor=ours["x_floor"], simd=ours["simd"], fused_threads=ours["threads"]))
    hdr = f"{'shape':<14}{'dtype':<6}{'torch eager':>12}{'torch.compile':>15}{'fused':>9}{'floor':>9}{'x floor':>9}{'x eager':>9}{'x compile':>11}"
    print(f"torch {torch.__version__}, {rows[0]['threads']} threads; fused: {rows[0]['simd']}, {rows[0]['fused_threads']} threads; ms are medians")
    print(hdr)
    for r in rows:
        comp = r["torch_compile_ms"]
        print(f"{r['shape']:<14}{r['dtype']:<6}{r['torch_eager_ms']:>12.1f}{comp if comp else float('nan'):>15.1f}"
              f"{r['fused_ms']:>9.2f}{r['floor_ms']:>9.2f}{r['x_floor']:>9.2f}{r['torch_eager_ms'] / r['fused_ms']:>9.1f}"
              f"{(comp / r['fused_ms']) if comp else float('nan'):>11.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
