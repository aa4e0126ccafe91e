#!/usr/bin/env python3
"""Time the course's keyword-weighted loss in PyTorch (eager and torch.compile, forward + backward)
against this crate: its Python package in the same process on the same tensors (when
`fused_weighted_loss` is importable: `pip install ./python`) and its CLI's fused `bench --json`
(when the binary exists), at the same shapes, in one run, and print the ratios. The package's
loss and gradient (and torch eager's) are also checked against the course function in float64 on
the same tensors (columns "err": the larger of the two relative errors).

CPU (default):
  python3 benches/compare_torch.py [--bin target/release/fused-weighted-loss] [--shapes 8x128x50000]
                                   [--dtypes f32,bf16] [--iters 10] [--no-compile] [--json out.json]
GPU (what scripts/gpu-check.sh runs):
  python3 benches/compare_torch.py --device cuda --shapes 32x128x50000:f32,32x128x50000:bf16,8x1024x128256:bf16
                                   [--liger-wheel liger_kernel-*.whl]
  adds Liger-Kernel's cross-entropy (per token, the weighting in torch) and the device copy bandwidth
  (a copy of the same bytes, timed with CUDA events, like every GPU figure here).

A shape may carry its dtype (`BxTxV:bf16`); otherwise every shape runs with every --dtypes entry.
Needs torch; build the binary first (cargo build --release --features cli[,cuda]) and/or install
the package (pip install ./python; for CUDA tensors built with the `cuda` feature, README "Python").
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


def package_loss_fn():
    """This crate's Python package, or None when it is not importable (or cannot run on CUDA)."""
    try:
        import fused_weighted_loss as fwl
    except ImportError as e:
        print(f"fused_weighted_loss not importable ({e}): no in-process columns", file=sys.stderr)
        return None
    return fwl


def errors_vs_float64(fns, logits, inputs, keys):
    """The relative error of each fn's loss and gradient against the course function in float64
    on the same tensors (the larger of the two), computed on the tensors' device."""
    x64 = logits.detach().double().requires_grad_()
    ref = course_loss(inputs, x64, keys)
    ref.backward()
    ref_grad, ref = x64.grad, ref.detach()
    del x64
    out = {}
    for name, fn in fns.items():
        x = logits.detach().clone().requires_grad_()
        loss = fn(inputs, x, keys)
        loss.backward()
        e_loss = ((loss.double() - ref).abs() / ref.abs()).item()
        e_grad = ((x.grad.double() - ref_grad).norm() / ref_grad.norm()).item()
        out[name] = max(e_loss, e_grad)
        del x, loss
    return out


