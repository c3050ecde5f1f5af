"""Long raw videos of several shots joined by hard cuts and fades, and corpora of them.

A fade is a dip to black: the picture and the sound ramp linearly down over the last
``fade_s / 2`` of one shot and up over the first ``fade_s / 2`` of the next. The
transition time is the shot boundary (a frame time; the frame there is black).
Adjacent shots never share a backdrop, so every cut changes most of the frame.
Shots start on frame boundaries; a shot's track is placed at sample
``round(start_s * sample_rate)``, so an event sound starts at exactly
``round(time_s * sample_rate)`` whenever ``sample_rate / fps`` is a whole number
(48000/24, 44100/30, ...), and within one sample otherwise.

Each video ``NAME.mp4`` gets its ground truth in ``NAME.json`` beside it (times are
absolute seconds in the video)::

    {"schema_version": 1, "video": "NAME.mp4", "seed", "fps", "width", "height",
     "sample_rate", "duration_s",
     "shots": [{"index", "start_s", "end_s", "kind", "caption",
                "transition_in": "start" | "cut" | "fade", "fade_s",
                "variant": "day" | "night", "background", "camera_pan_px_per_s",
                "objects": [{"id", "color", "shape", "radius_px",
                             "trajectory": [[t_s, x_px, y_px], ...]}],   # every frame
                "events": [{"type": "impact" | "collision" | "beat", "time_s",
                            "object_ids"}],
                "speech": null | {"text", "words": [{"word", "start_s", "end_s"}],
                                  "voice", "speed_wpm", "pitch"},
                "bpm"?: float}],
     "transitions": [{"time_s", "type": "cut"} | {"time_s", "type": "fade", "duration_s"}],
     "config": {...SynthConfig...}, "corpus_seed"?, "corpus_index"?}

``x_px, y_px`` is the object's area centroid with pixel centres at integer
coordinates (what ``core.probes`` measures); ``radius_px`` is a circle's radius, a
square's half side, or two thirds of an upright triangle's height.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from core import storage
from core.media import AVClip
from core.synth import palette
from core.synth.scenes import SCENE_KINDS, SceneError
from core.synth.shot import render_shot

SIDECAR_SCHEMA_VERSION = 1
# Events stay this far from a hard cut (and this far beyond a fade's half-span).
EVENT_GUARD_S = 0.2


@dataclass
class SynthConfig:
    """Everything that shapes a synthetic corpus; all sizes are configurable."""

    width: int = 320
    height: int = 192
    fps: float = 24.0
    sample_rate: int = 48000
    min_shots: int = 3
    max_shots: int = 8
    min_shot_s: float = 2.5
    max_shot_s: float = 5.0
    fade_probability: float = 0.4
    min_fade_s: float = 0.33
    max_fade_s: float = 0.75
    night_probability: float = 0.5  # for day_night shots
    kinds: tuple[str, ...] = field(default_factory=lambda: SCENE_KINDS)
    crf: int = 18
    name_prefix: str = "synth"

    def validate(self) -> None:
        if not 1 <= self.min_shots <= self.max_shots:
            raise ValueError(
                f"need 1 <= min_shots <= max_shots, got {self.min_shots}, {self.max_shots}"
            )
        if not 0 < self.min_shot_s <= self.max_shot_s:
            raise ValueError("need 0 < min_shot_s <= max_shot_s")
        if self.min_shot_s < 2 * (EVENT_GUARD_S + self.max_fade_s / 2) + 0.5:
            raise ValueError(
                f"min_shot_s={self.min_shot_s} is too short for fades of up to {self.max_fade_s} s"
            )
        if not 0 < self.min_fade_s <= self.max_fade_s:
            raise ValueError("need 0 < min_fade_s <= max_fade_s")
        unknown = [k for k in self.kinds if k not in SCENE_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"unknown scene kinds {unknown}; known: {SCENE_KINDS}")
        if self.width % 2 or self.height % 2 or self.width < 64 or self.height < 64:
            raise ValueError(
                f"width and height must be even and >= 64, got {self.width}x{self.height}"
            )
        if self.fps <= 0 or self.sample_rate < 8000:
            raise ValueError("fps must be > 0 and sample_rate >= 8000")


def _fade_gain(times: np.ndarray, boundary_s: float, half_s: float) -> np.ndarray:
    return np.clip(np.abs(times - boundary_s) / half_s, 0.0, 1.0)


def _shift_times(truth: dict, offset_s: float) -> dict:
    """The shot's ground truth with every time made absolute."""
    out = dict(truth)
    out["objects"] = [
        {**o, "trajectory": [[round(t + offset_s, 6), x, y] for t, x, y in o["trajectory"]]}
        for o in truth["objects"]
    ]
    out["events"] = [{**e, "time_s": round(e["time_s"] + offset_s, 6)} for e in truth["events"]]
    if truth["speech"] is not None:
        speech = dict(truth["speech"])
        speech["words"] = [
            {
                **w,
                "start_s": round(w["start_s"] + offset_s, 6),
                "end_s": round(w["end_s"] + offset_s, 6),
            }
            for w in speech["words"]
        ]
        out["speech"] = speech
    return out


