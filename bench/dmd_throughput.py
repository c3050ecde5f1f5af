"""The DMD2 loop's seconds a step under each way of running it, side by side.

    python -m bench.dmd_throughput --carry CARRY [--checkpoint checkpoints/default] \\
        [--ways fp32,autocast,compile,b64,b64compile] [--steps 80] [--out /tmp/dmd_throughput]

How many student updates a fixed budget holds decides how far a Fast student gets
(BENCHMARKS.md: 500-1050 updates so far). Each way runs ``align_job``'s ``distill``
stage alone (``--skip-rlhf``, one fake-score update a student update, no regression),
one after another on the same device, for ``--steps`` loop steps, then scores one
held-out clip (``align_job`` always scores; its seconds are not counted). Ways:

- ``fp32``: batch 16, fp32 weights and compute (TF32 matmuls on a GPU);
- ``autocast``: batch 16, bf16 autocast around each step (``--autocast``);
- ``compile``: batch 16, ``--autocast --compile`` (each DiT block compiled);
- ``b64``: batch 64 with ``--autocast`` (a step then holds four times the samples);
- ``b64compile``: batch 64 with ``--autocast --compile``.

Printed per way: loop steps, seconds a step (from the stage's own progress marks, every
25 steps and the last; the first window, with compilation and warm-up, and the last,
with the final checkpoint's write, left out), samples a second and the ratio of samples
a second to the first way's. Each way gets its own copy
of the carry and its own run folder under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# align_job's distill stage logs (and marks its progress) every 25 steps.
LOG_EVERY = 25
WAYS = {
    "fp32": ("16", []),
    "autocast": ("16", ["--autocast"]),
    "compile": ("16", ["--autocast", "--compile"]),
    "b64": ("64", ["--autocast"]),
    "b64compile": ("64", ["--autocast", "--compile"]),
}


def run_way(name: str, args: argparse.Namespace) -> dict:
    """One ``align_job`` distill run; its stage report and wall seconds."""
    batch, flags = WAYS[name]
    folder = os.path.join(args.out, name)
    shutil.rmtree(folder, ignore_errors=True)
    carry = os.path.join(folder, "carry")
    shutil.copytree(args.carry, carry)
    cmd = [
        sys.executable, "-m", "pipelines.shipped.align_job", "--carry", carry,
        "--checkpoint", args.checkpoint, "--out", os.path.join(folder, "out"),
        "--run", os.path.join(folder, "run"), "--skip-rlhf", "--fake-updates", "1",
        "--distill-steps", str(args.steps), "--distill-batch", batch,
        "--distill-until-s", "1e9", "--seeds", "1", "--max-eval-prompts", "1",
        "--eval-workers", "1", *flags,
    ]  # fmt: skip
    began = time.monotonic()
    with open(os.path.join(folder, "log.txt"), "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - began
    if done.returncode != 0:  # one way failing (say compile) must not cost the others
        print(f"{name}: align_job failed ({done.returncode}); see {folder}/log.txt", flush=True)
        return {"way": name, "batch": int(batch), "steps": 0, "s_per_step": None,
                "wall_s": round(wall, 1), "failed": done.returncode}  # fmt: skip
    with open(os.path.join(folder, "out", "summary.json")) as f:
        stage = json.load(f)["stages"]["distill"]
    return {"way": name, "batch": int(batch), "steps": stage["steps"],
            "s_per_step": stage.get("s_per_step"), "wall_s": round(wall, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--carry", required=True)
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--ways", default="fp32,autocast,compile,b64")
    parser.add_argument("--steps", type=int, default=80, help="loop steps a way")
    parser.add_argument("--out", default="/tmp/dmd_throughput")
    args = parser.parse_args(argv)
    ways = [w for w in args.ways.split(",") if w]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        parser.error(f"unknown way(s) {unknown}: choose from {sorted(WAYS)}")
    if args.steps <= 3 * LOG_EVERY:  # progress marks every 25 steps and at the last
        parser.error(f"--steps must be more than {3 * LOG_EVERY}: the first window (warm-up) "
                     "and the last (the final checkpoint) are left out")  # fmt: skip
    args.carry, args.checkpoint, args.out = (
        os.path.abspath(p) for p in (args.carry, args.checkpoint, args.out)
    )
    rows = []
    for name in ways:
        row = run_way(name, args)
        if row.get("s_per_step"):
            row["samples_per_s"] = row["batch"] / row["s_per_step"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0].get("samples_per_s")
    print(f"\n{'way':10} {'batch':>5} {'steps':>5} {'s/step':>8} {'samples/s':>10} {'ratio':>6}")
    for row in rows:
        rate = row.get("samples_per_s")
        ratio = f"{rate / base:.2f}" if rate and base else "-"
        s_step = f"{row['s_per_step']:.3f}" if row["s_per_step"] else "-"
        rate_text = f"{rate:.1f}" if rate else "-"
        print(f"{row['way']:10} {row['batch']:>5} {row['steps']:>5} {s_step:>8} {rate_text:>10} "
              f"{ratio:>6}")  # fmt: skip
    if all(row.get("failed") for row in rows):
        raise SystemExit("every way failed")
    return rows


if __name__ == "__main__":
    main()
