#!/usr/bin/env python3
"""The fused linear + weighted loss (`bench-linear`) against PyTorch, in one run: time of one
training step's loss + d hidden + d weight, and the memory it needs beyond its inputs.

CPU (the CPU target: N = 8x128 = 1024 tokens, H = 512, V = 32000, f32, all threads):
  python3 benches/compare_linear.py [--bin target/release/fused-weighted-loss] [--rounds 2] [--iters 5]
  - torch eager: F.linear + the course function + backward;
  - torch GEMMs: the three matrix products of those sizes alone (h·Wᵀ, G·W, Gᵀ·h), the compute floor;
  - fused: this crate's `bench-linear` (CLI built with `cargo build --release --features cli`).
  Memory: peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs) above what the
  process holds once the inputs exist, less the gradients themselves (the crate writes into
  buffers that exist before; torch allocates .grad in the step, as after zero_grad(set_to_none=True)).
  Each round times all three; ratios per round.

GPU (what scripts/gpu-check.sh runs; needs the CLI built with `cli,cuda`):
  python3 benches/compare_linear.py --device cuda --tokens 8x1024 --hidden 4096 --vocab 128256 --dtype bf16 \
      [--liger-wheel liger_kernel-*.whl]
  - torch eager: the course function on hidden @ Wᵀ (the logits built), forward + backward;
  - Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="none") with the keyword weighting in torch
    (per-token losses -> per-sample means -> weights), forward + backward;
  - fused: `bench-linear --backend cuda`.
  Time by CUDA events (medians); memory: peak of everything allocated during the step *including*
  inputs and gradients (torch.cuda.max_memory_allocated; for the crate the memory pool's high-water
  mark, which its inputs, gradients, chunk buffers and cuBLAS workspace all come from).
"""
import argparse, json, os, subprocess, sys, tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_torch import DTYPES, ROOT, Timer, course_loss  # noqa: E402

KEYS = [0, 1, 2]


def rss():
    """(resident, peak resident) bytes of this process (Linux)."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def inputs(a, dev, dtype):
    b, t = a.b, a.t
    g = torch.Generator(device="cpu").manual_seed(0)
    h = ((torch.rand(b * t, a.hidden, generator=g) * 2 - 1)).to(dev, dtype).requires_grad_()
    w = ((torch.rand(a.vocab, a.hidden, generator=g) * 2 - 1) * (3.0 / a.hidden ** 0.5)).to(dev, dtype).requires_grad_()
    ids = torch.randint(0, a.vocab, (b, t), generator=g).to(dev)
    return h, w, ids


def grad_bytes(h, w):
    """What the gradients of h and w occupy: the outputs, like the crate's gradient buffers."""
    return (h.numel() + w.numel()) * h.element_size()


def eager_step(a, h, w, ids):
    def step():
        h.grad = w.grad = None  # zero_grad(set_to_none=True): the step allocates the gradients
        logits = F.linear(h, w).view(a.b, a.t, a.vocab)
        course_loss(ids, logits, KEYS).backward()
    return step


def liger_step(a, h, w, ids, liger_cls):
    flce = liger_cls(reduction="none")
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)

    def step():
        h.grad = w.grad = None
        per_token = flce(w, h, targets).view(a.b, a.t)  # 0 at the last position (ignored)
        per_sample = per_token.sum(dim=1) / (a.t - 1)  # the course function's mean over T-1
        weights = torch.stack([(ids == kt).float() for kt in KEYS]).sum(axis=[0, 2])
        ((per_sample * (1.0 + weights)).mean()).backward()
    return step


