"""Lip sync of a talking face: the lag between mouth opening and speech loudness.

The mouth is the hole in the lower half of a face (see ``detect.detect_objects``);
its area per frame is compared with the RMS of the audio in a one-frame window
centred on the frame time shifted by a candidate offset. The offset (1 ms steps,
refined by a parabola through the correlation peak) with the highest Pearson
correlation is the estimate. Sign convention as for ``sync``: positive means the
audio is late.
"""

from __future__ import annotations

import numpy as np

from core.probes.onsets import mono

MAX_OFFSET_S = 0.3
MIN_FRAMES = 12
MIN_CORRELATION = 0.5


def mouth_track(tracks: list[dict]) -> dict | None:
    """The track whose lower hole (mouth) opens and closes the most, if any."""
    best, best_spread = None, 0.0
    for track in tracks:
        holes = np.asarray(track["lower_hole_px"], dtype=np.float64)
        if holes.size < MIN_FRAMES:
            continue
        spread = float(holes.std())
        if spread > best_spread and holes.max() > 0:
            best, best_spread = track, spread
    return best if best_spread >= 1.0 else None


def estimate_lip_sync(
    frame_times_s: np.ndarray,
    openness: np.ndarray,
    audio: np.ndarray,
    sample_rate: int,
    fps: float,
    max_offset_s: float = MAX_OFFSET_S,
) -> dict | None:
    """``{"offset_ms", "correlation"}`` or None if the mouth does not follow the sound."""
    times = np.asarray(frame_times_s, dtype=np.float64)
    mouth = np.asarray(openness, dtype=np.float64)
    if times.size < MIN_FRAMES or mouth.std() == 0:
        return None
    x = mono(audio)
    power = np.concatenate([[0.0], np.cumsum(x * x)])
    half = max(int(round(sample_rate / fps / 2)), 1)
    offsets = np.arange(-max_offset_s, max_offset_s + 5e-4, 0.001)  # (D,)
    centres = np.round((times[None, :] + offsets[:, None]) * sample_rate).astype(np.int64)
    lo = np.clip(centres - half, 0, x.size)
    hi = np.clip(centres + half, 0, x.size)
    rms = np.sqrt((power[hi] - power[lo]) / np.maximum(hi - lo, 1))  # (D, T)
    m = (mouth - mouth.mean()) / mouth.std()
    r = rms - rms.mean(axis=1, keepdims=True)
    norm = np.sqrt((r * r).sum(axis=1)) * np.sqrt(m.size)
    corr = np.where(norm > 0, (r @ m) / np.maximum(norm, 1e-12), -1.0)
    k = int(np.argmax(corr))
    if corr[k] < MIN_CORRELATION:
        return None
    shift = 0.0
    if 0 < k < corr.size - 1:
        curve = corr[k - 1] - 2 * corr[k] + corr[k + 1]
        if curve < 0:
            shift = 0.5 * (corr[k - 1] - corr[k + 1]) / curve
    offset_s = offsets[k] + shift * 0.001
    return {
        "offset_ms": round(float(offset_s) * 1000.0, 3),
        "correlation": round(float(corr[k]), 4),
    }
