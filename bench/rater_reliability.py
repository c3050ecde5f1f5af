"""How reliable are the rater's preferences between a checkpoint's own candidates?

    python -m bench.rater_reliability --manifest CLIPS.parquet --prompts 12

The ``rlhf`` stage's preference pairs order candidates of one group (one prompt, one
shared initial noise, the SDE sampler) by the programmatic rater's scores. A reward
model cannot agree with those orders on unseen prompts more often than the rater
agrees with itself on a copy of the same candidates that no person could tell apart.
This draws groups exactly as the stage does (:func:`pipelines.align.stages.build_preferences`,
``--candidates`` per group, the checkpoint's MP4s written at CRF 18), rates every
candidate again after the MP4 round trip (encoded, decoded), and prints per head:

- ``pairs``: pairs of a group whose original scores differ by ``--min-margin`` or more
  (the stage's training pairs);
- ``kept``: the share of those the round-trip scores order the same way (a tie counts
  half): the ceiling of any reward model's agreement with this rater on such pairs;
- ``groups with a pair``: how many groups give that head any pair at all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--manifest", required=True, help="clips.parquet whose captions are prompts")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--min-margin", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="work folder (default: a temporary one)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    import torch

    from core.media import read_clip
    from model.pipeline import DuetPipeline
    from pipelines.align.config import HEADS
    from pipelines.align.preferences import TABLE_NAME, groups, read_preferences
    from pipelines.align.prompts import manifest_prompts
    from pipelines.align.rater import rate_clip
    from pipelines.align.stages import build_preferences
    from pipelines.train.config import train_config_from

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or tempfile.mkdtemp(prefix="duet-rater-")
    cfg = train_config_from(
        {
            "preset": "compact",
            "seed": args.seed,
            "data": {"curated_uri": os.path.abspath(args.manifest)},
            "rlhf": {"preferences": {"candidates_per_prompt": args.candidates, "rounds": 1}},
        }
    )
    pipe = DuetPipeline.from_checkpoint(args.checkpoint).eval()
    every = manifest_prompts(cfg.data, pipe.config.fps)
    prompts = random.Random(args.seed).sample(every, min(args.prompts, len(every)))
    started = time.perf_counter()
    if not os.path.exists(os.path.join(out, TABLE_NAME)):
        build_preferences(cfg, pipe, prompts, out)
    rows = read_preferences(os.path.join(out, TABLE_NAME))
    drawn = time.perf_counter() - started
    again = {}
    for row in rows:
        scores = rate_clip(row["prompt"], read_clip(row["clip_uri"]))
        again[(row["group_id"], row["candidate"])] = scores
    result = {"prompts": len(prompts), "candidates": len(rows), "draw_s": round(drawn, 1)}
    for h in HEADS:
        pairs = kept = 0.0
        with_pair = 0
        for members in groups(rows).values():
            found = False
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    sa, sb = a[f"score_{h}"], b[f"score_{h}"]
                    if sa is None or sb is None or abs(sa - sb) < args.min_margin:
                        continue
                    found = True
                    ra = again[(a["group_id"], a["candidate"])].get(h)
                    rb = again[(b["group_id"], b["candidate"])].get(h)
                    pairs += 1
                    if ra is None or rb is None or ra == rb:
                        kept += 0.5
                    elif (ra > rb) == (sa > sb):
                        kept += 1
            with_pair += found
        share = kept / pairs if pairs else None
        result[h] = {"pairs": int(pairs), "kept": share, "groups_with_a_pair": with_pair}
        shown = "n/a" if share is None else f"{share:.3f}"
        print(f"{h:10s} pairs {int(pairs):5d}  kept after the MP4 round trip {shown}  "
              f"groups with a pair {with_pair}/{len(prompts)}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
