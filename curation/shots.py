"""Shot detection with PySceneDetect's detectors fed frames we already decoded.

PySceneDetect normally opens and decodes the file itself; here its detectors'
``process_frame`` is called directly on the shared analysis frames, so the
source is decoded once for every stage. ``AdaptiveDetector`` (or
``ContentDetector``) finds hard cuts; ``ThresholdDetector`` finds fades through
black, placing the boundary in the middle of the dark stretch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector, ThresholdDetector

from curation.records import ShotRecord


@dataclass(frozen=True)
class ShotConfig:
    cut_detector: str = "adaptive"  # "adaptive" | "content"
    adaptive_threshold: float = 3.0
    adaptive_min_content: float = 15.0
    content_threshold: float = 27.0
    fade_threshold: float = 12.0  # mean 8-bit intensity below which a frame is "faded out"
    detect_fades: bool = True
    min_shot_s: float = 0.6

    def __post_init__(self) -> None:
        if self.cut_detector not in ("adaptive", "content"):
            raise ValueError(
                f"cut_detector must be 'adaptive' or 'content', not {self.cut_detector!r}"
            )
        if self.min_shot_s < 0:
            raise ValueError("min_shot_s must be >= 0")


class StreamingShotDetector:
    """PySceneDetect's detectors fed one analysis frame at a time.

    ``push`` returns the boundaries that became final: a boundary is held back
    until ``hold`` frames have passed after it, long enough for a fade found
    nearby to replace a cut (see :func:`merge_boundaries`), so memory is the
    detectors' own plus a few pending boundaries, whatever the source's length.
    """

    def __init__(self, config: ShotConfig, fps: float):
        cfg = config
        self.fps = fps
        self.min_len = max(1, int(round(cfg.min_shot_s * fps)))
        # A fade's boundary is reported once the picture is back: allow a second.
        self.hold = self.min_len + int(round(fps))
        if cfg.cut_detector == "adaptive":
            self.cut_detector = AdaptiveDetector(
                adaptive_threshold=cfg.adaptive_threshold,
                min_scene_len=self.min_len,
                min_content_val=cfg.adaptive_min_content,
            )
        else:
            self.cut_detector = ContentDetector(
                threshold=cfg.content_threshold, min_scene_len=self.min_len
            )
        self.fade_detector = (
            ThresholdDetector(
                threshold=cfg.fade_threshold, min_scene_len=self.min_len, fade_bias=0.0
            )
            if cfg.detect_fades
            else None
        )
        self._pending: list[tuple[int, str]] = []
        self._last_final: tuple[int, str] | None = None
        self._timecode = None

    def _found(self, cuts: list[int], fades: list[int]) -> None:
        marked = sorted({(f, "fade") for f in fades} | {(c, "cut") for c in cuts})
        for frame, kind in marked:
            if frame <= 0:
                continue
            near = self._pending[-1] if self._pending else self._last_final
            if near is not None and abs(frame - near[0]) < self.min_len:
                # A fade wins over a nearby cut (a fade-in's luma jump trips the cut
                # detector too), but a boundary already handed out stays.
                if kind == "fade" and near[1] == "cut" and self._pending:
                    self._pending[-1] = (frame, kind)
                continue
            self._pending.append((frame, kind))
            self._pending.sort()

    def push(self, index: int, frame_bgr: np.ndarray) -> list[tuple[int, str]]:
        """Feed frame ``index`` ((h, w, 3) uint8 BGR); return boundaries now final."""
        self._timecode = FrameTimecode(index, fps=self.fps)
        cuts = [tc.frame_num for tc in self.cut_detector.process_frame(self._timecode, frame_bgr)]
        fades = []
        if self.fade_detector is not None:
            fades = [
                tc.frame_num for tc in self.fade_detector.process_frame(self._timecode, frame_bgr)
            ]
        if cuts or fades:
            self._found(cuts, fades)
        return self._release(lambda b: index - b >= self.hold)

    def finish(self, num_frames: int) -> list[tuple[int, str]]:
        """End of the source: flush the detectors and every pending boundary."""
        if self._timecode is not None:
            cuts = [tc.frame_num for tc in self.cut_detector.post_process(self._timecode)]
            fades = []
            if self.fade_detector is not None:
                fades = [tc.frame_num for tc in self.fade_detector.post_process(self._timecode)]
            self._found(cuts, fades)
        return self._release(lambda b: b < num_frames)

    def _release(self, ready) -> list[tuple[int, str]]:
        out = []
        while self._pending and ready(self._pending[0][0]):
            self._last_final = self._pending.pop(0)
            out.append(self._last_final)
        return out


class ShotStage:
    """``(T, h, w, 3)`` BGR analysis frames -> shots covering every frame exactly once
    (the batch form of :class:`StreamingShotDetector`, for tests and tools)."""

    name = "shots"

    def __init__(self, config: ShotConfig | None = None):
        self.config = config or ShotConfig()

    def detect_boundaries(self, frames_bgr: np.ndarray, fps: float) -> list[tuple[int, str]]:
        """Frame indices where a new shot starts, each with its transition kind.

        ``frames_bgr``: (T, h, w, 3) uint8 BGR.
        """
        detector = StreamingShotDetector(self.config, fps)
        bounds: list[tuple[int, str]] = []
        for i in range(frames_bgr.shape[0]):
            bounds += detector.push(i, frames_bgr[i])
        bounds += detector.finish(frames_bgr.shape[0])
        return bounds

    def __call__(self, frames_bgr: np.ndarray, fps: float, source_id: str) -> list[ShotRecord]:
        bounds = self.detect_boundaries(frames_bgr, fps)
        return shots_from_boundaries(source_id, bounds, frames_bgr.shape[0], fps)


def merge_boundaries(
    cuts: list[int], fades: list[int], min_len: int, num_frames: int
) -> list[tuple[int, str]]:
    """One sorted boundary list; a fade wins over a cut found within ``min_len`` of it
    (the luma jump at the end of a fade-in can also trip the cut detector)."""
    marked = sorted({(f, "fade") for f in fades} | {(c, "cut") for c in cuts})
    out: list[tuple[int, str]] = []
    for frame, kind in marked:
        if frame <= 0 or frame >= num_frames:
            continue
        if out and frame - out[-1][0] < min_len:
            if kind == "fade" and out[-1][1] == "cut":
                out[-1] = (frame, kind)
            continue
        out.append((frame, kind))
    return out


def shots_from_boundaries(
    source_id: str, bounds: list[tuple[int, str]], num_frames: int, fps: float
) -> list[ShotRecord]:
    starts = [(0, "start"), *bounds]
    shots = []
    for i, (start, kind) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else num_frames
        shots.append(
            ShotRecord(
                source_id=source_id,
                index=i,
                start_frame=start,
                end_frame=end,
                start_s=start / fps,
                end_s=end / fps,
                transition_in=kind,
            )
        )
    return shots
