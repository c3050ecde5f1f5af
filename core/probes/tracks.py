"""Object tracks within shots and the visual events read from them.

Tracking: detections of one colour are linked frame to frame by
minimum-cost assignment on the distance to each track's constant-velocity
prediction. Tracks never cross a shot boundary.

Impacts: a contact changes a body's velocity abruptly. On a track sampled every
frame, the second difference of position is the body's acceleration times 1/fps^2
(constant under gravity, zero when sliding or at rest) except next to a contact.
A contact between frames j and j+1 splits its velocity change over the second
differences at j and j+1, so sums of adjacent second differences (minus their
local median) that leave the robust noise band mark contacts. A polynomial (a
parabola, or a line on short branches) is fitted to up to ``FIT_POINTS``
positions before the contact and another after it; the impact time is where the
two fits meet (the body's position at contact is on both branches), which gives
sub-frame times from whole frames. A meeting without a velocity jump (a ball let
go from rest changes its acceleration only) is not a contact.

Pulses: a sudden jump of a tracked object's area (``PULSE_AREA_RATIO``) marks a beat;
it is timed at the middle of the frame interval in which it happened.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.optimize import linear_sum_assignment

FIT_POINTS = 6
# A contact must change velocity by at least this much (pixels per frame), beat
# KINK_MAD_FACTOR times the robust noise of the pair sums, and beat 1.5 times the
# track's local acceleration, so that a ball coming to rest or let go (second
# difference 0 <-> g/fps^2) is not mistaken for a contact.
MIN_KINK_PX = 3.0
# The noise band only nominates contacts; the fitted velocity jump
# (_meeting_time) confirms them, and keeps precision on its own. At 6 the band
# followed any jitter of the centres up: a quarter of a pixel of it lost a
# quarter of the bounces at 128 px and 16 fps, half a pixel half of them, and on
# generated clips, whose tracks are less regular, it missed nine bounces in ten
# (velocity reversed, about 9 px a frame of jump). At 2.5 synthetic footage keeps
# its impacts under half a pixel of jitter at unchanged precision
# (BENCHMARKS.md, session 31).
KINK_MAD_FACTOR = 2.5
KINK_BASE_FACTOR = 1.5
LOCAL_WINDOW = 6
PULSE_AREA_RATIO = 1.3
MAX_GAP_FRAMES = 2


def build_tracks(
    detections: list[list[dict]], segment: tuple[int, int], gate_px: float
) -> list[dict]:
    """Tracks in frames [a, b): ``{"color", "shape", "frames", "x", "y", "area",
    "lower_hole_px"}`` (lists).

    Detections are linked by colour only: a shape that is misread on one frame
    (a ball squashed against the floor by anti-aliasing) must not break its track.
    A track's shape is the one read on most of its frames.
    """
    a, b = segment
    active: list[dict] = []
    finished: list[dict] = []
    for k in range(a, b):
        dets = detections[k]
        still = []
        for tr in active:
            if k - tr["frames"][-1] > MAX_GAP_FRAMES + 1:
                finished.append(tr)
            else:
                still.append(tr)
        active = still
        used = set()
        colors = {d["color"] for d in dets} | {t["color"] for t in active}
        for color in colors:
            det_idx = [i for i, d in enumerate(dets) if d["color"] == color]
            trk_idx = [j for j, t in enumerate(active) if t["color"] == color]
            if det_idx and trk_idx:
                cost = np.zeros((len(trk_idx), len(det_idx)))
                for r, j in enumerate(trk_idx):
                    px, py = _predict(active[j], k)
                    for c, i in enumerate(det_idx):
                        cost[r, c] = np.hypot(dets[i]["x"] - px, dets[i]["y"] - py)
                rows, cols = linear_sum_assignment(cost)
                for r, c in zip(rows, cols, strict=True):
                    if cost[r, c] <= gate_px:
                        _append(active[trk_idx[r]], k, dets[det_idx[c]])
                        used.add(det_idx[c])
            for i in det_idx:
                if i not in used:
                    tr = {
                        "color": color,
                        "shapes": [],
                        "frames": [],
                        "x": [],
                        "y": [],
                        "area": [],
                        "lower_hole_px": [],
                    }
                    _append(tr, k, dets[i])
                    active.append(tr)
                    used.add(i)
    tracks = finished + active
    for tr in tracks:
        tr["shape"] = Counter(tr.pop("shapes")).most_common(1)[0][0]
    return tracks


def _append(track: dict, k: int, det: dict) -> None:
    track["frames"].append(k)
    track["shapes"].append(det["shape"])
    track["x"].append(det["x"])
    track["y"].append(det["y"])
    track["area"].append(det["area"])
    track["lower_hole_px"].append(det.get("lower_hole_px", 0))


def _predict(track: dict, k: int) -> tuple[float, float]:
    if len(track["frames"]) < 2:
        return track["x"][-1], track["y"][-1]
    dk = track["frames"][-1] - track["frames"][-2]
    vx = (track["x"][-1] - track["x"][-2]) / dk
    vy = (track["y"][-1] - track["y"][-2]) / dk
    steps = k - track["frames"][-1]
    return track["x"][-1] + vx * steps, track["y"][-1] + vy * steps


def _contiguous_runs(frames: list[int]) -> list[tuple[int, int]]:
    """Index ranges [i, j) of a track where frames are consecutive."""
    runs, start = [], 0
    for i in range(1, len(frames) + 1):
        if i == len(frames) or frames[i] != frames[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


def _meeting_time(
    t_pre: np.ndarray, p_pre: np.ndarray, t_post: np.ndarray, p_post: np.ndarray
) -> tuple[float, float, float] | None:
    """(time, velocity jump, acceleration change) where the fits to the two branches
    meet, between their inner ends; None if they do not meet there.

    Each branch gets a parabola when it has 4+ points (gravity, or any steady
    acceleration), else a line.
    """
    deg_pre = 2 if t_pre.size >= 4 else 1
    deg_post = 2 if t_post.size >= 4 else 1
    if t_pre.size < 2 or t_post.size < 2:
        return None
    # Fit around a local origin for numerical conditioning.
    t0 = 0.5 * (t_pre[-1] + t_post[0])
    fit_pre = np.polyfit(t_pre - t0, p_pre, deg_pre)
    fit_post = np.polyfit(t_post - t0, p_post, deg_post)
    size = max(len(fit_pre), len(fit_post))
    diff = np.pad(fit_pre, (size - len(fit_pre), 0)) - np.pad(fit_post, (size - len(fit_post), 0))
    lo, hi = t_pre[-1] - t0, t_post[0] - t0
    span = hi - lo
    roots = np.roots(diff) if np.any(diff[:-1]) else np.array([])
    real = [
        r.real for r in roots if abs(r.imag) < 1e-9 and lo - 0.5 * span <= r.real <= hi + 0.5 * span
    ]
    if not real:
        return None
    root = min(real, key=lambda r: abs(r))
    jump = np.polyval(np.polyder(fit_post), root) - np.polyval(np.polyder(fit_pre), root)
    accel_pre = 2.0 * fit_pre[0] if deg_pre == 2 else 0.0
    accel_post = 2.0 * fit_post[0] if deg_post == 2 else 0.0
    return float(t0 + root), float(jump), float(accel_post - accel_pre)


def _branch_bounds(group: list[int]) -> tuple[int, int]:
    """(last frame before, first frame after) a contact flagged on ``group`` frames."""
    if len(group) == 1:
        return group[0] - 1, group[0] + 1  # the one flagged frame is ambiguous
    return group[0], group[-1]


def kink_events(times: np.ndarray, positions: np.ndarray, axis: str) -> list[dict]:
    """Abrupt velocity changes of one coordinate of a contiguous track run."""
    n = positions.size
    fps = 1.0 / float(np.median(np.diff(times))) if n > 1 else 1.0
    if n < 7:
        return []
    accel = positions[2:] - 2.0 * positions[1:-1] + positions[:-2]  # accel[j-1] at frame j
    # Local baseline: a ball at rest (accel 0) and in flight (accel g/fps^2) are two
    # regimes of one track, so a global median would sit between them.
    padded = np.pad(accel, LOCAL_WINDOW, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * LOCAL_WINDOW + 1)
    base = np.median(windows, axis=1)
    # A contact between frames j and j+1 splits its velocity change over the
    # second differences at j and j+1 in a proportion set by its sub-frame phase;
    # their sum is the whole change whatever the phase, so detect on pair sums.
    dev = accel - base  # dev[i] belongs to frame i + 1
    pair = dev[:-1] + dev[1:]  # pair[i] spans frames i + 1 and i + 2
    spread = 1.4826 * float(np.median(np.abs(pair - np.median(pair))))
    floor_px = max(MIN_KINK_PX, KINK_MAD_FACTOR * spread)
    threshold = np.maximum(
        floor_px, KINK_BASE_FACTOR * np.maximum(np.abs(base[:-1]), np.abs(base[1:]))
    )
    strength = np.abs(pair)
    groups: list[list[int]] = []
    for i in np.nonzero(strength > threshold)[0]:
        lo, hi = max(i - 2, 0), min(i + 3, strength.size)
        if lo + int(np.argmax(strength[lo:hi])) != i:
            continue  # not the (first) local maximum: one contact, one detection
        d1, d2 = abs(dev[i]), abs(dev[i + 1])
        if min(d1, d2) >= 0.25 * (d1 + d2):
            group = [int(i) + 1, int(i) + 2]
        else:
            group = [int(i) + 1] if d1 > d2 else [int(i) + 2]
        if groups and group[0] <= groups[-1][-1]:
            groups[-1] = sorted(set(groups[-1]) | set(group))
        else:
            groups.append(group)
    events = []
    for gi, group in enumerate(groups):
        pre_end, post_start = _branch_bounds(group)
        # Branches stop at the neighbouring contacts' own ambiguous frames.
        prev_limit = _branch_bounds(groups[gi - 1])[1] if gi > 0 else 0
        next_limit = _branch_bounds(groups[gi + 1])[0] if gi + 1 < len(groups) else n - 1
        pre_lo = max(prev_limit, pre_end - FIT_POINTS + 1, 0)
        post_hi = min(next_limit, post_start + FIT_POINTS - 1, n - 1)
        if pre_end - pre_lo + 1 < 2 or post_hi - post_start + 1 < 2:
            continue
        met = _meeting_time(
            times[pre_lo : pre_end + 1],
            positions[pre_lo : pre_end + 1],
            times[post_start : post_hi + 1],
            positions[post_start : post_hi + 1],
        )
        if met is None:
            continue
        t_hit, jump, accel_change = met
        # A contact jumps the velocity. A change of acceleration alone (a ball let
        # go, or settling) can fake a small jump where two fits cross, but not one
        # larger than the acceleration change acting for two frames.
        if abs(jump) / fps < max(MIN_KINK_PX, 2.0 * abs(accel_change) / fps**2):
            continue
        v_before = (positions[pre_end] - positions[max(pre_end - 1, 0)]) / max(
            times[pre_end] - times[max(pre_end - 1, 0)], 1e-9
        )
        v_after = (positions[min(post_start + 1, n - 1)] - positions[post_start]) / max(
            times[min(post_start + 1, n - 1)] - times[post_start], 1e-9
        )
        events.append(
            {
                "time_s": t_hit,
                "axis": axis,
                "velocity_before": float(v_before),
                "velocity_after": float(v_after),
            }
        )
    return events


def track_events(track: dict, fps: float) -> list[dict]:
    """Impacts (velocity kinks on x and y) and pulses (area jumps) of one track."""
    frames = np.asarray(track["frames"])
    xs, ys = np.asarray(track["x"]), np.asarray(track["y"])
    areas = np.asarray(track["area"], dtype=np.float64)
    out = []
    for i, j in _contiguous_runs(track["frames"]):
        times = frames[i:j] / fps
        for axis, pos in (("x", xs[i:j]), ("y", ys[i:j])):
            for ev in kink_events(times, pos, axis):
                k = int(np.clip(np.searchsorted(times, ev["time_s"]), 0, j - i - 1))
                ev.update(
                    {
                        "type": "impact",
                        "color": track["color"],
                        "shape": track["shape"],
                        "x": float(xs[i + k]),
                        "y": float(ys[i + k]),
                    }
                )
                out.append(ev)
        for k in range(i + 3, j):
            # Area against the median of the three frames before: a jump, not noise.
            before = float(np.median(areas[k - 3 : k]))
            if areas[k] <= PULSE_AREA_RATIO * before or areas[k - 1] > PULSE_AREA_RATIO * before:
                continue
            out.append(
                {
                    "type": "pulse",
                    "time_s": (frames[k] - 0.5) / fps,
                    "axis": "area",
                    "color": track["color"],
                    "shape": track["shape"],
                    "x": float(xs[k]),
                    "y": float(ys[k]),
                }
            )
    return out


def segment_events(
    detections: list[list[dict]], segment: tuple[int, int], fps: float, gate_px: float
) -> tuple[list[dict], list[dict]]:
    """One shot's tracks (:func:`build_tracks`) and their visual events, merged."""
    tracks = build_tracks(detections, segment, gate_px)
    return tracks, merge_events([e for t in tracks for e in track_events(t, fps)], fps)


def merge_events(events: list[dict], fps: float) -> list[dict]:
    """Join simultaneous events of different tracks.

    Two horizontal kinks within a frame of each other are one collision between
    two bodies; pulses of several objects on the same frame are one beat.
    """
    events = sorted(events, key=lambda e: e["time_s"])
    merged: list[dict] = []
    for ev in events:
        mergeable = ev["axis"] in ("x", "area")
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and mergeable
            and prev["axis"] == ev["axis"]
            and abs(ev["time_s"] - prev["time_s"]) <= 1.0 / fps
        ):
            count = prev.get("num_objects", 1)
            prev["time_s"] = (prev["time_s"] * count + ev["time_s"]) / (count + 1)
            prev["num_objects"] = count + 1
            if ev["axis"] == "x":
                prev["type"] = "collision"
            continue
        merged.append({**ev, "num_objects": 1})
    return merged
