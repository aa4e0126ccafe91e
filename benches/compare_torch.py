#!/usr/bin/env python3
"""Time the course's keyword-weighted loss in PyTorch (eager and torch.compile, forward + backward)
against this crate's fused `bench --json`, at the same shapes, in one run, and print the ratios.

CPU (default):
  python3 benches/compare_torch.py [--bin target/release/fused-weighted-loss] [--shapes 8x128x50000]
                                   [--dtypes f32,bf16] [--iters 10] [--no-compile] [--json out.json]
GPU (what scripts/gpu-check.sh runs):
  python3 benches/compare_torch.py --device cuda --shapes 32x128x50000:f32,32x128x50000:bf16,8x1024x128256:bf16
                                   [--liger-wheel liger_kernel-*.whl]
  adds Liger-Kernel's cross-entropy (per token, the weighting in torch) and the device copy bandwidth
  (a copy of the same bytes, timed with CUDA events, like every GPU figure here).

A shape may carry its dtype (`BxTxV:bf16`); otherwise every shape runs with every --dtypes entry.
Needs torch; build the binary first (cargo build --release --features cli[,cuda]).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

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


def liger_loss_fn():
    from liger_kernel.transformers import LigerCrossEntropyLoss
    ce = LigerCrossEntropyLoss(reduction="none")

    def loss(inputs, logits, keytoken_ids, alpha=1.0):
        b, t, v = logits.shape
        per_token = ce(logits[:, :-1, :].reshape(-1, v), inputs[:, 1:].reshape(-1)).view(b, t - 1)
        weights = torch.stack([(inputs == kt).float() for kt in keytoken_ids]).sum(axis=[0, 2])
        return (per_token.mean(axis=1) * alpha * (1.0 + weights)).mean()
    return loss


class Timer:
    """Wall clock on the CPU; CUDA events on the GPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self, fn, warmup, iters):
        for _ in range(warmup):
            fn()
        runs = []
        for _ in range(iters):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                runs.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                runs.append((time.perf_counter() - t) * 1e3)
        return statistics.median(runs)


def step_of(fn, logits, inputs, keys):
    def step():
        logits.grad = None
        fn(inputs, logits, keys).backward()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "fused-weighted-loss"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shapes", default="8x128x50000")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-budget-s", type=float, default=1e9,
                    help="skip torch.compile once this much time has passed")
    ap.add_argument("--liger-wheel")
    ap.add_argument("--json")
    a = ap.parse_args()
    t0 = time.time()
    dev = a.device
    timer = Timer(dev)
    liger = None
    if a.liger_wheel:
        target = tempfile.mkdtemp()
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", target,
                        a.liger_wheel], check=True)
        sys.path.insert(0, target)
        liger = liger_loss_fn()
    configs = []
    for item in a.shapes.split(","):
        shape, _, dt = item.partition(":")
        for d in ([dt] if dt else a.dtypes.split(",")):
            configs.append((shape, d))
    rows = []
    for shape, dt in configs:
        b, t, v = (int(x) for x in shape.lower().split("x"))
        torch.manual_seed(0)
        logits = (torch.rand(b, t, v, device=dev) * 8 - 4).to(DTYPES[dt]).requires_grad_()
        inputs = torch.randint(0, v, (b, t), device=dev)
        keys = [0, 1, 2]
        row = dict(shape=shape, dtype=dt, device=dev)
        row["torch_eager_ms"] = timer(step_of(course_loss, logits, inputs, keys), 2, a.iters)
        row["torch_compile_ms"] = None
        if not a.no_compile and time.time() - t0 < a.compile_budget_s:
            row["torch_compile_ms"] = timer(step_of(torch.compile(course_loss), logits, inputs, keys), 3, a.iters)
        row["liger_ms"] = timer(step_of(liger, logits, inputs, keys), 2, a.iters) if liger else None
        if dev == "cuda":
            # copy floor: read the logits' bytes once, write as many once
            src = logits.detach()
            dst = torch.empty_like(src)
            row["torch_copy_ms"] = timer(lambda: dst.copy_(src), 2, a.iters)
            row["device"] = torch.cuda.get_device_name()
            del src, dst
        del logits
        if dev == "cuda":
            torch.cuda.empty_cache()
        cmd = [a.bin, "bench", "--shape", shape, "--dtype", dt, "--json", "--iters", str(max(a.iters, 15)),
               "--reference-iters", "0", "--backend", dev]
        ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        row.update(fused_ms=ours["median_ms"], floor_ms=ours["floor_median_ms"], x_floor=ours["x_floor"],
                   fused_gbps=ours["gbps"], floor_gbps=ours["floor_gbps"], fused_backend=ours["backend"],
                   simd=ours.get("simd"), fused_threads=ours.get("threads"))
        rows.append(row)

    def f(x, w, p=2):
        return f"{x:>{w}.{p}f}" if x is not None else f"{'-':>{w}}"

    print(f"torch {torch.__version__}; device {rows[0].get('device', 'cpu')}; "
          f"{'CUDA events' if dev == 'cuda' else f'{torch.get_num_threads()} threads'}; ms are medians")
    print(f"{'shape':<16}{'dtype':<6}{'eager':>9}{'compile':>9}{'liger':>9}{'fused':>9}{'GB/s':>8}"
          f"{'copy':>9}{'x copy':>8}{'x eager':>8}{'x comp':>8}{'x liger':>8}")
    for r in rows:
        ref = lambda k: (r[k] / r["fused_ms"]) if r.get(k) else None
        print(f"{r['shape']:<16}{r['dtype']:<6}{f(r['torch_eager_ms'], 9)}{f(r['torch_compile_ms'], 9)}"
              f"{f(r['liger_ms'], 9)}{f(r['fused_ms'], 9, 3)}{f(r['fused_gbps'], 8, 0)}{f(r['floor_ms'], 9, 3)}"
              f"{f(r['x_floor'], 8)}{f(ref('torch_eager_ms'), 8, 1)}{f(ref('torch_compile_ms'), 8, 1)}"
              f"{f(ref('liger_ms'), 8, 2)}")
    print("x copy: fused time / the crate's own copy floor (same bytes, same run); "
          "x eager/comp/liger: their time / fused time")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
