"""How well does the reward observer's pixel mask learn the probes' colour table, and
what do the rater's impacts make of its objects? On a table of a checkpoint's candidates.

    python -m bench.colour_mask --cache DIR [--reads table,palette,colour] [--steps 8000]

``DIR`` is a ``python -m bench.reward_generalisation --manifest ... --cache DIR`` table
(its candidates' frames decoded at ``--size`` pixels into ``DIR`` once, as
``bench.reward_concepts`` does; the two share the file). The rows are split by prompt as
the ``rlhf`` stage splits them (``--holdout``); each way's mask
(:class:`pipelines.align.observer.ClipObserver`'s, ``--width`` channels) learns on the
training candidates' frames with :func:`pipelines.align.reward.fit_colour_mask` for
``--steps`` steps, and is scored on the held-out candidates' frames:

- pixel recall and precision against the colour table's classes
  (:func:`pipelines.align.observer.table_classes`; a pixel counts when its class is
  right);
- the rater's impacts read by its own tracker and kink rule from the mask's cleaned
  objects (:func:`pipelines.align.observer.mask_objects` then
  :func:`pipelines.align.observer.impacts_by_rule`), precision and recall within a frame
  against the impacts the probes stored for each candidate.

Ways: ``palette`` and ``colour`` are the mask's ``mask_reads`` (each pixel through the
colour table's cell and prototype distances, or its raw colour); ``table`` is no network,
the colour table's own classes, the best any mask can do (the rule then finds exactly
the probes' impacts). Exits 1 when a learned way's impacts fall below
``--min-impact-f1`` (0: report only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipelines.align.observer import (
    PIXEL_READS,
    ClipObserver,
    ObserverConfig,
    event_recall_precision,
    impacts_by_rule,
    mask_objects,
    table_classes,
)

WAYS = ("table",) + PIXEL_READS


def table_probs(frames: torch.Tensor, colours: int) -> torch.Tensor:
    """(F, 3, s, s) uint8 -> (F, P, s, s): the colour table's classes as certainties."""
    one_hot = F.one_hot(table_classes(frames), colours + 1).permute(0, 3, 1, 2)
    return one_hot[:, 1:].float()


def mask_probs(mask: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """(F, 3, s, s) uint8 -> (F, P, s, s) the mask's probability of each colour."""
    with torch.no_grad():
        return mask(frames.float() / 127.5 - 1).softmax(1)[:, 1:]


def score(probs_of, frames: torch.Tensor, impacts: torch.Tensor, rows: list[int]) -> dict:
    """Pixel recall / precision and the rule's impacts on ``rows``' frames (N, F, 3, s, s)."""
    right = table_pixels = mask_pixels = 0
    found = []
    for i in rows:
        clip = frames[i]
        probs = probs_of(clip)  # (F, P, s, s)
        table = table_classes(clip)  # (F, s, s): 1 + colour, 0 none
        called = torch.where(probs.amax(1) > 0.5, probs.argmax(1) + 1, 0)
        right += int(((called == table) & (table > 0)).sum())
        table_pixels += int((table > 0).sum())
        mask_pixels += int((called > 0).sum())
        found.append(impacts_by_rule(mask_objects(probs.numpy(), clip.numpy()), clip.shape[-1]))
    events = event_recall_precision(torch.stack(found), impacts[rows])
    return {
        "pixel_recall": round(right / max(1, table_pixels), 4),
        "pixel_precision": round(right / max(1, mask_pixels), 4),
        "impact_precision": events["precision"],
        "impact_recall": events["recall"],
        "impacts_found": int(torch.stack(found).sum()),
        "impacts_stored": int(impacts[rows].sum()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="a bench.reward_generalisation --cache DIR")
    ap.add_argument("--checkpoint", default="checkpoints/default", help="decodes the frames")
    ap.add_argument("--reads", default=",".join(WAYS), help=f"ways, of {', '.join(WAYS)}")
    ap.add_argument("--steps", type=int, default=8000, help="fit_colour_mask steps")
    ap.add_argument("--width", type=int, default=64, help="the mask's channels")
    ap.add_argument("--size", type=int, default=128, help="decoded frames' side (pixels)")
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-impact-f1", type=float, default=0.0)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    ways = args.reads.split(",")
    if not set(ways) <= set(WAYS):
        ap.error(f"--reads: of {', '.join(WAYS)}")

    from bench.reward_concepts import observed_inputs
    from pipelines.align.preferences import TABLE_NAME, read_preferences
    from pipelines.align.reward import fit_colour_mask, split_by_prompt

    rows = read_preferences(os.path.join(args.cache, "preferences", TABLE_NAME))
    split_by_prompt(rows, args.holdout)
    inputs = load_file(os.path.join(args.cache, "inputs.safetensors"))
    seen = observed_inputs(args.cache, rows, inputs, os.path.abspath(args.checkpoint), args.size)
    frames, impacts = seen["frames"], seen["observed_impact"]
    colours = seen["observed_counts"].shape[-1]
    train = [i for i, r in enumerate(rows) if r["split"] == "train" and seen["observed"][i]]
    val = [i for i, r in enumerate(rows) if r["split"] == "val" and seen["observed"][i]]
    print(f"{len(train)} training and {len(val)} held-out candidates, frames "
          f"{tuple(frames.shape)}")  # fmt: skip
    results, failed = {}, []
    for way in ways:
        t0 = time.perf_counter()
        if way == "table":
            r = score(lambda clip: table_probs(clip, colours), frames, impacts, val)
        else:
            torch.manual_seed(args.seed)
            cfg = ObserverConfig(colours=colours, size=args.size, mask_width=args.width,
                                 mask_reads=way)  # fmt: skip
            mask = ClipObserver(cfg, seen["audio"].shape[1]).mask
            gen = torch.Generator().manual_seed(args.seed)
            fit_colour_mask(mask, frames, train, args.steps, gen)
            r = score(lambda clip, m=mask: mask_probs(m, clip), frames, impacts, val)
            p, q = r["impact_precision"], r["impact_recall"]
            if 2 * p * q / max(p + q, 1e-9) < args.min_impact_f1:
                failed.append(way)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results[way] = r
        print(f"{way:8s} pixels R {r['pixel_recall']:.4f} P {r['pixel_precision']:.4f}; "
              f"impacts P {r['impact_precision']:.3f} R {r['impact_recall']:.3f} "
              f"({r['impacts_found']} found, {r['impacts_stored']} stored); "
              f"{r['seconds']} s", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    if failed:
        print(f"impact F1 below {args.min_impact_f1}: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
