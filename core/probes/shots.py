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


def frame_luma(frames: np.ndarray) -> np.ndarray:
    """(T,) mean luma (BT.601 weights) of (T, H, W, 3) uint8 frames."""
    means = frames.reshape(frames.shape[0], -1, 3).mean(axis=1, dtype=np.float64)
    return means @ np.array([0.299, 0.587, 0.114])


def block_means(frames: np.ndarray) -> np.ndarray:
    """(T, nb, 3) per-block mean colour of 16x16 blocks (edges cropped)."""
    t, h, w, _ = frames.shape
    bh, bw = max(h // BLOCK, 1), max(w // BLOCK, 1)
    sh, sw = h // bh, w // bw
    crop = frames[:, : bh * sh, : bw * sw].astype(np.float32)
    return crop.reshape(t, bh, sh, bw, sw, 3).mean(axis=(2, 4)).reshape(t, bh * bw, 3)


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
