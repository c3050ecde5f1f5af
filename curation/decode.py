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
        w, h = self.analysis_size(source.width, source.height)
        # Filled in place as frames arrive (no list + np.stack copy of the whole
        # source); grown if the container under-reported its frame count.
        capacity = max(source.frame_count + 8, 16)
        frames = np.empty((capacity, source.height, source.width, 3), np.uint8)
        small_bgr = np.empty((capacity, h, w, 3), np.uint8)
        small_luma = np.empty((capacity, h, w), np.uint8)
        count = 0
        for _, frame in media.iter_video_frames(source.uri):
            if count == capacity:
                capacity *= 2
                frames = _grow(frames, capacity)
                small_bgr = _grow(small_bgr, capacity)
                small_luma = _grow(small_luma, capacity)
            frames[count] = frame
            # INTER_AREA averages pixels: a clean downscale that keeps mean luma exact.
            small = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
            cv2.cvtColor(small, cv2.COLOR_RGB2BGR, dst=small_bgr[count])
            # BT.601 luma, OpenCV's (and ffmpeg's) gray conversion.
            cv2.cvtColor(small, cv2.COLOR_RGB2GRAY, dst=small_luma[count])
            count += 1
        if count < 2:
            raise media.MediaError(source.uri, f"decoded only {count} video frame(s)")
        audio, rate = media.read_audio(source.uri)
        return DecodedSource(
            source=source,
            frames=frames[:count],
            fps=source.fps,
            audio=audio,
            sample_rate=rate,
            small_bgr=small_bgr[:count],
            small_luma=small_luma[:count],
        )


def _grow(array: np.ndarray, capacity: int) -> np.ndarray:
    out = np.empty((capacity, *array.shape[1:]), array.dtype)
    out[: array.shape[0]] = array
    return out
