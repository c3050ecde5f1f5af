"""Per-frame object detection by colour segmentation.

Each pixel is labelled with the nearest prototype colour of the synthetic world
(every object colour in its day and night-dimmed form, plus every backdrop tone);
a pixel nearer a backdrop tone, or farther than ``MAX_COLOR_DISTANCE`` from every
object colour, is background. A 3x3 opening then removes the thin fringes that
4:2:0 chroma subsampling paints around objects.

The position of an object is a coverage-weighted centroid (see
``subpixel_centroid``), accurate to a few hundredths of a pixel after H.264, which
is what lets the tracks time impacts to a small fraction of a frame.

Connected components of one colour are objects. Shape class: the hole-filled
component is compared (intersection over union) with an ideal circle, square and
upright triangle of the same area and centroid; the best match wins. This is
robust to the ragged edges compression leaves, unlike a bare fill ratio.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from core.synth import palette, raster

MAX_COLOR_DISTANCE = 48.0
# The lookup table quantises each channel to 64 levels (4 RGB levels per bin).
LUT_SHIFT = 2
SHAPE_NAMES = palette.SHAPES
COLOR_NAMES = palette.COLOR_NAMES
BACKGROUND = -1
_SQUARE3 = np.ones((3, 3), dtype=bool)


@functools.lru_cache(maxsize=1)
def color_lut() -> np.ndarray:
    """(64, 64, 64) int8: colour index per quantised RGB, or BACKGROUND."""
    levels = (np.arange(256 >> LUT_SHIFT, dtype=np.float32) + 0.5) * (1 << LUT_SHIFT)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    protos = palette.color_prototypes()
    object_rgb = np.stack([rgb for _, rgb in protos])  # (P, 3)
    object_index = np.array([COLOR_NAMES.index(name) for name, _ in protos])
    backdrop_rgb = np.stack(palette.background_prototypes())  # (B, 3)
    d_obj = np.sqrt(((grid[:, None, :] - object_rgb[None, :, :]) ** 2).sum(-1))  # (G, P)
    d_bg = np.sqrt(((grid[:, None, :] - backdrop_rgb[None, :, :]) ** 2).sum(-1).min(axis=1))
    nearest = d_obj.argmin(axis=1)
    best = d_obj[np.arange(grid.shape[0]), nearest]
    labels = np.where(
        (best <= MAX_COLOR_DISTANCE) & (best < d_bg), object_index[nearest], BACKGROUND
    )
    n = 256 >> LUT_SHIFT
    return labels.astype(np.int8).reshape(n, n, n)


def label_pixels(frame: np.ndarray) -> np.ndarray:
    """(H, W) int8 colour index of each pixel of an (H, W, 3) uint8 frame; -1 = background."""
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 frame, got {frame.shape} {frame.dtype}")
    bits = 8 - LUT_SHIFT
    q = (frame >> LUT_SHIFT).astype(np.int32)
    flat = (q[..., 0] << (2 * bits)) | (q[..., 1] << bits) | q[..., 2]
    return np.take(color_lut().ravel(), flat)


def _size_for_area(shape: str, area: float) -> float:
    """The ``size_px`` (see ``core.synth.raster.shape_extent``) of a shape of ``area``."""
    if shape == "circle":
        return float(np.sqrt(area / np.pi))
    if shape == "square":
        return float(np.sqrt(area) / 2.0)
    return float(np.sqrt(area * np.sqrt(3.0) / 4.0))  # upright equilateral triangle


def classify_shape(mask: np.ndarray, cx: float, cy: float) -> tuple[str, float]:
    """(shape, IoU) of the best ideal shape for a filled mask; ``cx, cy`` in mask coordinates."""
    area = float(mask.sum())
    pad = 0.5 * max(mask.shape) + 2
    h, w = mask.shape
    ys = np.arange(-int(pad), h + int(pad), dtype=np.float32)
    xs = np.arange(-int(pad), w + int(pad), dtype=np.float32)
    padded = np.zeros((ys.size, xs.size), dtype=bool)
    padded[int(pad) : int(pad) + h, int(pad) : int(pad) + w] = mask
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    best, best_iou = "circle", -1.0
    for shape in SHAPE_NAMES:
        template = raster.coverage(shape, dx, dy, _size_for_area(shape, area)) >= 0.5
        inter = np.count_nonzero(template & padded)
        union = np.count_nonzero(template | padded)
        iou = inter / union if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, float(best_iou)


def subpixel_centroid(
    frame: np.ndarray,
    labels: np.ndarray,
    filled: np.ndarray,
    origin: tuple[int, int],
    color_index: int,
) -> tuple[float, float]:
    """Coverage-weighted centroid of one object, in frame pixel coordinates.

    A thresholded mask moves in whole pixels, and H.264 quantises alternate frames
    differently, so its centroid jitters by up to a pixel. Here every pixel within
    2 px of the object gets a coverage estimate: its colour projected onto the line
    from the local backdrop colour (median of a ring 3-4 px out) to the object's
    own colour (median of its interior); the interior counts fully. Pixels of other
    objects are left out so two bodies in contact do not pull on each other.
    """
    oy, ox = origin
    h, w = labels.shape
    bh, bw = filled.shape
    pad = 4
    y0, x0 = max(oy - pad, 0), max(ox - pad, 0)
    y1, x1 = min(oy + bh + pad, h), min(ox + bw + pad, w)
    comp = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    comp[oy - y0 : oy - y0 + bh, ox - x0 : ox - x0 + bw] = filled
    region = frame[y0:y1, x0:x1].astype(np.float32)
    region_labels = labels[y0:y1, x0:x1]
    interior = ndimage.binary_erosion(comp)
    if not interior.any():
        interior = comp
    near = ndimage.binary_dilation(comp, iterations=2)
    ring = ndimage.binary_dilation(comp, iterations=4) & ~near & (region_labels == BACKGROUND)
    others = (region_labels != BACKGROUND) & (region_labels != color_index)
    ys, xs = np.nonzero(comp)
    if not ring.any():
        return float(xs.mean() + x0), float(ys.mean() + y0)
    obj = np.median(region[interior], axis=0)
    back = np.median(region[ring], axis=0)
    axis = obj - back
    norm = float(axis @ axis)
    if norm < 400.0:  # object barely differs from its surroundings
        return float(xs.mean() + x0), float(ys.mean() + y0)
    weight = np.clip(((region - back) @ axis) / norm, 0.0, 1.0)
    weight[~near | others] = 0.0
    weight[interior] = 1.0
    total = float(weight.sum())
    gy, gx = np.mgrid[y0:y1, x0:x1]
    return float((weight * gx).sum() / total), float((weight * gy).sum() / total)


MIN_OBJECT_AREA = 24  # pixels, at a short side of MIN_AREA_FULL_SIDE_PX or more
MIN_AREA_FULL_SIDE_PX = 128
MIN_OBJECT_AREA_FLOOR = 12


def min_object_area(side_px: int) -> int:
    """Smallest component counted as an object in frames whose short side is ``side_px``.

    The 24-pixel default drops compression specks at 128 px and up. Below that the
    world's balls shrink with the frame: at 64 px, 13% of the detections of its own
    clips' balls are 16-23 pixels, which the default would miss. So the minimum
    scales with the side, down to 12 pixels (a 3x3 opening already removes anything
    smaller than 9).
    """
    scaled = round(MIN_OBJECT_AREA * min(side_px, MIN_AREA_FULL_SIDE_PX) / MIN_AREA_FULL_SIDE_PX)
    return max(MIN_OBJECT_AREA_FLOOR, scaled)


def object_pixels(component: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """One colour's connected component (a bool crop) -> the object the probes count in
    it: ``opened`` (3 x 3 opening, its largest piece) and ``filled`` (that with its holes
    filled), or ``None`` when the opening leaves nothing."""
    # Opening drops the 1-2 px fringes that 4:2:0 chroma bleed paints around an object
    # in a dimmed version of its hue: a fringe ring vanishes (it would otherwise enclose
    # the object once holes are filled).
    opened = ndimage.binary_opening(np.pad(component, 1), structure=_SQUARE3)[1:-1, 1:-1]
    if not opened.any():
        return None
    pieces, num_pieces = ndimage.label(opened)
    if num_pieces > 1:
        keep = np.argmax(np.bincount(pieces.ravel())[1:]) + 1
        opened = pieces == keep
    return opened, ndimage.binary_fill_holes(opened)


def detect_objects(frame: np.ndarray, min_area: int = MIN_OBJECT_AREA) -> list[dict]:
    """Objects in one frame: ``{"color", "shape", "x", "y", "area", "bbox", "fill", "shape_iou", "touches_edge", "lower_hole_px"}``.

    ``x, y`` is the centroid in pixel coordinates (pixel centres at integers),
    ``bbox`` is ``[x0, y0, x1, y1]`` inclusive. Components smaller than ``min_area``
    pixels (compression specks) are ignored.
    """
    labels = label_pixels(frame)
    h, w = labels.shape
    counts = np.bincount(labels.ravel().astype(np.int64) + 1, minlength=len(COLOR_NAMES) + 1)
    found: list[dict] = []
    for color_index in np.nonzero(counts[1:] >= min_area)[0]:
        components, count = ndimage.label(labels == color_index)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        for comp_id, sl in enumerate(ndimage.find_objects(components), start=1):
            if sl is None or sizes[comp_id] < min_area:
                continue
            cleaned = object_pixels(components[sl] == comp_id)
            if cleaned is None:
                continue
            opened, filled = cleaned
            area = int(filled.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(filled)
            y0, x0 = sl[0].start, sl[1].start
            bh, bw = filled.shape
            shape, match = classify_shape(filled, float(xs.mean()), float(ys.mean()))
            cx, cy = subpixel_centroid(frame, labels, filled, (y0, x0), int(color_index))
            # Holes below the centroid: for the talking avatar's face, its open mouth.
            holes = filled & ~opened
            lower_holes = int(holes[int(np.floor(ys.mean())) + 1 :].sum())
            found.append(
                {
                    "color": COLOR_NAMES[int(color_index)],
                    "shape": shape,
                    "shape_iou": round(match, 4),
                    "x": cx,
                    "y": cy,
                    "area": area,
                    "bbox": [int(x0), int(y0), int(x0 + bw - 1), int(y0 + bh - 1)],
                    "fill": round(area / float(bh * bw), 4),
                    "touches_edge": bool(x0 == 0 or y0 == 0 or x0 + bw == w or y0 + bh == h),
                    "lower_hole_px": lower_holes,
                }
            )
    found.sort(key=lambda d: (d["x"], d["y"]))
    return found
