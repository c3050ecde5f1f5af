"""DanceGRPO's rollouts: a batch's groups sampled together against one group at a time.

    python -m bench.grpo_rollout [--checkpoint checkpoints/default] [--prompts 4] [--repeats 3]
    python -m bench.grpo_rollout --carry CARRY --prompts 16   # a host without the text encoder

The checkpoint's :class:`pipelines.align.grpo.GRPO` with the stage's defaults (groups of
8, 10 SDE steps, text guidance) samples ``--prompts`` groups with
``rollout_groups`` (one batch: what ``collect`` does) and with ``rollout`` one group
after another, alternating, ``--repeats`` times each, on the same generators. Printed:
seconds per rollout batch of each, their ratio, and the largest difference between
the two ways' final latents (the same groups either way). On a GPU a small DiT is bound
by kernel launches, so one batch should take about the time of one group; on a CPU the
arithmetic dominates and the ratio stays near 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def bench_prompts(n: int, carry: str) -> list[str]:
    """``n`` prompts: the first captions of a carry's text table (its PyAV installed, its
    table embedding them), or made-up ones."""
    if carry:
        from pipelines.shipped.carry import use_carry_texts

        captions = use_carry_texts(carry)
        if len(captions) < n:
            raise SystemExit(f"{carry} holds {len(captions)} captions, fewer than {n}")
        return captions[:n]
    colours = ("red", "blue", "green", "yellow", "purple", "orange", "white", "pink")
    return [f"a {colours[k % len(colours)]} circle bounces on a gray floor" for k in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/default")
    ap.add_argument("--prompts", type=int, default=4, help="groups a rollout batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--carry", default="",
        help="a carry (pipelines.shipped.carry): prompts are its captions, embedded from "
             "its table, for a host without the text encoder",
    )  # fmt: skip
    args = ap.parse_args(argv)
    prompts = bench_prompts(args.prompts, args.carry)  # before imports that need PyAV

    from model.pipeline import DuetPipeline
    from pipelines.align import grpo
    from pipelines.align.config import RLHFStageConfig
    from pipelines.align.sampling import encode_prompts, latent_shapes, sampling_times

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = DuetPipeline.from_checkpoint(args.checkpoint).to(device).eval()
    s = RLHFStageConfig()
    v_shape, a_shape, frames = latent_shapes(pipeline.config, s.preferences.duration_s)
    tokens, mask = encode_prompts(pipeline, prompts)
    policy = grpo.GRPO(
        settings=s, module=pipeline.dit, dit=pipeline.dit, reference=None, reward_model=None,
        pipeline=pipeline, tokens=tokens.to(device), mask=mask.to(device), prompts=prompts,
        shapes=(v_shape, a_shape, frames),
        times=sampling_times(pipeline.config, v_shape, a_shape, s.sample_steps),
        device=device,
    )  # fmt: skip
    indices = list(range(args.prompts))

    def gens():
        return [torch.Generator().manual_seed(100 + k) for k in indices]

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    def together():
        return policy.rollout_groups(indices, gens())

    def apart():
        return [policy.rollout(p, g) for p, g in zip(indices, gens(), strict=True)]

    together(), apart()  # warm-up
    batched, single = [], []
    for _ in range(args.repeats):
        t, joint = timed(together)
        batched.append(t)
        t, alone = timed(apart)
        single.append(t)
    g = s.group_size
    gap = max(
        float((joint.final[0][k * g : (k + 1) * g] - a.final[0]).abs().max())
        for k, a in enumerate(alone)
    )
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    b, o = statistics.fmean(batched), statistics.fmean(single)
    print(
        f"{name}, torch {torch.__version__}; {args.prompts} groups of {g}, {s.sample_steps} steps"
    )
    print(f"  one batch          {b:.3f} s a rollout batch")
    print(f"  a group at a time  {o:.3f} s")
    print(f"  speed-up           {o / b:.2f}x; largest final-latent difference {gap:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
