"""Preference data per second: the rlhf stage's table drawn one group at a time and
several groups a batch, the rater in the stage's process or in worker processes.

    python -m bench.preference_throughput --manifest CLIPS --prompts 32 \
        --device cuda --rater-workers 0,12 --groups-per-batch 1,8

Each setting draws the same ``--prompts`` prompts (the manifest's first captions, one
group of ``--candidates`` each, clips of ``--duration`` seconds) with
:func:`pipelines.align.stages.build_preferences` and prints seconds per group and the
speed-up over the first setting, side by side in one run. ``--texts TABLE`` serves the
prompts from a carry's text table (:mod:`pipelines.shipped.carry`) on a host without
the text encoder's weights. The first setting also warms the device (run it twice,
e.g. ``--groups-per-batch 1,1,8``, to see the warm-up).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--manifest", required=True, help="clips.parquet: its captions are read")
    ap.add_argument("--texts", default="", help="text table (safetensors) for the encoder")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--duration", type=float, default=33 / 16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rater-workers", default="0")
    ap.add_argument("--groups-per-batch", default="1,4")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.texts:
        from pipelines.shipped.carry import use_text_table_file

        use_text_table_file(args.texts)
    from model.pipeline import DuetPipeline
    from pipelines.align.prompts import manifest_prompts
    from pipelines.align.stages import build_preferences
    from pipelines.train.config import train_config_from

    pipe = DuetPipeline.from_checkpoint(args.checkpoint).to(args.device).eval()
    base = {"preset": pipe.config.name, "data": {"curated_uri": args.manifest}}
    prompts = manifest_prompts(train_config_from(base).data, pipe.config.fps)[: args.prompts]
    settings = [(int(w), int(b)) for w in args.rater_workers.split(",")
                for b in args.groups_per_batch.split(",")]  # fmt: skip
    print(f"{len(prompts)} prompts x {args.candidates} candidates of {args.duration:.3f} s, "
          f"{pipe.config.name} on {args.device}")  # fmt: skip
    results = []
    for workers, batch in settings:
        cfg = train_config_from({**base, "rlhf": {
            "rater_workers": workers, "preferences": {
                "candidates_per_prompt": args.candidates, "rounds": 1, "write_mp4": False,
                "duration_s": args.duration, "groups_per_batch": batch}}})  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            build_preferences(cfg, pipe, prompts, out, None)
            took = time.perf_counter() - t0
        per_group = took / len(prompts)
        speedup = results[0]["s_per_group"] / per_group if results else 1.0
        results.append({"rater_workers": workers, "groups_per_batch": batch,
                        "seconds": round(took, 2), "s_per_group": round(per_group, 4),
                        "speedup": round(speedup, 2)})  # fmt: skip
        print(
            f"rater workers {workers:3d}, groups a batch {batch:3d}: {took:7.1f} s, "
            f"{per_group:.3f} s a group, x{speedup:.2f} the first setting",
            flush=True,
        )
    if args.json:  # a local path or any URI storage writes (s3://...)
        from core import storage

        storage.write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
