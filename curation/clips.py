"""Shots -> training clips of configurable length, written as H.264 + AAC MP4.

A shot shorter than ``min_clip_s`` yields no clip; a longer one is cut into the
fewest equal pieces no longer than ``max_clip_s``. Frames next to a boundary are
trimmed first (``trim_s``) so a cut found one frame late cannot leak a frame of
the neighbouring shot into a clip, and the dark tail of a fade is trimmed too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core import media, storage
from curation.decode import DecodedSource
from curation.records import ClipRecord, ShotRecord, clip_id_of


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


class ClipStage:
    """Cuts shots into :class:`ClipRecord` s (no files yet) and writes them on demand."""

    resources = {"num_cpus": 1}
    name = "clips"

    def __init__(self, config: ClipConfig | None = None):
        self.config = config or ClipConfig()

    def __call__(self, decoded: DecodedSource, shots: list[ShotRecord]) -> list[ClipRecord]:
        src = decoded.source
        frame_luma = decoded.small_luma.reshape(decoded.num_frames, -1).mean(axis=1)
        clips: list[ClipRecord] = []
        for shot in shots:
            spans = clip_spans(
                shot,
                decoded.fps,
                self.config,
                frame_luma,
                ends_on_transition=shot.index < len(shots) - 1,
                fades_out=shot.index + 1 < len(shots)
                and shots[shot.index + 1].transition_in == "fade",
            )
            for k, (a, b) in enumerate(spans):
                start_s, end_s = a / decoded.fps, b / decoded.fps
                clips.append(
                    ClipRecord(
                        clip_id=clip_id_of(src.uri, start_s, end_s),
                        source_uri=src.uri,
                        source_id=src.source_id,
                        shot_index=shot.index,
                        clip_index=k,
                        start_frame=a,
                        end_frame=b,
                        start_s=start_s,
                        end_s=end_s,
                        fps=decoded.fps,
                        width=src.width,
                        height=src.height,
                        sample_rate=decoded.sample_rate,
                    )
                )
        return clips

    def clip_uri(self, out_uri: str, clip: ClipRecord) -> str:
        return storage.join(out_uri, "clips", clip.source_id, f"{clip.clip_id}.mp4")

    def write(self, decoded: DecodedSource, clip: ClipRecord, out_uri: str) -> ClipRecord:
        """Encode the clip's frames and audio (shifted by its offset when corrected)."""
        frames = decoded.frames[clip.start_frame : clip.end_frame]
        audio = clip_audio(decoded, clip)
        uri = self.clip_uri(out_uri, clip)
        media.write_mp4(
            uri,
            media.AVClip(
                frames=frames, fps=decoded.fps, audio=audio, sample_rate=decoded.sample_rate
            ),
            crf=self.config.crf,
            preset=self.config.preset,
            aac_coder=self.config.aac_coder,
        )
        clip.uri = uri
        return clip


def clip_audio(
    decoded: DecodedSource, clip: ClipRecord, shift_ms: float | None = None
) -> np.ndarray:
    """The source audio under the clip's frames, ``(C, N)``, zero-padded at the edges.

    ``shift_ms`` (default: the stored offset when the clip is corrected) takes the
    audio that much later, which cancels a sound track lagging the picture.
    """
    if shift_ms is None:
        shift_ms = clip.sync_offset_ms if clip.sync_corrected else 0.0
    rate = decoded.sample_rate
    n = int(round((clip.end_frame - clip.start_frame) / decoded.fps * rate))
    a = int(round(clip.start_frame / decoded.fps * rate + shift_ms / 1000.0 * rate))
    out = np.zeros((decoded.audio.shape[0], n), dtype=np.float32)
    lo, hi = max(a, 0), min(a + n, decoded.audio.shape[1])
    if hi > lo:
        out[:, lo - a : hi - a] = decoded.audio[:, lo:hi]
    return out
