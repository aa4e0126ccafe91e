#!/usr/bin/env python3
"""Compare the loss options of `fused-weighted-loss eval` with PyTorch's own, in float64.

Usage: python3 scripts/check_options.py [--bin target/release/fused-weighted-loss]
Needs numpy and torch. For each case it writes random .npy inputs, runs `eval` with the options'
flags (--label-smoothing, --z-loss, --softcap, --token-weights, --token-loss-out, --grad-out), and
recomputes the same loss in PyTorch float64 from the course function's steps:
  label smoothing  torch.nn.functional.cross_entropy(..., label_smoothing=eps, reduction="none")
  soft-capping     logits <- c * tanh(logits / c) before the loss
  z-loss           + k * logsumexp(logits)^2 per token
  token weights    per-token losses times weights[:, 1:] before the row mean
and the gradient by autograd. Prints ||out - ref|| / ||ref|| for the loss, z-loss, per-token losses
and gradient; exits 1 when any is over 1e-5 or NaN.
"""
import argparse, os, sys, tempfile
import numpy as np

from cli_check import default_bin, need_file, run_json
import torch
import torch.nn.functional as F


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / d) if d > 0 else float(np.linalg.norm(a))


def torch_loss(L, I, Y, keywords, eps, k, cap, W):
    """The course function with the options, float64; returns loss, z-loss, per-token, grad."""
    logits = torch.from_numpy(L.astype(np.float64)).requires_grad_()
    inputs = torch.from_numpy(I)
    labels = torch.from_numpy(Y if Y is not None else I)
    z = cap * torch.tanh(logits / cap) if cap else logits
    shift_logits = z[..., :-1, :].reshape(-1, z.shape[-1])
    shift_labels = labels[..., 1:].reshape(-1)
    ce = F.cross_entropy(shift_logits, shift_labels, reduction="none", ignore_index=-100, label_smoothing=eps)
    lse = torch.logsumexp(shift_logits, dim=-1)
    valid = (shift_labels != -100).to(torch.float64)
    zl = k * lse ** 2 * valid
    per_token = (ce + zl).view(I.shape[0], -1)
    w = torch.from_numpy(W[:, 1:].astype(np.float64)) if W is not None else torch.ones_like(per_token)
    per_sample = (per_token * w).mean(axis=1)
    per_sample_z = (zl.view(I.shape[0], -1) * w).mean(axis=1)
    hits = sum((inputs == kw).to(torch.float64) for kw in keywords).sum(axis=1) if keywords else 0.0
    weights = 1.0 + hits
    loss = (per_sample * weights).mean()
    loss.backward()
    return loss.item(), (per_sample_z * weights).mean().item(), per_token.detach().numpy(), logits.grad.numpy()


def cases(rng):
    def base(b, t, v, scale=4.0):
        return rng.uniform(-scale, scale, (b, t, v)).astype(np.float32), rng.integers(0, v, (b, t)).astype(np.int64)
    L, I = base(3, 9, 3001)
    W = rng.uniform(0.0, 2.0, I.shape).astype(np.float32)
    Y = I.copy(); Y[0, 2:5] = -100
    yield "label smoothing 0.1", L, I, None, None, 0.1, 0.0, None
    yield "label smoothing 1.0, ignored labels", L, I, Y, None, 1.0, 0.0, None
    yield "z-loss 1e-3", L, I, None, None, 0.0, 1e-3, None
    yield "soft-cap 2", L, I, None, None, 0.0, 0.0, 2.0
    yield "token weights", L, I, Y, W, 0.0, 0.0, None
    L, I = base(2, 6, 50257, scale=40.0)
    W = rng.uniform(0.0, 2.0, I.shape).astype(np.float32)
    yield "all four, V=50257, logits ±40", L, I, None, W, 0.1, 1e-4, 30.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=default_bin())
    a = ap.parse_args()
    need_file(a.bin, "build it: cargo build --release --features cli, or pass --bin")
    rng = np.random.default_rng(1)
    worst, failed = 0.0, False
    with tempfile.TemporaryDirectory() as d:
        for name, L, I, Y, W, eps, k, cap in cases(rng):
            p = {x: os.path.join(d, f"{x}.npy") for x in "LIYWGP"}
            np.save(p["L"], L)
            np.save(p["I"], I)
            keywords = [int(I[0, 0]), int(I[1, 3])]
            args = ["eval", "--logits", p["L"], "--inputs", p["I"], "--keywords", ",".join(map(str, keywords)),
                    "--label-smoothing", str(eps), "--z-loss", str(k), "--backend", "cpu",
                    "--grad-out", p["G"], "--token-loss-out", p["P"]]
            if Y is not None:
                np.save(p["Y"], Y)
                args += ["--labels", p["Y"]]
            if W is not None:
                np.save(p["W"], W)
                args += ["--token-weights", p["W"]]
            if cap:
                args += ["--softcap", str(cap)]
            ours = run_json([a.bin, *args])
            loss, z_loss, per_token, grad = torch_loss(L, I, Y, keywords, eps, k, cap, W)
            errs = {
                "loss": rel([ours["loss"]], [loss]),
                "z-loss": rel([ours["z_loss"]], [z_loss]),
                "per-token": rel(np.load(p["P"]), per_token),
                "grad": rel(np.load(p["G"]), grad),
            }
            ok = all(e <= 1e-5 for e in errs.values())  # NaN fails the comparison
            worst = max([worst] + list(errs.values()))
            failed |= not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:<36} " + "  ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    print(f"worst relative error {worst:.2e} (bound 1e-5)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
