"""Validate a raw source before anything decodes it.

Checks the name, the container against the extension, the streams, duration,
frame rate (in range), resolution and, only when asked, audio presence and a
constant frame rate. Real footage is accepted as it comes: video-only sources
become video-only clips, variable-frame-rate sources are re-timed to a constant
rate, rotation and non-square pixels are recorded and applied downstream. A
failing source becomes a :class:`QuarantineRecord` with a reason a person can act
on; the flow carries on with the rest.
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
from curation.stage import Resources, SourceContext, SourceRejected, Stage

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
    # Video-only footage trains the video branch; True quarantines it instead.
    require_audio: bool = False
    # Variable-frame-rate footage (phones, screen captures) is re-timed to a constant
    # rate; False quarantines it instead.
    allow_variable_frame_rate: bool = True


class ValidateStage(Stage):
    """``uri -> SourceRecord | QuarantineRecord``; reads headers, a few packets and
    the first frame only."""

    name = "validate"
    version = "2"

    def __init__(self, config: ValidateConfig | None = None):
        self.config = config or ValidateConfig()

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1)

    def precheck(self, uri: str) -> None:
        """Name, extension and size only: run before a remote source is downloaded."""
        checked = self(uri, path=None, headers_only=True)
        if isinstance(checked, QuarantineRecord):
            raise SourceRejected(checked.reason, checked.size_bytes)

    def process(self, ctx: SourceContext) -> None:
        checked = self(ctx.uri, ctx.path or None)
        if isinstance(checked, QuarantineRecord):
            raise SourceRejected(checked.reason, checked.size_bytes)
        ctx.source = checked

    def __call__(
        self, uri: str, path: str | None = None, headers_only: bool = False
    ) -> SourceRecord | QuarantineRecord | None:
        """``path``: a local copy of ``uri`` already made (else ``uri`` is read).
        ``headers_only``: stop after the name, extension and size checks (None: passed)."""
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
        if headers_only:
            return None
        try:
            info = media.probe_media(path or uri)
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
            return bad(
                f"frame rate {info.fps:.3f} outside [{cfg.min_fps}, {cfg.max_fps}]", size_bytes
            )
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
            rotation=info.rotation,
            sample_aspect_ratio=info.sample_aspect_ratio,
            display_width=info.display_width,
            display_height=info.display_height,
            start_s=info.start_s,
            variable_frame_rate=variable_rate,
            has_audio=info.has_audio,
            audio_streams=info.audio_streams,
            audio_stream=info.audio_stream,
        )
