"""Video-to-video editing with SDEdit (Meng et al. 2022), per branch.

The source clip is encoded, noised to flow time ``strength`` (1 = pure noise, a
fresh generation; near 0 = the source back up to VAE reconstruction error) and
denoised from there under the edit prompt. ``keep="audio"`` keeps the source
soundtrack and regenerates only the picture; ``keep="video"`` keeps the picture
and regenerates only the sound. The kept branch is conditioning, as in
video-to-audio / audio-to-video: held at its clean source latents with flow time 0
at every sampler step (the model has a time per branch), and the kept media is
copied from the source into the output unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.samplers import KeepLatents

if TYPE_CHECKING:
    from core.media import AVClip

KEEP_MODES = ("none", "audio", "video")


@dataclass
class EditState:
    init_video: torch.Tensor  # (1, Cv, T', h, w) noised source latents at t_start
    init_audio: torch.Tensor  # (1, Ca, Na)
    t_start: float
    num_frames: int
    keep: KeepLatents | None


def check_edit(strength: float, keep: str) -> None:
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"edit strength must be in (0, 1], got {strength}")
    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")


def prepare_edit(
    pipeline, source: AVClip, strength: float, keep: str, generator: torch.Generator
) -> EditState:
    check_edit(strength, keep)
    video, audio = pipeline.encode_clip(source)
    tf = pipeline.config.video_vae.temporal_factor
    num_frames = 1 + tf * (video.shape[2] - 1)
    noise_v = torch.randn(video.shape, generator=generator).to(video.device)
    noise_a = torch.randn(audio.shape, generator=generator).to(audio.device)
    init_v = (1.0 - strength) * video + strength * noise_v
    init_a = (1.0 - strength) * audio + strength * noise_a
    kept = None
    if keep == "audio":
        kept = KeepLatents(audio=audio)
    elif keep == "video":
        kept = KeepLatents(video=video)
    return EditState(init_v, init_a, float(strength), num_frames, kept)


def finish_edit(generated: AVClip, source: AVClip, keep: str) -> AVClip:
    """Copy the kept branch from the source, unchanged, into the generated clip."""
    from core.media import AVClip

    if keep == "none":
        return generated
    if keep == "video":
        if abs(source.fps - generated.fps) > 1e-3:
            n = generated.num_frames
            idx = np.minimum(
                np.round(np.arange(n) * source.fps / generated.fps).astype(int),
                source.num_frames - 1,
            )
            frames = source.frames[idx]
        else:
            frames = source.frames[: generated.num_frames]
        return AVClip(
            frames=frames.copy(),
            fps=generated.fps,
            audio=generated.audio,
            sample_rate=generated.sample_rate,
        )
    audio = np.asarray(source.audio, dtype=np.float32)
    if source.sample_rate != generated.sample_rate:
        from core.media import resample_audio

        audio = resample_audio(audio, source.sample_rate, generated.sample_rate)
    n = generated.audio.shape[1]
    channels = generated.audio.shape[0]
    if audio.shape[0] < channels:
        audio = np.repeat(audio, channels, axis=0)[:channels]
    audio = audio[:channels, :n]
    if audio.shape[1] < n:
        audio = np.pad(audio, ((0, 0), (0, n - audio.shape[1])))
    return AVClip(
        frames=generated.frames,
        fps=generated.fps,
        audio=audio.copy(),
        sample_rate=generated.sample_rate,
    )
