"""Audio-video offset from paired events.

Sign convention: ``av_offset_ms > 0`` means the audio is late, i.e. a sound is
heard after the visual event that caused it (audio onset time - visual event time).

The offset is found in two steps. First, a search over candidate offsets in
1 ms steps (within +-``max_offset_s``) counts the visual events that have an audio
onset within ``tolerance_s`` of ``visual + offset``; the offset with most matches
wins (ties: the middle of the best plateau nearest zero). Second, each visual event
is paired with its nearest onset under that offset and the median of the pair
differences is the estimate, robust to stray onsets (speech, noise) and to a few
missed events.
"""

from __future__ import annotations

import numpy as np

MAX_OFFSET_S = 0.3
TOLERANCE_S = 0.025


def estimate_av_offset(
    visual_times: list[float],
    onset_times: list[float],
    max_offset_s: float = MAX_OFFSET_S,
    tolerance_s: float = TOLERANCE_S,
) -> dict:
    """``{"av_offset_ms", "matched", "visual_events", "pairs"}``; offset None if < 2 pairs."""
    visual = np.sort(np.asarray(visual_times, dtype=np.float64))
    onsets = np.sort(np.asarray(onset_times, dtype=np.float64))
    result = {"av_offset_ms": None, "matched": 0, "visual_events": int(visual.size), "pairs": []}
    if visual.size == 0 or onsets.size == 0:
        return result
    candidates = np.arange(-max_offset_s, max_offset_s + 5e-4, 0.001)
    padded = np.concatenate([[-np.inf], onsets, [np.inf]])  # sentinels: no bounds checks
    scores = np.zeros(candidates.size, dtype=np.int64)
    for i, d in enumerate(candidates):
        target = visual + d
        idx = np.searchsorted(padded, target)
        nearest = np.minimum(padded[idx] - target, target - padded[idx - 1])
        scores[i] = int(np.count_nonzero(nearest <= tolerance_s))
    best = scores.max()
    if best < 2:
        return result
    # Plateaus of the best score; take the middle of the one nearest zero offset.
    on = scores == best
    plateaus, start = [], None
    for i, flag in enumerate(on):
        if flag and start is None:
            start = i
        if (not flag or i == on.size - 1) and start is not None:
            end = i if flag else i - 1
            plateaus.append((start, end))
            start = None
    mid = min((0.5 * (candidates[a] + candidates[b]) for a, b in plateaus), key=abs)
    pairs = []
    for v in visual:
        j = int(np.argmin(np.abs(onsets - (v + mid))))
        if abs(onsets[j] - (v + mid)) <= tolerance_s:
            pairs.append((float(v), float(onsets[j])))
    diffs = np.array([a - v for v, a in pairs])
    result.update(
        {
            "av_offset_ms": round(float(np.median(diffs)) * 1000.0, 3),
            "matched": len(pairs),
            "pairs": [[round(v, 6), round(a, 6)] for v, a in pairs],
        }
    )
    return result
