"""The programmatic rater: per-head scores of a generated clip, measured by the probes.

Every head is a number in [0, 1], higher is better, computed from
:func:`core.probes.probe.probe_clip` and the clip's pixels and samples:

- ``sync``: audio onsets matched one-to-one to visual impacts within
  ``SYNC_TOLERANCE_FRAMES``; the F1 of recall (impacts that have their sound) and
  precision (sounds that have their impact), so extra clicks cost as much as
  missing ones. A clip with neither (nothing bounces, nothing sounds) scores 0:
  every prompt of the synthetic world that this rater is used on describes
  impacts, so a still, silent clip has not done what was asked.
- ``adherence``: multiset IoU of the (colour, shape) objects the prompt names,
  with their counts, and those detected (:func:`core.probes.caption_adherence`);
  ``None`` when the prompt names no coloured shape. Below ``SHAPE_MIN_SIDE_PX``
  (the ``tiny`` preset's 64x64) shape is left out and the IoU is over colours with
  their counts: a ball there is 16-68 pixels, and the shape classifier reads the
  world's own ground-truth clips as squares or triangles on many frames (three
  real "red circles" probe as two red squares), so shape would score noise. The
  smallest object counted scales with the frame (``detect.min_object_area``: 12
  pixels at 64x64, where the probe's default 24 scored the world's own clips 0.94).
- ``motion``: objects neither doubled nor vanishing (the fraction of frames whose
  object count equals the clip's median count, median > 0) times track continuity
  (the fraction of frame-to-frame detections that have a same-colour detection
  within the tracker's gate in the previous frame).
- ``visual``: no flicker (mean absolute frame-to-frame change of the backdrop's
  luma) and sharpness (95th percentile of the luma gradient), each mapped to [0, 1].
- ``audio``: no clipping (samples at full scale) and no dropouts (10 ms windows far
  below the world's room tone between sounds).

``sync``, ``adherence`` and ``motion`` read the synthetic world's coloured shapes (the
palette detector of :mod:`core.probes.detect`, the caption grammar); on a corpus whose
captions are not all of that world (real footage) they do not apply and are skipped
(:func:`skipped_heads`; ``None`` scores: no pairs, no rewards, named in the run's
report). ``visual`` and ``audio`` apply to any clip.

Ranks within a group are per head (0 = best). Human ratings use the same schema
(:mod:`pipelines.align.preferences`) with another ``rater_id``.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from core.probes.captions import (
    SHAPE_WORDS,
    caption_adherence,
    multiset_iou,
    observed_objects,
    parse_caption,
)
from core.probes.detect import COLOR_NAMES, label_pixels, min_object_area
from core.probes.probe import TRACK_GATE_FRACTION, probe_clip
from pipelines.align.config import HEADS

SYNC_TOLERANCE_FRAMES = 2.0
SHAPE_MIN_SIDE_PX = 128
IMPACT_TYPES = ("impact", "collision")
FLICKER_SCALE = 4.0  # luma levels per frame at which the flicker score is 1/e
SHARPNESS_FULL = 24.0  # luma levels per pixel of gradient that count as fully sharp
DROPOUT_RMS = 2e-4  # well below the synthetic world's room tone (about 1.5e-3)
CLIP_LEVEL = 0.999
# Heads that need the synthetic world (its palette of coloured shapes and its captions).
WORLD_HEADS = ("sync", "adherence", "motion")


def names_world_shape(prompt: str) -> bool:
    return any(w in SHAPE_WORDS for w in re.findall(r"[a-z]+", prompt.lower()))


def skipped_heads(prompts: list[str]) -> tuple[tuple[str, ...], str]:
    """Rater heads that do not apply to a corpus of these prompts, and why ("" if none).

    A corpus is the synthetic world when every caption names one of its shapes
    (coloured or not: the conditioning corpus leaves colours out of half its
    captions); one caption that names none makes it a real corpus for the rater.
    """
    foreign = [p for p in prompts if not names_world_shape(p)]
    if not foreign:
        return (), ""
    return WORLD_HEADS, (
        f"{len(foreign)} of {len(prompts)} prompt(s) do not describe the synthetic world's "
        f"coloured shapes (e.g. {foreign[0]!r}): {', '.join(WORLD_HEADS)} need its palette "
        "detector and caption grammar"
    )


def match_events(visual: list[float], onsets: list[float], tolerance_s: float) -> int:
    """Greedy one-to-one matches between two time lists, closest pairs first."""
    pairs = sorted(
        (abs(a - v), i, j)
        for i, v in enumerate(visual)
        for j, a in enumerate(onsets)
        if abs(a - v) <= tolerance_s
    )
    used_v, used_a, matched = set(), set(), 0
    for _, i, j in pairs:
        if i in used_v or j in used_a:
            continue
        used_v.add(i)
        used_a.add(j)
        matched += 1
    return matched


def sync_score(visual: list[float], onsets: list[float], fps: float) -> dict:
    matched = match_events(visual, onsets, SYNC_TOLERANCE_FRAMES / fps)
    recall = matched / len(visual) if visual else 0.0
    precision = matched / len(onsets) if onsets else 0.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {"sync": f1, "sync_recall": recall, "sync_precision": precision}


def colour_counts(wanted: Counter) -> Counter:
    """{colour: count} of a parsed caption's {(colour, shape): count}."""
    colours: Counter = Counter()
    for (colour, _), n in wanted.items():
        colours[colour] += n
    return colours


