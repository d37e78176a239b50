"""Pure grid and frame maths for whole-slide tiling (numpy only).

Naming follows the house frame prefixes: ``*_l0`` is level-0 pixels (the slide's
full-resolution frame), ``*_lv`` pixels of a pyramid level, ``*_m`` pixels of a
low-resolution tissue mask. Scales are always *per axis* and never rounded:
pyramids with downsamples such as 4.0003 x 4.0011 are common, and a mask whose
size is not an exact divisor of level 0 has different x and y scales.

Nothing here touches pixels on disk; :mod:`histohelper.server.tiling` does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

EdgeMode = Literal["pad", "drop"]

#: Relative slack when comparing float extents, so 1000.0000001 px still "fits" in 1000.
_EPS = 1e-6


def choose_level(
    level_downsamples: Sequence[tuple[float, float]],
    target_downsample_x: float,
    target_downsample_y: float,
    tolerance: float = 0.005,
) -> int:
    """Pick the coarsest pyramid level that is not coarser than the target.

    A level qualifies when on *both* axes its downsample is at most
    ``target * (1 + tolerance)``; the tolerance absorbs vendor rounding (a level
    reported at 4.0003 serves a target of 4 without a resize from level 0).
    Downsamples are compared as floats, never rounded to integers.

    Args:
        level_downsamples: per level ``(downsample_x, downsample_y)`` relative to
            level 0 (level-0 px per level px), level 0 first.
        target_downsample_x: wanted level-0 px per output px along x.
        target_downsample_y: wanted level-0 px per output px along y.
        tolerance: relative slack (dimensionless, >= 0).

    Returns:
        The level index; 0 when no coarser level qualifies (level 0 always does
        in effect: reading finer and downscaling is always possible).
    """
    best = 0
    best_ds = -math.inf
    for level, (ds_x, ds_y) in enumerate(level_downsamples):
        if ds_x <= target_downsample_x * (1 + tolerance) and ds_y <= target_downsample_y * (
            1 + tolerance
        ):
            ds = max(ds_x, ds_y)
            if ds > best_ds:
                best, best_ds = level, ds
    return best


def axis_cell_count(
    size_l0: float, footprint_l0: float, stride_l0: float, edge_mode: EdgeMode
) -> int:
    """Number of grid cells along one axis.

    Cell ``i`` starts at ``i * stride_l0``. In ``"pad"`` mode every cell that starts
    inside the slide and is needed to cover it is kept (the last one may overhang the
    edge; it is read white-padded). In ``"drop"`` mode only cells lying wholly inside
    the slide are counted. In both modes no cell starts at or past the edge, so the
    count is at most ``ceil(size_l0 / stride_l0)``: that bounds ``"pad"`` grids whose
    stride exceeds the footprint (the cell after the last one that starts inside
    would start outside) and ``"drop"`` grids of footprints within the float slack.

    Args:
        size_l0: slide extent along the axis (level-0 px).
        footprint_l0: cell extent along the axis (level-0 px, may be fractional).
        stride_l0: distance between cell origins (level-0 px, > 0).
        edge_mode: ``"pad"`` or ``"drop"``.

    Returns:
        The cell count (>= 0; ``"pad"`` gives >= 1 for a non-empty slide).
    """
    if size_l0 <= 0:
        return 0
    slack = _EPS * max(1.0, size_l0)
    # Origins i * stride_l0 < size_l0 - slack. Binds only on a "pad" stride longer
    # than the footprint or a "drop" footprint within 2 * slack.
    starts_inside = max(1, math.ceil((size_l0 - slack) / stride_l0))
    if edge_mode == "drop":
        if footprint_l0 > size_l0 + slack:
            return 0
        fitting = math.floor((size_l0 - footprint_l0 + slack) / stride_l0) + 1
        return min(fitting, starts_inside)
    if footprint_l0 >= size_l0 - slack:
        return 1
    covering = math.ceil((size_l0 - footprint_l0 - slack) / stride_l0) + 1
    return min(covering, starts_inside)


def integral_image(mask: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    """Summed-area table with a zero first row and column.

    Args:
        mask: ``[h, w]`` array (bool or numeric), any frame.

    Returns:
        ``[h + 1, w + 1]`` float64 with ``out[j, i] = mask[:j, :i].sum()``.
    """
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    np.cumsum(mask, axis=0, dtype=np.float64, out=out[1:, 1:])
    np.cumsum(out[1:, 1:], axis=1, out=out[1:, 1:])
    return out


def _integral_at(
    table: npt.NDArray[np.float64], x_m: npt.NDArray[np.float64], y_m: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Integral of the piecewise-constant image over ``[0, x) x [0, y)`` at float x, y.

    Bilinear interpolation of the summed-area table is exact for an image that is
    constant within each pixel. Coordinates are clamped to the image.
    """
    h, w = table.shape[0] - 1, table.shape[1] - 1
    x = np.clip(x_m, 0.0, float(w))
    y = np.clip(y_m, 0.0, float(h))
    x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
    y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
    fx = x - x0
    fy = y - y0
    x1 = np.minimum(x0 + 1, w)
    y1 = np.minimum(y0 + 1, h)
    top = table[y0, x0] * (1 - fx) + table[y0, x1] * fx
    bottom = table[y1, x0] * (1 - fx) + table[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def box_fractions(
    table: npt.NDArray[np.float64],
    scale_x: float,
    scale_y: float,
    x_l0: npt.ArrayLike,
    y_l0: npt.ArrayLike,
    width_l0: npt.ArrayLike,
    height_l0: npt.ArrayLike,
) -> npt.NDArray[np.float64]:
    """Mean of a mask over level-0 boxes, with exact fractional pixel coverage.

    Parts of a box outside the mask count as 0 (background), so an edge box that
    overhangs the slide gets the fraction of its *whole* area that is tissue (divide by
    :func:`in_slide_fractions` for the share of its in-slide area).

    Args:
        table: summed-area table of the mask (:func:`integral_image`).
        scale_x: level-0 px per mask px along x (per axis, not rounded).
        scale_y: level-0 px per mask px along y.
        x_l0: ``[N]`` box left edges, level-0 px (float).
        y_l0: ``[N]`` box top edges, level-0 px.
        width_l0: box widths, level-0 px (scalar or ``[N]``).
        height_l0: box heights, level-0 px.

    Returns:
        ``[N]`` float64 in [0, 1].
    """
    x0 = np.asarray(x_l0, dtype=np.float64) / scale_x
    y0 = np.asarray(y_l0, dtype=np.float64) / scale_y
    x1 = x0 + np.asarray(width_l0, dtype=np.float64) / scale_x
    y1 = y0 + np.asarray(height_l0, dtype=np.float64) / scale_y
    total = (
        _integral_at(table, x1, y1)
        - _integral_at(table, x0, y1)
        - _integral_at(table, x1, y0)
        + _integral_at(table, x0, y0)
    )
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        area = (x1 - x0) * (y1 - y0)  # may overflow to inf for absurd boxes: fraction 0
        frac = np.where(area > 0, total / area, 0.0)
    return np.clip(frac, 0.0, 1.0)


def in_slide_fractions(
    x_l0: npt.ArrayLike,
    y_l0: npt.ArrayLike,
    width_l0: npt.ArrayLike,
    height_l0: npt.ArrayLike,
    slide_width_l0: float,
    slide_height_l0: float,
) -> npt.NDArray[np.float64]:
    """Share of each level-0 box that lies inside the slide ``[0, W) x [0, H)``.

    Args:
        x_l0: ``[N]`` box left edges, level-0 px (float).
        y_l0: ``[N]`` box top edges, level-0 px.
        width_l0: box widths, level-0 px (scalar or ``[N]``, > 0).
        height_l0: box heights, level-0 px.
        slide_width_l0: slide width W, level-0 px.
        slide_height_l0: slide height H, level-0 px.

    Returns:
        ``[N]`` float64 in [0, 1] (0 for a box wholly outside or of no area).
    """
    x0 = np.asarray(x_l0, dtype=np.float64)
    y0 = np.asarray(y_l0, dtype=np.float64)
    w = np.broadcast_to(np.asarray(width_l0, dtype=np.float64), x0.shape)
    h = np.broadcast_to(np.asarray(height_l0, dtype=np.float64), y0.shape)
    ow = np.clip(np.minimum(x0 + w, slide_width_l0) - np.maximum(x0, 0.0), 0.0, None)
    oh = np.clip(np.minimum(y0 + h, slide_height_l0) - np.maximum(y0, 0.0), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where((w > 0) & (h > 0), (ow * oh) / (w * h), 0.0)
    return np.clip(share, 0.0, 1.0)


def level_read_size(footprint_l0: float, level_downsample: float) -> int:
    """Pixels to read at a level to cover a level-0 footprint (>= 1, rounded to nearest).

    Args:
        footprint_l0: extent in level-0 px (may be fractional).
        level_downsample: level-0 px per level px along the same axis (exact float).
    """
    return max(1, round(footprint_l0 / level_downsample))
