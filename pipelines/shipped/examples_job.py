"""Record the web page's example prompts in a checkpoint: captions it trained on that
it renders so the probes recognise every (colour, shape) pair they name.

    python -m pipelines.shipped.examples_job --checkpoint checkpoints/default \
        --manifest CURATED/clips.parquet --count 6 --seeds 2

Candidates are the manifest's training captions whose every word the checkpoint
knows, in the page's varied order (:func:`pipelines.train.vocabulary.pick_examples`).
Each is generated on ``--seeds`` seeds from ``--first-seed`` and kept when every clip
shows every named pair (a caption the probes cannot parse is skipped). The kept
prompts replace ``extra.caption_examples`` in the checkpoint's config.json, with how
they were checked in ``extra.caption_examples_check``; the weights are not touched.
``python -m bench.page_examples`` then measures the page on other seeds.
"""

from __future__ import annotations

import argparse
import time

EXAMPLES_KEY = "caption_examples"
CHECK_KEY = "caption_examples_check"


def recognised(pipeline, prompt: str, seeds: range, settings) -> bool | None:
    """True when every clip of ``prompt`` shows every named (colour, shape) pair; None
    when the probes cannot read the prompt."""
    from core.probes.captions import parse_caption
    from core.probes.probe import probe_clip
    from pipelines.shipped.quality import attribute_scores, generate_clip

    if not parse_caption(prompt):
        return None
    for seed in seeds:
        clip = generate_clip(pipeline, settings, seed, prompt=prompt, duration_s=2.0)
        detections = probe_clip(clip, include_frames=True)["frames"]
        if attribute_scores(prompt, detections)["pair"] < 1.0:
            return False
    return True


def choose_examples(pipeline, candidates: list[str], vocabulary, count: int, seeds: range,
                    settings, log=print) -> tuple[list[str], int]:  # fmt: skip
    """Up to ``count`` recognised candidates, in the varied order; and how many were tried."""
    from pipelines.train.vocabulary import pick_examples

    chosen, tried = [], 0
    for prompt in pick_examples(candidates, vocabulary, limit=len(candidates)):
        if len(chosen) >= count:
            break
        verdict = recognised(pipeline, prompt, seeds, settings)
        tried += verdict is not None
        log(f"{'kept' if verdict else 'skipped':8s} {prompt}")
        if verdict:
            chosen.append(prompt)
    return chosen, tried


def record(checkpoint: str, examples: list[str], check: dict) -> None:
    """Write the examples into the checkpoint's config.json (atomically: storage.write_json)."""
    from core import storage

    uri = storage.join(checkpoint, "config.json")
    meta = storage.read_json(uri)
    meta.setdefault("extra", {})[EXAMPLES_KEY] = examples
    meta["extra"][CHECK_KEY] = check
    storage.write_json(uri, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--manifest", required=True, help="the curated manifest it trained on")
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--frames", type=int, default=33, help="shortest clip trained on")
    parser.add_argument("--dry-run", action="store_true", help="choose, print, write nothing")
    args = parser.parse_args(argv)
    if args.count < 1 or args.seeds < 1:
        parser.error("--count and --seeds must be at least 1")

    from model.checkpoint import read_meta
    from model.pipeline import DuetPipeline
    from pipelines.shipped.quality import QualitySettings
    from pipelines.train.vocabulary import checkpoint_vocabulary, training_captions

    started = time.perf_counter()
    meta = read_meta(args.checkpoint)
    vocabulary = checkpoint_vocabulary(meta)
    if not vocabulary:
        parser.error(f"{args.checkpoint} records no caption vocabulary to check prompts against")
    candidates = training_captions(args.manifest, float(meta["config"]["fps"]), (args.frames,))
    pipeline = DuetPipeline.from_checkpoint(args.checkpoint)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    settings = QualitySettings(steps=args.steps)
    chosen, tried = choose_examples(pipeline, candidates, vocabulary, args.count, seeds, settings)
    if not chosen:
        print(
            f"no candidate was recognised on seeds {list(seeds)} ({tried} tried); nothing written"
        )
        return 1
    check = {
        "seeds": list(seeds), "steps": args.steps, "sampler": settings.sampler,
        "recognised": len(chosen), "tried": tried,
        "rule": "every (colour, shape) pair the prompt names seen by core.probes in every seed",
    }  # fmt: skip
    print(f"{len(chosen)} of {tried} tried kept, {time.perf_counter() - started:.0f} s")
    if not args.dry_run:
        record(args.checkpoint, chosen, check)
        print(f"-> {args.checkpoint}/config.json extra.{EXAMPLES_KEY}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