def adherence_score(prompt: str, frames_dets: list[list[dict]], side_px: int) -> float | None:
    wanted = parse_caption(prompt)
    if not wanted:
        return None
    if side_px >= SHAPE_MIN_SIDE_PX:
        return caption_adherence(prompt, frames_dets)
    colours = colour_counts(wanted)
    seen = observed_objects([[{"color": d["color"], "shape": ""} for d in f] for f in frames_dets])
    return multiset_iou(colours, Counter({c: n for (c, _), n in seen.items()}))


def colour_frames_score(prompt: str, frames_dets: list[list[dict]]) -> float | None:
    """Mean over frames of the multiset IoU of the colours the prompt names (with their
    counts) and the colours detected in that frame; ``None`` when it names no colour.

    The preference labels' adherence (``rlhf.preferences.adherence_score``): candidates
    of one group differ little, and on them the whole-clip object score (shape calls on
    generated blobs, a median count) flips under an invisible re-encode, while this one
    keeps 87-96% of its pair orders (BENCHMARKS.md, session 20)."""
    parts = frame_parts(prompt, frames_dets)
    return None if parts is None else parts["adherence_colour_frames"]


# What frame_parts adds to a clip's scores beside the colour score itself.
FRAME_PART_KEYS = ("colour_frames_recall", "colour_frames_precision", "count_frames",
                   "shape_colour_frames")  # fmt: skip


def frame_parts(prompt: str, frames_dets: list[list[dict]]) -> dict | None:
    """The colour score and what it is made of, each a mean over frames; ``None`` when
    the prompt names no colour or there are no frames.

    - ``adherence_colour_frames``: :func:`colour_frames_score`;
    - ``colour_frames_recall``: the share of the named colours (with their counts) seen;
    - ``colour_frames_precision``: the share of the objects seen whose colour was named
      (frames that see nothing left out; ``None`` when no frame sees anything);
    - ``count_frames``: the share of frames with exactly as many objects as named;
    - ``shape_colour_frames``: the multiset IoU of the (colour, shape) pairs named and
      seen: which colour goes with which shape. Shape calls on generated blobs are
      noisy, so read it as a difference between two models on the same prompts and
      seeds, not as a level.

    A drop in the colour score is then a named object missing (recall), a colour not
    asked for (precision), objects merging or splitting (count) or colours on the wrong
    shapes (the pairs' score falling while the colours' holds)."""
    wanted = parse_caption(prompt)
    colours = colour_counts(wanted)
    colours.pop(None, None)  # a shape named without a colour asks for no colour
    if not colours or not frames_dets:
        return None
    named = sum(colours.values())
    iou, recall, precision, count, pairs = [], [], [], [], []
    for dets in frames_dets:
        seen = Counter(d["color"] for d in dets)
        hit = sum(min(n, seen.get(c, 0)) for c, n in colours.items())
        iou.append(multiset_iou(colours, seen))
        recall.append(hit / named)
        if dets:
            precision.append(hit / len(dets))
        count.append(float(len(dets) == named))
        pairs.append(multiset_iou(wanted, Counter((d["color"], d["shape"]) for d in dets)))
    return {
        "adherence_colour_frames": float(np.mean(iou)),
        "colour_frames_recall": float(np.mean(recall)),
        "colour_frames_precision": float(np.mean(precision)) if precision else None,
        "count_frames": float(np.mean(count)),
        "shape_colour_frames": float(np.mean(pairs)),
    }


