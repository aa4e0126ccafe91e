#!/usr/bin/env python3
"""float16 logits under a loss scale: the float32 gradient the package keeps by default against
a float16 one (``kept_grad_dtype=torch.float16``), for time and for accuracy.

  python3 benches/float16_scale.py [--shape 8x128x50000] [--iters 12] [--check-shape 8x128x8000]
                                   [--device cpu|cuda] [--json out.json]

Time: forward and backward of ``weighted_loss`` on float16 logits, upstream gradient 1 and
65536 (GradScaler's initial scale), the four variants alternating so that drifts of a shared
machine hit them alike; medians after two warm-up rounds. Accuracy (on --check-shape, logits
``2 * randn``): the L1 error of the gradient at scale 65536 against the float64 gradient times
the scale, and the share of its nonzero entries that came out 0; beside them the course
function on ``logits.float()`` (PyTorch's float32 inside, one rounding to float16) and the
float64 gradient rounded to float16 (the best a float16 gradient can be).
"""
import argparse, json, statistics, time

import torch
from torch.nn import CrossEntropyLoss

import fused_weighted_loss as fwl

SCALES = (1.0, 65536.0)


def shape_arg(s):
    return tuple(int(x) for x in s.split("x"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def course(inputs, logits, keys):
    """The course function (float32 or float64 logits)."""
    shift_labels = inputs[..., 1:].contiguous()
    shift_logits = logits[..., :-1, :].contiguous()
    loss = CrossEntropyLoss(reduction="none")(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
    per = loss.view(shift_logits.size(0), shift_logits.size(1)).mean(axis=1)
    weights = 1.0 + torch.stack([(inputs == k).to(logits.dtype) for k in keys]).sum(axis=[0, 2])
    return (per * weights).mean()


def timing(shape, iters, device):
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(*shape, generator=g) * 2).half().to(device)
    ids = torch.randint(0, shape[2], shape[:2], generator=g).to(device)
    keys = [int(ids[0, 3])]
    times = {}
    for round_ in range(iters + 2):
        for kept in (torch.float32, torch.float16):
            for scale in SCALES:
                x = x0.clone().requires_grad_()
                sync(device)
                t0 = time.perf_counter()
                loss = fwl.weighted_loss(x, ids, keywords=keys, kept_grad_dtype=kept)
                sync(device)
                t1 = time.perf_counter()
                (loss * scale if scale != 1.0 else loss).backward()
                sync(device)
                t2 = time.perf_counter()
                if round_ >= 2:
                    times.setdefault((str(kept).removeprefix("torch."), scale), []).append((t1 - t0, t2 - t1))
                del x, loss
    return {f"{k} x{s:g}": {"forward_ms": 1e3 * statistics.median(f for f, _ in v),
                            "backward_ms": 1e3 * statistics.median(b for _, b in v)} for (k, s), v in times.items()}


def accuracy(shape, device):
    g = torch.Generator().manual_seed(1)
    x16 = (torch.randn(*shape, generator=g) * 2).half().to(device)
    ids = torch.randint(0, shape[2], shape[:2], generator=g).to(device)
    keys = [int(ids[0, 3])]
    scale = SCALES[-1]
    x64 = x16.double().requires_grad_()
    course(ids, x64, keys).backward()
    ref = x64.grad * scale
    nonzero = ref != 0

    def errors(grad):
        l1 = float((grad.double() - ref).abs().sum() / ref.abs().sum())
        lost = float(((grad == 0) & nonzero).sum() / nonzero.sum())
        return {"l1": l1, "zeroed": lost}

    out = {}
    for kept in (torch.float32, torch.float16):
        x = x16.clone().requires_grad_()
        (fwl.weighted_loss(x, ids, keywords=keys, kept_grad_dtype=kept) * scale).backward()
        out[f"package, kept {str(kept).removeprefix('torch.')}"] = errors(x.grad)
    x = x16.clone().requires_grad_()
    (course(ids, x.float(), keys) * scale).backward()
    out["torch, course function on logits.float()"] = errors(x.grad)
    out["float64 gradient rounded to float16"] = errors(ref.half())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=shape_arg, default=(8, 128, 50000))
    ap.add_argument("--check-shape", type=shape_arg, default=(8, 128, 8000))
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json")
    a = ap.parse_args()
    device = torch.device(a.device)
    times = timing(a.shape, a.iters, device)
    acc = accuracy(a.check_shape, device)
    shape = "x".join(map(str, a.shape))
    print(f"time, float16 {shape}, {a.device}, {torch.get_num_threads()} threads (medians of {a.iters})")
    print(f"  {'kept, upstream':<22} {'forward ms':>11} {'backward ms':>12} {'total ms':>9}")
    for k, v in times.items():
        total = v["forward_ms"] + v["backward_ms"]
        print(f"  {k:<22} {v['forward_ms']:>11.2f} {v['backward_ms']:>12.2f} {total:>9.2f}")
    print(f"accuracy at scale 65536, {'x'.join(map(str, a.check_shape))} (against float64 times the scale)")
    for k, v in acc.items():
        print(f"  {k:<44} L1 {v['l1']:.3e}   nonzero entries zeroed {100 * v['zeroed']:.1f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "device": a.device, "time": times, "accuracy": acc}, f, indent=1)


if __name__ == "__main__":
    main()
