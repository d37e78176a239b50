"""Plan a slide's tiling: resolve resolution, build the mask, lay out the patch grid.

Every coordinate in the result is in level-0 px (float where the footprint is
fractional: a 0.5 um/px target on a 0.2456 um/px slide gives 455.94 px footprints).
Patch origins are computed from grid indices (``col * stride_x_l0``), never by
accumulating rounded steps, so overlays and heatmaps do not drift towards the far
corner.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.errors import InvalidOptionsError, SlideTooLargeError, UnsupportedSlideError
from histohelper.geometry import (
    axis_cell_count,
    box_fractions,
    choose_level,
    in_slide_fractions,
    level_read_size,
)

from .mask import INK_COLORS, TissueMask, compute_tissue_mask, read_low_res
from .options import TilingOptions
from .roi import region_raster
from .slide import MAX_REGION_PX, Slide, SlideMetadata

logger = logging.getLogger(__name__)

MppSource = Literal["metadata", "override", "objective_power", "assumed"]
THUMBNAIL_MAX_SIDE_PX = 1024
#: Grids with more cells than this (kept or not) are refused before any work.
MAX_GRID_CELLS = 50_000_000
#: Target downsamples (level-0 px per output px) accepted. Below 1/16 a patch would
#: be upsampled more than 16x from level 0; above 2**20 one patch would span more
#: level-0 px than any slide has. Both mean a mistaken target or mpp.
DOWNSAMPLE_RANGE = (1.0 / 16.0, float(2**20))
#: Most tissue pixels a plan keeps for per-slide fits (:attr:`TilingPlan.tissue_rgb`).
MAX_TISSUE_SAMPLE = 262_144


@dataclass(frozen=True)
class PatchGrid:
    """The kept patches of a slide as compact parallel arrays (length N, row-major).

    Attributes:
        row: ``[N]`` int32 grid row.
        col: ``[N]`` int32 grid column.
        x_l0: ``[N]`` float64 left edge, level-0 px (``col * stride_x_l0``).
        y_l0: ``[N]`` float64 top edge, level-0 px.
        width_l0: ``[N]`` float64 exact footprint width, level-0 px (may be fractional).
        height_l0: ``[N]`` float64 footprint height, level-0 px.
        tissue_fraction: ``[N]`` float32 tissue share of the footprint's part inside
            the slide (0..1): for a cell wholly inside, of the whole footprint; for an
            edge cell (``is_edge``, pad mode) of its in-slide area, so the white
            padding neither counts as tissue nor dilutes it (:func:`in_slide_share`).
        is_edge: ``[N]`` bool, footprint overhangs the slide (read white-padded).
        ink_fraction: ``[N]`` float32 share of the footprint (in-slide part, as
            ``tissue_fraction``) covered by marker ink of any colour.
        n_rows: full grid rows, including cells not kept.
        n_cols: full grid columns.
        level: pyramid level patches are read from.
        level_downsample_x: exact per-axis downsample of ``level``.
        level_downsample_y: as above, y.
        read_width_px: region width read at ``level`` (before resizing).
        read_height_px: region height read at ``level``.
        patch_size_px: output patch side (px at the target resolution).
        stride_x_l0: distance between column origins, level-0 px.
        stride_y_l0: distance between row origins, level-0 px.
        effective_mpp: um/px of the output patches.
        footprint_x_l0: patch footprint width, level-0 px (also for an empty grid).
        footprint_y_l0: patch footprint height, level-0 px.
        ink_by_color: ``[N, 3]`` float32 share of the footprint (as ``ink_fraction``)
            covered by each colour of :data:`~.mask.INK_COLORS` (green_blue, black,
            red), in that column order.
    """

    row: npt.NDArray[np.int32]
    col: npt.NDArray[np.int32]
    x_l0: npt.NDArray[np.float64]
    y_l0: npt.NDArray[np.float64]
    width_l0: npt.NDArray[np.float64]
    height_l0: npt.NDArray[np.float64]
    tissue_fraction: npt.NDArray[np.float32]
    is_edge: npt.NDArray[np.bool_]
    ink_fraction: npt.NDArray[np.float32]
    n_rows: int
    n_cols: int
    level: int
    level_downsample_x: float
    level_downsample_y: float
    read_width_px: int
    read_height_px: int
    patch_size_px: int
    stride_x_l0: float
    stride_y_l0: float
    effective_mpp: float
    footprint_x_l0: float = 0.0
    footprint_y_l0: float = 0.0
    ink_by_color: npt.NDArray[np.float32] = field(
        default_factory=lambda: np.zeros((0, len(INK_COLORS)), np.float32)
    )

    def __len__(self) -> int:
        return int(self.row.shape[0])


#: A kept patch counts as inked when more than this share of it is marker ink.
INKED_PATCH_SHARE = 0.25


@dataclass(frozen=True)
class InkFigure:
    """Marker ink of one colour (``QualityControl.ink``).

    Attributes:
        color: ``"green_blue"``, ``"black"`` or ``"red"``.
        slide_fraction: share of the slide's area covered by this ink (0..1).
        inked_patch_count: kept patches more than 25 % covered by this ink.
    """

    color: str
    slide_fraction: float
    inked_patch_count: int


@dataclass(frozen=True)
class TilingPlan:
    """Everything needed to read a slide's patches, plus QC for the caller.

    Attributes:
        metadata: the slide's :class:`SlideMetadata`.
        mask: the :class:`TissueMask`.
        grid: the :class:`PatchGrid` of kept patches.
        thumbnail: ``[h, w, 3]`` uint8 RGB, longest side <= 1024, composited on white.
        thumbnail_scale_x: level-0 px per thumbnail px along x.
        thumbnail_scale_y: level-0 px per thumbnail px along y.
        effective_mpp: um/px of the output patches.
        mpp_source: where level-0 mpp came from.
        mpp_x: level-0 um/px used along x.
        mpp_y: level-0 um/px used along y.
        warnings: human-readable notes (missing metadata, ink, no tissue, ...).
        no_tissue: True when no patch was kept (an outcome, not an error).
        tiling_seconds: wall time of :func:`plan_tiling` (s).
        tissue_rgb: ``[N, 3]`` uint8 RGB of the low-resolution image's tissue pixels
            (an even subsample of at most :data:`MAX_TISSUE_SAMPLE`), for fitting
            per-slide statistics such as stain normalisation (:mod:`.stain`).
        roi_excluded_patch_count: patches that pass ``min_tissue_fraction`` on the
            whole slide but not inside ``options.roi`` (0 without a region).
        region: ``[h, w]`` bool, the region of interest on the tissue mask's pixel
            grid (centre rule, :func:`.roi.region_raster`), or None without a region.
        ink: marker ink per colour (:class:`InkFigure`, :func:`ink_figures`).
        faint_tissue: the tissue was found only by the faint-tissue pass.
    """

    metadata: SlideMetadata
    mask: TissueMask
    grid: PatchGrid
    thumbnail: npt.NDArray[np.uint8]
    thumbnail_scale_x: float
    thumbnail_scale_y: float
    effective_mpp: float
    mpp_source: MppSource
    mpp_x: float
    mpp_y: float
    warnings: tuple[str, ...]
    no_tissue: bool
    tiling_seconds: float
    tissue_rgb: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros((0, 3), np.uint8))
    roi_excluded_patch_count: int = 0
    region: npt.NDArray[np.bool_] | None = None

    @property
    def ink(self) -> tuple[InkFigure, ...]:
        """Marker ink per colour (green_blue, black, red), see :func:`ink_figures`."""
        return ink_figures(self.mask, self.grid)

    @property
    def faint_tissue(self) -> bool:
        """The tissue was found only by the faint-tissue pass (``mask.faint``)."""
        return self.mask.faint


def resolve_mpp(
    md: SlideMetadata, options: TilingOptions
) -> tuple[float, float, MppSource, list[str]]:
    """Level-0 um/px per axis, with its source and any warnings.

    Order: ``options.mpp_override``; metadata mpp; objective power (mpp = 10 /
    power, the usual 10x ~ 1 um/px convention); else level 0 is taken at face value
    (assumed to be at the target resolution, or at 10 / magnification).

    Returns:
        ``(mpp_x, mpp_y, source, warnings)``.
    """
    if options.mpp_override is not None:
        return options.mpp_override, options.mpp_override, "override", []
    if md.mpp_x is not None and md.mpp_y is not None:
        return md.mpp_x, md.mpp_y, "metadata", []
    if md.objective_power is not None:
        mpp = 10.0 / md.objective_power
        return (
            mpp,
            mpp,
            "objective_power",
            [
                f"slide has no mpp metadata; derived {mpp:.4g} um/px from objective power "
                f"{md.objective_power:g}x (mpp = 10 / power)"
            ],
        )
    t = options.target
    mpp = t.value if t.unit == "mpp" else (10.0 / t.value if t.unit == "magnification" else 1.0)
    note = (
        "slide has no mpp or objective-power metadata; level 0 taken at face value "
        f"(assumed {mpp:.4g} um/px): patch physical size and areas are uncertain"
    )
    return mpp, mpp, "assumed", [note]


def target_downsample(
    md: SlideMetadata, options: TilingOptions, mpp_x: float, mpp_y: float, source: MppSource
) -> tuple[float, float, int | None]:
    """Level-0 px per output px along x and y, and a forced level (unit ``"level"``).

    Raises:
        InvalidOptionsError: a level target beyond the pyramid.
    """
    t = options.target
    if t.unit == "level":
        level = int(t.value)
        if level >= md.level_count:
            raise InvalidOptionsError(
                f"target level {level} does not exist (the slide has {md.level_count})"
            )
        ds_x, ds_y = md.level_downsamples[level]
        return ds_x, ds_y, level
    if t.unit == "magnification":
        if md.objective_power is not None and options.mpp_override is None:
            d = md.objective_power / t.value
            return d, d, None
        target_mpp = 10.0 / t.value
    else:
        target_mpp = t.value
    return target_mpp / mpp_x, target_mpp / mpp_y, None


def mask_integral(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """Summed-area table of a bool mask, as :func:`histohelper.geometry.integral_image`.

    OpenCV's ``cv2.integral`` (float64 sums, exact for counts below 2**53), faster than
    the numpy cumsums (figures in benchmarks/RESULTS.md).

    Args:
        mask: ``[h, w]`` bool, mask frame.

    Returns:
        ``[h + 1, w + 1]`` float64 with ``out[j, i] = mask[:j, :i].sum()``.
    """
    return np.asarray(
        cv2.integral(np.ascontiguousarray(mask).view(np.uint8), sdepth=cv2.CV_64F),
        dtype=np.float64,
    )


def build_grid(
    md: SlideMetadata,
    mask: TissueMask,
    options: TilingOptions,
    ds_x: float,
    ds_y: float,
    level: int,
    effective_mpp: float,
    touch: npt.NDArray[np.bool_] | None = None,
) -> PatchGrid:
    """Lay out the patch grid and keep cells with enough tissue.

    Args:
        md: slide metadata (level-0 size, level downsamples).
        mask: tissue mask with per-axis scales.
        options: patch size, stride, min tissue fraction, edge mode.
        ds_x: level-0 px per output px along x (target downsample).
        ds_y: as above, y.
        level: pyramid level to read from.
        effective_mpp: um/px of output patches (recorded on the grid).
        touch: ``[h, w]`` bool on the mask's pixel grid, or None: keep only cells whose
            footprint holds at least one True pixel (a region the patches must touch).

    Returns:
        :class:`PatchGrid`.

    Raises:
        SlideTooLargeError: the grid exceeds :data:`MAX_GRID_CELLS` cells (so each
            of ``n_rows`` and ``n_cols`` is at most that, well inside int32) or
            ``options.max_patches`` kept patches. A grid with no cell along one axis
            is empty (``n_rows == n_cols == 0``), not an error.
    """
    size = options.patch_size_px
    n_rows, n_cols, fw, fh, sx, sy = _grid_shape(md, options, ds_x, ds_y)
    # Both counts are now 0, or both >= 1: so this also keeps each one at most
    # MAX_GRID_CELLS (they go out as int32).
    if n_rows * n_cols > MAX_GRID_CELLS:
        raise SlideTooLargeError(
            f"the patch grid would have {n_rows} x {n_cols} cells (limit {MAX_GRID_CELLS})"
        )
    lds_x, lds_y = md.level_downsamples[level]
    read_w, read_h = level_read_size(fw, lds_x), level_read_size(fh, lds_y)
    if read_w * read_h > MAX_REGION_PX:
        raise InvalidOptionsError(
            f"each patch would need a {read_w} x {read_h} px read at level {level}: the "
            "target resolution is too coarse for this slide and patch size"
        )
    ink_table = mask_integral(mask.ink) if mask.ink is not None and mask.ink.any() else None
    keep_r: list[npt.NDArray[np.int64]] = []
    keep_c: list[npt.NDArray[np.int64]] = []
    keep_f: list[npt.NDArray[np.float64]] = []
    kept = 0
    cells = _kept_cells(md, mask, options, n_rows, n_cols, fw, fh, sx, sy, touch)
    for rr, cc, ff in cells:
        kept += len(rr)
        if kept > options.max_patches:
            raise SlideTooLargeError(
                f"more than {options.max_patches} patches would be kept",
                limit=str(options.max_patches),
            )
        keep_r.append(rr)
        keep_c.append(cc)
        keep_f.append(ff)
    row = np.concatenate(keep_r) if keep_r else np.zeros(0, np.int64)
    col = np.concatenate(keep_c) if keep_c else np.zeros(0, np.int64)
    frac = np.concatenate(keep_f) if keep_f else np.zeros(0, np.float64)
    x_l0 = col * sx
    y_l0 = row * sy
    n = row.shape[0]
    slack = 1e-6
    is_edge = (x_l0 + fw > md.width_l0 + slack) | (y_l0 + fh > md.height_l0 + slack)
    if ink_table is not None and n:
        ink = box_fractions(ink_table, mask.scale_x, mask.scale_y, x_l0, y_l0, fw, fh)
        ink = in_slide_share(ink, x_l0, y_l0, fw, fh, md)
    else:
        ink = np.zeros(n)
    ink_by_color = np.zeros((n, len(INK_COLORS)), np.float32)
    for j, color in enumerate(INK_COLORS):
        m = mask.ink_by_color.get(color)
        if m is not None and n and m.any():
            share = box_fractions(mask_integral(m), mask.scale_x, mask.scale_y, x_l0, y_l0, fw, fh)
            ink_by_color[:, j] = in_slide_share(share, x_l0, y_l0, fw, fh, md)
    return PatchGrid(
        row=row.astype(np.int32),
        col=col.astype(np.int32),
        x_l0=x_l0.astype(np.float64),
        y_l0=y_l0.astype(np.float64),
        width_l0=np.full(n, fw, dtype=np.float64),
        height_l0=np.full(n, fh, dtype=np.float64),
        tissue_fraction=frac.astype(np.float32),
        is_edge=is_edge,
        ink_fraction=ink.astype(np.float32),
        n_rows=n_rows,
        n_cols=n_cols,
        level=level,
        level_downsample_x=lds_x,
        level_downsample_y=lds_y,
        read_width_px=read_w,
        read_height_px=read_h,
        patch_size_px=size,
        stride_x_l0=sx,
        stride_y_l0=sy,
        effective_mpp=effective_mpp,
        footprint_x_l0=fw,
        footprint_y_l0=fh,
        ink_by_color=ink_by_color,
    )


def in_slide_share(
    fraction: npt.NDArray[np.float64],
    x_l0: npt.NDArray[np.floating],
    y_l0: npt.NDArray[np.floating],
    width_l0: float,
    height_l0: float,
    md: SlideMetadata,
) -> npt.NDArray[np.float64]:
    """Mask shares of whole footprints turned into shares of their in-slide area.

    A pad-mode edge cell overhangs the slide; :func:`~histohelper.geometry.box_fractions`
    counts its padding as background, so a cell 87 % tissue inside the slide scored
    its in-slide share times that (0.40 with 104 of 224 px inside). Edge cells (those
    overhanging by more than 1e-6 px, as ``PatchGrid.is_edge``) get
    ``fraction / in-slide share`` (capped at 1); every other cell keeps its value
    bit for bit.

    Args:
        fraction: ``[N]`` share of each whole footprint (0..1).
        x_l0: ``[N]`` footprint left edges, level-0 px.
        y_l0: ``[N]`` footprint top edges, level-0 px.
        width_l0: footprint width, level-0 px.
        height_l0: footprint height, level-0 px.
        md: the slide's metadata (its level-0 size).

    Returns:
        ``[N]`` float64 in [0, 1].
    """
    slack = 1e-6
    edge = (x_l0 + width_l0 > md.width_l0 + slack) | (y_l0 + height_l0 > md.height_l0 + slack)
    if not edge.any():
        return fraction
    inside = in_slide_fractions(x_l0, y_l0, width_l0, height_l0, md.width_l0, md.height_l0)
    safe = np.where(inside > 0, inside, 1.0)
    return np.where(edge & (inside > 0), np.minimum(fraction / safe, 1.0), fraction)


#: Grid cells whose tissue fraction one chunk of :func:`_kept_cells` computes at once
#: (about 60 MB of temporaries), so no pass over the grid holds more than that.
CELLS_PER_CHUNK = 1_000_000


def _grid_shape(
    md: SlideMetadata, options: TilingOptions, ds_x: float, ds_y: float
) -> tuple[int, int, float, float, float, float]:
    """(n_rows, n_cols, footprint_x_l0, footprint_y_l0, stride_x_l0, stride_y_l0) of
    the grid :func:`build_grid` lays out (0 x 0 when no cell fits along one axis)."""
    size = options.patch_size_px
    stride = options.effective_stride_px
    fw, fh = size * ds_x, size * ds_y
    sx, sy = stride * ds_x, stride * ds_y
    n_cols = axis_cell_count(md.width_l0, fw, sx, options.edge_mode)
    n_rows = axis_cell_count(md.height_l0, fh, sy, options.edge_mode)
    if n_rows == 0 or n_cols == 0:
        # No cell fits along one axis ("drop" mode, a slide narrower than one
        # footprint): the grid is empty, however many cells the other axis holds.
        n_rows = n_cols = 0
    return n_rows, n_cols, fw, fh, sx, sy


def _kept_cells(
    md: SlideMetadata,
    mask: TissueMask,
    options: TilingOptions,
    n_rows: int,
    n_cols: int,
    fw: float,
    fh: float,
    sx: float,
    sy: float,
    touch: npt.NDArray[np.bool_] | None = None,
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """The cells :func:`build_grid` keeps, streamed in row-major chunks of at most
    :data:`CELLS_PER_CHUNK` cells: per chunk ``(row [k], col [k], tissue fraction
    [k])`` of its kept cells. The one place the keep rule is computed."""
    table = mask_integral(mask.mask)
    touch_table = mask_integral(touch) if touch is not None else None
    cols = np.arange(n_cols, dtype=np.int64)
    x_all = cols * sx
    rows_per_chunk = max(1, CELLS_PER_CHUNK // max(1, n_cols))
    for r0 in range(0, n_rows, rows_per_chunk):
        rows = np.arange(r0, min(n_rows, r0 + rows_per_chunk), dtype=np.int64)
        rr = np.repeat(rows, n_cols)
        cc = np.tile(cols, rows.shape[0])
        frac = box_fractions(table, mask.scale_x, mask.scale_y, x_all[cc], rr * sy, fw, fh)
        frac = in_slide_share(frac, x_all[cc], rr * sy, fw, fh, md)
        sel = frac >= options.min_tissue_fraction
        if options.min_tissue_fraction > 0:
            sel &= frac > 0
        if touch_table is not None:
            x, y = x_all[cc[sel]], rr[sel] * sy
            hit = box_fractions(touch_table, mask.scale_x, mask.scale_y, x, y, fw, fh) > 0
            sel[sel] = hit
        yield rr[sel], cc[sel], frac[sel]


def count_kept_patches(
    md: SlideMetadata,
    mask: TissueMask,
    options: TilingOptions,
    ds_x: float,
    ds_y: float,
) -> int:
    """How many patches :func:`build_grid` would keep, without building the grid.

    The same keep rule, streamed (:func:`_kept_cells`): memory is bounded by one chunk
    of :data:`CELLS_PER_CHUNK` cells, however many patches are kept, and no patch
    limit applies (``options.max_patches`` is ignored). With ``min_tissue_fraction``
    0 every cell passes (fractions are never negative): the count is the grid's size.

    Args:
        md, mask, options, ds_x, ds_y: as :func:`build_grid`.

    Returns:
        The number of kept patches, ``len(build_grid(...))`` for an unlimited
        ``max_patches``.

    Raises:
        SlideTooLargeError: the grid exceeds :data:`MAX_GRID_CELLS` cells.
    """
    n_rows, n_cols, fw, fh, sx, sy = _grid_shape(md, options, ds_x, ds_y)
    if n_rows * n_cols > MAX_GRID_CELLS:
        raise SlideTooLargeError(
            f"the patch grid would have {n_rows} x {n_cols} cells (limit {MAX_GRID_CELLS})"
        )
    if options.min_tissue_fraction <= 0:
        return n_rows * n_cols
    return sum(
        len(rr) for rr, _, _ in _kept_cells(md, mask, options, n_rows, n_cols, fw, fh, sx, sy)
    )


def build_region_grid(
    md: SlideMetadata,
    mask: TissueMask,
    options: TilingOptions,
    ds_x: float,
    ds_y: float,
    level: int,
    effective_mpp: float,
    warnings: list[str],
) -> tuple[PatchGrid, npt.NDArray[np.bool_] | None, int]:
    """:func:`build_grid` restricted to ``options.roi``, and what the region removed.

    Without a region this is :func:`build_grid`. With one, in three steps:

    1. the region is rasterised on the tissue mask's pixel grid (a mask pixel is inside
       when its centre is, :func:`.roi.region_raster`);
    2. :func:`build_grid` runs on ``tissue AND region``: a patch is kept when its tissue
       fraction *inside the region* (by :func:`build_grid`'s own fraction rule, the
       share of the footprint) passes ``min_tissue_fraction``; with a threshold of 0
       a patch must at least touch the region (some inside mask pixel in its
       footprint);
    3. the patches :func:`build_grid` would keep on the tissue alone are counted
       (:func:`count_kept_patches`: streamed, no grid built, no kept-patch limit) to
       tell how many the region removed (a patch kept inside the region is kept
       without it).

    Args:
        md, mask, options, ds_x, ds_y, level, effective_mpp: as :func:`build_grid`.
        warnings: QC warnings, extended in place with the region's notes.

    Returns:
        ``(grid, region raster [h, w] bool or None, patches removed by the region)``.

    Raises:
        InvalidOptionsError: the region lies wholly outside the slide, or as
            :func:`build_grid`.
        SlideTooLargeError: as :func:`build_grid` (for the patches inside the region).
    """
    roi = options.roi
    if roi is None:
        return build_grid(md, mask, options, ds_x, ds_y, level, effective_mpp), None, 0
    region, notes = region_raster(
        roi, mask.mask.shape, mask.scale_x, mask.scale_y, md.width_l0, md.height_l0
    )
    warnings += [*roi.notes, *notes]
    grid = build_grid(
        md, replace(mask, mask=mask.mask & region), options, ds_x, ds_y, level, effective_mpp,
        # With a threshold of 0 every cell passes: keep those touching the region as the
        # grid is built, so a huge grid is never laid out whole.
        touch=region if options.min_tissue_fraction <= 0 else None,
    )  # fmt: skip
    # Counted, not built: the whole grid may hold far more patches than the region.
    removed = max(0, count_kept_patches(md, mask, options, ds_x, ds_y) - len(grid))
    if removed or not len(grid):
        warnings.append(
            f"region of interest: {len(grid)} patches kept inside it, {removed} patches with "
            "enough tissue outside it left out"
        )
    return grid, region, removed


def _thumbnail(
    rgb: npt.NDArray[np.uint8], scale_x: float, scale_y: float, md: SlideMetadata
) -> tuple[npt.NDArray[np.uint8], float, float]:
    """Crop the low-res image to the slide and shrink it to <= 1024 px."""
    cw = max(1, min(rgb.shape[1], math.ceil(md.width_l0 / scale_x - 1e-9)))
    ch = max(1, min(rgb.shape[0], math.ceil(md.height_l0 / scale_y - 1e-9)))
    img = rgb[:ch, :cw]
    f = THUMBNAIL_MAX_SIDE_PX / max(cw, ch)
    if f < 1:
        tw, th = max(1, round(cw * f)), max(1, round(ch * f))
        img = np.asarray(cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA), np.uint8)
    else:
        img = np.ascontiguousarray(img)
    return img, scale_x * cw / img.shape[1], scale_y * ch / img.shape[0]


def _mask_read_options(
    md: SlideMetadata, options: TilingOptions, mpp_x: float, mpp_y: float
) -> TilingOptions:
    """``options`` with the mask side capped by ``mask_min_um_per_px`` (see there)."""
    if options.mask_min_um_per_px <= 0:
        return options
    side_um = max(md.width_l0 * mpp_x, md.height_l0 * mpp_y)
    side_px = max(16, math.ceil(side_um / options.mask_min_um_per_px))
    if side_px >= options.mask_target_side_px:
        return options
    return replace(options, mask_target_side_px=side_px)


def plan_tiling(
    slide: Slide, options: TilingOptions, stop: threading.Event | None = None
) -> TilingPlan:
    """Tissue mask and patch grid of an open slide.

    Steps: resolve level-0 mpp (:func:`resolve_mpp`), read a low-resolution image
    with bounded memory and segment tissue (:mod:`.mask`), choose the read level
    (coarsest not coarser than the target, small tolerance, per axis), lay out the
    grid in level-0 px and keep cells whose tissue fraction reaches
    ``options.min_tissue_fraction``.

    Args:
        slide: an open :class:`Slide`.
        options: :class:`TilingOptions`.
        stop: when set, the low-resolution read ends (checked between its blocks).

    Returns:
        :class:`TilingPlan`; ``no_tissue`` is True (and the grid empty) when no
        patch qualifies. Never raises for missing metadata.

    Raises:
        CorruptSlideError: the low-resolution image could not be decoded.
        SlideTooLargeError: the grid exceeds a limit.
        InvalidOptionsError: a level target beyond the pyramid, or a target
            downsample outside :data:`DOWNSAMPLE_RANGE`.
        AnalysisCancelledError: ``stop`` was set.
    """
    t0 = time.perf_counter()
    md = slide.metadata
    warnings = list(md.warnings)
    warnings += _fluorescence_notes(md, options)
    mpp_x, mpp_y, source, notes = resolve_mpp(md, options)
    warnings += notes
    ds_x, ds_y, forced_level = target_downsample(md, options, mpp_x, mpp_y, source)
    lo, hi = DOWNSAMPLE_RANGE
    if not (lo <= ds_x <= hi and lo <= ds_y <= hi):
        raise InvalidOptionsError(
            f"the target resolution gives a downsample of {ds_x:.4g} x {ds_y:.4g} level-0 px "
            f"per patch px (accepted: {lo:g} to {hi:g}); check the target and the slide mpp"
        )
    if forced_level is None:
        level = choose_level(md.level_downsamples, ds_x, ds_y, options.level_tolerance)
    else:
        level = forced_level
    effective_mpp = options.target.value if options.target.unit == "mpp" else mpp_x * ds_x
    low = read_low_res(slide, _mask_read_options(md, options, mpp_x, mpp_y), stop)
    if low.failed_reads:
        warnings.append(
            f"{100 * low.failed_reads / low.total_reads:.2f}% of the low-resolution image "
            "could not be decoded; those areas are treated as background"
        )
    if low.sampled:
        warnings.append("the coarsest level is very large: the tissue mask was sampled in bands")
    mask = compute_tissue_mask(
        low,
        options,
        mpp_x,
        mpp_y,
        md.width_l0,
        md.height_l0,
        fluorescence=bool(md.fluorescence),
        bits_per_sample=md.bits_per_sample,
    )
    grid, region, roi_excluded = build_region_grid(
        md, mask, options, ds_x, ds_y, level, effective_mpp, warnings
    )
    if mask.ink_fraction > 0.001:
        warnings.append(_ink_note(mask, grid))
    if mask.faint:
        warnings.append(
            "faint tissue: the tissue has too little colour for the saturation threshold "
            f"and was found by its contrast against the glass ({100 * mask.tissue_fraction:.2f}% "
            "of the slide); check the tissue mask"
        )
    no_tissue = len(grid) == 0
    if md.width_l0 < grid.footprint_x_l0 or md.height_l0 < grid.footprint_y_l0:
        warnings.append(_smaller_than_a_patch(md, grid))
    if no_tissue:
        warnings.append(
            "no tissue found: no patch reaches the minimum tissue fraction "
            f"(mask tissue fraction {mask.tissue_fraction:.4f})"
        )
    thumb, tsx, tsy = _thumbnail(low.rgb, low.scale_x, low.scale_y, md)
    thumb.setflags(write=False)
    return TilingPlan(
        metadata=md,
        mask=mask,
        grid=grid,
        thumbnail=thumb,
        thumbnail_scale_x=tsx,
        thumbnail_scale_y=tsy,
        effective_mpp=float(effective_mpp),
        mpp_source=source,
        mpp_x=float(mpp_x),
        mpp_y=float(mpp_y),
        warnings=tuple(warnings),
        no_tissue=no_tissue,
        tiling_seconds=time.perf_counter() - t0,
        tissue_rgb=_tissue_sample(low.rgb, mask.mask),
        roi_excluded_patch_count=roi_excluded,
        region=region,
    )


def _fluorescence_notes(md: SlideMetadata, options: TilingOptions) -> list[str]:
    """The QC note of a fluorescence slide read in ``"read"`` mode (none for brightfield).

    Raises:
        UnsupportedSlideError: a fluorescence or multiplex slide (``md.fluorescence``)
            and ``options.fluorescence`` is ``"refuse"``.
    """
    if not md.fluorescence:
        return []
    if options.fluorescence != "read":
        raise UnsupportedSlideError(
            f"the slide is {md.fluorescence}, not a brightfield picture: a brightfield H&E "
            "model cannot read fluorescence or multiplex immunofluorescence. The operator "
            "may start the server with --fluorescence read to analyse it anyway"
        )
    return [
        f"fluorescence mode: the slide is {md.fluorescence}; read as is (the first channel "
        "as OpenSlide renders it, grey), tissue = brighter than the dark background (Otsu "
        "on grey value); a brightfield H&E model's outputs on it are out of domain"
    ]


def ink_figures(mask: TissueMask, grid: PatchGrid) -> tuple[InkFigure, ...]:
    """Marker ink per colour of :data:`~.mask.INK_COLORS`: slide share and kept patches
    more than 25 % covered (of their in-slide footprint) by that colour."""
    return tuple(
        InkFigure(
            color=color,
            slide_fraction=float(mask.ink_fractions.get(color, 0.0)),
            inked_patch_count=int((grid.ink_by_color[:, j] > INKED_PATCH_SHARE).sum())
            if grid.ink_by_color.shape[0] == len(grid)
            else 0,
        )
        for j, color in enumerate(INK_COLORS)
    )


def _smaller_than_a_patch(md: SlideMetadata, grid: PatchGrid) -> str:
    """The QC warning for a slide narrower and/or shorter than one patch footprint,
    naming the side(s) that are smaller (level-0 px)."""
    narrow = md.width_l0 < grid.footprint_x_l0
    short = md.height_l0 < grid.footprint_y_l0
    patch = f"({grid.footprint_x_l0:.0f} x {grid.footprint_y_l0:.0f} level-0 px)"
    if narrow and short:
        return (
            f"the slide ({md.width_l0} x {md.height_l0} px) is smaller than one patch "
            f"{patch} in width and height: at most one white-padded patch, kept only if "
            "it reaches the minimum tissue fraction"
        )
    side, other = ("width", "height") if narrow else ("height", "width")
    size, other_size = (md.width_l0, md.height_l0) if narrow else (md.height_l0, md.width_l0)
    line = "column" if narrow else "row"
    return (
        f"the slide's {side} ({size} px) is smaller than one patch's {patch}; its {other} "
        f"({other_size} px) is not: one {line} of white-padded patches, each kept only if "
        "it reaches the minimum tissue fraction"
    )


def _ink_note(mask: TissueMask, grid: PatchGrid) -> str:
    """The QC warning on marker ink, with the count of inked kept patches per colour."""
    n_ink = int((grid.ink_fraction > INKED_PATCH_SHARE).sum())
    per_color = ", ".join(
        f"{f.color.replace('_', '/')} {f.inked_patch_count}"
        for f in ink_figures(mask, grid)
        if f.slide_fraction > 0 or f.inked_patch_count
    )
    return (
        f"marker ink detected over {100 * mask.ink_fraction:.2f}% of the slide "
        f"(excluded from tissue; {n_ink} kept patches are >25% ink: {per_color})"
    )


def _tissue_sample(
    rgb: npt.NDArray[np.uint8], tissue: npt.NDArray[np.bool_]
) -> npt.NDArray[np.uint8]:
    """``[N, 3]`` uint8: the tissue pixels of the low-res image, at most
    :data:`MAX_TISSUE_SAMPLE` (evenly spaced in raster order), read-only."""
    px = rgb[: tissue.shape[0], : tissue.shape[1]][tissue[: rgb.shape[0], : rgb.shape[1]]]
    if px.shape[0] > MAX_TISSUE_SAMPLE:
        px = px[np.linspace(0, px.shape[0] - 1, MAX_TISSUE_SAMPLE).astype(np.int64)]
    px = np.ascontiguousarray(px, dtype=np.uint8)
    px.setflags(write=False)
    return px
