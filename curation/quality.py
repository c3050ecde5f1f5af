"""Quality scores and filter verdicts for one clip.

Every score is stored (``ClipRecord.scores``) and every filter's pass/fail is
stored (``ClipRecord.verdicts``), so thresholds can be re-tuned from the
manifest without re-running the flow. Near-duplicate search needs every clip of
the run, so :func:`mark_near_duplicates` runs once when the manifest is built;
this stage only computes each clip's perceptual hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from curation.records import ClipRecord
from curation.stage import Resources, SourceContext, Stage


@dataclass(frozen=True)
class QualityConfig:
    black_luma: float = 16.0  # mean 8-bit luma at or below which a frame counts as black
    max_black_ratio: float = 0.5
    # A frame is unchanged when fewer than ``frozen_changed_fraction`` of its pixels
    # differ from the previous frame by more than ``frozen_pixel_delta`` levels:
    # compression noise moves many pixels a little, real motion some pixels a lot.
    # Frozen frames are those in runs of unchanged frames at least ``frozen_min_run_s``
    # long: a stuck picture, not the still moment between two beats.
    frozen_pixel_delta: float = 8.0
    frozen_changed_fraction: float = 0.0005
    frozen_min_run_s: float = 1.0
    max_frozen_ratio: float = 0.5
    # Mean abs luma change per frame (8-bit levels): ~1 pixel in 50 moving by one level.
    min_motion: float = 0.02
    min_loudness_dbfs: float = -60.0
    silence_dbfs: float = -50.0  # 50 ms windows quieter than this count as silent
    max_silence_ratio: float = 0.9
    min_side_px: int = 128
    min_aspect: float = 0.5
    max_aspect: float = 2.5
    max_duplicate_bits: int = 8  # of 192 hash bits


class QualityStage(Stage):
    """Scores a clip from its analysis frames and audio (clip stage)."""

    name = "quality"
    version = "2"
    kind = "clip"

    def __init__(self, config: QualityConfig | None = None):
        self.config = config or QualityConfig()

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1)

    def process(self, ctx: SourceContext) -> None:
        w = ctx.window
        self(w.clip, w.luma, w.audio, w.sample_rate)

    def __call__(
        self, clip: ClipRecord, luma: np.ndarray, audio: np.ndarray | None, sample_rate: int
    ) -> ClipRecord:
        """``luma``: (T, h, w) uint8 or float of the clip's frames; ``audio``: (C, N) of
        its span, None for a video-only clip (its audio verdicts do not apply)."""
        cfg = self.config
        scores = dict(clip.scores)
        verdicts = dict(clip.verdicts)
        scores.update(video_scores(luma, cfg, clip.fps))
        if audio is not None:
            scores.update(audio_scores(audio, sample_rate, cfg))
        scores["width"] = float(clip.width)
        scores["height"] = float(clip.height)
        scores["aspect"] = clip.width / clip.height
        verdicts["not_black"] = scores["black_ratio"] <= cfg.max_black_ratio
        verdicts["not_frozen"] = scores["frozen_ratio"] <= cfg.max_frozen_ratio
        verdicts["has_motion"] = scores["motion"] >= cfg.min_motion
        if audio is not None:
            verdicts["loud_enough"] = scores["loudness_dbfs"] >= cfg.min_loudness_dbfs
            verdicts["not_silent"] = scores["silence_ratio"] <= cfg.max_silence_ratio
        else:
            verdicts["loud_enough"] = verdicts["not_silent"] = None
        verdicts["resolution_ok"] = min(clip.width, clip.height) >= cfg.min_side_px
        verdicts["aspect_ok"] = cfg.min_aspect <= scores["aspect"] <= cfg.max_aspect
        clip.scores = scores
        clip.verdicts = verdicts
        clip.phash = perceptual_hash(luma)
        return clip


def video_scores(luma: np.ndarray, cfg: QualityConfig, fps: float) -> dict[str, float]:
    luma = luma.astype(np.float32, copy=False)  # uint8 differences would wrap around
    frame_mean = luma.reshape(luma.shape[0], -1).mean(axis=1)  # (T,)
    if luma.shape[0] > 1:
        delta = np.abs(np.diff(luma, axis=0)).reshape(luma.shape[0] - 1, -1)  # (T-1, h*w)
        change = delta.mean(axis=1)
        changed = (delta > cfg.frozen_pixel_delta).mean(axis=1)
    else:
        change = changed = np.zeros(1, np.float32)
    min_run = max(1, int(round(cfg.frozen_min_run_s * fps)))
    return {
        "black_ratio": float(np.mean(frame_mean <= cfg.black_luma)),
        "frozen_ratio": _long_run_fraction(changed < cfg.frozen_changed_fraction, min_run),
        "motion": float(change.mean()),
        "mean_luma": float(frame_mean.mean()),
    }


def _long_run_fraction(flags: np.ndarray, min_run: int) -> float:
    """Fraction of ``flags`` that sit in runs of True at least ``min_run`` long."""
    covered = 0
    run = 0
    for flag in [*flags.tolist(), False]:
        if flag:
            run += 1
        else:
            covered += run if run >= min_run else 0
            run = 0
    return covered / max(len(flags), 1)


def audio_scores(audio: np.ndarray, sample_rate: int, cfg: QualityConfig) -> dict[str, float]:
    mono = audio.mean(axis=0) if audio.ndim == 2 else audio
    floor = 1e-10
    rms = float(np.sqrt(np.mean(mono.astype(np.float64) ** 2))) if mono.size else 0.0
    window = max(1, int(0.05 * sample_rate))
    n = mono.size // window
    if n:
        win_rms = np.sqrt(np.mean(mono[: n * window].reshape(n, window) ** 2, axis=1))
        win_db = 20 * np.log10(np.maximum(win_rms, floor))
        silence = float(np.mean(win_db < cfg.silence_dbfs))
    else:
        silence = 1.0
    peak = float(np.max(np.abs(mono))) if mono.size else 0.0
    return {
        "loudness_dbfs": float(20 * np.log10(max(rms, floor))),
        "peak_dbfs": float(20 * np.log10(max(peak, floor))),
        "silence_ratio": silence,
    }


def _dct_hash(gray: np.ndarray) -> int:
    """64-bit pHash: low 8x8 DCT coefficients of a 32x32 thumbnail against their median."""
    thumb = cv2.resize(gray.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(thumb)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def perceptual_hash(luma: np.ndarray) -> str:
    """192-bit hash (hex) of the frames at 25 %, 50 % and 75 % of the clip."""
    t = luma.shape[0]
    picks = [min(t - 1, int(t * q)) for q in (0.25, 0.5, 0.75)]
    return "".join(f"{_dct_hash(luma[i]):016x}" for i in picks)


HASH_BITS = 192


def hamming(a: str, b: str) -> int:
    return int(bin(int(a, 16) ^ int(b, 16)).count("1"))


class DuplicateIndex:
    """Kept clips' hashes, searchable for near-duplicates without comparing all pairs.

    Multi-index hashing: the 192 hash bits are cut into ``max_bits + 1`` bands; two
    hashes within ``max_bits`` of each other agree exactly on at least one band
    (pigeonhole), so only clips sharing a band value are compared. Memory is a few
    dozen bytes per kept clip; the run's manifest is marked shard by shard.
    """

    def __init__(self, max_bits: int):
        self.max_bits = max_bits
        bands = max_bits + 1
        edges = np.linspace(0, HASH_BITS, bands + 1).round().astype(int)
        self.bands = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.hashes: list[int] = []
        self.keys: list[tuple[str, int, str]] = []  # (source_id, shot_index, clip_id)

    def _band_values(self, value: int) -> list[int]:
        return [(value >> (HASH_BITS - b)) & ((1 << (b - a)) - 1) for a, b in self.bands]

    def nearest(self, phash: str, source_id: str, shot_index: int) -> tuple[str, int]:
        """(clip id, distance) of the nearest kept clip from another shot, or ("", 192)."""
        value = int(phash, 16)
        best, best_bits, best_i = "", HASH_BITS, -1
        seen: set[int] = set()
        for table, band in zip(self.tables, self._band_values(value), strict=True):
            for i in table.get(band, ()):
                if i in seen:
                    continue
                seen.add(i)
                sid, shot, cid = self.keys[i]
                if (sid, shot) == (source_id, shot_index):
                    continue
                bits = (value ^ self.hashes[i]).bit_count()
                # Ties go to the earliest kept clip (the run's first copy).
                if bits < best_bits or (bits == best_bits and i < best_i):
                    best, best_bits, best_i = cid, bits, i
        return best, best_bits

    def add(self, phash: str, source_id: str, shot_index: int, clip_id: str) -> None:
        value = int(phash, 16)
        i = len(self.hashes)
        self.hashes.append(value)
        self.keys.append((source_id, shot_index, clip_id))
        for table, band in zip(self.tables, self._band_values(value), strict=True):
            table.setdefault(band, []).append(i)


def mark_near_duplicates(
    clips: list[ClipRecord], max_bits: int, index: DuplicateIndex | None = None
) -> list[ClipRecord]:
    """Set ``verdicts['not_duplicate']`` on every clip, in a deterministic order.

    Clips are visited sorted by (source, start); a clip within ``max_bits`` of an
    earlier kept clip from a *different shot* is a near-duplicate of it. Clips of
    one shot are consecutive pieces of one take, not copies, so they are never
    compared with each other. ``index`` carries the kept clips of earlier calls
    (earlier shards of the same run). The reported distance is exact when it is
    within ``max_bits``; beyond that it is a lower bound's stand-in (192).
    """
    index = index or DuplicateIndex(max_bits)
    ordered = sorted(clips, key=lambda c: (c.source_uri, c.start_s, c.clip_id))
    for clip in ordered:
        nearest, nearest_bits = "", HASH_BITS
        if clip.phash:
            nearest, nearest_bits = index.nearest(clip.phash, clip.source_id, clip.shot_index)
        duplicate = bool(nearest) and nearest_bits <= max_bits
        clip.scores["duplicate_distance_bits"] = float(nearest_bits)
        clip.verdicts["not_duplicate"] = not duplicate
        clip.duplicate_of = nearest if duplicate else ""
        if not duplicate and clip.phash:
            index.add(clip.phash, clip.source_id, clip.shot_index, clip.clip_id)
    return clips
