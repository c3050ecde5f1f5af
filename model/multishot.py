"""Multi-shot sequences: one denoising pass over all shots of a plan.

A :class:`ShotPlan` lists shots (prompt, duration, transition into the shot). The
whole plan is generated as one latent sequence, so subjects stay consistent across
shots: every token shares the sequence's self-attention, the references, and the
plan's ``subject`` text, while text cross-attention lets each latent time step read
only its own shot's prompt (plus the shared subject). Transitions are rendered on
the decoded clip like the synthetic world renders them: a cut is a hard switch, a
fade is a dip to black whose picture and sound ramp down over the last ``fade_s/2``
of one shot and up over the first ``fade_s/2`` of the next.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.configs import ModelConfig
from model.dit import ShotLayout, TextConditioning

if TYPE_CHECKING:
    from core.media import AVClip

TRANSITIONS = ("cut", "fade")
MAX_SHOTS = 16


@dataclass
class Shot:
    prompt: str
    duration_s: float
    transition: str = "cut"  # into this shot; ignored for the first
    fade_s: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("every shot needs a non-empty prompt")
        if not self.duration_s > 0:
            raise ValueError(f"shot duration must be > 0, got {self.duration_s}")
        if self.transition not in TRANSITIONS:
            raise ValueError(f"transition must be one of {TRANSITIONS}, got {self.transition!r}")
        if self.transition == "fade" and not 0 < self.fade_s <= self.duration_s:
            raise ValueError(f"fade_s must be in (0, duration], got {self.fade_s}")


@dataclass
class ShotPlan:
    shots: list[Shot]
    subject: str = ""  # text shared by every shot (who/what stays the same)
    boundaries_s: list[float] = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.shots) <= MAX_SHOTS:
            raise ValueError(f"a shot plan needs 1..{MAX_SHOTS} shots, got {len(self.shots)}")
        starts = np.cumsum([0.0] + [s.duration_s for s in self.shots])
        self.boundaries_s = [float(x) for x in starts[1:-1]]

    @property
    def duration_s(self) -> float:
        return float(sum(s.duration_s for s in self.shots))

    @classmethod
    def from_json(cls, data) -> ShotPlan:
        """Accepts a JSON string, a list of shots or ``{"subject": ..., "shots": [...]}``."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as err:
                raise ValueError(f"shot plan is not valid JSON: {err}") from err
        if isinstance(data, list):
            data = {"shots": data}
        if not isinstance(data, dict) or not isinstance(data.get("shots"), list):
            raise ValueError('shot plan must be a list of shots or {"shots": [...]}')
        shots = []
        for i, item in enumerate(data["shots"]):
            if not isinstance(item, dict):
                raise ValueError(f"shot {i} must be an object")
            unknown = set(item) - {"prompt", "duration_s", "transition", "fade_s"}
            if unknown:
                raise ValueError(f"shot {i}: unknown keys {sorted(unknown)}")
            shots.append(Shot(**item))
        return cls(shots, subject=str(data.get("subject", "")))

    def to_dict(self) -> dict:
        return {
            "subject": self.subject,
            "shots": [
                {
                    "prompt": s.prompt,
                    "duration_s": s.duration_s,
                    "transition": s.transition,
                    "fade_s": s.fade_s,
                }
                for s in self.shots
            ],
        }


def shot_of_time(plan: ShotPlan, time_s: torch.Tensor) -> torch.Tensor:
    """Shot index of each time (times past the end belong to the last shot)."""
    bounds = torch.tensor(plan.boundaries_s, dtype=torch.float64)
    return torch.bucketize(time_s.double(), bounds, right=True).long()


def layout(plan: ShotPlan, cfg: ModelConfig) -> tuple[int, ShotLayout]:
    """Frame count of the whole sequence and the shot of every latent time step.

    Video latent i shows frames 4i-3 .. 4i, the time interval [(4i-3)/fps, (4i+1)/fps)
    centred on (4i-1)/fps, and audio latent j sits at position (j + 0.5)/m - 0.5 (see
    model.rope); a position p therefore stands for the instant (4p - 1) / fps.
    """
    num_frames = cfg.frames_for_duration(plan.duration_s)
    n_video = cfg.num_latent_frames(num_frames)
    m = cfg.audio_latents_per_video_latent
    tf = cfg.video_vae.temporal_factor

    def to_time(p: torch.Tensor) -> torch.Tensor:
        return (tf * p - tf / 2 + 1).clamp_min(0) / cfg.fps

    video_pos = torch.arange(n_video, dtype=torch.float64)
    audio_pos = (torch.arange(n_video * m, dtype=torch.float64) + 0.5) / m - 0.5
    return num_frames, ShotLayout(
        shot_of_time(plan, to_time(video_pos)), shot_of_time(plan, to_time(audio_pos))
    )


def shot_text(encoder, plan: ShotPlan) -> TextConditioning:
    """Subject tokens (shot id -1) followed by each shot's prompt tokens (shot id s)."""
    rows, ids = [], []
    if plan.subject.strip():
        emb = encoder.embed_tokens(plan.subject)
        rows.append(emb)
        ids.append(torch.full((emb.shape[0],), -1, dtype=torch.long))
    for s, shot in enumerate(plan.shots):
        emb = encoder.embed_tokens(shot.prompt)
        rows.append(emb)
        ids.append(torch.full((emb.shape[0],), s, dtype=torch.long))
    tokens = torch.cat(rows)[None]  # (1, L, D)
    shot_ids = torch.cat(ids)[None]
    return TextConditioning(tokens, torch.ones(shot_ids.shape, dtype=torch.bool), shot_ids)


def apply_transitions(clip: AVClip, plan: ShotPlan) -> AVClip:
    """Dip-to-black fades at the plan's fade boundaries (cuts need nothing)."""
    from core.media import AVClip

    frames = clip.frames.astype(np.float32)
    audio = clip.audio.copy()
    frame_times = np.arange(clip.num_frames) / clip.fps
    sample_times = np.arange(audio.shape[1]) / clip.sample_rate
    for boundary, shot in zip(plan.boundaries_s, plan.shots[1:], strict=True):
        if shot.transition != "fade":
            continue
        half = shot.fade_s / 2
        frames *= np.clip(np.abs(frame_times - boundary) / half, 0.0, 1.0)[:, None, None, None]
        audio *= np.clip(np.abs(sample_times - boundary) / half, 0.0, 1.0)[None, :].astype(
            np.float32
        )
    return AVClip(
        frames=np.clip(np.round(frames), 0, 255).astype(np.uint8),
        fps=clip.fps,
        audio=audio,
        sample_rate=clip.sample_rate,
    )
