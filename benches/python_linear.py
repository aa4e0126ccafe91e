#!/usr/bin/env python3
"""The Python package's fused linear entry (fused_weighted_loss.weighted_linear_loss) against
PyTorch on the same tensors, in one process: one training step's loss, d hidden and d weight.

  python3 benches/python_linear.py [--device cpu|cuda] [--tokens 8x128] [--hidden 512] [--vocab 32000]
                                   [--dtype f32|bf16|f16] [--iters 5] [--rounds 3] [--json out.json]

- torch eager: F.linear(h, W) + the course function + backward (the [B*T, V] logits and their
  gradient exist);
- package: weighted_linear_loss(h, W, ids, keywords=...) + backward, as a training step calls it;
- native call (CPU): the Rust function the package wraps (its linear_forward) on the same memory
  with gradient buffers that stay: what the Python entry costs over it.
Each iteration runs them one after the other (wall clock; on CUDA synchronised around each step);
per round the medians of --iters and the medians of the paired ratios (each iteration's eager over
package, package over native), so that drifts of a shared machine hit both sides alike. The gradients are set to None before
each step (zero_grad(set_to_none=True)), so every step allocates the gradients it returns.
Memory, CPU: peak resident memory (VmHWM, reset through /proc/self/clear_refs) above what the
process held before one step (no gradients, the package's gradient pool emptied), less the
gradients (outputs, not extra memory; the pool's blocks are those gradients); buffers that the C
allocator serves from memory it kept resident from earlier steps (under its mmap threshold, up
to 32 MiB) are not seen, so the package's chunk buffers may not show; CUDA: peak of
torch.cuda.max_memory_allocated during one step, inputs and gradients included, which does not
see the package's chunk buffers and cuBLAS workspace (the crate allocates them itself, not
through torch: `fused-weighted-loss bench-linear` reports them as scratch_bytes).
The package's (and eager's) loss and gradients are checked first against the course function in
float64 on the same rounded inputs: f32 <= 1e-5; 16-bit <= 1e-4 (loss) and 1.5e-2 (gradients).
Needs: pip install ./python (with --features cuda for the GPU: see README, "PyTorch").
"""
import argparse, gc, json, os, statistics, sys, time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_linear import KEYS, grad_bytes, inputs, reset_peak, rss  # noqa: E402
from compare_torch import DTYPES, course_loss  # noqa: E402

import fused_weighted_loss as fwl  # noqa: E402
from fused_weighted_loss import _cpu_pool, _native  # noqa: E402


def eager_step(a, h, w, ids):
    def step():
        h.grad = w.grad = None
        course_loss(ids, F.linear(h, w).view(a.b, a.t, a.vocab), KEYS).backward()
    return step


def package_step(h, w, ids):
    def step():
        h.grad = w.grad = None
        fwl.weighted_linear_loss(h, w, ids, keywords=KEYS).backward()
    return step


def native_call(h, w, ids):
    """The package's native function on the same memory, its gradient buffers made once (f32
    accumulation of d weight for 16-bit inputs, as the package's default)."""
    hd, wd = h.detach(), w.detach()
    # float16: the package keeps d hidden in float32 too (rounded in the backward)
    dh = torch.empty_like(hd, dtype=torch.float32 if hd.dtype == torch.float16 else None)
    dw = torch.empty_like(wd, dtype=torch.float32)
    loss = torch.empty((), dtype=torch.float32)
    arg = lambda t: (t.data_ptr(), list(t.shape), str(t.dtype).removeprefix("torch."))
    options = (list(KEYS), [1.0] * len(KEYS), 1.0, -100, "all", "mean", False, 0.0, 0.0, None)

    def call():
        _native.linear_forward((arg(hd), arg(wd), None, arg(ids), None, None),
                               ((arg(dh), arg(dw), None), (0, loss.data_ptr(), 0, 0, 0, 0, False)), options, (None, None))
    return call


