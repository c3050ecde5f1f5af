"""Decode a source once and share its frames with every stage that needs them.

Shot detection, quality scores, sync and keyframe captions all look at the same
frames; decoding once and handing the arrays around is what keeps the flow near
the speed of pure decoding. Analysis runs on small copies (``analysis_width``
pixels wide) made while decoding; clips are cut from the full-size frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from core import media
from curation.records import SourceRecord


@dataclass
class DecodedSource:
    source: SourceRecord
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, full size
    fps: float
    audio: np.ndarray  # (C, N) float32, source rate
    sample_rate: int
    small_bgr: np.ndarray  # (T, h, w, 3) uint8 BGR (what PySceneDetect's detectors expect)
    small_luma: np.ndarray  # (T, h, w) uint8 luma (stages convert the slices they use)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


@dataclass(frozen=True)
class DecodeConfig:
    analysis_width: int = 160
    # Whole sources are held in memory; longer ones are refused rather than
    # risking a worker's memory (stream-splitting long sources is future work).
    max_frame_bytes: int = 4 * 1024**3


class DecodeStage:
    """``SourceRecord -> DecodedSource``: one pass over the video, one over the audio."""

    resources = {"num_cpus": 1}
    name = "decode"

    def __init__(self, config: DecodeConfig | None = None):
        self.config = config or DecodeConfig()

    def analysis_size(self, width: int, height: int) -> tuple[int, int]:
        w = min(self.config.analysis_width, width)
        h = max(2, int(round(height * w / width / 2)) * 2)
        return w, h

    def __call__(self, source: SourceRecord) -> DecodedSource:
        expected = source.frame_count * source.width * source.height * 3
        if expected > self.config.max_frame_bytes:
            raise media.MediaError(
                source.uri,
                f"decoded frames would take {expected / 1024**3:.1f} GiB, over the "
                f"{self.config.max_frame_bytes / 1024**3:.1f} GiB per-source limit",
            )
        small_size = self.analysis_size(source.width, source.height)
        frames: list[np.ndarray] = []
        small_bgr: list[np.ndarray] = []
        small_luma: list[np.ndarray] = []
        for _, frame in media.iter_video_frames(source.uri):
            frames.append(frame)
            # INTER_AREA averages pixels: a clean downscale that keeps mean luma exact.
            small = cv2.resize(frame, small_size, interpolation=cv2.INTER_AREA)
            small_bgr.append(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
            # BT.601 luma, OpenCV's (and ffmpeg's) gray conversion.
            small_luma.append(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        if len(frames) < 2:
            raise media.MediaError(source.uri, f"decoded only {len(frames)} video frame(s)")
        audio, rate = media.read_audio(source.uri)
        return DecodedSource(
            source=source,
            frames=np.stack(frames),
            fps=source.fps,
            audio=audio,
            sample_rate=rate,
            small_bgr=np.stack(small_bgr),
            small_luma=np.stack(small_luma),
        )
