"""A policy with three weights for checking DanceGRPO's machinery, in tests and benches.

:class:`ToyVelocity` is a velocity field ``v = scale * x + bias(prompt) + 0.1 t`` (the
bias read from the prompt's tokens by one linear layer), so the policy can move its
video's mean; :class:`VideoMean` rewards that mean. :func:`toy_grpo` wires both into the
product's :class:`pipelines.align.grpo.GRPO` (groups of 4, 4 SDE steps, two prompts),
small enough to train in a second on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from model.dit import TextConditioning
from pipelines.align.config import HEADS, RLHFStageConfig
from pipelines.align.grpo import GRPO

TEXT_DIM = 4  # width of the toy prompts' tokens


class ToyVelocity(nn.Module):
    """A velocity field with a handful of weights, read from the prompt's tokens."""

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
    """(G, heads): head h rewards (-1)^h times the video's mean. ``noisy_tokens``: for
    the prompt with those tokens, noise of 1e-3 instead (a group whose candidates differ
    only by a rater's noise)."""

    def __init__(self, noisy_tokens: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        self.noisy_tokens = noisy_tokens
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, video, audio, tokens, mask):
        m = video.float().mean(dim=(1, 2, 3, 4))
        if self.noisy_tokens is not None and torch.equal(tokens[0], self.noisy_tokens):
            m = 1e-3 * torch.randn(m.shape, generator=self.gen)
        return torch.stack([m * (-1) ** k for k in range(len(HEADS))], 1)


def toy_grpo(**settings) -> tuple[GRPO, RLHFStageConfig]:
    """DanceGRPO on the toy: two prompts, head weights 1 and 0.5 on heads 0 and 1."""
    s = RLHFStageConfig(
        group_size=4, sample_steps=4, timestep_fraction=0.5, clip_range=1e-3,
        monitor_rater=False, **settings,
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


def head0_reward(policy: GRPO, prompts=(0, 1), groups: int = 4) -> list[float]:
    """Head 0's clean reward (the video's mean) of ``groups`` fresh groups, per prompt."""
    gen = torch.Generator().manual_seed(99)
    clean = VideoMean()
    out = []
    with torch.no_grad():
        for p in prompts:
            got = [clean(*policy.rollout(p, gen).final, policy.tokens[p : p + 1], None)[:, 0]
                   for _ in range(groups)]  # fmt: skip
            out.append(float(torch.cat(got).mean()))
    return out
