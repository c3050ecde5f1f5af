"""Anti-aliased numpy rasterisation of the world's shapes.

Pixel ``(row i, column j)`` has its centre at ``(x=j, y=i)``; a shape placed at
``(x, y)`` therefore has its area centroid at that pixel coordinate, which is what
the probes measure. Coverage is a box-filtered signed distance (``clip(0.5 - sdf)``),
which keeps centroids sub-pixel accurate so impacts can be timed within a frame.
"""

from __future__ import annotations

import numpy as np

SQRT3 = float(np.sqrt(3.0))


def shape_extent(shape: str, size_px: float) -> tuple[float, float]:
    """(half width, distance from centroid to bottom) of a shape of ``size_px``.

    ``size_px`` is the radius of a circle, the half side of a square and, for the
    upright equilateral triangle, two thirds of its height (centroid to apex is
    ``4/3 * size``, centroid to base ``2/3 * size``).
    """
    if shape == "circle" or shape == "square":
        return size_px, size_px
    if shape == "triangle":
        return 2.0 * size_px / SQRT3, 2.0 * size_px / 3.0
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, dx: np.ndarray, dy: np.ndarray, size_px: float) -> np.ndarray:
    """Fraction in [0, 1] of each pixel covered by ``shape`` centred at the origin.

    ``dx, dy``: pixel-centre offsets from the shape's centroid (broadcastable).
    """
    if shape == "circle":
        sdf = np.sqrt(dx * dx + dy * dy) - size_px
        return np.clip(0.5 - sdf, 0.0, 1.0)
    if shape == "square":
        # Separable box coverage is exact for an axis-aligned square.
        cx = np.clip(size_px + 0.5 - np.abs(dx), 0.0, 1.0)
        cy = np.clip(size_px + 0.5 - np.abs(dy), 0.0, 1.0)
        return cx * cy
    if shape == "triangle":
        height = 2.0 * size_px  # apex at -4/3 s, base at +2/3 s
        base_y = height / 3.0
        # Signed distances to the base and the two slanted edges (outward normals).
        d_base = dy - base_y
        # Edges through the apex (0, -2h/3) with normals (+-sin60, -cos60).
        apex_y = -2.0 * height / 3.0
        d_right = (np.abs(dx) * (SQRT3 / 2.0)) - (dy - apex_y) * 0.5
        sdf = np.maximum(d_base, d_right)
        return np.clip(0.5 - sdf, 0.0, 1.0)
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(
    image: np.ndarray,
    shape: str,
    x: float,
    y: float,
    size_px: float,
    rgb: np.ndarray,
) -> None:
    """Alpha-blend ``shape`` of colour ``rgb`` into ``image`` (H, W, 3) float32, in place."""
    h, w, _ = image.shape
    reach = 1.5 * size_px + 2.0
    x0, x1 = max(int(np.floor(x - reach)), 0), min(int(np.ceil(x + reach)) + 1, w)
    y0, y1 = max(int(np.floor(y - reach)), 0), min(int(np.ceil(y + reach)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(x)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(y)
    alpha = coverage(shape, dx, dy, size_px)[..., None]  # (h', w', 1)
    region = image[y0:y1, x0:x1]
    region *= 1.0 - alpha
    region += alpha * rgb


def draw_ellipse(
    image: np.ndarray, x: float, y: float, rx: float, ry: float, rgb: np.ndarray
) -> None:
    """Alpha-blend an axis-aligned ellipse (approximate distance) into ``image``."""
    if rx <= 0.0 or ry <= 0.0:
        return
    h, w, _ = image.shape
    x0, x1 = max(int(np.floor(x - rx - 2)), 0), min(int(np.ceil(x + rx + 2)) + 1, w)
    y0, y1 = max(int(np.floor(y - ry - 2)), 0), min(int(np.ceil(y + ry + 2)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(x)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(y)
    radius = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    # Scale the normalised radius back to pixels along the smaller axis.
    sdf = (radius - 1.0) * min(rx, ry)
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
    region = image[y0:y1, x0:x1]
    region *= 1.0 - alpha
    region += alpha * rgb


def backdrop(
    height: int, width: int, sky: tuple[int, int, int], floor: tuple[int, int, int], floor_y: int
) -> np.ndarray:
    """(H, W, 3) float32 background: ``sky`` above row ``floor_y``, ``floor`` from it down."""
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:floor_y] = np.asarray(sky, np.float32)
    image[floor_y:] = np.asarray(floor, np.float32)
    return image


def stripe_texture(
    rng: np.random.Generator, length: int, amplitude: float, min_width: int, max_width: int
) -> np.ndarray:
    """1-D (length,) float32 luminance offsets: random-width vertical bands, for pans."""
    out = np.empty(length, dtype=np.float32)
    pos = 0
    while pos < length:
        band = int(rng.integers(min_width, max_width + 1))
        out[pos : pos + band] = rng.uniform(-amplitude, amplitude)
        pos += band
    return out
