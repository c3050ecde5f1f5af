"""DMD2's student updates with the regression term, its targets sampled per step or
drawn once as pairs, side by side.

    python -m bench.dmd_regression [--checkpoint checkpoints/default] [--batch 4] [--steps 3]
    python -m bench.dmd_regression --carry CARRY --batch 16   # a host without the text encoder

The checkpoint's DMD2 step (:class:`pipelines.align.dmd.DMD2`, the stage's defaults,
one clip length) runs ``--steps`` student updates each way, alternating, on the same
generators: without the regression; with it on the teacher's Heun endpoint of each
step's own noise (``regression_pairs`` 0: ``teacher_steps`` guided evaluations a
step); with it on pairs drawn once (``regression_pairs`` N, whose drawing is timed
apart). Printed: seconds per update and per pair, and the ratios to DMD2 alone.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="student updates timed each way")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--carry", default="", help="a carry: its captions, embedded from its "
                    "table, for a host without the text encoder")  # fmt: skip
    args = ap.parse_args(argv)
    captions = [f"a {c} circle bounces on a gray floor" for c in ("red", "blue", "green")]
    if args.carry:  # before imports that need PyAV
        from pipelines.shipped.carry import use_carry_texts

        captions = use_carry_texts(args.carry)

    from model.pipeline import DuetPipeline
    from pipelines.align import dmd
    from pipelines.align.config import DistillStageConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = DuetPipeline.from_checkpoint(args.checkpoint).to(device)
    teacher = copy.deepcopy(pipeline.dit).eval().requires_grad_(False)
    pair = dmd.DMDPair(pipeline.dit, copy.deepcopy(pipeline.dit)).train()
    s = DistillStageConfig(method="dmd2")
    s.dmd.fake_updates = 1  # odd loop steps are student updates
    stream = dmd.PromptStream(captions, [], grammar_fraction=0.0)
    step = dmd.DMD2(s, pair, pair, teacher, pipeline.text_encoder, pipeline.config,
                    (args.frames,), stream, device)  # fmt: skip

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # One batch untimed first: CUDA's first kernels and autotuning are not the draw's.
    dmd.teacher_pairs(step, min(args.batch, args.pairs), seed=1, batch=args.batch)
    sync()
    t = time.perf_counter()
    pairs = dmd.teacher_pairs(step, args.pairs, seed=0, batch=args.batch)
    sync()
    per_pair = (time.perf_counter() - t) / args.pairs

    def update(weight: float, paired: bool, k: int) -> float:
        s.dmd.regression_weight = weight
        step.pairs = pairs if paired else {}
        sync()
        t = time.perf_counter()
        loss, _, _ = step(list(range(args.batch)), torch.Generator().manual_seed(k), 1)
        pair.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        return time.perf_counter() - t

    ways = {"DMD2 alone": (0.0, False), "regression, teacher per step": (0.25, False),
            "regression on pairs": (0.25, True)}  # fmt: skip
    for weight, paired in ways.values():  # warm-up
        update(weight, paired, 0)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for k in range(args.steps):
        for name, (weight, paired) in ways.items():
            times[name].append(update(weight, paired, 1 + k))
    print(f"{device.type}, torch {torch.__version__}; batch {args.batch}, {args.frames} frames, "
          f"teacher {s.teacher_steps} Heun steps")  # fmt: skip
    base = statistics.median(times["DMD2 alone"])
    for name, got in times.items():
        med = statistics.median(got)
        print(f"  {name:30s} {med:7.3f} s an update  ({med / base:.2f}x)")
    print(f"  drawing a pair                 {per_pair:7.3f} s ({args.pairs} drawn once)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
