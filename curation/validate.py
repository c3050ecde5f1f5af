"""Validate a raw source before anything decodes it.

Checks the name, the container against the extension, the streams, duration,
frame rate (constant, in range), resolution and audio presence. A failing
source becomes a :class:`QuarantineRecord` with a reason a person can act on;
the flow carries on with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from core import media, storage
from curation.records import (
    QuarantineRecord,
    SourceRecord,
    display_uri,
    file_extension,
    is_valid_utf8_name,
    source_id_of,
)

# FFmpeg's demuxer names (``container.format.name``) each extension may carry.
CONTAINERS_BY_EXTENSION = {
    ".mp4": ("mov,mp4,m4a,3gp,3g2,mj2",),
    ".m4v": ("mov,mp4,m4a,3gp,3g2,mj2",),
    ".mov": ("mov,mp4,m4a,3gp,3g2,mj2",),
    ".mkv": ("matroska,webm",),
    ".webm": ("matroska,webm",),
    ".avi": ("avi",),
}


@dataclass(frozen=True)
class ValidateConfig:
    min_duration_s: float = 1.0
    min_frames: int = 8
    min_fps: float = 5.0
    max_fps: float = 120.0
    min_side_px: int = 64
    max_pixels: int = 3840 * 2160  # 4K UHD; larger frames exhaust a worker's memory
    require_audio: bool = True
    allow_variable_frame_rate: bool = False


class ValidateStage:
    """``uri -> SourceRecord | QuarantineRecord``; reads headers and a few packets only."""

    resources = {"num_cpus": 1}
    name = "validate"

    def __init__(self, config: ValidateConfig | None = None):
        self.config = config or ValidateConfig()

    def __call__(self, uri: str) -> SourceRecord | QuarantineRecord:
        sid = source_id_of(uri)

        def bad(reason: str, size_bytes: int = -1) -> QuarantineRecord:
            return QuarantineRecord(
                uri=display_uri(uri),
                source_id=sid,
                stage=self.name,
                reason=reason,
                size_bytes=size_bytes,
            )

        if not is_valid_utf8_name(uri):
            return bad("file name is not valid UTF-8")
        ext = file_extension(uri)
        if ext not in CONTAINERS_BY_EXTENSION:
            return bad(
                f"extension {ext or '(none)'!r} is not a video container "
                f"(expected one of {', '.join(sorted(CONTAINERS_BY_EXTENSION))})"
            )
        try:
            size_bytes = storage.size(uri)
        except storage.StorageError as err:
            return bad(f"cannot read: {err}")
        if size_bytes == 0:
            return bad("file is empty (0 bytes)", 0)
        try:
            info = media.probe_media(uri)
            variable_rate = info.variable_frame_rate
        except media.MediaError as err:
            return bad(f"unreadable media: {err.reason}", size_bytes)
        cfg = self.config
        if info.container not in CONTAINERS_BY_EXTENSION[ext]:
            return bad(
                f"extension {ext!r} does not match the container {info.container!r}", size_bytes
            )
        if not info.has_video:
            return bad("no video stream", size_bytes)
        if cfg.require_audio and not info.has_audio:
            return bad("no audio stream", size_bytes)
        if info.width * info.height > cfg.max_pixels:
            return bad(
                f"resolution {info.width}x{info.height} exceeds the limit of "
                f"{cfg.max_pixels} pixels per frame",
                size_bytes,
            )
        if min(info.width, info.height) < cfg.min_side_px:
            return bad(
                f"resolution {info.width}x{info.height} is below {cfg.min_side_px} px", size_bytes
            )
        if variable_rate and not cfg.allow_variable_frame_rate:
            return bad("variable frame rate (constant frame rate required)", size_bytes)
        if not (cfg.min_fps <= info.fps <= cfg.max_fps):
            return bad(f"frame rate {info.fps:.3f} outside [{cfg.min_fps}, {cfg.max_fps}]")
        if info.frame_count < cfg.min_frames:
            return bad(
                f"only {info.frame_count} video frame(s); at least {cfg.min_frames} required",
                size_bytes,
            )
        if info.duration_s < cfg.min_duration_s:
            return bad(
                f"duration {info.duration_s:.3f} s is below {cfg.min_duration_s} s", size_bytes
            )
        return SourceRecord(
            uri=uri,
            source_id=sid,
            container=info.container,
            duration_s=info.duration_s,
            width=info.width,
            height=info.height,
            fps=info.fps,
            frame_count=info.frame_count,
            audio_rate=info.audio_rate,
            audio_channels=info.audio_channels,
            video_codec=info.video_codec,
            audio_codec=info.audio_codec,
            size_bytes=size_bytes,
        )
