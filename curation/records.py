"""Typed records that flow between curation stages.

Each stage is a pure transform of these records, so a stage can be tested
without Ray or Prefect. Records round-trip through JSON (``to_dict`` /
``from_dict``) because per-source results are committed to storage as JSON and
read back when a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def display_uri(uri: str) -> str:
    """``uri`` as valid UTF-8 text: undecodable file-name bytes become ``\\xNN`` escapes.

    Local file names are bytes; Python hands undecodable ones over as lone
    surrogates, which Parquet (UTF-8 only) and JSON writers reject.
    """
    return uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_valid_utf8_name(uri: str) -> bool:
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def source_id_of(uri: str) -> str:
    """Stable 16-hex id of a source URI (raw bytes hashed, so odd names work too)."""
    raw = uri.encode("utf-8", "surrogateescape")
    return hashlib.sha1(raw).hexdigest()[:16]


def clip_id_of(source_uri: str, start_s: float, end_s: float) -> str:
    """Stable clip id: hash of the source and the time range (millisecond precision)."""
    key = f"{display_uri(source_uri)}|{start_s:.3f}|{end_s:.3f}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]


class _Record:
    """JSON round-trip for the dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


def _plain(obj: Any) -> Any:
    # numpy scalars sneak in from measurements; JSON and Arrow want Python types.
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


@dataclass
class SourceRecord(_Record):
    """A raw input that passed validation."""

    uri: str
    source_id: str
    container: str
    duration_s: float
    width: int
    height: int
    fps: float
    frame_count: int
    audio_rate: int
    audio_channels: int
    video_codec: str
    audio_codec: str
    size_bytes: int
    # Real footage: display geometry, where the picture starts, which audio is used.
    rotation: int = 0  # degrees counter-clockwise, from the display matrix
    sample_aspect_ratio: float = 1.0
    display_width: int = 0  # upright, square pixels: what clips are written at
    display_height: int = 0
    start_s: float = 0.0  # first video frame on the container clock (time origin)
    variable_frame_rate: bool = False  # clips are then re-timed to a constant ``fps``
    has_audio: bool = True
    audio_streams: int = 1
    audio_stream: int = 0  # index among the audio streams (-1: none)


@dataclass
class ShotRecord(_Record):
    """One shot of a source: frames ``[start_frame, end_frame)``."""

    source_id: str
    index: int
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    transition_in: str  # "start" | "cut" | "fade"

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame


@dataclass
class ClipRecord(_Record):
    """One training clip cut from a shot, with every score and verdict measured on it."""

    clip_id: str
    source_uri: str
    source_id: str
    shot_index: int
    clip_index: int  # index within the shot
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    fps: float
    width: int
    height: int
    sample_rate: int
    uri: str = ""  # the written MP4
    has_audio: bool = True  # False: a video-only clip (training's video branch only)
    copy_mode: str = ""  # "stream_copy" (packets kept) | "reencode"
    scores: dict[str, float] = field(default_factory=dict)
    # A verdict of None does not apply (audio filters on a video-only clip).
    verdicts: dict[str, bool | None] = field(default_factory=dict)
    phash: str = ""  # hex perceptual hash of keyframes, for near-duplicate search
    caption: str = ""
    caption_backend: str = ""
    caption_model: str = ""
    caption_verdict: str = ""  # "captioned" | "caption_missing" | "caption_failed"
    caption_error: str = ""
    transcript: str = ""
    words: list[dict[str, Any]] = field(default_factory=list)
    language: str = ""
    alignment_method: str = ""
    speech_model: str = ""
    # "" (speech off) | "transcribed" | "no_speech" | "no_audio" | "speech_failed"
    speech_verdict: str = ""
    speech_error: str = ""
    sync_offset_ms: float = 0.0
    sync_confidence: float = 0.0
    sync_verdict: str = ""  # "in_sync" | "out_of_sync" | "uncertain"
    sync_method: str = ""  # envelope pairing that gave the offset, e.g. "motion~energy"
    sync_corrected: bool = False
    split: str = ""
    duplicate_of: str = ""

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def keep(self) -> bool:
        return all(v for v in self.verdicts.values() if v is not None)


@dataclass
class QuarantineRecord(_Record):
    """A source the flow could not use, and why."""

    uri: str  # display form (valid UTF-8)
    source_id: str
    stage: str  # the stage that failed: "validate" | "segment" | "clips" | ... | "executor"
    reason: str
    size_bytes: int = -1
    # "rejected" (validation said no), else the exception's type: "MediaError", ...
    error_type: str = "rejected"


@dataclass
class SourceResult(_Record):
    """Everything one source produced; committed per source so reruns skip it."""

    source_uri: str
    source_id: str
    source: dict[str, Any] | None = None  # SourceRecord.to_dict()
    shots: list[dict[str, Any]] = field(default_factory=list)
    clips: list[dict[str, Any]] = field(default_factory=list)
    quarantine: dict[str, Any] | None = None
    fingerprint: str = ""  # of the config and stage versions that produced it
    # Not part of the manifest: they differ between runs.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    media_seconds: float = 0.0
    stage_cpu_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0  # of the worker process after this source

    @property
    def status(self) -> str:
        """Where this input went: "curated" (has clips), "no_clips" (usable, but no
        shot long enough), or "quarantined"."""
        if self.quarantine:
            return "quarantined"
        return "curated" if self.clips else "no_clips"

    def clip_records(self) -> list[ClipRecord]:
        return [ClipRecord.from_dict(c) for c in self.clips]

    def shot_records(self) -> list[ShotRecord]:
        return [ShotRecord.from_dict(s) for s in self.shots]


def file_extension(uri: str) -> str:
    return os.path.splitext(uri)[1].lower()
