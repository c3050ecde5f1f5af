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

from curation.decode import DecodedSource
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


class ShotStage:
    """``DecodedSource -> list[ShotRecord]`` covering every frame exactly once."""

    resources = {"num_cpus": 1}
    name = "shots"

    def __init__(self, config: ShotConfig | None = None):
        self.config = config or ShotConfig()

    def detect_boundaries(self, frames_bgr: np.ndarray, fps: float) -> list[tuple[int, str]]:
        """Frame indices where a new shot starts, each with its transition kind.

        ``frames_bgr``: (T, h, w, 3) uint8 BGR.
        """
        cfg = self.config
        min_len = max(1, int(round(cfg.min_shot_s * fps)))
        if cfg.cut_detector == "adaptive":
            cut_detector = AdaptiveDetector(
                adaptive_threshold=cfg.adaptive_threshold,
                min_scene_len=min_len,
                min_content_val=cfg.adaptive_min_content,
            )
        else:
            cut_detector = ContentDetector(threshold=cfg.content_threshold, min_scene_len=min_len)
        fade_detector = (
            ThresholdDetector(threshold=cfg.fade_threshold, min_scene_len=min_len, fade_bias=0.0)
            if cfg.detect_fades
            else None
        )
        cuts: list[int] = []
        fades: list[int] = []
        timecode = None
        for i in range(frames_bgr.shape[0]):
            timecode = FrameTimecode(i, fps=fps)
            frame = frames_bgr[i]
            cuts += [tc.frame_num for tc in cut_detector.process_frame(timecode, frame)]
            if fade_detector is not None:
                fades += [tc.frame_num for tc in fade_detector.process_frame(timecode, frame)]
        if timecode is not None:
            cuts += [tc.frame_num for tc in cut_detector.post_process(timecode)]
            if fade_detector is not None:
                fades += [tc.frame_num for tc in fade_detector.post_process(timecode)]
        return merge_boundaries(cuts, fades, min_len, frames_bgr.shape[0])

    def __call__(self, decoded: DecodedSource) -> list[ShotRecord]:
        bounds = self.detect_boundaries(decoded.small_bgr, decoded.fps)
        return shots_from_boundaries(
            decoded.source.source_id, bounds, decoded.num_frames, decoded.fps
        )


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