def motion_score(frames_dets: list[list[dict]], gate_px: float) -> float:
    counts = np.array([len(d) for d in frames_dets])
    median = int(round(float(np.median(counts)))) if counts.size else 0
    if median == 0:
        return 0.0
    stable = float(np.mean(counts == median))
    linked = total = 0
    for prev, cur in zip(frames_dets, frames_dets[1:], strict=False):
        for det in cur:
            total += 1
            if any(
                p["color"] == det["color"]
                and math.hypot(p["x"] - det["x"], p["y"] - det["y"]) <= gate_px
                for p in prev
            ):
                linked += 1
    continuity = linked / total if total else 0.0
    return stable * continuity


def visual_score(frames: np.ndarray) -> float:
    luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (T, H, W)
    if luma.shape[0] > 1:
        background = np.stack([label_pixels(np.ascontiguousarray(f)) < 0 for f in frames])
        both = background[1:] & background[:-1]
        diff = np.abs(np.diff(luma, axis=0))
        flicker = float(diff[both].mean()) if both.any() else float(diff.mean())
    else:
        flicker = 0.0
    gy, gx = np.gradient(luma, axis=(1, 2))
    sharp = float(np.percentile(np.hypot(gx, gy), 95))
    return 0.5 * math.exp(-flicker / FLICKER_SCALE) + 0.5 * min(1.0, sharp / SHARPNESS_FULL)


