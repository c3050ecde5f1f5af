"""What few-step sampling of a full model loses on held-out prompts: the baseline a Fast
student at 4 network evaluations has to beat, and where the loss is.

    python -m bench.few_step --carry CARRY [--checkpoint checkpoints/default] \\
        [--student RUN/distill/final] [--prompts 40] [--seeds 4] [--steps 4] \\
        [--shifts 3,6] [--all-prompts] [--threads 2]

The held-out prompts are ``align_job``'s (the same split of the carry's captions),
prompts naming several objects only unless ``--all-prompts``. The model samples each
(prompt, seed) three ways: its full setting (Heun, ``--full-steps``, text guidance 4),
``--steps`` guided Euler steps (two network evaluations a step) and ``--steps``
unguided Euler steps (one a step: what a student starts from); with ``--student``, a
Fast student of that model at ``--steps`` too (its own sampler); with ``--shifts``, the
guided Euler steps again on the time grid of each shift given (the model's own is the
resolution shift: ``distill.dmd.time_shift`` asks which grid a student should step on).
Printed: each way's rater scores, the colour score's parts
(:func:`pipelines.align.rater.frame_parts`: recall, precision, count, shape-colour
pairs) and each few-step way minus the full one, paired over the same (prompt, seed),
with standard errors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

KEYS = ("adherence", "adherence_colour_frames", "colour_frames_recall", "colour_frames_precision",
        "count_frames", "shape_colour_frames", "motion", "sync")  # fmt: skip


def held_out_prompts(carry: str, run: str, several_only: bool) -> list[str]:
    """``align_job``'s held-out prompts of the carry (its default split)."""
    from core.probes.captions import parse_caption
    from pipelines.align.stages import prompt_sets
    from pipelines.shipped.align_job import build_config, parse_args
    from pipelines.shipped.carry import unpack

    manifest = unpack(carry, os.path.join(run, "data"))
    cfg = build_config(parse_args(["--carry", carry, "--out", run, "--run", run]), manifest)
    _, held_out = prompt_sets(cfg)
    if several_only:
        held_out = [p for p in held_out if sum(parse_caption(p).values()) > 1]
    return held_out


@contextlib.contextmanager
def time_shift(shift: float | None):
    """Full-quality sampling on the grid of ``shift`` instead of the resolution shift
    (requests have no shift of their own; None: unchanged)."""
    import model.generate as generate

    own = generate.resolution_shift
    if shift is not None:
        generate.resolution_shift = lambda tokens, cfg: shift
    try:
        yield
    finally:
        generate.resolution_shift = own


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--carry", required=True, help="an align_job carry (captions at least)")
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--student", default="", help="a Fast student of the checkpoint")
    parser.add_argument("--run", default="/tmp/duet_few_step", help="where the carry unpacks")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--full-steps", type=int, default=12)
    parser.add_argument("--duration", type=float, default=33 / 16)
    parser.add_argument("--shifts", default="", help="time shifts of extra guided Euler ways")
    parser.add_argument("--all-prompts", action="store_true", help="not only several objects")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if min(args.prompts, args.seeds, args.steps, args.full_steps) < 1:
        parser.error("--prompts, --seeds, --steps and --full-steps must be >= 1")
    try:
        shifts = [float(s) for s in args.shifts.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--shifts takes numbers, got {args.shifts!r}")
    if not all(0 < s <= 100 for s in shifts):
        parser.error("--shifts must be in (0, 100]")

    import torch

    from model.pipeline import DuetPipeline
    from pipelines.align.evaluate import EvalSettings, evaluate_prompts, paired_difference
    from pipelines.shipped.carry import TEXTS_NAME, use_text_table_file

    if args.threads:
        torch.set_num_threads(args.threads)
    use_text_table_file(os.path.join(os.path.abspath(args.carry), TEXTS_NAME))
    prompts = held_out_prompts(args.carry, args.run, not args.all_prompts)[: args.prompts]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = DuetPipeline.from_checkpoint(args.checkpoint).to(device).eval()
    seeds = tuple(range(args.seeds))
    n = args.steps
    ways = {
        f"full (heun {args.full_steps}, guided)": ("heun", args.full_steps, 4.0, None),
        f"euler {n}, guided ({2 * n} evaluations)": ("euler", n, 4.0, None),
        f"euler {n}, unguided ({n} evaluations)": ("euler", n, 1.0, None),
    }
    for shift in shifts:
        ways[f"euler {n}, guided, shift {shift:g}"] = ("euler", n, 4.0, shift)
    models = dict.fromkeys(ways, pipeline)
    if args.student:
        ways[f"student, {n} steps ({n} evaluations)"] = ("euler", n, 1.0, None)
        models[f"student, {n} steps ({n} evaluations)"] = (
            DuetPipeline.from_checkpoint(args.student).to(device).eval()
        )
    results = {}
    for name, (sampler, steps, scale, shift) in ways.items():
        began = time.perf_counter()
        quality = "full" if models[name] is pipeline else "fast"
        settings = EvalSettings(seeds, quality, steps, sampler, scale, args.duration)
        with time_shift(shift):
            results[name] = evaluate_prompts(models[name], prompts, settings)
        print(f"{name}: {len(prompts)} prompts x {len(seeds)} seeds, "
              f"{time.perf_counter() - began:.0f} s", flush=True)  # fmt: skip
    print(f"\n{args.checkpoint} on {device}; {len(prompts)} held-out prompts"
          f"{'' if args.all_prompts else ' naming several objects'}, seeds {list(seeds)}")  # fmt: skip
    print(f"{'':44s}" + "".join(f"{k[:16]:>17s}" for k in KEYS))
    full = next(iter(results))
    for name, result in results.items():
        means = "".join(f"{result['summary'][k]['mean']:>17.3f}" for k in KEYS)
        print(f"{name:44s}{means}")
    diffs = {}
    for name in list(results)[1:]:
        diffs[name] = {k: paired_difference(results[full], results[name], k) for k in KEYS}
        shown = "".join(f"{f'{d:+.3f} +- {se:.3f}':>17s}" for d, se in diffs[name].values())
        print(f"{name + ' - full':44s}{shown}")
    return {"summary": {k: v["summary"] for k, v in results.items()}, "paired": diffs}


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