def generate_video(
    seed: int, config: SynthConfig | None = None, name: str = "video"
) -> tuple[AVClip, dict]:
    """One long raw video (all shots, transitions applied) and its sidecar dict."""
    config = config or SynthConfig()
    config.validate()
    rng = np.random.default_rng(seed)
    fps, sr = config.fps, config.sample_rate
    num_shots = int(rng.integers(config.min_shots, config.max_shots + 1))
    frame_counts = [
        int(round(rng.uniform(config.min_shot_s, config.max_shot_s) * fps))
        for _ in range(num_shots)
    ]
    # Transition i sits between shot i and shot i + 1.
    transitions = []
    for _ in range(num_shots - 1):
        if rng.random() < config.fade_probability:
            half_frames = max(
                int(round(rng.uniform(config.min_fade_s, config.max_fade_s) * fps / 2)), 1
            )
            transitions.append(("fade", half_frames))
        else:
            transitions.append(("cut", 0))

    shot_clips, shot_truths, starts = [], [], []
    previous_backdrop = None
    frame_cursor = 0
    for i in range(num_shots):
        kind = config.kinds[int(rng.integers(0, len(config.kinds)))]
        variant = (
            "night" if kind == "day_night" and rng.random() < config.night_probability else "day"
        )
        names = [n for n in palette.backgrounds(variant) if (variant, n) != previous_backdrop]
        background = names[int(rng.integers(0, len(names)))]
        previous_backdrop = (variant, background)
        guard_in = EVENT_GUARD_S + (transitions[i - 1][1] / fps if i > 0 else 0.0)
        guard_out = EVENT_GUARD_S + (transitions[i][1] / fps if i < num_shots - 1 else 0.0)
        shot_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        clip, truth = render_shot(
            kind,
            shot_seed,
            frame_counts[i] / fps,
            config.width,
            config.height,
            fps,
            sr,
            variant,
            background=background,
            guard_start_s=guard_in,
            guard_end_s=guard_out,
        )
        shot_clips.append(clip)
        shot_truths.append(truth)
        starts.append(frame_cursor)
        frame_cursor += clip.num_frames

    frames = np.concatenate([c.frames for c in shot_clips], axis=0)
    total_samples = int(round(frames.shape[0] / fps * sr))
    audio = np.zeros((2, total_samples), np.float32)
    for clip, start in zip(shot_clips, starts, strict=True):
        a = int(round(start / fps * sr))
        piece = clip.audio[:, : max(total_samples - a, 0)]
        audio[:, a : a + piece.shape[1]] = piece

    sidecar_transitions = []
    for i, (kind, half_frames) in enumerate(transitions):
        boundary = starts[i + 1]
        time_s = boundary / fps
        if kind == "cut":
            sidecar_transitions.append({"time_s": round(time_s, 6), "type": "cut"})
            continue
        lo, hi = boundary - half_frames, boundary + half_frames
        frame_times = np.arange(lo, hi + 1) / fps
        gain = _fade_gain(frame_times, time_s, half_frames / fps)
        frames[lo : hi + 1] = np.rint(frames[lo : hi + 1] * gain[:, None, None, None]).astype(
            np.uint8
        )
        s_lo, s_hi = int(round(lo / fps * sr)), min(int(round(hi / fps * sr)), total_samples)
        sample_times = np.arange(s_lo, s_hi) / sr
        audio[:, s_lo:s_hi] *= _fade_gain(sample_times, time_s, half_frames / fps)[None, :]
        sidecar_transitions.append(
            {
                "time_s": round(time_s, 6),
                "type": "fade",
                "duration_s": round(2 * half_frames / fps, 6),
            }
        )

    shots = []
    for i, (truth, start) in enumerate(zip(shot_truths, starts, strict=True)):
        start_s = start / fps
        absolute = _shift_times(truth, start_s)
        if i == 0:
            transition_in, fade_s = "start", 0.0
        else:
            kind, half_frames = transitions[i - 1]
            transition_in, fade_s = kind, (2 * half_frames / fps if kind == "fade" else 0.0)
        shots.append(
            {
                "index": i,
                "start_s": round(start_s, 6),
                "end_s": round((start + shot_clips[i].num_frames) / fps, 6),
                "transition_in": transition_in,
                "fade_s": round(fade_s, 6),
                **absolute,
            }
        )
    sidecar = {
        "schema_version": SIDECAR_SCHEMA_VERSION,
        "video": f"{name}.mp4",
        "seed": int(seed),
        "fps": float(fps),
        "width": config.width,
        "height": config.height,
        "sample_rate": int(sr),
        "duration_s": round(frames.shape[0] / fps, 6),
        "shots": shots,
        "transitions": sidecar_transitions,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
    }
    return AVClip(frames=frames, fps=fps, audio=audio, sample_rate=sr), sidecar


def video_seed(corpus_seed: int, index: int) -> int:
    """The seed of video ``index`` of a corpus: independent streams per video."""
    return int(np.random.SeedSequence([corpus_seed, 1_000_003, index]).generate_state(1)[0])


def generate_corpus(
    out_uri: str,
    num_videos: int,
    seed: int = 0,
    config: SynthConfig | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Write ``num_videos`` raw videos (MP4 + JSON sidecar) under ``out_uri``; return video URIs.

    Works for any URI ``core.storage`` supports (local, ``file://``, ``s3://``).
    ``progress(i, uri)`` is called after each video is written.
    """
    from core.media import write_mp4

    if num_videos < 0:
        raise ValueError(f"num_videos must be >= 0, got {num_videos}")
    config = config or SynthConfig()
    config.validate()
    storage.makedirs(out_uri)
    uris = []
    for i in range(num_videos):
        name = f"{config.name_prefix}_{i:05d}"
        clip, sidecar = generate_video(video_seed(seed, i), config, name=name)
        sidecar["corpus_seed"] = int(seed)
        sidecar["corpus_index"] = i
        video_uri = storage.join(out_uri, f"{name}.mp4")
        write_mp4(video_uri, clip, crf=config.crf)
        # Sidecar last: a video with a sidecar beside it is complete.
        storage.write_json(storage.join(out_uri, f"{name}.json"), sidecar)
        uris.append(video_uri)
        if progress is not None:
            progress(i, video_uri)
    return uris


__all__ = ["SceneError", "SynthConfig", "generate_corpus", "generate_video", "video_seed"]
