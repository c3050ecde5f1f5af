"""Rectified flow: x_t = (1 - t) x_0 + t * noise, the network predicts v = noise - x_0.

t = 0 is data, t = 1 is pure noise. Training draws t from a logit-normal and
applies a resolution-dependent shift that pushes t toward noise for long token
sequences (more tokens carry more redundant signal, so the same t destroys less
of it, as in SD3). Samplers integrate the same shifted schedule from 1 to 0.
"""

from __future__ import annotations

import math

import torch

from model.configs import FlowConfig


def resolution_shift(num_tokens: int, cfg: FlowConfig) -> float:
    shift = cfg.base_shift * math.sqrt(max(num_tokens, 1) / cfg.base_tokens)
    return float(min(max(shift, 1.0), cfg.max_shift))


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Monotone map of [0, 1] onto itself; shift > 1 moves mass toward noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(
    batch: int, cfg: FlowConfig, shift: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,) logit-normal timesteps in (0, 1), shifted."""
    z = torch.randn(batch, generator=generator) * cfg.logit_normal_std + cfg.logit_normal_mean
    return shift_timesteps(torch.sigmoid(z), shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample t (B,)."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def schedule(steps: int, shift: float, t_start: float = 1.0) -> torch.Tensor:
    """(steps + 1,) decreasing times from t_start to 0, shifted like training."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift_timesteps(u, shift)
    return (t * t_start).float()


def flow_matching_loss(
    pred_video: torch.Tensor,
    pred_audio: torch.Tensor,
    target_video: torch.Tensor,
    target_audio: torch.Tensor,
    audio_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE on velocities of both branches; returns the total and its parts."""
    loss_v = torch.mean((pred_video.float() - target_video.float()) ** 2)
    loss_a = torch.mean((pred_audio.float() - target_audio.float()) ** 2)
    total = loss_v + audio_weight * loss_a
    return total, {"video": float(loss_v.detach()), "audio": float(loss_a.detach())}
