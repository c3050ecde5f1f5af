"""The synthetic world's fixed palette of object colours, shapes and backgrounds.

Colours are saturated and far apart in RGB so a probe can segment objects by
nearest-colour lookup after H.264 encoding (4:2:0 chroma subsampling and
quantisation move flat colours by a few levels, edges by more). Backgrounds are
low-chroma tones, each far from every object colour, so background pixels never
read as an object.

Night variant: the background becomes a dark, slightly blue tone and every object
colour is scaled by ``NIGHT_OBJECT_GAIN`` ("moonlit"). The probes carry both the
day and the night prototype of each colour, so a dimmed red still reads as red; the
night backgrounds sit far (> 90 RGB levels) from every dimmed colour.
"""

from __future__ import annotations

import numpy as np

# Day RGB of each object colour. Pairwise distances (day and night-dimmed) >= 57.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 200, 215),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
}
COLOR_NAMES: tuple[str, ...] = tuple(OBJECT_COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

NIGHT_OBJECT_GAIN = 0.7

# Backgrounds: name -> (sky/wall RGB, floor RGB). Adjacent shots of a video use
# different backgrounds so that every cut changes most of the frame.
DAY_BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "gray": ((112, 112, 112), (72, 72, 72)),
    "beige": ((132, 122, 106), (88, 80, 70)),
    "slate": ((88, 100, 116), (58, 64, 74)),
    "charcoal": ((62, 62, 62), (96, 96, 96)),
}
NIGHT_BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "midnight": ((16, 18, 34), (36, 38, 52)),
    "dusk": ((34, 26, 20), (14, 12, 10)),
}
# Dark features drawn on a face (eyes, mouth): near-black, far from every colour.
FEATURE_COLOR = (24, 16, 16)
# Camera-pan texture amplitude around the background tone (low chroma, so the
# texture stays nearer the background than any object colour).
TEXTURE_AMPLITUDE = 18


def object_rgb(color: str, variant: str = "day") -> np.ndarray:
    """RGB (float32, 0..255) of an object colour in a variant."""
    if color not in OBJECT_COLORS:
        raise ValueError(f"unknown colour {color!r}; known: {', '.join(COLOR_NAMES)}")
    rgb = np.asarray(OBJECT_COLORS[color], dtype=np.float32)
    if variant == "night":
        return rgb * NIGHT_OBJECT_GAIN
    if variant != "day":
        raise ValueError(f"variant must be 'day' or 'night', got {variant!r}")
    return rgb


def backgrounds(variant: str) -> dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]]:
    if variant == "day":
        return DAY_BACKGROUNDS
    if variant == "night":
        return NIGHT_BACKGROUNDS
    raise ValueError(f"variant must be 'day' or 'night', got {variant!r}")


def color_prototypes() -> list[tuple[str, np.ndarray]]:
    """Every colour's day and night RGB, labelled by colour name."""
    out = []
    for name in COLOR_NAMES:
        out.append((name, object_rgb(name, "day")))
        out.append((name, object_rgb(name, "night")))
    return out


def background_prototypes() -> list[np.ndarray]:
    """Every background and floor tone (day and night) plus black (fades)."""
    tones = [np.zeros(3, np.float32), np.asarray(FEATURE_COLOR, np.float32)]
    for table in (DAY_BACKGROUNDS, NIGHT_BACKGROUNDS):
        for sky, floor in table.values():
            tones.append(np.asarray(sky, np.float32))
            tones.append(np.asarray(floor, np.float32))
    return tones
