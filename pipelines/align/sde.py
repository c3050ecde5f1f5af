"""The Euler flow sampler turned into an SDE, with the log-probability of each step.

DanceGRPO explores by sampling the rectified flow with a stochastic sampler: from
``x`` at time ``t`` to ``t' < t`` (``dt = t' - t < 0``), with the (guided) velocity
``v`` and the clean-sample estimate ``x0 = x - t v``,

    score = -(x - (1 - t) x0) / t^2
    mean  = x + dt * v - 0.5 * eta^2 * score * dt
    x'    = mean + eta * sqrt(t - t') * noise

(the update of DanceGRPO's ``sde_step_with_logprob``; ``eta = 0`` is the Euler ODE
step). Each step is a Gaussian with a known mean and standard deviation, so the
log-probability of the step the sampler took is exact; it is averaged over the
latent elements of both branches (as in DanceGRPO), which is why the PPO clip range
is small.

``guided_velocities`` evaluates several (state, time) rows in one batched forward,
text guidance included, so a training step differentiates through one forward of
the (possibly DDP-wrapped) DiT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.dit import TextConditioning

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def repeat_text(text: TextConditioning, times: int) -> TextConditioning:
    return TextConditioning(
        text.tokens.repeat(times, 1, 1),
        text.mask.repeat(times, 1),
        None if text.shot_ids is None else text.shot_ids.repeat(times, 1),
    )


def guided_velocities(
    model,
    video: torch.Tensor,  # (B, Cv, T, h, w)
    audio: torch.Tensor,  # (B, Ca, Na)
    t: torch.Tensor,  # (B,) per-row flow time
    text: TextConditioning,  # (B, L, D) per-row prompt
    null: TextConditioning,  # (B, 1, D) the null prompt
    text_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guided velocity of every row, one batched forward (2B rows)."""
    if text_scale == 1.0:
        return model(video, audio, t, text)
    from model.samplers import _concat_text

    b = video.shape[0]
    v, a = model(
        torch.cat([video, video]), torch.cat([audio, audio]), torch.cat([t, t]),
        _concat_text([text, null]),
    )  # fmt: skip
    v_c, v_u = v[:b], v[b:]
    a_c, a_u = a[:b], a[b:]
    return v_u + text_scale * (v_c - v_u), a_u + text_scale * (a_c - a_u)


def step_mean(x: torch.Tensor, vel: torch.Tensor, t: float, t_next: float, eta: float):
    dt = t_next - t
    x0 = x - t * vel
    score = -(x - (1.0 - t) * x0) / (t * t)
    return x + dt * vel - 0.5 * eta * eta * score * dt


def step_std(t: float, t_next: float, eta: float) -> float:
    return eta * math.sqrt(max(t - t_next, 0.0))


def gaussian_logprob(
    sample_v: torch.Tensor,
    sample_a: torch.Tensor,
    mean_v: torch.Tensor,
    mean_a: torch.Tensor,
    std: float | torch.Tensor,
) -> torch.Tensor:
    """(B,) log-density of the step, averaged over the elements of both branches;
    ``std`` is one width for all rows or a (B,) tensor of per-row widths."""
    sq = ((sample_v - mean_v) ** 2).flatten(1).sum(1) + ((sample_a - mean_a) ** 2).flatten(1).sum(1)
    n = sample_v[0].numel() + sample_a[0].numel()
    std_t = torch.as_tensor(std, dtype=sq.dtype, device=sq.device)
    return -sq / (2 * std_t * std_t * n) - torch.log(std_t) - LOG_SQRT_2PI


@dataclass
class Trajectory:
    """One SDE rollout of a batch: states at every time, and each step's log-prob."""

    times: list[float]
    videos: list[torch.Tensor]  # len(times) states, (B, Cv, T, h, w) each
    audios: list[torch.Tensor]
    logprobs: torch.Tensor  # (steps, B)

    @property
    def final(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.videos[-1], self.audios[-1]

    def rows(self, start: int, stop: int) -> Trajectory:
        """Rows ``start:stop`` of every state (one group of a batch of groups)."""
        return Trajectory(
            self.times, [v[start:stop] for v in self.videos], [a[start:stop] for a in self.audios],
            self.logprobs[:, start:stop],
        )  # fmt: skip


def step_noise(shape: torch.Size, gen: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of ``shape``; from a list of generators, block by block."""
    if isinstance(gen, torch.Generator):
        return torch.randn(shape, generator=gen)
    rows, blocks = shape[0], len(gen)
    if rows % blocks:
        raise ValueError(f"{rows} rows do not split into {blocks} equal blocks")
    block = (rows // blocks, *shape[1:])
    return torch.cat([torch.randn(block, generator=g) for g in gen])


@torch.no_grad()
def sde_rollout(
    model,
    video: torch.Tensor,
    audio: torch.Tensor,
    text: TextConditioning,
    null: TextConditioning,
    times: list[float],
    eta: float | list[float],
    text_scale: float,
    gen: torch.Generator | list[torch.Generator],
) -> Trajectory:
    """Sample from ``times[0]`` to 0 with the SDE; every row draws its own noise.

    ``eta`` one noise level, or one per step: a step at 0 is the Euler ODE step (no
    noise drawn; its log-probability is recorded as 0 and it cannot be trained on).
    ``gen`` a list: the rows are that many equal blocks (groups sampled in one batch),
    each drawing its noise from its own generator, as it would sampled alone."""
    videos, audios, logps = [video], [audio], []
    etas = eta if isinstance(eta, list) else [eta] * (len(times) - 1)
    for t, t_next, eta_j in zip(times[:-1], times[1:], etas, strict=True):
        b = video.shape[0]
        tt = torch.full((b,), t, device=video.device)
        vel_v, vel_a = guided_velocities(model, video, audio, tt, text, null, text_scale)
        mean_v = step_mean(video, vel_v, t, t_next, eta_j)
        mean_a = step_mean(audio, vel_a, t, t_next, eta_j)
        std = step_std(t, t_next, eta_j)
        if std == 0.0:
            video, audio = mean_v, mean_a
            logps.append(torch.zeros(b, device=video.device))
        else:
            noise_v = step_noise(video.shape, gen).to(video.device)
            noise_a = step_noise(audio.shape, gen).to(audio.device)
            video = mean_v + std * noise_v
            audio = mean_a + std * noise_a
            logps.append(gaussian_logprob(video, audio, mean_v, mean_a, std))
        videos.append(video)
        audios.append(audio)
    return Trajectory(list(times), videos, audios, torch.stack(logps))
