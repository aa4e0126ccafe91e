"""What scripts/check_course.py and scripts/check_options.py share: where the CLI is, and
running a command for its JSON report."""

import json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_bin():
    """The release CLI in CARGO_TARGET_DIR, or in the repository's target/."""
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.path.join(target, "release", "fused-weighted-loss")


def run_json(cmd):
    """The JSON a command prints; a command that fails stops the check with its own message."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))}\nexited {r.returncode}: {r.stderr.strip()}")
    return json.loads(r.stdout)


def need_file(path, what):
    if not os.path.isfile(path):
        sys.exit(f"{path}: no such file ({what})")