def liger_loss_fn():
    from liger_kernel.transformers import LigerCrossEntropyLoss
    ce = LigerCrossEntropyLoss(reduction="none")

    def loss(inputs, logits, keytoken_ids, alpha=1.0):
        b, t, v = logits.shape
        flat = logits[:, :-1, :].reshape(-1, v)
        if flat.data_ptr() == logits.data_ptr():
            # (B = 1: the reshape is a view, and Liger writes its gradient into its input: the
            # shared logits would then hold gradient values for the next timing and check; for
            # B > 1 the reshape copies, so the copy is Liger's either way)
            flat = flat.clone()
        per_token = ce(flat, inputs[:, 1:].reshape(-1)).view(b, t - 1)
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
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"),
                                                  "release", "fused-weighted-loss"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shapes", default="8x128x50000")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-budget-s", type=float, default=1e9,
                    help="skip torch.compile once this much time has passed")
    ap.add_argument("--liger-wheel")
    ap.add_argument("--no-package", action="store_true", help="leave out the in-process package")
    ap.add_argument("--no-check", action="store_true", help="leave out the float64 error columns")
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
    pkg = None if a.no_package else package_loss_fn()
    if pkg is not None and dev == "cuda" and not pkg.cuda_available():
        print(f"fused_weighted_loss cannot run on CUDA here ({pkg.cuda_unavailable_reason()}): no in-process columns",
              file=sys.stderr)
        pkg = None
    use_cli = bool(a.bin) and os.path.exists(a.bin)
    if not use_cli:
        print(f"{a.bin}: no such file (build the CLI: cargo build --release --features cli, or pass --bin): "
              "the CLI's columns and the copy floor are left out", file=sys.stderr)
    configs = []
    for item in a.shapes.split(","):
        shape, _, dt = item.partition(":")
        for d in ([dt] if dt else a.dtypes.split(",")):
            configs.append((shape, d))
    rows, failures = [], []
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
        row["package_ms"] = None
        if pkg is not None:
            row["package_ms"] = timer(step_of(pkg.keytoken_weighted_loss, logits, inputs, keys), 2, a.iters)
            if not a.no_check:
                errs = errors_vs_float64({"package": pkg.keytoken_weighted_loss, "torch_eager": course_loss},
                                         logits, inputs, keys)
                row["package_err"], row["torch_eager_err"] = errs["package"], errs["torch_eager"]
                if not row["package_err"] <= (1e-5 if dt == "f32" else 1.5e-2):
                    failures.append(f"{shape} {dt}: the package is {row['package_err']:.2e} from float64")
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
        row.update(fused_ms=None, floor_ms=None, x_floor=None, fused_gbps=None)
        if use_cli:
            cmd = [a.bin, "bench", "--shape", shape, "--dtype", dt, "--json", "--iters", str(max(a.iters, 15)),
                   "--reference-iters", "0", "--backend", dev]
            ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            row.update(fused_ms=ours["median_ms"], floor_ms=ours["floor_median_ms"], x_floor=ours["x_floor"],
                       fused_gbps=ours["gbps"], floor_gbps=ours["floor_gbps"], fused_backend=ours["backend"],
                       simd=ours.get("simd"), fused_threads=ours.get("threads"))
        rows.append(row)
        # each row as soon as it is measured, so that a run cut short still leaves its figures
        print("row", json.dumps(row), flush=True)

    def f(x, w, p=2):
        return f"{x:>{w}.{p}f}" if x is not None else f"{'-':>{w}}"

    print(f"torch {torch.__version__}; device {rows[0].get('device', 'cpu')}; "
          f"{'CUDA events' if dev == 'cuda' else f'{torch.get_num_threads()} threads'}; ms are medians")
    print(f"{'shape':<16}{'dtype':<6}{'eager':>9}{'compile':>9}{'liger':>9}{'fused':>9}{'GB/s':>8}"
          f"{'copy':>9}{'x copy':>8}{'x eager':>8}{'x comp':>8}{'x liger':>8}"
          f"{'package':>9}{'pkg/fused':>10}{'pkg err':>9}{'eager err':>10}{'t copy':>9}")
    for r in rows:
        # the ratios to torch: against the package, timed in this process on the same tensors as
        # eager, compile and Liger (what a PyTorch user calls); the CLI's time, from its own
        # process and data, only where the package is not importable
        base = r["package_ms"] or r["fused_ms"]
        ref = lambda k: (r[k] / base) if r.get(k) and base else None
        err = lambda k, w: f"{r[k]:>{w}.1e}" if r.get(k) is not None else f"{'-':>{w}}"
        pkg_x = r["package_ms"] / r["fused_ms"] if r["package_ms"] and r["fused_ms"] else None
        print(f"{r['shape']:<16}{r['dtype']:<6}{f(r['torch_eager_ms'], 9)}{f(r['torch_compile_ms'], 9)}"
              f"{f(r['liger_ms'], 9)}{f(r['fused_ms'], 9, 3)}{f(r['fused_gbps'], 8, 0)}{f(r['floor_ms'], 9, 3)}"
              f"{f(r['x_floor'], 8)}{f(ref('torch_eager_ms'), 8, 1)}{f(ref('torch_compile_ms'), 8, 1)}"
              f"{f(ref('liger_ms'), 8, 2)}{f(r['package_ms'], 9, 3)}{f(pkg_x, 10)}"
              f"{err('package_err', 9)}{err('torch_eager_err', 10)}{f(r.get('torch_copy_ms'), 9, 3)}")
    print("fused: the CLI's bench (its own data); x copy: fused time / the crate's own copy floor (same bytes, "
          "same run, in the CLI); x eager/comp/liger: their time / the package's time (the CLI's without the "
          "package); package: fused_weighted_loss in this process, forward + backward on the same tensors as "
          "eager/compile/liger; err: relative error of loss and gradient vs the course function in float64 (the "
          "larger); t copy: torch's copy_ of the logits' bytes on the GPU, in this process")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    for msg in failures:
        print("FAILED:", msg, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
