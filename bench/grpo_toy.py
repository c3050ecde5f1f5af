"""DanceGRPO's settings on a policy small enough to train many times: which ones learn?

    python -m bench.grpo_toy --seeds 6 --steps 40

The toy policy of :mod:`pipelines.align.toy_policy` (a scale, and a bias read from the
prompt's tokens) is trained by :class:`pipelines.align.grpo.GRPO` through the stage's
:class:`pipelines.align.stages.RolloutSchedule` (groups of 4, 4 SDE steps, 2 updates a
rollout, Adam) on a reward it can raise: the mean of its video. Printed per setting: the
reward's gain on fresh groups of both prompts (mean +- standard error over seeds, and
each seed's), and in the ``noisy`` rows the gain of each prompt apart.

Settings: ``shared_noise`` (DanceGRPO's one initial noise a group, or each candidate its
own, as Flow-GRPO), ``advantage_norm`` (``group`` std or ``batch`` spread) and
``sde_window`` (noise at 1 or 2 of the 4 steps only, the rest the ODE; the window's start
drawn per rollout batch, or with ``sde_window_start`` fixed at the first step). ``noisy``:
the second prompt's reward is replaced by noise of 1e-3 that has nothing to do with the
clip, as a group whose candidates differ only by the rater's noise; the question is how
much such groups pull the policy about.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from pipelines.align.stages import RolloutSchedule
from pipelines.align.toy_policy import VideoMean, head0_reward, toy_grpo


def train(seed: int, steps: int, noisy: bool, lr: float, **settings) -> list[float]:
    """Per-prompt gains of head 0 after ``steps`` loop steps."""
    policy, s = toy_grpo(updates_per_rollout=2, steps=steps, checkpoint_every=10**6, **settings)
    before = head0_reward(policy)
    if noisy:
        policy.reward_model = VideoMean(policy.tokens[1], seed)
    schedule = RolloutSchedule(policy, s, "/nonexistent-never-written", rank=0)
    opt = torch.optim.Adam(policy.module.parameters(), lr=lr)
    for step in range(steps):
        loss, _, _ = schedule([0, 1], torch.Generator().manual_seed(10_000 * seed + step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [a - b for a, b in zip(head0_reward(policy), before, strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args(argv)
    rows = [
        ("shared noise, group std", False, {"shared_noise": True, "advantage_norm": "group"}),
        ("shared noise, batch spread", False, {"shared_noise": True, "advantage_norm": "batch"}),
        ("own noise, group std", False, {"shared_noise": False, "advantage_norm": "group"}),
        ("own noise, batch spread", False, {"shared_noise": False, "advantage_norm": "batch"}),
        ("SDE window of 1 step, shared", False, {"sde_window": 1}),
        ("SDE window of 2 steps, shared", False, {"sde_window": 2}),
        ("SDE window of the first step", False, {"sde_window": 1, "sde_window_start": 0}),
        ("SDE window of 2 steps, own", False, {"sde_window": 2, "shared_noise": False}),
        ("noisy 2nd prompt, group std", True, {"advantage_norm": "group"}),
        ("noisy 2nd prompt, batch spread", True, {"advantage_norm": "batch"}),
    ]
    print(f"{args.steps} steps, {args.seeds} seeds; gain of the video's mean on fresh groups")
    for name, noisy, settings in rows:
        gains = [train(k, args.steps, noisy, args.lr, **settings) for k in range(args.seeds)]
        both = [sum(g) / 2 for g in gains]
        se = statistics.stdev(both) / len(both) ** 0.5 if len(both) > 1 else float("nan")
        line = f"  {name:32s} {statistics.fmean(both):+.3f} +- {se:.3f}  ["
        line += ", ".join(f"{x:+.2f}" for x in both) + "]"
        if noisy:
            first = statistics.fmean(g[0] for g in gains)
            second = statistics.fmean(g[1] for g in gains)
            line += f"  prompt with a reward {first:+.3f}, noisy prompt {second:+.3f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
