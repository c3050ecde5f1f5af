"""DanceGRPO's settings on a policy small enough to train many times: which ones learn?

    python -m bench.grpo_toy --seeds 6 --steps 40

A velocity field with a handful of weights (a scale, and a bias read from the prompt's
tokens) is trained by :class:`pipelines.align.grpo.GRPO` through the stage's
:class:`pipelines.align.stages.RolloutSchedule` (groups of 4, 4 SDE steps, 2 updates a
rollout, Adam) on a reward it can raise: the mean of its video. Printed per setting: the
reward's gain on fresh groups of both prompts (mean +- standard error over seeds, and
each seed's), and in the ``noisy`` rows the gain of each prompt apart.

Settings: ``shared_noise`` (DanceGRPO's one initial noise a group, or each candidate its
own, as Flow-GRPO) and ``advantage_norm`` (``group`` std or ``batch`` spread). ``noisy``:
the second prompt's reward is replaced by noise of 1e-3 that has nothing to do with the
clip, as a group whose candidates differ only by the rater's noise; the question is how
much such groups pull the policy about.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from model.dit import TextConditioning
from pipelines.align.config import HEADS, RLHFStageConfig
from pipelines.align.grpo import GRPO
from pipelines.align.stages import RolloutSchedule

TEXT_DIM = 4


class ToyVelocity(nn.Module):
    """v = scale * x + bias(prompt) + 0.1 t: the prompt's bias moves the video's mean."""

    patch = 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.text = nn.Linear(TEXT_DIM, 2)
        self.scale = nn.Parameter(torch.tensor(-0.5))

    def forward(self, video, audio, t, text, *rest, **kw):
        m = text.mask.float().unsqueeze(-1)
        c = self.text((text.tokens * m).sum(1) / m.sum(1).clamp_min(1.0))  # (B, 2)
        v = self.scale * video + c[:, 0].view(-1, 1, 1, 1, 1) + 0.1 * t.view(-1, 1, 1, 1, 1)
        return v, self.scale * audio + c[:, 1].view(-1, 1, 1)

    def null_text_conditioning(self, b, device):
        return TextConditioning(torch.zeros(b, 1, TEXT_DIM), torch.ones(b, 1, dtype=torch.bool))


class VideoMean(nn.Module):
    """(G, heads): head h rewards (-1)^h times the video's mean (head 0 weighs most)."""

    def __init__(self, noisy_tokens: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        self.noisy_tokens = noisy_tokens
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, video, audio, tokens, mask):
        m = video.float().mean(dim=(1, 2, 3, 4))
        if self.noisy_tokens is not None and torch.equal(tokens[0], self.noisy_tokens):
            m = 1e-3 * torch.randn(m.shape, generator=self.gen)
        return torch.stack([m * (-1) ** k for k in range(len(HEADS))], 1)


def build(steps: int, **settings) -> tuple[GRPO, RLHFStageConfig]:
    s = RLHFStageConfig(
        group_size=4, sample_steps=4, timestep_fraction=0.5, clip_range=1e-3,
        monitor_rater=False, updates_per_rollout=2, steps=steps, checkpoint_every=10**6,
        **settings,
    )  # fmt: skip
    toy = ToyVelocity()
    tokens = torch.randn(2, 3, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    policy = GRPO(
        settings=s, module=toy, dit=toy, reference=None, reward_model=VideoMean(),
        pipeline=None, tokens=tokens, mask=torch.ones(2, 3, dtype=torch.bool),
        prompts=["a red circle", "a blue square"], shapes=((1, 2, 2, 2, 2), (1, 2, 4), 5),
        times=[1.0, 0.75, 0.5, 0.25, 0.0], device=torch.device("cpu"),
        weights=(1.0, 0.5, 0.0, 0.0, 0.0),
    )  # fmt: skip
    return policy, s


def prompt_rewards(policy: GRPO) -> list[float]:
    """Head 0's reward (the video's mean) of 4 fresh groups, per prompt."""
    gen = torch.Generator().manual_seed(99)
    clean = VideoMean()
    out = []
    with torch.no_grad():
        for p in (0, 1):
            got = [clean(*policy.rollout(p, gen).final, policy.tokens[p : p + 1], None)[:, 0]
                   for _ in range(4)]  # fmt: skip
            out.append(float(torch.cat(got).mean()))
    return out


def train(seed: int, steps: int, noisy: bool, lr: float, **settings) -> list[float]:
    """Per-prompt gains of head 0 after ``steps`` loop steps."""
    policy, s = build(steps, **settings)
    before = prompt_rewards(policy)
    if noisy:
        policy.reward_model = VideoMean(policy.tokens[1], seed)
    schedule = RolloutSchedule(policy, s, "/nonexistent-never-written", rank=0)
    opt = torch.optim.Adam(policy.module.parameters(), lr=lr)
    for step in range(steps):
        loss, _, _ = schedule([0, 1], torch.Generator().manual_seed(10_000 * seed + step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [a - b for a, b in zip(prompt_rewards(policy), before, strict=True)]


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
