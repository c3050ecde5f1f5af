"""``render_shot``: one shot of a scene kind as an AVClip plus its ground truth."""

from __future__ import annotations

import numpy as np

from core.media import AVClip
from core.synth import palette
from core.synth.scenes import (
    SCENE_KINDS,
    VARIANTS,
    SceneError,
    ShotSpec,
    ground_truth,
    plan_shot,
    render_audio,
    render_frames,
)


def render_shot(
    kind: str,
    seed: int,
    duration_s: float = 4.0,
    width: int = 320,
    height: int = 192,
    fps: float = 24.0,
    sample_rate: int = 48000,
    variant: str = "day",
    *,
    background: str | None = None,
    guard_start_s: float = 0.2,
    guard_end_s: float = 0.2,
    min_event_gap_s: float = 0.12,
) -> tuple[AVClip, dict]:
    """Render one shot; times in the returned ground truth are relative to its start.

    The same ``seed`` gives the same objects, motion and events in both variants:
    ``variant="night"`` only swaps the backdrop for a dark one and dims the objects.
    ``background`` names a backdrop of the variant (see ``core.synth.palette``);
    by default one is drawn from the seed.
    """
    if kind not in SCENE_KINDS:
        raise SceneError(f"unknown scene kind {kind!r}; known: {', '.join(SCENE_KINDS)}")
    if variant not in VARIANTS:
        raise SceneError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if width < 64 or height < 64 or width % 2 or height % 2:
        raise SceneError(f"width and height must be even and >= 64, got {width}x{height}")
    if fps <= 0 or sample_rate < 8000:
        raise SceneError(f"bad fps {fps} or sample rate {sample_rate}")
    if duration_s < guard_start_s + guard_end_s + 0.5:
        raise SceneError(f"shot of {duration_s} s is too short for its guards")
    spec = ShotSpec(
        width=width,
        height=height,
        fps=float(fps),
        sample_rate=int(sample_rate),
        duration_s=float(duration_s),
        variant=variant,
        guard_start_s=guard_start_s,
        guard_end_s=guard_end_s,
        min_event_gap_s=min_event_gap_s,
    )
    rng = np.random.default_rng(seed)
    # Drawn first in both variants, so day and night consume the seed identically.
    backdrop_pick = int(rng.integers(0, 1 << 30))
    names = list(palette.backgrounds(variant))
    if background is None:
        background = names[backdrop_pick % len(names)]
    elif background not in names:
        raise SceneError(f"background {background!r} is not a {variant} backdrop: {names}")
    plan = plan_shot(kind, rng, spec)
    plan.background = background
    frames = render_frames(plan, spec)
    audio = render_audio(plan, spec, rng)
    clip = AVClip(frames=frames, fps=spec.fps, audio=audio, sample_rate=spec.sample_rate)
    return clip, ground_truth(plan, spec)
