"""How reliable are the rater's preferences between a checkpoint's own candidates?

    python -m bench.rater_reliability --manifest CLIPS.parquet --prompts 12

The ``rlhf`` stage's preference pairs order candidates of one group (one prompt, one
shared initial noise, the SDE sampler) by the programmatic rater's scores. A reward
model cannot agree with those orders on unseen prompts more often than the rater
agrees with itself on a copy of the same candidates that no person could tell apart.
This draws groups exactly as the stage does (:func:`pipelines.align.stages.build_preferences`,
``--candidates`` per group, the candidates' MP4s written at CRF 18), rates every
candidate again on two copies (that MP4 decoded, and another at ``--second-crf``), and
prints per head, for three (labels, check) pairs: the stage's own scores against the
first copy's, against the second copy's, and the mean of own and first copy against
the second (does averaging two ratings give steadier labels?):

- ``pairs``: pairs of a group whose label scores differ by ``--min-margin`` or more
  (the stage's training pairs);
- ``kept``: the share of those the check scores order the same way (a tie counts
  half): the ceiling of any reward model's agreement with such labels;
- ``groups with a pair``: how many groups give that head any pair at all.

``--kink-mad-factor`` rates everything (the stage's labels included) with the impact
rule's noise band at that factor (``core.probes.tracks.KINK_MAD_FACTOR``) instead of
the product's: two runs with the same ``--seed`` and different factors draw the same
groups and compare the rules on them. ``copy vs second`` (both copies rated by this
bench) needs no stage labels.

Reuses the groups of a finished run in ``--out``.
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
    ap.add_argument("--eta", type=float, default=0.3, help="the SDE sampler's noise level")
    ap.add_argument("--duration", type=float, default=17 / 16, help="seconds a candidate")
    ap.add_argument("--min-margin", type=float, default=0.05)
    ap.add_argument(
        "--adherence-score", default="colour_frames", choices=("colour_frames", "objects"),
        help="what ranks adherence (rlhf.preferences.adherence_score)",
    )  # fmt: skip
    ap.add_argument("--second-crf", type=int, default=23, help="the second copy's H.264 CRF")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--kink-mad-factor", type=float, default=0.0,
                    help="the impact rule's noise band (default: the product's)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="work folder (default: a temporary one)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    import torch

    import core.probes.tracks as tracks
    from core.media import read_clip, write_mp4
    from model.pipeline import DuetPipeline
    from pipelines.align.config import HEADS
    from pipelines.align.preferences import TABLE_NAME, read_preferences
    from pipelines.align.prompts import manifest_prompts
    from pipelines.align.rater import preference_scores, rate_clip
    from pipelines.align.stages import build_preferences
    from pipelines.train.config import train_config_from

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kink_mad_factor:
        tracks.KINK_MAD_FACTOR = args.kink_mad_factor
    out = args.out or tempfile.mkdtemp(prefix="duet-rater-")
    cfg = train_config_from(
        {
            "preset": "compact",
            "seed": args.seed,
            "data": {"curated_uri": os.path.abspath(args.manifest)},
            "rlhf": {
                "preferences": {
                    "candidates_per_prompt": args.candidates,
                    "rounds": 1,
                    "duration_s": args.duration,
                    "eta": args.eta,
                    "adherence_score": args.adherence_score,
                }
            },
        }
    )
    adherence = args.adherence_score
    pipe = DuetPipeline.from_checkpoint(args.checkpoint).eval()
    every = manifest_prompts(cfg.data, pipe.config.fps)
    prompts = random.Random(args.seed).sample(every, min(args.prompts, len(every)))
    started = time.perf_counter()
    if not os.path.exists(os.path.join(out, TABLE_NAME)):
        build_preferences(cfg, pipe, prompts, out)
    rows = read_preferences(os.path.join(out, TABLE_NAME))
    drawn = time.perf_counter() - started
    # Scores per candidate: "own" (the stage's, from the decoded latents), then each
    # copy: the stage's MP4 (CRF 18) and a second one at CRF --second-crf, both decoded.
    scores: dict[str, dict] = {"own": {}, "copy": {}, "second": {}}
    for row in rows:
        key = (row["group_id"], row["candidate"])
        scores["own"][key] = {h: row[f"score_{h}"] for h in HEADS}
        clip = read_clip(row["clip_uri"])
        scores["copy"][key] = preference_scores(rate_clip(row["prompt"], clip), adherence)
        second = row["clip_uri"][:-4] + f"-crf{args.second_crf}.mp4"
        write_mp4(second, clip, crf=args.second_crf, aac_coder="fast")
        rated = rate_clip(row["prompt"], read_clip(second))
        scores["second"][key] = preference_scores(rated, adherence)
    scores["mean"] = {
        k: {h: _mean(scores["own"][k].get(h), scores["copy"][k].get(h)) for h in HEADS}
        for k in scores["own"]
    }
    result = {"prompts": len(prompts), "candidates": len(rows), "draw_s": round(drawn, 1),
              "kink_mad_factor": tracks.KINK_MAD_FACTOR}  # fmt: skip
    # (labels, check): the stage's labels against the copy; then, against the second
    # copy (which neither label saw), the stage's labels and the mean of own and copy.
    for name, labels, check in (("own vs copy", "own", "copy"), ("own vs second", "own", "second"),
                                ("mean vs second", "mean", "second"),
                                ("copy vs second", "copy", "second")):  # fmt: skip
        result[name] = {}
        for h in HEADS:
            pairs, kept, with_pair = _kept(rows, scores[labels], scores[check], h, args.min_margin)
            share = kept / pairs if pairs else None
            result[name][h] = {"pairs": pairs, "kept": share, "groups_with_a_pair": with_pair}
            shown = "n/a" if share is None else f"{share:.3f}"
            print(f"{name:15s} {h:10s} pairs {pairs:5d}  kept {shown}  "
                  f"groups with a pair {with_pair}/{len(prompts)}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _mean(a, b):
    return None if a is None or b is None else (float(a) + float(b)) / 2


def _kept(rows, labels: dict, check: dict, head: str, margin: float) -> tuple[int, float, int]:
    """Pairs of a group that ``labels`` orders by ``margin`` or more, the share ``check``
    orders the same way (a tie or a missing score counts half), and the groups with one."""
    from pipelines.align.preferences import groups

    pairs, kept, with_pair = 0, 0.0, 0
    for members in groups(rows).values():
        keys = [(m["group_id"], m["candidate"]) for m in members]
        found = False
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                sa, sb = labels[a].get(head), labels[b].get(head)
                if sa is None or sb is None or abs(sa - sb) < margin:
                    continue
                found = True
                pairs += 1
                ra, rb = check[a].get(head), check[b].get(head)
                if ra is None or rb is None or ra == rb:
                    kept += 0.5
                elif (ra > rb) == (sa > sb):
                    kept += 1
        with_pair += found
    return pairs, kept, with_pair


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
