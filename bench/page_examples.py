"""Do the web page's example prompts make something the probes recognise?

    python -m bench.page_examples                                   # checkpoints/default
    python -m bench.page_examples --checkpoint URI --seeds 3 --json out.json
    python -m bench.page_examples --first-seed 2     # seeds the examples were not chosen on

The page (serve/examples.py) suggests prompts taken from what the served checkpoint
was trained on. This generates each suggested prompt with a few seeds, probes every
clip (core/probes) and scores it against the prompt: the colours, shapes and
(colour, shape) pairs the prompt names that are seen, and whether every count is
exact. A prompt the probes cannot parse into objects (a talking face, say) is listed
as not scored. Prints a table and exits 1 when the share of scored clips whose every
named (colour, shape) pair is seen is below ``--target``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def score_examples(checkpoint: str, seeds: range, settings) -> list[dict]:
    from core.probes.captions import parse_caption
    from core.probes.probe import probe_clip
    from model.pipeline import DuetPipeline
    from pipelines.shipped.quality import attribute_scores, generate_clip
    from serve.examples import model_examples

    pipeline = DuetPipeline.from_checkpoint(checkpoint)
    rows = []
    for prompt in model_examples(checkpoint)["prompts"]:
        if not parse_caption(prompt):
            rows.append({"prompt": prompt, "seed": None, "scored": False})
            continue
        for seed in seeds:
            clip = generate_clip(pipeline, settings, seed, prompt=prompt, duration_s=2.0)
            detections = probe_clip(clip, include_frames=True)["frames"]
            rows.append({"prompt": prompt, "seed": seed, "scored": True,
                         **attribute_scores(prompt, detections)})  # fmt: skip
    return rows


def summary(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["scored"]]
    out = {
        "clips": len(scored),
        "not_scored": sorted({r["prompt"] for r in rows} - {r["prompt"] for r in scored}),
    }
    for key in ("colour", "shape", "pair", "count"):
        values = [r[key] for r in scored]
        out[key] = statistics.fmean(values) if values else None
        out[key + "_se"] = (
            statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
        )
    out["all_pairs_seen"] = sum(r["pair"] == 1.0 for r in scored) / len(scored) if scored else None
    return out


def main(argv: list[str] | None = None) -> int:
    from pipelines.shipped.quality import QualitySettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--first-seed", type=int, default=0,
        help="seeds other than those pipelines.shipped.examples_job chose the examples on",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--target", type=float, default=0.8,
                        help="share of scored clips with every named pair seen")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows = score_examples(args.checkpoint, seeds, QualitySettings(steps=args.steps))
    result = summary(rows)
    print(f"{'prompt':70s} seed colour shape pair count")
    for r in rows:
        if r["scored"]:
            print(f"{r['prompt'][:70]:70s} {r['seed']:4d} {r['colour']:.2f}   "
                  f"{r['shape']:.2f}  {r['pair']:.2f} {r['count']:.0f}")  # fmt: skip
        else:
            print(f"{r['prompt'][:70]:70s}    - not scored (no coloured shape named)")
    for key in ("colour", "shape", "pair", "count"):
        if result[key] is not None:
            se = result[key + "_se"]
            print(f"{key}: {result[key]:.3f}" + (f" +- {se:.3f}" if se is not None else ""))
    met = result["all_pairs_seen"] is not None and result["all_pairs_seen"] >= args.target
    print(
        f"every named pair seen in {result['all_pairs_seen']} of {result['clips']} scored clips "
        f"(target >= {args.target}): {'met' if met else 'MISSED'}; "
        f"{time.perf_counter() - started:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": result, "rows": rows}, f, indent=1)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
