"""Rotary position embeddings: 3D (time, height, width) for video, 1D time for audio.

Temporal positions are measured in *video latent steps* in both branches, so one
instant has one temporal position whichever branch a token lives in:

- video latent frame ``i`` covers frames ``4i-3 .. 4i`` (frame 0 alone for ``i = 0``)
  and sits at time position ``i``;
- the audio waveform is front-padded by ``tf - 1`` video frames (see
  :func:`audio_front_pad_samples`), so audio latents ``m*i .. m*i + m - 1`` cover
  exactly the frames of video latent ``i``; audio latent ``j`` sits at the centre of
  its span, ``(j + 0.5) / m - 0.5``, and the group's mean position is ``i``.
"""

from __future__ import annotations

import torch


def audio_front_pad_samples(fps: float, sample_rate: int, temporal_factor: int) -> int:
    """Silence placed before the waveform so audio latent groups match video latents."""
    pad = (temporal_factor - 1) * sample_rate / fps
    if abs(pad - round(pad)) > 1e-6:
        raise ValueError(f"sample_rate {sample_rate} / fps {fps} must give whole samples per frame")
    return int(round(pad))


def video_positions(num_latent_frames: int, grid_h: int, grid_w: int, time_offset: float = 0.0):
    """(T*Hg*Wg, 3) float32 positions (time, row, col), time-major like the token order."""
    t = torch.arange(num_latent_frames, dtype=torch.float32) + time_offset
    h = torch.arange(grid_h, dtype=torch.float32)
    w = torch.arange(grid_w, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)  # (T, Hg, Wg, 3)
    return grid.reshape(-1, 3)


def audio_positions(num_latents: int, latents_per_video_latent: int, time_offset: float = 0.0):
    """(Na,) float32 time positions in video latent steps."""
    j = torch.arange(num_latents, dtype=torch.float32)
    return (j + 0.5) / latents_per_video_latent - 0.5 + time_offset


def _angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """(N,) positions -> (N, dim // 2) rotation angles."""
    if dim % 2:
        raise ValueError(f"RoPE dim must be even, got {dim}")
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    return positions.float()[:, None] * inv_freq[None, :]


def video_rope_dims(head_dim: int, time_fraction: float) -> tuple[int, int, int]:
    """Split a head dim into even (time, height, width) parts."""
    dt = int(head_dim * time_fraction) // 2 * 2
    rest = head_dim - dt
    dh = rest // 2 // 2 * 2
    dw = rest - dh
    if min(dt, dh, dw) <= 0 or dw % 2:
        raise ValueError(f"head dim {head_dim} too small for 3D RoPE")
    return dt, dh, dw


def rope_3d(positions: torch.Tensor, head_dim: int, theta: float, time_fraction: float):
    """(N, 3) positions -> (cos, sin), each (N, head_dim // 2)."""
    dt, dh, dw = video_rope_dims(head_dim, time_fraction)
    angles = torch.cat(
        [
            _angles(positions[:, 0], dt, theta),
            _angles(positions[:, 1], dh, theta),
            _angles(positions[:, 2], dw, theta),
        ],
        dim=-1,
    )
    return angles.cos(), angles.sin()


def rope_1d(positions: torch.Tensor, head_dim: int, theta: float):
    """(N,) positions -> (cos, sin), each (N, head_dim // 2)."""
    angles = _angles(positions, head_dim, theta)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, N, D) by (N, D/2) angles; pairs are (i, i + D/2). Float32 inside."""
    dtype = x.dtype
    x = x.float()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(dtype)