def check(a, h, w, ids):
    """Relative errors of the package's loss, d hidden and d weight against the course function's
    in float64 on the same (rounded) inputs, and the eager step's the same way."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss64 = course_loss(ids, F.linear(h64, w64).view(a.b, a.t, a.vocab), KEYS)
    loss64.backward()
    ref = [loss64.detach(), h64.grad, w64.grad]
    del loss64
    rel = lambda x, y: ((x.double() - y).norm() / y.norm()).item()
    errors = {}
    for name, step, loss_of in (("package", package_step(h, w, ids),
                                 lambda: fwl.weighted_linear_loss(h, w, ids, keywords=KEYS)),
                                ("eager", eager_step(a, h, w, ids),
                                 lambda: course_loss(ids, F.linear(h, w).view(a.b, a.t, a.vocab), KEYS))):
        step()
        out = [loss_of().detach(), h.grad, w.grad]
        errors.update({f"{name}_{k}": rel(x, y) for k, x, y in zip(("loss", "d_hidden", "d_weight"), out, ref)})
    return errors


def extra_memory(step, device, h, w):
    """Bytes one `step` needs: CPU, peak resident memory above what the process held with no
    gradient and an empty gradient pool; CUDA, peak allocated (the inputs included)."""
    h.grad = w.grad = None
    _cpu_pool.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    before, _ = rss()
    reset_peak()
    step()
    return rss()[1] - before


def interleaved(steps, iters, device):
    """Seconds of each step of `steps` (a dict), run one after the other in each iteration after
    one warm-up each, so that a drift of a shared machine hits them alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in steps}
    for k in range(iters + 1):
        for name, step in steps.items():
            sync()
            t = time.perf_counter()
            step()
            sync()
            if k > 0:
                times[name].append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tokens", default="8x128")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=list(DTYPES), default="f32")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    a.b, a.t = (int(x) for x in a.tokens.lower().split("x"))
    if a.device == "cuda" and not fwl.cuda_available():
        sys.exit(f"CUDA cannot be used here: {fwl.cuda_unavailable_reason()}")
    h, w, ids = inputs(a, a.device, DTYPES[a.dtype])
    errors = check(a, h, w, ids)
    steps = dict(eager=eager_step(a, h, w, ids), package=package_step(h, w, ids))
    if a.device == "cpu":
        steps["native"] = native_call(h, w, ids)
    rows = []
    for r in range(a.rounds):
        row = dict(round=r + 1)
        for name in ("eager", "package"):
            extra = extra_memory(steps[name], a.device, h, w)
            if a.device == "cpu":
                extra -= grad_bytes(h, w)  # the step's outputs
            row[f"{name}_mem_mib"] = extra / 2**20
        times = interleaved(steps, a.iters, a.device)
        for name, ts in times.items():
            row[f"{name}_ms"] = statistics.median(ts) * 1e3
        row["x_eager"] = statistics.median(e / p for e, p in zip(times["eager"], times["package"]))
        if a.device == "cpu":
            row["overhead_pct"] = 100 * (statistics.median(p / n for p, n in zip(times["package"], times["native"])) - 1)
        rows.append(row)
    n = a.b * a.t
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; N={n} H={a.hidden} V={a.vocab} {a.dtype}; medians of {a.iters}")
    print("vs the course function in float64 on the same inputs: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    mem = "peak MiB" if a.device == "cuda" else "extra MiB"
    print(f"{'round':<6}{'eager ms':>10}{'package ms':>12}{'x eager':>9}" + (f"{'native ms':>11}{'overhead':>10}"
          if a.device == "cpu" else "") + f"{'eager ' + mem:>18}{'package ' + mem:>20}")
    for x in rows:
        line = f"{x['round']:<6}{x['eager_ms']:>10.1f}{x['package_ms']:>12.1f}{x['x_eager']:>9.2f}"
        if a.device == "cpu":
            line += f"{x['native_ms']:>11.1f}{x['overhead_pct']:>9.1f}%"
        print(line + f"{x['eager_mem_mib']:>18.1f}{x['package_mem_mib']:>20.1f}")
    print("x eager: median of the paired ratios eager / package; overhead: median of the paired ratios package step /"
          " native call on the same memory, less 1")
    summary = dict(device=a.device, where=where, torch=torch.__version__, tokens=a.tokens, hidden=a.hidden,
                   vocab=a.vocab, dtype=a.dtype, iters=a.iters, errors=errors, rounds=rows,
                   median_x_eager=statistics.median(x["x_eager"] for x in rows))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    # the project's bounds against float64: f32 1e-5; 16-bit inputs 1e-4 on the loss, 1.5e-2 on
    # the gradients; NaN never passes
    f32 = DTYPES[a.dtype] == torch.float32
    bound = {"loss": 1e-5 if f32 else 1e-4, "d_hidden": 1e-5 if f32 else 1.5e-2, "d_weight": 1e-5 if f32 else 1.5e-2}
    over = {k: v for k, v in errors.items() if k.startswith("package_") and not v <= bound[k.removeprefix("package_")]}
    if over:
        sys.exit(f"the package's results are beyond the bounds against float64: {over}")


if __name__ == "__main__":
    main()
