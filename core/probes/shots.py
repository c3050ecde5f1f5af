"""Shot transitions from frame statistics: hard cuts and fades through black.

Fades: a run of (near-)black frames flanked by monotone brightness ramps. The ramp
ends are found by walking out from the black run while mean luma keeps changing by
more than ``FADE_STEP_RATIO`` per frame; the fade spans [first ramp frame, last ramp
frame] and its time is the middle of the black run.

Cuts: the frame is split into 16x16 blocks; a cut between frames k-1 and k changes
the mean colour of most blocks at once, so the feature is the *median* over blocks
of the absolute block-mean change. Moving objects change a few blocks and a camera
pan shifts textures within blocks, so neither moves the median much, while a cut to
a different backdrop moves all of it. Frames inside a fade are not cut candidates.
A cut is reported at the time of the first frame of the new shot.
"""

from __future__ import annotations

import numpy as np

BLOCK = 16
CUT_THRESHOLD = 5.0  # median block change in RGB levels
CUT_LOCAL_RATIO = 3.0  # and this many times the local median change
BLACK_LEVEL = 8.0  # mean luma of a black (faded-out) frame
FADE_STEP_RATIO = 1.03


CHUNK_FRAMES = 64  # frames per chunk, so statistics never copy a whole video


def block_means(frames: np.ndarray) -> np.ndarray:
    """(T, nb, 3) float32 per-block mean colour of 16x16 blocks (edges cropped)."""
    t, h, w, _ = frames.shape
    bh, bw = max(h // BLOCK, 1), max(w // BLOCK, 1)
    sh, sw = h // bh, w // bw
    out = np.empty((t, bh * bw, 3), dtype=np.float32)
    for c in range(0, t, CHUNK_FRAMES):
        # Every other row and column: a block mean needs no more, and it is 4x cheaper.
        crop = frames[c : c + CHUNK_FRAMES, : bh * sh : 2, : bw * sw : 2].astype(np.float32)
        n = crop.shape[0]
        out[c : c + n] = (
            crop.reshape(n, bh, -1, bw, crop.shape[2] // bw, 3)
            .mean(axis=(2, 4))
            .reshape(n, bh * bw, 3)
        )
    return out


def frame_luma(frames: np.ndarray) -> np.ndarray:
    """(T,) mean luma (BT.601 weights) of (T, H, W, 3) uint8 frames."""
    means = np.empty((frames.shape[0], 3))
    for c in range(0, frames.shape[0], CHUNK_FRAMES):
        chunk = frames[c : c + CHUNK_FRAMES, ::2, ::2].astype(np.float32)
        means[c : c + chunk.shape[0]] = chunk.reshape(chunk.shape[0], -1, 3).mean(axis=1)
    return means @ np.array([0.299, 0.587, 0.114])


def cut_feature(frames: np.ndarray) -> np.ndarray:
    """(T,) median block-mean change between frame k-1 and k (0 for k = 0)."""
    blocks = block_means(frames)
    change = np.abs(np.diff(blocks, axis=0)).mean(axis=2)  # (T-1, nb)
    return np.concatenate([[0.0], np.median(change, axis=1)])


def detect_fades(luma: np.ndarray, fps: float) -> list[dict]:
    black = luma < BLACK_LEVEL
    fades = []
    k, n = 0, luma.size
    while k < n:
        if not black[k]:
            k += 1
            continue
        a = k
        while k + 1 < n and black[k + 1]:
            k += 1
        b = k
        darkest = a + int(np.argmin(luma[a : b + 1]))
        s = a
        while s > 0 and luma[s - 1] > luma[s] * FADE_STEP_RATIO + 0.3:
            s -= 1
        e = b
        while e + 1 < n and luma[e + 1] > luma[e] * FADE_STEP_RATIO + 0.3:
            e += 1
        # Walking needs at least one ramp frame on a side to call it a fade.
        if s < a or e > b:
            fades.append(
                {
                    "type": "fade",
                    "time_s": round(darkest / fps, 6),
                    "start_s": round(s / fps, 6),
                    "end_s": round(e / fps, 6),
                    "duration_s": round((e - s) / fps, 6),
                    "start_frame": int(s),
                    "end_frame": int(e),
                }
            )
        k += 1
    return fades


def detect_transitions(frames: np.ndarray, fps: float) -> list[dict]:
    """Cuts and fades of a (T, H, W, 3) uint8 video, sorted by time."""
    if frames.shape[0] == 0:
        return []
    luma = frame_luma(frames)
    fades = detect_fades(luma, fps)
    in_fade = np.zeros(frames.shape[0], dtype=bool)
    for fade in fades:
        in_fade[fade["start_frame"] + 1 : fade["end_frame"] + 1] = True
    feature = cut_feature(frames)
    cuts = []
    for k in range(1, frames.shape[0]):
        if in_fade[k] or feature[k] <= CUT_THRESHOLD:
            continue
        window = np.concatenate([feature[max(k - 6, 1) : k], feature[k + 1 : k + 7]])
        local = float(np.median(window)) if window.size else 0.0
        if feature[k] > CUT_LOCAL_RATIO * local:
            cuts.append(
                {
                    "type": "cut",
                    "time_s": round(k / fps, 6),
                    "frame": k,
                    "strength": round(float(feature[k]), 3),
                }
            )
    return sorted(cuts + fades, key=lambda tr: tr["time_s"])


def segments_from_transitions(transitions: list[dict], num_frames: int) -> list[tuple[int, int]]:
    """Frame ranges [a, b) of the shots between transitions, fade ramps excluded."""
    bounds: list[tuple[int, int]] = []  # (last frame of a shot + 1, first frame of the next)
    for tr in transitions:
        if tr["type"] == "cut":
            bounds.append((tr["frame"], tr["frame"]))
        else:
            bounds.append((tr["start_frame"], tr["end_frame"] + 1))
    segments, start = [], 0
    for end, nxt in bounds:
        if end > start:
            segments.append((start, end))
        start = max(start, nxt)
    if num_frames > start:
        segments.append((start, num_frames))
    return segments


PAN_MAX_SHIFT_PX = 16
PAN_STEP = 4
PAN_BAND_FRACTION = 0.1


def _band_profiles(frames: np.ndarray) -> np.ndarray:
    """(T, 2, W) luma column profiles of the top and bottom bands (median over rows)."""
    h = frames.shape[1]
    rows = max(int(round(PAN_BAND_FRACTION * h)), 1)
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    top = np.median(frames[:, :rows].astype(np.float32) @ weights, axis=1)
    bottom = np.median(frames[:, h - rows :].astype(np.float32) @ weights, axis=1)
    return np.stack([top, bottom], axis=1)


def _shift_between(a: np.ndarray, b: np.ndarray, max_shift: int) -> tuple[float, float]:
    """(shift, peak correlation) such that b[c] ~ a[c - shift]; sub-pixel by parabola."""
    a = a - a.mean()
    b = b - b.mean()
    w = a.size
    scores = np.full(2 * max_shift + 1, -np.inf)
    for i, s in enumerate(range(-max_shift, max_shift + 1)):
        lo, hi = max(s, 0), min(w + s, w)
        if hi - lo < w // 2:
            continue
        x, y = a[lo - s : hi - s], b[lo:hi]
        denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
        scores[i] = float((x * y).sum()) / denom if denom > 0 else -np.inf
    k = int(np.argmax(scores))
    if not np.isfinite(scores[k]):
        return 0.0, 0.0
    frac = 0.0
    if 0 < k < scores.size - 1 and np.isfinite(scores[k - 1]) and np.isfinite(scores[k + 1]):
        left, mid, right = scores[k - 1], scores[k], scores[k + 1]
        curve = left - 2 * mid + right
        if curve < 0:
            frac = 0.5 * (left - right) / curve
    return k - max_shift + frac, float(scores[k])


def estimate_pan(frames: np.ndarray, fps: float) -> float:
    """Horizontal camera pan in px/s over a shot's frames (positive: camera moves right,
    so the picture moves left); 0.0 when the backdrop has no texture to follow.

    Column profiles of a top and a bottom band (medians over rows, so a passing
    object barely moves them) are cross-correlated between frames ``PAN_STEP``
    apart; the median shift over the shot gives the speed.
    """
    if frames.shape[0] < 2:
        return 0.0
    profiles = _band_profiles(frames)
    # Compare frames PAN_STEP apart: the sub-pixel error of one correlation is
    # then divided by the step.
    step = min(PAN_STEP, frames.shape[0] - 1)
    shifts = []
    for k in range(step, frames.shape[0]):
        best_shift, best_score = 0.0, 0.0
        for band in range(2):
            a, b = profiles[k - step, band], profiles[k, band]
            if a.std() < 1.0 or b.std() < 1.0:
                continue  # flat backdrop: nothing to follow
            shift, score = _shift_between(a, b, PAN_MAX_SHIFT_PX)
            if score > best_score:
                best_shift, best_score = shift, score
        if best_score > 0.8:
            shifts.append(best_shift)
    if len(shifts) < 0.5 * (frames.shape[0] - step):
        return 0.0
    return float(-np.median(shifts) / step * fps)
