"""Caption attributes (colour, shape, count) and how well detections match them.

The parser reads noun phrases ``[count] colour shape`` ("three blue squares",
"a yellow circle", "an orange face"); quoted text (a transcript) is ignored.
Adherence compares the multiset of (colour, shape) the caption asks for with the
multiset detected: ``|intersection| / |union|``, so 1.0 means exactly the objects
named and nothing else, and both missing and extra objects cost.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from core.synth.palette import COLOR_NAMES

NUMBERS = {
    "a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "pair": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip
SHAPE_WORDS = {
    "circle": "circle", "circles": "circle", "ball": "circle", "balls": "circle",
    "disc": "circle", "discs": "circle", "disk": "circle", "disks": "circle",
    "face": "circle", "faces": "circle", "dot": "circle", "dots": "circle",
    "square": "square", "squares": "square", "box": "square", "boxes": "square",
    "block": "square", "blocks": "square", "cube": "square", "cubes": "square",
    "triangle": "triangle", "triangles": "triangle",
}  # fmt: skip
COLOR_WORDS = {name: name for name in COLOR_NAMES}
# A talking-avatar caption is `a yellow face says "<line>"`: without its line, the verb
# that introduced it would dangle ("a yellow face says").
SPEECH_VERBS = ("says", "said", "speaks", "sings")


def without_dialogue(caption: str) -> str:
    """The caption with its quoted line (and what follows), and the verb that
    introduces it, removed: the scene a prompt can ask for."""
    words = caption.split('"')[0].split()
    if words and words[-1].lower() in SPEECH_VERBS:
        words = words[:-1]
    return " ".join(words)


def parse_caption(caption: str) -> Counter:
    """Counter of (colour, shape) -> count named by a caption."""
    text = re.sub(r'"[^"]*"|“[^”]*”', " ", caption.lower())
    tokens = re.findall(r"[a-z]+|\d+", text)
    wanted: Counter = Counter()
    for i, tok in enumerate(tokens):
        shape = SHAPE_WORDS.get(tok)
        if shape is None or i == 0 or tokens[i - 1] not in COLOR_WORDS:
            continue
        color = COLOR_WORDS[tokens[i - 1]]
        count = 1
        if i >= 2:
            word = tokens[i - 2]
            if word.isdigit():
                count = int(word)
            elif word in NUMBERS:
                count = NUMBERS[word]
        wanted[(color, shape)] += count
    return wanted


def observed_objects(detections: list[list[dict]] | list[dict]) -> Counter:
    """Counter of (colour, shape) seen: per-frame counts, median over frames."""
    if detections and isinstance(detections[0], dict):
        frames = [detections]  # a single frame's detections
    else:
        frames = detections  # type: ignore[assignment]
    per_frame = [Counter((d["color"], d["shape"]) for d in frame) for frame in frames]
    keys = set().union(*per_frame) if per_frame else set()
    out: Counter = Counter()
    for key in keys:
        median = float(np.median([c.get(key, 0) for c in per_frame]))
        if int(round(median)) > 0:
            out[key] = int(round(median))
    return out


def multiset_iou(wanted: Counter, seen: Counter) -> float:
    keys = set(wanted) | set(seen)
    if not keys:
        return 1.0
    inter = sum(min(wanted.get(k, 0), seen.get(k, 0)) for k in keys)
    union = sum(max(wanted.get(k, 0), seen.get(k, 0)) for k in keys)
    return inter / union


def caption_adherence(caption: str, detections: list[list[dict]] | list[dict]) -> float:
    """Score in [0, 1] of how well detections (one frame, or frames of a shot) match a caption.

    Raises ValueError when the caption names no coloured shape, since there is
    nothing to measure.
    """
    wanted = parse_caption(caption)
    if not wanted:
        raise ValueError(f"caption names no coloured shape the probes know: {caption!r}")
    return multiset_iou(wanted, observed_objects(detections))
