#!/usr/bin/env python3
"""Overhead of the Python entry (fused_weighted_loss.keytoken_weighted_loss, forward + backward,
as a training step calls it) over the Rust call it wraps, on the same data in the same process.

CPU (target: <= 5% at 8x128x50000 f32):
  python3 benches/python_overhead.py [--shape 8x128x50000] [--dtype f32] [--iters 15] [--json out.json]
  The Rust call is LossSpec::loss_and_grad on the tensors' memory (the native function the
  package calls, with nothing around it), its gradient into one buffer that stays (as the CLI's
  bench reuses one) and, separately, timed inside Rust, into a new buffer per call; as a
  cross-check, the same call in a loop inside Rust. The Python entry returns a new gradient tensor each step; its memory comes from
  the package's CPU gradient pool (--no-pool: from torch's allocator, fresh pages each step).
  Python entry and Rust calls alternate, so that drifts of a shared machine hit them alike; the
  overhead is the median of the paired ratios (each Python call over the Rust call after it).
  With --dtype f16 the entry keeps a float32 gradient and rounds it to float16 in the backward
  (see the README, "float16 logits and loss scaling"): that pass counts as overhead here.
GPU (target: <= 30 us per call at the course shape):
  python3 benches/python_overhead.py --device cuda [--shape 32x128x50000] [--dtype bf16]
  Back-to-back calls on torch's current stream, wall clock until the stream is done, per call:
  the Python entry vs the crate's device API called from Rust on the same device memory; and the
  host time of one Python call (what the device has to hide).
Needs: pip install ./python (with --features cuda for the GPU: see README, "Python").
"""
import argparse, json, os, statistics, sys, time

import torch

fwl = _native = None  # imported in main(), after --no-pool is applied

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
KEYS = [0, 1, 2]


def options(keys=KEYS):
    return (list(keys), [1.0] * len(keys), 1.0, -100, "all", "mean", False, 0.0, 0.0, None)


def tensor_arg(t):
    return (t.data_ptr(), list(t.shape), str(t.dtype).removeprefix("torch."))


def data(shape, dtype, device):
    b, t, v = shape
    g = torch.Generator(device=device).manual_seed(0)
    logits = ((torch.rand(b, t, v, device=device, generator=g) * 8 - 4).to(dtype)).requires_grad_()
    ids = torch.randint(0, v, (b, t), device=device, generator=g)
    return logits, ids


def python_step(logits, ids):
    logits.grad = None
    fwl.keytoken_weighted_loss(ids, logits, KEYS).backward()