def audio_score(audio: np.ndarray, sample_rate: int) -> float:
    x = np.asarray(audio, np.float64)
    if x.size == 0:
        return 0.0
    clipped = float(np.mean(np.abs(x) >= CLIP_LEVEL))
    mono = x.mean(axis=0) if x.ndim == 2 else x
    hop = max(1, sample_rate // 100)
    n = mono.size // hop
    if n == 0:
        return 0.0
    rms = np.sqrt((mono[: n * hop].reshape(n, hop) ** 2).mean(axis=1))
    dropouts = float(np.mean(rms < DROPOUT_RMS))
    return max(0.0, 1.0 - 20.0 * clipped) * (1.0 - dropouts)


def frame_observations(
    frames_dets: list[list[dict]],
    impacts_s: list[float],
    onsets_s: list[float],
    fps: float,
    size: tuple[int, int],
) -> dict:
    """What the probes saw, frame by frame: ``colour_counts`` (frames, palette colours)
    objects of each colour of :data:`core.probes.detect.COLOR_NAMES`, ``objects`` per
    frame a list of ``[colour index, x, y]`` (centres as fractions of the frame's
    ``size`` (height, width)), ``impact`` and ``onset`` (frames,) 1 where an impact is
    seen / an onset heard, JSON-able.

    The dense labels behind the world heads' scores: a reward model can learn to read
    them from a clip on every candidate, where a pair gives one bit (BENCHMARKS.md,
    session 23: with these read exactly, scores from them order held-out prompts' pairs
    at 0.94 sync and 0.83 adherence)."""
    n = len(frames_dets)
    counts = np.zeros((n, len(COLOR_NAMES)), np.int16)
    for f, dets in enumerate(frames_dets):
        for d in dets:
            counts[f, COLOR_NAMES.index(d["color"])] += 1
    marks = {}
    for name, times in (("impact", impacts_s), ("onset", onsets_s)):
        marks[name] = [0] * n
        for t in times:
            marks[name][min(n - 1, max(0, round(t * fps)))] = 1
    h, w = size
    objects = [
        [[COLOR_NAMES.index(d["color"]), (d["x"] + 0.5) / w, (d["y"] + 0.5) / h] for d in dets]
        for dets in frames_dets
    ]
    return {"colour_counts": counts.tolist(), "objects": objects, **marks}


def rate_clip(prompt: str, clip, skip: tuple[str, ...] = (), observe: bool = False) -> dict:
    """Per-head scores of one clip for its prompt (plus the sync parts), JSON-able.

    Heads in ``skip`` (:func:`skipped_heads`) score ``None``. ``observe`` adds
    ``observations``: :func:`frame_observations` of the clip."""
    side_px = min(clip.frames.shape[1:3])
    probe = probe_clip(clip, include_frames=True, min_object_area=min_object_area(side_px))
    fps = float(clip.fps)
    frames_dets = probe["frames"]
    # Impacts only: the probe's "pulses" (area jumps) are beats in beat scenes, and in
    # bouncing scenes the artefact of a 16-68 pixel ball's area flickering.
    visual = [e["time_s"] for e in probe["visual_events"] if e["type"] in IMPACT_TYPES]
    scores = sync_score(visual, probe["audio_onsets_s"], fps)
    scores["adherence"] = adherence_score(prompt, frames_dets, side_px)
    parts = frame_parts(prompt, frames_dets) or {}
    scores["adherence_colour_frames"] = parts.get("adherence_colour_frames")
    for key in FRAME_PART_KEYS:
        scores[key] = parts.get(key)
    gate = TRACK_GATE_FRACTION * min(clip.frames.shape[1], clip.frames.shape[2])
    scores["motion"] = motion_score(frames_dets, gate)
    scores["visual"] = visual_score(clip.frames)
    scores["audio"] = audio_score(clip.audio, clip.sample_rate)
    scores["visual_events"] = len(visual)
    scores["audio_onsets"] = len(probe["audio_onsets_s"])
    if observe:
        scores["observations"] = frame_observations(
            frames_dets, visual, probe["audio_onsets_s"], fps, clip.frames.shape[1:3]
        )
    for h in skip:
        scores[h] = None
        if h == "adherence":
            for key in ("adherence_colour_frames", *FRAME_PART_KEYS):
                scores[key] = None
    return scores


# The rate_clip key that fills a preference table's adherence column, per
# rlhf.preferences.adherence_score (config.ADHERENCE_SCORES).
ADHERENCE_KEYS = {"objects": "adherence", "colour_frames": "adherence_colour_frames"}


def preference_scores(scores: dict, adherence_score: str = "colour_frames") -> dict:
    """The per-head scores that rank a group's candidates: ``rate_clip``'s heads with
    adherence taken from ``ADHERENCE_KEYS[adherence_score]``."""
    if adherence_score not in ADHERENCE_KEYS:
        raise ValueError(
            f"adherence_score must be one of {sorted(ADHERENCE_KEYS)}, got {adherence_score!r}"
        )
    out = {h: scores.get(h) for h in HEADS}
    out["adherence"] = scores.get(ADHERENCE_KEYS[adherence_score])
    return out


def _rate_one(prompt: str, clip, skip: tuple[str, ...], observe: bool = False) -> dict:
    return rate_clip(prompt, clip, skip, observe)


def rater_pool(workers: int):
    """Processes for :func:`rate_clips`, or ``None`` for ``workers`` 0 (rate in process).

    The probes are CPU work (about 0.15 s a 17-frame clip on one core): rated one
    after another they keep a GPU that samples a group of 8 in a fraction of that
    waiting. Spawned, not forked, so a parent that has started CUDA is safe; the
    caller shuts the pool down (``pool.shutdown()``)."""
    if workers <= 0:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def rate_clips(
    prompts: list[str], clips: list, skip: tuple[str, ...] = (), pool=None
) -> list[dict]:
    """:func:`rate_clip` of each (prompt, clip), in ``pool``'s processes when given; the
    scores are the same either way (the probes are deterministic)."""
    return rate_clips_later(prompts, clips, skip, pool)()


def rate_clips_later(
    prompts: list[str], clips: list, skip: tuple[str, ...] = (), pool=None, observe: bool = False
):
    """:func:`rate_clips`, handed to ``pool`` at once: returns a function that waits for
    and returns the scores, so the caller samples the next group while these are rated
    (without a pool the clips are rated now)."""
    if len(prompts) != len(clips):
        raise ValueError(f"{len(prompts)} prompts for {len(clips)} clips")
    if pool is None:
        scores = [rate_clip(p, c, skip, observe) for p, c in zip(prompts, clips, strict=True)]
        return lambda: scores
    futures = [
        pool.submit(_rate_one, p, c, tuple(skip), observe)
        for p, c in zip(prompts, clips, strict=True)
    ]
    return lambda: [f.result() for f in futures]


def head_vector(scores: dict) -> list[float | None]:
    return [None if scores.get(h) is None else float(scores[h]) for h in HEADS]


def ranks(values: list[float | None]) -> list[int | None]:
    """Rank of each value within its group (0 = best; ties share the better rank)."""
    present = sorted((v for v in values if v is not None), reverse=True)
    return [None if v is None else present.index(v) for v in values]
