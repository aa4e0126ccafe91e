#!/usr/bin/env bash
# `CpuSimd::Portable` gives the same bits on every CPU: this checks it across architectures.
# It builds the CLI for aarch64 (where the portable level is the only one), runs it under
# qemu-user beside this machine's CLI pinned to `--simd portable`, and compares the JSON
# report, the gradient and the per-token losses byte for byte over every logits dtype, the loss
# options and one and two threads. It also runs clippy for aarch64 with warnings denied, so
# that non-x86 builds stay clean.
#
# Needs rustup (it adds the aarch64 standard library) and, when missing, installs qemu-user
# and the aarch64 cross gcc with apt (as root). Usage: bash scripts/cross-arch-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu

rustup target add "$target" >/dev/null 2>&1 || rustup target add "$target"
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc

echo "-- clippy for $target (warnings denied)"
cargo clippy --target "$target" --all-targets --features cli -- -D warnings

# The CLI's executable that cargo's JSON messages (stdin) name, wherever CARGO_TARGET_DIR or a
# config puts it; the compiler's own messages go to stderr as cargo would print them.
cli_path() {
  python3 -c '
import json, sys
path = ""
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-message":
        sys.stderr.write(m["message"].get("rendered") or "")
    elif m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["bin"] and m.get("executable"):
        path = m["executable"]
print(path)
'
}

echo "-- the CLI for $target and for this machine"
arm=$(cargo build --release --target "$target" --features cli --message-format=json | cli_path)
# the CLI as the README's test command builds it (its features, and the dev-dependencies' features
# that a test build unifies in): CI has just run that command, so nothing is rebuilt there
x86=$(cargo test --release --features cli,candle --test cli --no-run --message-format=json | cli_path)
[[ -x "$arm" && -x "$x86" ]] || { echo "no CLI executable named by cargo: '$arm', '$x86'" >&2; exit 1; }
# the comparison means something only if the two binaries are of two architectures:
# ELF e_machine (bytes 18-19) 0xB7 is aarch64, 0x3E x86-64
machine() { od -An -tx1 -j18 -N1 "$1" | tr -d ' '; }
[[ "$(machine "$arm")" == b7 && "$(machine "$x86")" == 3e ]] || {
  echo "expected an aarch64 and an x86-64 binary, got e_machine $(machine "$arm") and $(machine "$x86")" >&2
  exit 1
}

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# inputs as .npy without numpy: logits with a large outlier and a shifted row (the paths that
# move the reference), ids, token weights; f32 and f16 files
python3 - "$dir" <<'EOF'
import random, struct, sys
d = sys.argv[1]
def save(name, descr, fmt, shape, values):
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }" % (descr, "".join(f"{s}, " for s in shape))
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    with open(f"{d}/{name}", "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        f.write(struct.pack("<%d%s" % (len(values), fmt), *values))
rng = random.Random(7)
B, T, V = 3, 17, 5003
z = [rng.gauss(0.0, 3.0) for _ in range(B * T * V)]
z[(0 * T + 3) * V + 100] = 60.0
for v in range(V):
    z[(1 * T + 5) * V + v] -= 40.0
save("z32.npy", "<f4", "f", (B, T, V), z)
save("z16.npy", "<f2", "e", (B, T, V), z)
save("ids.npy", "<i8", "q", (B, T), [rng.randrange(V) for _ in range(B * T)])
save("tw.npy", "<f4", "f", (B, T), [0.5 + rng.random() for _ in range(B * T)])
EOF

echo "-- the portable level on x86-64 and on aarch64 (qemu-user): the same bytes?"
n=0
for z in z32 z16; do
  for dtype in f32 bf16 f16; do
    for opts in "" "--z-loss 1e-3 --label-smoothing 0.1 --token-weights $dir/tw.npy" "--softcap 30 --z-loss 1e-4"; do
      for threads in 1 2; do
        # shellcheck disable=SC2206
        args=(eval --logits "$dir/$z.npy" --inputs "$dir/ids.npy" --dtype "$dtype" --keywords 5,17,300
          --alpha 2 --threads "$threads" $opts)
        "$x86" "${args[@]}" --simd portable --grad-out "$dir/grad-x.npy" --token-loss-out "$dir/tok-x.npy" >"$dir/out-x.json"
        qemu-aarch64 -L /usr/aarch64-linux-gnu "$arm" "${args[@]}" --grad-out "$dir/grad-a.npy" \
          --token-loss-out "$dir/tok-a.npy" >"$dir/out-a.json"
        grep -q '"loss":' "$dir/out-x.json"
        for what in out grad tok; do
          a=$(ls "$dir/$what"-x.*) b=$(ls "$dir/$what"-a.*)
          if ! cmp -s "$a" "$b"; then
            echo "differ: $z.npy --dtype $dtype $opts --threads $threads: $a vs $b" >&2
            cmp "$a" "$b" >&2 || true
            exit 1
          fi
        done
        rm -f "$dir"/out-?.json "$dir"/grad-?.npy "$dir"/tok-?.npy
        n=$((n + 1))
      done
    done
  done
done
echo "ok: $n runs, x86-64 portable and aarch64 byte-identical (report, gradient, per-token losses)"