def cpu(shape, dtype, iters, warmup):
    logits, ids = data(shape, dtype, "cpu")
    la, ia = tensor_arg(logits.detach()), tensor_arg(ids)
    # the Rust call into one gradient buffer that stays (written by the warm-up), called directly
    grad, loss = torch.empty_like(logits.detach()), torch.empty((), dtype=torch.float32)

    def rust_call():
        _native.forward((la, ia, None, None), (grad.data_ptr(), loss.data_ptr(), 0, 0, 0, 0, False), options())

    py, reused = [], []
    for k in range(warmup + iters):
        t = time.perf_counter()
        python_step(logits, ids)
        dt = time.perf_counter() - t
        t = time.perf_counter()
        rust_call()
        r = time.perf_counter() - t
        if k >= warmup:
            py.append(dt)
            reused.append(r)
    # a new gradient buffer per call (apart: unmapping 200 MB disturbs whatever runs next)
    fresh = _native.time_rust_call(la, ia, options(), 1, max(3, iters // 3), True)
    # cross-check: the same call in a loop inside Rust (no Python between calls), buffer reused
    in_rust = _native.time_rust_call(la, ia, options(), 2, iters, False)
    med = lambda xs: statistics.median(xs) * 1e3
    row = dict(device="cpu", shape="x".join(map(str, shape)), dtype=str(dtype).removeprefix("torch."),
               threads=torch.get_num_threads(), iters=iters, grad_pool=os.environ.get("FWL_CPU_GRAD_POOL") != "0",
               python_ms=med(py), rust_reused_grad_ms=med(reused), rust_fresh_grad_ms=med(fresh),
               rust_loop_ms=med(in_rust))
    # each Python call against the Rust call right after it: drift between rounds cancels out
    row["paired_ratio"] = statistics.median(p / r for p, r in zip(py, reused))
    row["python_min_ms"], row["rust_reused_min_ms"] = min(py) * 1e3, min(reused) * 1e3
    row["overhead_vs_reused_pct"] = 100 * (row["paired_ratio"] - 1)
    row["overhead_vs_fresh_pct"] = 100 * (row["python_ms"] / row["rust_fresh_grad_ms"] - 1)
    # the fixed cost per call, where the work itself is negligible
    small_l, small_i = data((2, 8, 64), dtype, "cpu")
    sl, si = tensor_arg(small_l.detach()), tensor_arg(small_i)
    small_py, small_rust = [], []
    for k in range(200):
        t = time.perf_counter()
        python_step(small_l, small_i)
        small_py.append(time.perf_counter() - t)
        small_rust.append(_native.time_rust_call(sl, si, options(), 0, 1, True)[0])
    row["fixed_python_us"] = statistics.median(small_py[50:]) * 1e6
    row["fixed_rust_us"] = statistics.median(small_rust[50:]) * 1e6
    return row


def cuda(shape, dtype, iters, warmup):
    if not hasattr(_native, "time_rust_call_cuda"):
        sys.exit("this build has no CUDA support: pip install ./python with --features cuda")
    if not torch.cuda.is_available() or not fwl.cuda_available():
        sys.exit(f"CUDA cannot be used here: {fwl.cuda_unavailable_reason() or 'torch sees no CUDA device'}")
    dev = torch.device("cuda")
    logits, ids = data(shape, dtype, dev)
    grad = torch.empty_like(logits)
    stream = torch.cuda.current_stream()
    device = (torch.cuda.current_device(), stream.cuda_stream)
    rounds = []
    for _ in range(3):  # alternate the two, three rounds; medians of the rounds
        for _ in range(warmup):
            python_step(logits, ids)
        torch.cuda.synchronize()
        host = []
        start = time.perf_counter()
        for _ in range(iters):
            t = time.perf_counter()
            python_step(logits, ids)
            host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        py_wall = (time.perf_counter() - start) / iters
        rust_wall, rust_host = _native.time_rust_call_cuda(
            (tensor_arg(logits.detach()), tensor_arg(ids), None, None), grad.data_ptr(), options(), device, warmup,
            iters)
        rounds.append((py_wall, statistics.median(host), rust_wall / iters, statistics.median(rust_host)))
    med = lambda i: statistics.median(r[i] for r in rounds)
    row = dict(device=torch.cuda.get_device_name(), shape="x".join(map(str, shape)),
               dtype=str(dtype).removeprefix("torch."), iters=iters, python_us_per_call=med(0) * 1e6,
               python_host_us_per_call=med(1) * 1e6, rust_us_per_call=med(2) * 1e6, rust_host_us_per_call=med(3) * 1e6)
    row["overhead_us_per_call"] = row["python_us_per_call"] - row["rust_us_per_call"]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape")
    ap.add_argument("--dtype", choices=list(DTYPES))
    ap.add_argument("--iters", type=int)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-pool", action="store_true", help="CPU: gradients from torch's allocator, not the pool")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.no_pool:
        os.environ["FWL_CPU_GRAD_POOL"] = "0"
    global fwl, _native
    import fused_weighted_loss as fwl
    from fused_weighted_loss import _native
    if a.device == "cpu":
        shape, dtype, iters = a.shape or "8x128x50000", a.dtype or "f32", a.iters or 15
    else:
        shape, dtype, iters = a.shape or "32x128x50000", a.dtype or "bf16", a.iters or 50
    shape = tuple(int(x) for x in shape.lower().split("x"))
    row = (cpu if a.device == "cpu" else cuda)(shape, DTYPES[dtype], iters, a.warmup)
    print(f"torch {torch.__version__}, fused_weighted_loss {fwl.__version__}, {os.cpu_count()} CPUs")
    if a.device == "cpu":
        print(f"{row['shape']} {row['dtype']}, {row['threads']} threads, medians of {row['iters']}, "
              f"gradient pool {'on' if row['grad_pool'] else 'off'}:")
        print(f"  Python entry (forward + backward)      {row['python_ms']:9.2f} ms")
        print(f"  Rust call, gradient buffer that stays  {row['rust_reused_grad_ms']:9.2f} ms   "
              f"(in a Rust loop: {row['rust_loop_ms']:.2f} ms)")
        print(f"  overhead: median of the paired ratios {row['overhead_vs_reused_pct']:+.1f}%; minimums "
              f"{row['python_min_ms']:.2f} vs {row['rust_reused_min_ms']:.2f} ms")
        print(f"  Rust call, new gradient buffer         {row['rust_fresh_grad_ms']:9.2f} ms   "
              f"overhead {row['overhead_vs_fresh_pct']:+.1f}%")
        print(f"  fixed cost per call (2x8x64): Python {row['fixed_python_us']:.1f} us, "
              f"Rust {row['fixed_rust_us']:.1f} us")
    else:
        print(f"{row['device']}, {row['shape']} {row['dtype']}, {row['iters']} back-to-back calls, medians of 3 rounds:")
        print(f"  Python entry (forward + backward)  {row['python_us_per_call']:9.1f} us per call "
              f"(host {row['python_host_us_per_call']:.1f} us)")
        print(f"  Rust call (device API)             {row['rust_us_per_call']:9.1f} us per call "
              f"(host {row['rust_host_us_per_call']:.1f} us)")
        print(f"  overhead                           {row['overhead_us_per_call']:+9.1f} us per call")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(row, fh, indent=1)


if __name__ == "__main__":
    main()
