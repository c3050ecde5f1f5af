"""Segment a source into clip windows in one streaming pass, in bounded memory.

The source is decoded once, at analysis size (``analysis_width`` pixels wide,
upright, square pixels, on a constant frame-rate grid): shot detection consumes
each frame as it arrives, and only the analysis luma of the open shot is kept, so
memory is bounded by the longest clip (plus a hold of about two seconds), not by
the source: an hour of 4K costs what a minute does. When a shot closes, or an
open shot grows past two clip lengths, its clips are planned (trimmed, split,
snapped to keyframes) and handed out as :class:`ClipWindow` s with the clip's
analysis frames and audio; the clip stages score, caption and write each one
before the decode goes on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from core import media
from curation.clips import ClipConfig, snap_start, split_span, trim_span
from curation.records import ClipRecord, ShotRecord, SourceRecord, clip_id_of
from curation.shots import ShotConfig, StreamingShotDetector
from curation.stage import ClipWindow, Resources, SourceContext, SourceRejected, Stage


@dataclass(frozen=True)
class DecodeConfig:
    analysis_width: int = 160
    # One decoder thread per source: the least CPU per frame (Ray runs sources in
    # parallel, one CPU each); 0 lets FFmpeg pick, for one long source on many cores.
    decoder_threads: int = 1
    # Skip H.264's deblocking and shrink 4:2:0 planes before colour conversion:
    # analysis frames only (clips are cut from the source itself).
    fast_analysis: bool = True
    # Audio kept behind the newest clip, for sync correction's shifted reads.
    audio_margin_s: float = 1.0


def analysis_size(width: int, height: int, analysis_width: int) -> tuple[int, int]:
    w = min(analysis_width, width)
    w = max(2, w // 2 * 2)
    h = max(2, int(round(height * w / width / 2)) * 2)
    return w, h


class SegmentStage(Stage):
    """Source stage: sets ``ctx.windows``, an iterator of the source's clip windows
    (shots land in ``ctx.shots`` as they close)."""

    name = "segment"
    version = "2"

    def __init__(
        self,
        decode: DecodeConfig | None = None,
        shots: ShotConfig | None = None,
        clips: ClipConfig | None = None,
    ):
        self.decode = decode or DecodeConfig()
        self.shots = shots or ShotConfig()
        self.clips = clips or ClipConfig()

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1)

    def process(self, ctx: SourceContext) -> None:
        ctx.windows = self.windows(ctx)

    def windows(self, ctx: SourceContext) -> Iterator[ClipWindow]:
        src = ctx.source
        fps = src.fps
        w, h = analysis_size(src.display_width, src.display_height, self.decode.analysis_width)
        cfg = self.clips
        max_len = int(math.floor(cfg.max_clip_s * fps + 1e-6))
        detector = StreamingShotDetector(self.shots, fps)
        state = _OpenShot(fps, detector.hold)
        count = 0
        for frame in media.iter_display_frames(
            ctx.path,
            fps,
            src.start_s,
            size=(w, h),
            pixel_format="bgr24",
            sample_aspect_ratio=src.sample_aspect_ratio,
            threads=self.decode.decoder_threads,
            analysis=self.decode.fast_analysis,
        ):
            count = frame.index + 1
            state.add(frame.index, cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY), frame.key_frame)
            for boundary, kind in detector.push(frame.index, frame.image):
                yield from self._close(ctx, state, boundary, kind, ends_on_transition=True)
            # A long shot is cut as it goes, keeping at most two clip lengths in memory.
            while frame.index + 1 - state.cursor >= 2 * max_len + state.hold:
                yield from self._long_piece(ctx, state, max_len)
        if count < 2:
            raise SourceRejected(f"decoded only {count} video frame(s)")
        for boundary, kind in detector.finish(count):
            yield from self._close(ctx, state, boundary, kind, ends_on_transition=True)
        yield from self._close(ctx, state, count, "end", ends_on_transition=False)
        ctx.notes["frames"] = count

    def _long_piece(self, ctx: SourceContext, state: _OpenShot, max_len: int):
        fps = state.fps
        cfg = self.clips
        snap = int(round(cfg.keyframe_snap_s * fps))
        min_len = max(1, int(math.ceil(cfg.min_clip_s * fps - 1e-6)))
        if not state.trimmed:
            a, _ = trim_span(
                state.start,
                state.latest + 1,
                state.kind,
                fps,
                cfg,
                state.mean_luma,
                ends_on_transition=False,
                fades_out=False,
            )
            lowest = a if state.kind == "fade" else state.start
            a = snap_start(a, a + max_len, state.keyframes, lowest, snap)
            state.cursor, state.trimmed = a, True
        a = state.cursor
        b = a + max_len
        near = [k for k in state.keyframes if max(a + min_len, b - snap) <= k <= b]
        b = max(near) if near else b
        yield self._window(ctx, state, a, b)
        state.cursor = b
        state.drop_before(b)

    def _close(self, ctx, state: _OpenShot, boundary: int, next_kind: str, ends_on_transition):
        fps = state.fps
        cfg = self.clips
        shot = ShotRecord(
            source_id=ctx.source_id,
            index=state.shot_index,
            start_frame=state.start,
            end_frame=boundary,
            start_s=state.start / fps,
            end_s=boundary / fps,
            transition_in=state.kind,
        )
        ctx.shots.append(shot)
        kind = "continued" if state.trimmed else state.kind
        start = state.cursor if state.trimmed else state.start
        a, e = trim_span(
            start,
            boundary,
            kind,
            fps,
            cfg,
            state.mean_luma,
            ends_on_transition=ends_on_transition,
            fades_out=next_kind == "fade",
        )
        if not state.trimmed and e > a:
            snap = int(round(cfg.keyframe_snap_s * fps))
            lowest = a if state.kind == "fade" else state.start
            a = snap_start(a, e, state.keyframes, lowest, snap)
        for a_, b_ in split_span(a, e, fps, cfg, state.keyframes):
            yield self._window(ctx, state, a_, b_)
        state.next_shot(boundary, next_kind)

    def _window(self, ctx: SourceContext, state: _OpenShot, a: int, b: int) -> ClipWindow:
        src = ctx.source
        fps = state.fps
        start_s, end_s = a / fps, b / fps
        clip = ClipRecord(
            clip_id=clip_id_of(src.uri, start_s, end_s),
            source_uri=src.uri,
            source_id=src.source_id,
            shot_index=state.shot_index,
            clip_index=state.clips_in_shot,
            start_frame=a,
            end_frame=b,
            start_s=start_s,
            end_s=end_s,
            fps=fps,
            width=src.display_width,
            height=src.display_height,
            sample_rate=ctx.audio.sample_rate if ctx.audio is not None else 0,
            has_audio=ctx.audio is not None,
        )
        state.clips_in_shot += 1
        audio = None
        if ctx.audio is not None:
            audio = ctx.audio.read(start_s, end_s)
            ctx.audio.release(start_s - self.decode.audio_margin_s)
        ctx.clips.append(clip)
        return ClipWindow(
            clip=clip,
            luma=state.luma(a, b),
            audio=audio,
            sample_rate=clip.sample_rate,
            keyframes=[k for k in state.keyframes if a <= k < b],
        )


class _OpenShot:
    """The frames of the shot being read: analysis luma from ``base`` on."""

    def __init__(self, fps: float, hold: int):
        self.fps = fps
        self.hold = hold
        self.shot_index = 0
        self.start = 0
        self.kind = "start"
        self.cursor = 0  # first frame not yet handed out in a clip
        self.trimmed = False  # the shot's start was trimmed (a piece was cut already)
        self.clips_in_shot = 0
        self.base = 0
        self.frames: list[np.ndarray] = []
        self.means: list[float] = []
        self.keyframes: list[int] = []
        self.latest = -1

    def add(self, index: int, luma: np.ndarray, key: bool) -> None:
        self.frames.append(luma)
        self.means.append(float(luma.mean()))
        if key:
            self.keyframes.append(index)
        self.latest = index

    def mean_luma(self, index: int) -> float:
        return self.means[index - self.base]

    def luma(self, a: int, b: int) -> np.ndarray:
        return np.stack(self.frames[a - self.base : b - self.base])

    def drop_before(self, index: int) -> None:
        cut = index - self.base
        if cut > 0:
            del self.frames[:cut]
            del self.means[:cut]
            self.base = index
        self.keyframes = [k for k in self.keyframes if k >= index]

    def next_shot(self, boundary: int, kind: str) -> None:
        self.shot_index += 1
        self.start = self.cursor = boundary
        self.kind = kind
        self.trimmed = False
        self.clips_in_shot = 0
        # Frames just before the boundary may still be needed: none are (the shot
        # before it is closed), so everything before it goes.
        self.drop_before(boundary)


def analysis_frames(
    path: str, source: SourceRecord, analysis_width: int = 160
) -> tuple[np.ndarray, np.ndarray]:
    """The whole source's analysis frames, ``(T, h, w, 3)`` BGR and ``(T, h, w)`` luma.

    For tests and tools on short sources; the flow streams (:class:`SegmentStage`).
    """
    w, h = analysis_size(source.display_width, source.display_height, analysis_width)
    bgr = [
        f.image
        for f in media.iter_display_frames(
            path,
            source.fps,
            source.start_s,
            size=(w, h),
            pixel_format="bgr24",
            sample_aspect_ratio=source.sample_aspect_ratio,
            threads=1,
            analysis=True,  # as the segment stage decodes
        )
    ]
    frames = np.stack(bgr)
    luma = np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in bgr])
    return frames, luma
