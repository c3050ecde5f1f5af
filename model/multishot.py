"""Multi-shot sequences: one denoising pass over all shots of a plan.

A :class:`ShotPlan` lists shots (prompt, duration, transition into the shot). The
whole plan is generated as one latent sequence, so subjects stay consistent across
shots: every token shares the sequence's self-attention, the references, and the
plan's ``subject`` text, while text cross-attention lets each latent time step read
only its own shot's prompt (plus the shared subject).

The plan's text is ONE token sequence of at most ``config.text.max_tokens`` (77 for
new presets): the subject (read by every shot), then per shot its transition in
(``cut``/``fade``), its prompt and its transition out, each token tagged
with the shot it belongs to (:func:`plan_segments`, encoded by
:meth:`model.text_encoder.FrozenTextEncoder.embed_segments`). A transition's words
sit in both shots it joins, so the frames before and after the boundary both read
it. Training uses the same text for continuous multi-shot footage (one encode of
the whole sequence, cuts and fades as they occur; ``pipelines.train.sequences``),
so the model *generates* the transitions.

Checkpoints from before that training (config ``multishot = "stitched"``: trained
on two separately encoded clips joined at a cut) keep what they did: each prompt
encoded alone, and fades applied to the decoded clip by :func:`apply_transitions`
(a dip to black whose picture and sound ramp down over the last ``fade_s/2`` of one
shot and up over the first ``fade_s/2`` of the next), the named fallback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.configs import ModelConfig, TextEncoderConfig
from model.dit import ShotLayout, TextConditioning

if TYPE_CHECKING:
    from core.media import AVClip

TRANSITIONS = ("cut", "fade")
MAX_SHOTS = 16
SHARED = -1  # shot id of text every shot reads (subject, special tokens)


@dataclass(frozen=True)
class TextSegment:
    """A piece of a plan's text and the shot that reads it (SHARED: every shot).
    ``trim``: may lose tail tokens when the plan's text exceeds the token budget
    (prompts may; the transition words and the subject are kept whole)."""

    text: str
    shot: int
    trim: bool = True


def plan_segments(subject: str, prompts: list[str], transitions: list[str]) -> list[TextSegment]:
    """The text of a plan as the model reads it: subject, then per shot the kind of
    its transition in, its prompt, the kind of its transition out (one word-piece
    each side, so even 16 shots fit 77 tokens). ``transitions[k]`` joins shot k and
    k + 1."""
    if len(transitions) != len(prompts) - 1:
        raise ValueError(f"{len(prompts)} shots need {len(prompts) - 1} transitions")
    bad = [t for t in transitions if t not in TRANSITIONS]
    if bad:
        raise ValueError(f"transition must be one of {TRANSITIONS}, got {bad[0]!r}")
    segments = []
    if subject.strip():
        segments.append(TextSegment(subject.strip(), SHARED, trim=False))
    for s, prompt in enumerate(prompts):
        if s > 0:
            segments.append(TextSegment(transitions[s - 1], s, trim=False))
        if prompt.strip():
            segments.append(TextSegment(prompt.strip(), s))
        if s < len(prompts) - 1:
            segments.append(TextSegment(transitions[s], s, trim=False))
    return segments


@dataclass
class Shot:
    prompt: str
    duration_s: float
    transition: str = "cut"  # into this shot; ignored for the first
    # Length of a fade drawn by the fallback (apply_transitions); a model trained on
    # continuous footage draws its fades as long as the footage's were.
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

    @property
    def transitions(self) -> list[str]:
        """Kind of each boundary (``transitions[k]`` joins shot k and k + 1)."""
        return [s.transition for s in self.shots[1:]]

    def segments(self) -> list[TextSegment]:
        return plan_segments(self.subject, [s.prompt for s in self.shots], self.transitions)

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
    """Frame count of the whole sequence and the shot of every latent time step."""
    num_frames = cfg.frames_for_duration(plan.duration_s)
    return num_frames, latent_shots(plan.boundaries_s, cfg.num_latent_frames(num_frames), cfg)


def latent_shots(boundaries_s: list[float], n_video: int, cfg: ModelConfig) -> ShotLayout:
    """Shot of every video and audio latent step of ``n_video`` video latents whose
    shots change at ``boundaries_s`` (training sequences and plans alike).

    Video latent i shows frames 4i-3 .. 4i, the time interval [(4i-3)/fps, (4i+1)/fps)
    centred on (4i-1)/fps, and audio latent j sits at position (j + 0.5)/m - 0.5 (see
    model.rope); a position p therefore stands for the instant (4p - 1) / fps.
    """
    bounds = torch.tensor(boundaries_s, dtype=torch.float64)
    m = cfg.audio_latents_per_video_latent
    tf = cfg.video_vae.temporal_factor

    def to_time(p: torch.Tensor) -> torch.Tensor:
        return (tf * p - tf / 2 + 1).clamp_min(0) / cfg.fps

    def shot(p: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(to_time(p), bounds, right=True).long()

    video_pos = torch.arange(n_video, dtype=torch.float64)
    audio_pos = (torch.arange(n_video * m, dtype=torch.float64) + 0.5) / m - 0.5
    return ShotLayout(shot(video_pos), shot(audio_pos))


def generates_transitions(cfg: ModelConfig) -> bool:
    """Whether the checkpoint was trained on continuous multi-shot footage (it draws
    cuts and fades itself) rather than on stitched pairs (fades applied afterwards)."""
    return cfg.multishot == "continuous"


def shot_text(encoder, plan: ShotPlan, cfg: ModelConfig | None = None) -> TextConditioning:
    """The plan's text, each token tagged with its shot (-1: every shot reads it).

    ``cfg`` (the checkpoint's config) picks the form it was trained with: one
    sequence of at most ``cfg.text.max_tokens`` tokens with transition words
    (continuous; also when ``cfg`` is None), or each prompt encoded alone (stitched).
    """
    if cfg is not None and not generates_transitions(cfg):
        return _stitched_shot_text(encoder, plan)
    budget = (cfg.text if cfg is not None else TextEncoderConfig(encoder.max_tokens)).max_tokens
    tokens, shot_ids = encoder.embed_segments(plan.segments(), budget)
    ones = torch.ones((1, shot_ids.shape[0]), dtype=torch.bool)
    return TextConditioning(tokens[None], ones, shot_ids[None])


def _stitched_shot_text(encoder, plan: ShotPlan) -> TextConditioning:
    """Older checkpoints: subject tokens (shot id -1) followed by each shot's prompt
    tokens (shot id s), every prompt encoded alone."""
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
    """Fallback for checkpoints that do not generate transitions (``multishot =
    "stitched"``): dip-to-black fades at the plan's fade boundaries, drawn on the
    decoded clip (cuts need nothing)."""
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
