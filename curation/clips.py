"""Shots -> training clips of configurable length, written as MP4.

A shot shorter than ``min_clip_s`` yields no clip; a longer one is cut into the
fewest equal pieces no longer than ``max_clip_s``. Frames next to a boundary are
trimmed first (``trim_s``) so a cut found one frame late cannot leak a frame of
the neighbouring shot into a clip, and the dark tail of a fade is trimmed too.

Writing: a clip that starts on a keyframe of an H.264/HEVC source with square,
upright pixels and a constant rate is *stream-copied* (packets kept, no decode, no
encode, bit-exact pictures). Encoders put keyframes at scene cuts, so a clip start
may move up to ``keyframe_snap_s`` onto one, and long shots are split at keyframes
near the even split points. Every other clip is re-encoded (H.264 + AAC) from a
seek-and-decode of its own frames, upright and square-pixelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core import media, storage
from curation.records import ClipRecord, ShotRecord, SourceRecord
from curation.stage import Resources, SourceContext, Stage


@dataclass(frozen=True)
class ClipConfig:
    min_clip_s: float = 2.0
    max_clip_s: float = 15.0
    trim_s: float = 0.1  # dropped at each shot boundary that is a transition
    fade_luma_ratio: float = 0.8  # frames darker than this x the shot's median are fade tails
    crf: int = 18
    # Encoding is the flow's largest cost; at a fixed CRF a faster preset spends
    # bits instead of CPU (bigger files, same quality target).
    preset: str = "ultrafast"
    # FFmpeg's fast AAC coder costs a third of the default's CPU; clip audio is
    # re-encoded by the audio VAE during training, so its last decibel is moot.
    aac_coder: str = "fast"
    stream_copy: bool = True  # copy packets where the cut allows; False re-encodes all
    keyframe_snap_s: float = 0.5  # how far a clip start or split may move onto a keyframe

    def __post_init__(self) -> None:
        if not 0 < self.min_clip_s <= self.max_clip_s:
            raise ValueError("need 0 < min_clip_s <= max_clip_s")


def clip_spans(
    shot: ShotRecord,
    fps: float,
    config: ClipConfig,
    frame_luma: np.ndarray | None = None,
    ends_on_transition: bool = True,
    fades_out: bool = False,
) -> list[tuple[int, int]]:
    """Frame ranges ``[start, end)`` of the clips cut from ``shot``.

    ``frame_luma``: (num_frames_of_source,) mean luma per frame, used to trim fades.
    ``ends_on_transition``: False for a source's last shot, which ends with the file.
    ``fades_out``: the next shot starts with a fade (so this one's tail is dark).
    """
    trim = int(round(config.trim_s * fps))
    start, end = shot.start_frame, shot.end_frame
    if shot.transition_in != "start":
        start += trim
    if ends_on_transition:
        end -= trim
    if frame_luma is not None and end - start > 2:
        # A fade's dark frames belong to no shot's content.
        dark = config.fade_luma_ratio * float(np.median(frame_luma[start:end]))
        while shot.transition_in == "fade" and start < end - 1 and frame_luma[start] < dark:
            start += 1
        while fades_out and end - 1 > start and frame_luma[end - 1] < dark:
            end -= 1
    min_len = int(math.ceil(config.min_clip_s * fps - 1e-6))
    max_len = int(math.floor(config.max_clip_s * fps + 1e-6))
    length = end - start
    if length < max(min_len, 1):
        return []
    pieces = int(math.ceil(length / max_len))
    size = length // pieces
    return [(start + i * size, start + (i + 1) * size) for i in range(pieces)]


def trim_span(
    shot_start: int,
    shot_end: int,
    transition_in: str,
    fps: float,
    config: ClipConfig,
    frame_luma,
    ends_on_transition: bool,
    fades_out: bool,
) -> tuple[int, int]:
    """The usable part of a shot: boundary frames trimmed, fade tails dropped.

    ``frame_luma(i)``: mean luma of source frame ``i``; ``transition_in`` "continued"
    for the rest of a long shot whose first pieces were already cut.
    """
    trim = int(round(config.trim_s * fps))
    start, end = shot_start, shot_end
    if transition_in not in ("start", "continued"):
        start += trim
    if ends_on_transition:
        end -= trim
    if end - start > 2:
        values = np.array([frame_luma(i) for i in range(start, end)], np.float32)
        dark = config.fade_luma_ratio * float(np.median(values))
        while transition_in == "fade" and start < end - 1 and frame_luma(start) < dark:
            start += 1
        while fades_out and end - 1 > start and frame_luma(end - 1) < dark:
            end -= 1
    return start, end


def snap_start(start: int, end: int, keyframes: list[int], lowest: int, snap: int) -> int:
    """``start`` moved onto the nearest keyframe in ``[lowest, start + snap]`` (and
    before ``end``), so the clip can be stream-copied; unchanged when there is none."""
    near = [k for k in keyframes if lowest <= k <= start + snap and k < end]
    return min(near, key=lambda k: (abs(k - start), k)) if near else start


def split_span(
    start: int, end: int, fps: float, config: ClipConfig, keyframes: list[int]
) -> list[tuple[int, int]]:
    """``[start, end)`` as the fewest equal pieces no longer than ``max_clip_s``; each
    inner split moves onto a keyframe within ``keyframe_snap_s`` when the pieces stay
    within the length limits."""
    min_len = max(1, int(math.ceil(config.min_clip_s * fps - 1e-6)))
    max_len = int(math.floor(config.max_clip_s * fps + 1e-6))
    length = end - start
    if length < min_len:
        return []
    pieces = int(math.ceil(length / max_len))
    size = length // pieces
    bounds = [start + i * size for i in range(pieces + 1)]
    snap = int(round(config.keyframe_snap_s * fps))
    for i in range(1, pieces):
        near = [k for k in keyframes if abs(k - bounds[i]) <= snap]
        for k in sorted(near, key=lambda k: abs(k - bounds[i])):
            if min_len <= k - bounds[i - 1] <= max_len and min_len <= bounds[i + 1] - k <= max_len:
                bounds[i] = k
                break
    return [(bounds[i], bounds[i + 1]) for i in range(pieces)]


def can_stream_copy(source: SourceRecord, config: ClipConfig) -> bool:
    """Whether this source's packets can go into a clip as they are."""
    return (
        config.stream_copy
        and source.video_codec in media.COPYABLE_VIDEO_CODECS
        and source.rotation == 0
        and abs(source.sample_aspect_ratio - 1.0) < 1e-3
        and not source.variable_frame_rate
        # Clips carry mono or stereo: 5.1 and wider tracks are downmixed by a re-encode.
        and (
            not source.has_audio
            or (source.audio_codec in media.COPYABLE_AUDIO_CODECS and source.audio_channels <= 2)
        )
    )


def clip_uri_of(out_uri: str, clip: ClipRecord, fingerprint: str) -> str:
    # The config fingerprint is in the path: a run with other settings writes other
    # files, so an older manifest version never points at a file rewritten under it.
    return storage.join(out_uri, "clips", clip.source_id, fingerprint, f"{clip.clip_id}.mp4")


class ClipWriteStage(Stage):
    """Writes the window's clip: stream copy where it can, else a streaming re-encode."""

    name = "write"
    version = "2"
    kind = "clip"

    def __init__(self, config: ClipConfig | None = None):
        self.config = config or ClipConfig()

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1)

    def process(self, ctx: SourceContext) -> None:
        window = ctx.window
        src = ctx.source
        clip = window.clip
        uri = clip_uri_of(ctx.out_uri, clip, ctx.fingerprint)
        if (
            can_stream_copy(src, self.config)
            and not clip.sync_corrected
            and clip.start_frame in window.keyframes
        ):
            copied = media.copy_span(
                ctx.path,
                uri,
                clip.start_frame / clip.fps,
                clip.end_frame / clip.fps,
                clip.fps,
                origin_s=src.start_s,
                audio_stream=src.audio_stream if src.has_audio else None,
            )
            clip.end_frame = clip.start_frame + copied.frames
            clip.end_s = clip.end_frame / clip.fps
            clip.copy_mode = "stream_copy"
        else:
            self.reencode(ctx, clip, uri)
            clip.copy_mode = "reencode"
        clip.uri = uri

    def reencode(self, ctx: SourceContext, clip: ClipRecord, uri: str) -> None:
        src = ctx.source
        cfg = self.config
        fps = clip.fps
        writer = media.Mp4Writer(
            uri,
            clip.width,
            clip.height,
            fps,
            sample_rate=clip.sample_rate if clip.has_audio else 0,
            channels=ctx.audio.channels if clip.has_audio and ctx.audio is not None else 0,
            crf=cfg.crf,
            preset=cfg.preset,
            aac_coder=cfg.aac_coder,
        )
        try:
            for frame in media.iter_display_frames(
                ctx.path,
                fps,
                src.start_s,
                size=(clip.width, clip.height),
                start_s=clip.start_frame / fps,
                end_s=clip.end_frame / fps,
                sample_aspect_ratio=src.sample_aspect_ratio,
            ):
                writer.add_frame(frame.image)
            if clip.has_audio and ctx.audio is not None:
                # Correction takes the audio ``offset`` later, cancelling a lagging track.
                shift = clip.sync_offset_ms / 1000.0 if clip.sync_corrected else 0.0
                span = writer.frames / fps
                writer.add_audio(ctx.audio.read(clip.start_s + shift, clip.start_s + shift + span))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        clip.end_frame = clip.start_frame + writer.frames
        clip.end_s = clip.end_frame / fps
