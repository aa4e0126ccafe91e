#!/usr/bin/env python3
"""Compare `fused-weighted-loss eval` with the course function run in PyTorch float64.

Usage: python3 scripts/check_course.py [--bin target/release/fused-weighted-loss]
                                       [--course ../shared/reference/course_loss.py]
Needs numpy and torch (for the course command). Writes random .npy cases to a temporary folder, runs
both commands on each, and prints ‖out−ref‖/‖ref‖ for the loss, the per-sample losses and the gradient.
Exits 1 when any case is over its bound (f32: 1e-5; f16/bf16 logits: 1e-5 too, since both sides compute
from the same rounded values and the CLI writes an f32 gradient) or is NaN.
"""
import argparse, os, sys, tempfile
import numpy as np

from cli_check import default_bin, need_file, run_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / d) if d > 0 else float(np.linalg.norm(a))


def cases(rng):
    def base(b, t, v, scale=3.0, dtype=np.float32):
        return (rng.uniform(-scale, scale, (b, t, v)).astype(dtype), rng.integers(0, v, (b, t)).astype(np.int64))
    L, I = base(4, 32, 5000)
    I[0, :5] = 17
    yield "course defaults, keywords 3,17,40", L, I, None, ["--keywords", "3,17,40"]
    L, I = base(3, 16, 50000)
    yield "V=50000, duplicated keyword", L, I, None, ["--keywords", f"{I[0,0]},{I[0,0]},{I[1,3]}"]
    L, I = base(3, 12, 3001)
    Y = I.copy(); Y[0, 3:7] = -100; Y[2, :] = -100
    yield "labels with ignore_index, all positions", L, I, Y, ["--keywords", f"{I[1,1]}"]
    yield "labels with ignore_index, valid-token mean", L, I, Y, ["--row-mean", "valid", "--alpha", "0.7"]
    L, I = base(3, 12, 3001)
    I[0, 0] = -100; I[1, 4:6] = -100; I[2, 9:] = -100
    yield "inputs holding -100 (ignored targets)", L, I, None, ["--keywords", f"{I[1,1]}"]
    L, I = base(2, 8, 4000, scale=3000.0)
    yield "huge logits ±3e3", L, I, None, []
    L, I = base(2, 8, 4000)
    yield "large common offset 1e4", (L + 1e4).astype(np.float32), I, None, []
    L, I = base(2, 8, 4000)
    mask = rng.random(L.shape) < 0.5
    for b in range(2):
        for t in range(7):
            mask[b, t, I[b, t + 1]] = False
    L[mask] = -np.inf
    yield "-inf masked vocab", L, I, None, ["--keywords", "5"]
    L, I = base(2, 10, 1)
    yield "V=1", L, I, None, []
    L, I = base(3, 9, 2049, dtype=np.float16)
    yield "f16 logits", L, I, None, ["--keywords", f"{I[0,2]}"]
    L, I = base(3, 9, 2049)
    yield "f32 logits rounded to bf16", L, I, None, ["--dtype", "bf16"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("--course", default=os.path.join(ROOT, "..", "shared", "reference", "course_loss.py"))
    a = ap.parse_args()
    need_file(a.bin, "build it: cargo build --release --features cli, or pass --bin")
    need_file(a.course, "the course function beside the repository, ../shared/reference/; or pass --course")
    rng = np.random.default_rng(0)
    worst, failed = 0.0, False
    with tempfile.TemporaryDirectory() as d:
        for name, L, I, Y, extra in cases(rng):
            paths = {k: os.path.join(d, f"{k}.npy") for k in "LIYGR"}
            np.save(paths["L"], L)
            np.save(paths["I"], I)
            args = ["--logits", paths["L"], "--inputs", paths["I"]] + extra
            if Y is not None:
                np.save(paths["Y"], Y)
                args += ["--labels", paths["Y"]]
            ours = run_json([a.bin, "eval", *args, "--grad-out", paths["G"]])
            course = run_json([sys.executable, a.course, *args, "--grad-out", paths["R"]])
            e_loss = rel([ours["loss"]], [course["loss"]])
            e_per = rel(ours["per_sample_loss"], course["per_sample_loss"])
            e_grad = rel(np.load(paths["G"]), np.load(paths["R"]))
            w_ok = ours["weights"] == course["weights"]
            errs = [e_loss, e_per, e_grad]
            ok = w_ok and all(e <= 1e-5 for e in errs)  # NaN fails the comparison
            worst = max([worst] + errs)
            failed |= not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:<44} loss {e_loss:.1e}  per-sample {e_per:.1e}  "
                  f"grad {e_grad:.1e}  weights {'equal' if w_ok else 'DIFFER'}")
    print(f"worst relative error {worst:.2e} (bound 1e-5)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