def fused(a, device):
    cmd = [a.bin, "bench-linear", "--tokens", f"{a.b}x{a.t}", "--hidden", str(a.hidden), "--vocab", str(a.vocab),
           "--dtype", a.dtype, "--backend", device, "--iters", str(a.iters), "--warmup", "1", "--json"]
    if device == "cpu":
        # always the threads torch gets (without the flag, rayon's own count: RAYON_NUM_THREADS or
        # the cores it sees, which need not be torch's)
        cmd += ["--threads", str(a.threads)]
    if a.budget_mib:
        cmd += ["--budget-mib", str(a.budget_mib)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def cpu(a):
    torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype]
    h, w, ids = inputs(a, "cpu", dtype)
    n, hid, v = a.b * a.t, a.hidden, a.vocab
    logits, dh, dw = torch.empty(n, v, dtype=dtype), torch.empty(n, hid, dtype=dtype), torch.empty(v, hid, dtype=dtype)
    hd, wd = h.detach(), w.detach()

    def gemms():
        torch.mm(hd, wd.t(), out=logits)
        torch.mm(logits, wd, out=dh)
        torch.mm(logits.t(), hd, out=dw)

    rows = []
    for r in range(a.rounds):
        ours = fused(a, "cpu")
        h.grad = w.grad = None
        before, _ = rss()
        reset_peak()
        eager_ms = Timer("cpu")(eager_step(a, h, w, ids), 1, a.iters)
        _, peak = rss()
        gemm_ms = Timer("cpu")(gemms, 1, a.iters)
        # torch's step allocates the gradients it returns; those are outputs, not extra memory
        eager_extra = peak - before - grad_bytes(h, w)
        rows.append(dict(round=r + 1, fused_ms=ours["median_ms"], eager_ms=eager_ms, gemm_ms=gemm_ms,
                         fused_extra_mib=ours["peak_extra_bytes"] / 2**20, eager_extra_mib=eager_extra / 2**20,
                         chunk_rows=ours["chunk_rows"], chunks=ours["chunks"], threads=ours["threads"]))
    print(f"torch {torch.__version__}, {a.threads} threads; N={n} H={hid} V={v} {a.dtype}; medians of {a.iters} runs")
    print(f"{'round':<6}{'eager ms':>10}{'3 GEMMs':>10}{'fused ms':>10}{'C':>6}{'x eager':>9}{'x GEMMs':>9}"
          f"{'eager MiB':>11}{'fused MiB':>11}{'mem ratio':>11}")
    for x in rows:
        print(f"{x['round']:<6}{x['eager_ms']:>10.1f}{x['gemm_ms']:>10.1f}{x['fused_ms']:>10.1f}{x['chunk_rows']:>6}"
              f"{x['eager_ms'] / x['fused_ms']:>9.2f}{x['fused_ms'] / x['gemm_ms']:>9.2f}"
              f"{x['eager_extra_mib']:>11.1f}{x['fused_extra_mib']:>11.1f}"
              f"{x['fused_extra_mib'] / x['eager_extra_mib']:>11.3f}")
    print("x eager: eager time / fused time (target >= 1); x GEMMs: fused time / the three GEMMs' (target <= 1.3);"
          " MiB: peak memory above inputs + gradients; mem ratio: fused / eager (target <= 0.1)")
    return rows


def cuda(a):
    dev, dtype = "cuda", DTYPES[a.dtype]
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    liger_cls = None
    if a.liger_wheel:
        target = tempfile.mkdtemp()
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", target,
                        a.liger_wheel], check=True)
        sys.path.insert(0, target)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss as liger_cls
    for name, make in [("eager", lambda h, w, ids: eager_step(a, h, w, ids)),
                       ("liger", (lambda h, w, ids: liger_step(a, h, w, ids, liger_cls)) if liger_cls else None)]:
        if make is None:
            continue
        torch.cuda.empty_cache()
        h, w, ids = inputs(a, dev, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            ms = Timer("cuda")(make(h, w, ids), 2, a.iters)
            results[name] = dict(ms=ms, peak_bytes=torch.cuda.max_memory_allocated())
        except torch.OutOfMemoryError as e:
            results[name] = dict(ms=None, peak_bytes=None, error=str(e).splitlines()[0])
        del h, w, ids
    torch.cuda.empty_cache()
    ours = fused(a, "cuda")
    results["fused"] = dict(ms=ours["median_ms"], peak_bytes=ours["peak_bytes"], chunk_rows=ours["chunk_rows"],
                            logits_rows=ours.get("logits_rows"), scratch_bytes=ours["scratch_bytes"])
    print(f"{results['device']}; torch {results['torch']}; N={a.b * a.t} H={a.hidden} V={a.vocab} {a.dtype}; "
          f"CUDA events, medians of {a.iters}; peak memory includes inputs and gradients")
    print(f"{'':<34}{'ms':>10}{'peak GiB':>10}{'x fused (time)':>16}")
    f = results["fused"]
    for key, label in [("eager", "torch eager (course on h@W^T)"), ("liger", "Liger FLCE + weighting in torch"),
                       ("fused", f"fused (C={f['chunk_rows']}, {f['logits_rows']} per GEMM)")]:
        x = results.get(key)
        if not x:
            continue
        ms = f"{x['ms']:.2f}" if x.get("ms") else "-"
        peak = f"{x['peak_bytes'] / 2**30:.3f}" if x.get("peak_bytes") else "-"
        ratio = f"{x['ms'] / f['ms']:.2f}" if x.get("ms") else x.get("error", "-")[:40]
        print(f"{label:<34}{ms:>10}{peak:>10}{ratio:>16}")
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"),
                                                  "release", "fused-weighted-loss"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tokens", default="8x128")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="f32")
    # (the cores this process may run on: os.cpu_count() counts the machine's, affinity aside)
    ap.add_argument("--threads", type=int,
                    default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-mib", type=int)
    ap.add_argument("--liger-wheel")
    ap.add_argument("--json")
    a = ap.parse_args()
    if not os.path.isfile(a.bin):
        sys.exit(f"{a.bin}: no such file (build the CLI: cargo build --release --features cli, or pass --bin)")
    a.b, a.t = (int(x) for x in a.tokens.lower().split("x"))
    out = cpu(a) if a.device == "cpu" else cuda(a)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
