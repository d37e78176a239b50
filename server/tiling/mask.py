"""Tissue masks from a low-resolution image of the slide, with bounded memory.

Recipe (after CLAM, Lu et al. 2021, ``WholeSlideImage.segmentTissue``): convert the
low-resolution RGB (composited on white) to HSV, median-blur the saturation channel,
threshold it with Otsu's method (OpenCV), close small gaps, drop small fragments and
fill small holes (areas in um^2). Additions for real-world slides:

* areas OpenSlide returns transparent (alpha 0: outside the scanned region, past the
  edge) are background and excluded from the Otsu statistics; dropping alpha would
  turn them black, and black has high Otsu contrast against glass;
* very dark pixels (HSV value < ``dark_value_max``) are background: black opaque
  backgrounds, black marker, debris. Near-black JPEG noise has huge saturation, so
  they are also excluded from the Otsu statistics;
* green/blue marker ink (hue 70-240 deg, saturated) and red marker ink (the RGB
  boxes of python-wsi-preprocessing's ``filter_red_pen``, see :data:`RED_INK_BOXES`)
  are excluded from the Otsu statistics and from the mask, and reported as ink;
  black marker ink (dark, grey, not the near-zero black of a scanner background,
  see :func:`ink_masks`) stays background as every very dark pixel does, and is
  reported as ink too;
* a floor on the threshold (``mask_min_saturation``): Otsu always splits a
  histogram, even of uniform glass with noise; the floor turns that into an explicit
  "no tissue" outcome instead of speckle. Conversely, when Otsu's lower class is not
  glass-like (mean above twice the floor: tissue fills the view), Otsu has split the
  tissue itself, and the floor is used as the threshold.

When this finds no tissue at all, a contrast-aware pass looks for *faint* tissue
(:func:`faint_tissue`): pixels whose colour differs from the measured glass colour
by more than the glass's own noise and at least :data:`FAINT_MIN_CONTRAST` grey
levels. Tissue found only that way is flagged (:attr:`TissueMask.faint`). Slides in
fluorescence mode are segmented by grey value instead (:func:`fluorescence_tissue`).

Why saturation rather than grayscale: glass is bright *and grey*, stain is coloured.
On ``CMU-1-Small-Region.svs`` (H&E skin, about half glass) the saturation mask covers
the tissue (see docs/tiling.md for the measured figures); grayscale Otsu depends on
brightness, so pale eosin-stained dermis falls on the glass side while dark dust,
pen and folds fall on the tissue side.

The low-resolution image is never a whole level read at once: the chosen level is
read in blocks of at most 2048 x 2048 px and each block is downscaled as it
arrives. When even the coarsest level exceeds ``mask_max_read_px`` (one-level
slides, shallow pyramids), the slide is *sampled*: one thin band of rows per mask
row, each band inside one row of the level's tiles. Reads are bounded by
``mask_max_read_px`` and decoding by ``mask_max_decode_px`` (a band decodes every tile
it touches, whole: a crafted 300,000 px wide slide of 512 px tiles decodes 154 Mpx per
band), so memory and time stay bounded whatever the slide size; a slide that cannot
be sampled in 16 bands within them is refused. Where the bands are sparser than the
mask's columns, rows between them are interpolated, except at the edge of the scanned
area (transparent tiles), whose rows are read (:func:`_refine_scan_edges`, within
:data:`EDGE_REFINE_SHARE` of both budgets). A ``stop`` event is checked between
blocks and bands.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.errors import (
    AnalysisCancelledError,
    CorruptSlideError,
    InvalidOptionsError,
    SlideTooLargeError,
)
from histohelper.geometry import choose_level

from .options import TilingOptions
from .slide import Slide, composite_on_white

logger = logging.getLogger(__name__)

#: Fraction of mask blocks/bands that may fail to decode before the slide is corrupt.
MASK_MAX_FAILED_FRACTION = 0.25
#: Fewest bands a sampled mask may have; a slide that needs fewer is refused.
MIN_MASK_BANDS = 16
#: Decode cost of one tile counts at least this many px (per-tile overhead of tiny tiles).
_MIN_TILE_COST_PX = 256 * 256
_BLOCK_PX = 2048
_RETRY_BLOCK_PX = 256
#: Share of the read and decode budgets a band-sampled mask keeps, when it has fewer
#: bands than rows, to read the rows at the edges of the scanned area.
EDGE_REFINE_SHARE = 0.125
#: OpenCV hue range (0..180) treated as green/blue marker ink (70..236 degrees):
#: green, teal and blue markers and margin dyes; H&E stays at ~240..360 degrees.
_INK_HUE = (35, 118)
#: Minimum saturation (0..255) for a pixel to count as ink.
_INK_MIN_SAT = 60
#: Marker-ink colours reported, in this order (QualityControl.ink).
INK_COLORS = ("green_blue", "black", "red")
#: Red marker ink: ``(R >, G <, B <)`` boxes of RGB, a pixel in any box is red ink.
#: From python-wsi-preprocessing (D. Eriksson, IBM CODAIT, ``filter.py``,
#: ``filter_red_pen``), tuned on scanned red pen over H&E (TUPAC16). Alone they also
#: take saturated eosin: 0.71 % of CMU-1-Small-Region.svs, whose eosin is magenta-red
#: (OpenCV hue 167-172 = 334-344 deg, 5th-95th percentile; B - G 28-47). Hence the
#: hue gate :data:`RED_INK_HUE` as well; with it, 0.005 % (40 scattered px) of that
#: slide, which a 3 x 3 opening removes.
RED_INK_BOXES = (
    (150, 80, 90),
    (110, 20, 30),
    (185, 65, 105),
    (195, 85, 125),
    (220, 115, 145),
    (125, 40, 70),
    (200, 120, 150),
    (100, 50, 65),
    (85, 25, 45),
)
#: Red ink's OpenCV hue (0..180): at least the first or at most the second value, i.e.
#: 350..10 deg. Red ink darkened over tissue towards magenta is not told from eosin.
RED_INK_HUE = (175, 5)
#: Black marker ink: HSV value at least this (0..255; below it is the near-zero black
#: of a scanner's opaque background or outside-scan area, JPEG noise included) ...
BLACK_INK_MIN_VALUE = 16
#: ... and at most this HSV saturation (0..255, 31 %): grey-black, not dark stain. Dark
#: haematoxylin is saturated purple: on CMU-1-Small-Region.svs its pixels darker than
#: value 50 have saturation >= 112 (1st percentile; 3 of 3,531 at <= 80).
BLACK_INK_MAX_SATURATION = 80
#: Faint tissue: least colour distance (Euclidean, RGB grey levels) from the glass.
#: Faint tissue of ~228 grey on ~240 glass is 14-28 away; glass tinted by (2, 6, 3)
#: (tests/tiling's faint_slide, kept as "no tissue") is 7.
FAINT_MIN_CONTRAST = 10.0
#: Faint tissue: least distance in robust standard deviations of the glass's noise.
FAINT_NOISE_SIGMAS = 6.0
#: Fluorescence mode: least grey value (0..255) of tissue over the dark background.
FLUORESCENCE_MIN_GREY = 20


@dataclass(frozen=True)
class LowResImage:
    """A low-resolution view of the whole slide.

    Attributes:
        rgb: ``[h, w, 3]`` uint8, composited on white.
        opaque: ``[h, w]`` uint8 mean alpha (0 = wholly transparent / outside).
        scale_x: level-0 px per low-res px along x (exact, per axis).
        scale_y: level-0 px per low-res px along y.
        level: pyramid level it was read from.
        sampled: True when rows were sampled in bands rather than read whole.
        failed_reads: level px (blocks) or bands that could not be decoded (left
            transparent, i.e. background).
        total_reads: level px (blocks) or bands attempted.
    """

    rgb: npt.NDArray[np.uint8]
    opaque: npt.NDArray[np.uint8]
    scale_x: float
    scale_y: float
    level: int
    sampled: bool
    failed_reads: int
    total_reads: int


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over the slide.

    Attributes:
        mask: ``[h, w]`` bool, True = tissue; mask px (i, j) covers level-0
            ``[j * scale_x, (j + 1) * scale_x) x [i * scale_y, (i + 1) * scale_y)``.
            It may extend past the slide edge (padding there is background).
        scale_x: level-0 px per mask px along x (per axis, never rounded).
        scale_y: level-0 px per mask px along y.
        tissue_fraction: tissue area / slide area (0..1).
        method: description of the method, e.g. ``"otsu-hsv-saturation"``.
        threshold: the threshold applied (0..255, after the floor).
        otsu_threshold: Otsu's own threshold before the floor.
        ink: ``[h, w]`` bool marker-ink pixels (never tissue).
        ink_fraction: ink area / slide area.
        level: pyramid level the mask was computed from.
        sampled: rows were sampled in bands (huge coarsest level).
        ink_by_color: per colour of :data:`INK_COLORS`, ``[h, w]`` bool ink pixels
            (``ink`` is their union); empty without ink detection.
        ink_fractions: per colour, ink area / slide area.
        faint: the tissue was found only by the faint-tissue pass
            (:func:`faint_tissue`): low contrast against the glass; check the mask.
    """

    mask: npt.NDArray[np.bool_]
    scale_x: float
    scale_y: float
    tissue_fraction: float
    method: str
    threshold: float = 0.0
    otsu_threshold: float = 0.0
    ink: npt.NDArray[np.bool_] | None = None
    ink_fraction: float = 0.0
    level: int = 0
    sampled: bool = False
    ink_by_color: Mapping[str, npt.NDArray[np.bool_]] = field(default_factory=dict)
    ink_fractions: Mapping[str, float] = field(default_factory=dict)
    faint: bool = False


def _read_block(
    slide: Slide, level: int, x_lv: int, y_lv: int, w: int, h: int
) -> npt.NDArray[np.uint8] | None:
    """Read level px ``[x_lv, x_lv+w) x [y_lv, y_lv+h)`` as RGBA; None when undecodable."""
    md = slide.metadata
    ds_os = md.openslide_downsamples[level]
    # OpenSlide maps level-0 locations to the level with its single averaged
    # downsample; multiply by the same value so the level position is exact.
    x_l0 = round(x_lv * ds_os)
    y_l0 = round(y_lv * ds_os)
    for _attempt in range(2):  # the handle reopens after a failure; one retry
        try:
            return slide.read_region_rgba(x_l0, y_l0, level, w, h)
        except CorruptSlideError:
            continue
    return None


def _rgb_alpha_block(rgba: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """``[h, w, 4]`` with RGB composited on white and the alpha kept in channel 3."""
    out = np.empty(rgba.shape, dtype=np.uint8)
    out[..., :3] = composite_on_white(rgba)
    out[..., 3] = rgba[..., 3]
    return out


def read_low_res(
    slide: Slide, options: TilingOptions, stop: threading.Event | None = None
) -> LowResImage:
    """Build a low-resolution image of the whole slide with bounded memory.

    Picks the coarsest level whose downsample does not exceed the one needed for a
    longest side of ``options.mask_target_side_px``, then reads it in blocks and
    downsamples each by an integer factor (INTER_AREA). If that level holds more
    than ``options.mask_max_read_px`` px, samples one band of rows per output row,
    and when the bands are sparser than the columns, interpolates rows between them
    (linear) so that mask pixels are square, reading instead the rows at the edge of
    the scanned area (where two bands differ in opacity) while the budgets allow.

    Args:
        slide: an open slide.
        options: uses ``mask_target_side_px``, ``mask_max_read_px``,
            ``mask_max_decode_px``, ``level_tolerance``.
        stop: when set (checked between blocks and bands), reading ends.

    Returns:
        :class:`LowResImage`.

    Raises:
        CorruptSlideError: more than :data:`MASK_MAX_FAILED_FRACTION` of the reads failed.
        SlideTooLargeError: a level so wide that fewer than 16 bands fit the read or
            decode budget.
        AnalysisCancelledError: ``stop`` was set.
    """
    md = slide.metadata
    target_ds = max(md.width_l0, md.height_l0) / options.mask_target_side_px
    level = choose_level(md.level_downsamples, target_ds, target_ds, options.level_tolerance)
    w_lv, h_lv = md.level_dimensions[level]
    ds_x, ds_y = md.level_downsamples[level]
    if w_lv * h_lv <= options.mask_max_read_px:
        out = _read_blocks(slide, level, w_lv, h_lv, options.mask_target_side_px, stop)
    else:
        out = _read_bands(slide, level, w_lv, h_lv, options, stop)
    rgba, fx, fy, failed, total, sampled = out
    if total and failed / total > MASK_MAX_FAILED_FRACTION:
        raise CorruptSlideError(
            "the slide's pixel data could not be decoded "
            f"({100 * failed / total:.0f}% of the low-resolution image failed)",
            failed_reads=str(failed),
            total_reads=str(total),
        )
    return LowResImage(
        rgb=np.ascontiguousarray(rgba[..., :3]),
        opaque=np.ascontiguousarray(rgba[..., 3]),
        scale_x=fx * ds_x,
        scale_y=fy * ds_y,
        level=level,
        sampled=sampled,
        failed_reads=failed,
        total_reads=total,
    )


def _place(
    out: npt.NDArray[np.uint8], rgba: npt.NDArray[np.uint8], x_lv: int, y_lv: int, f: int
) -> None:
    """Composite, pad to a multiple of ``f``, shrink by ``f`` and paste into ``out``."""
    bh, bw = rgba.shape[:2]
    rgba = _rgb_alpha_block(rgba)
    pw, ph = math.ceil(bw / f) * f, math.ceil(bh / f) * f
    if (pw, ph) != (bw, bh):  # pad partial edge blocks as transparent white
        padded = np.zeros((ph, pw, 4), dtype=np.uint8)
        padded[..., :3] = 255
        padded[:bh, :bw] = rgba
        rgba = padded
    small = rgba if f == 1 else cv2.resize(rgba, (pw // f, ph // f), interpolation=cv2.INTER_AREA)
    ym, xm = y_lv // f, x_lv // f
    out[ym : ym + small.shape[0], xm : xm + small.shape[1]] = small


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise AnalysisCancelledError("the analysis was cancelled while the tissue mask was read")


def _read_blocks(
    slide: Slide,
    level: int,
    w_lv: int,
    h_lv: int,
    target_side: int,
    stop: threading.Event | None = None,
) -> tuple[npt.NDArray[np.uint8], float, float, int, int, bool]:
    f = max(1, round(max(w_lv, h_lv) / target_side))
    w_m, h_m = math.ceil(w_lv / f), math.ceil(h_lv / f)
    out = np.zeros((h_m, w_m, 4), dtype=np.uint8)
    out[..., :3] = 255
    block = f * max(1, _BLOCK_PX // f)
    sub = f * max(1, _RETRY_BLOCK_PX // f)
    failed = total = 0
    for y_lv in range(0, h_lv, block):
        for x_lv in range(0, w_lv, block):
            _check_stop(stop)
            bw, bh = min(block, w_lv - x_lv), min(block, h_lv - y_lv)
            total += bw * bh
            rgba = _read_block(slide, level, x_lv, y_lv, bw, bh)
            if rgba is not None:
                _place(out, rgba, x_lv, y_lv, f)
                continue
            # One bad tile fails the whole read: retry in small pieces so only the
            # undecodable area is lost (left transparent = background).
            for sy in range(y_lv, y_lv + bh, sub):
                for sx in range(x_lv, x_lv + bw, sub):
                    sw, sh = min(sub, x_lv + bw - sx), min(sub, y_lv + bh - sy)
                    piece = _read_block(slide, level, sx, sy, sw, sh)
                    if piece is None:
                        failed += sw * sh
                    else:
                        _place(out, piece, sx, sy, f)
    return out, float(f), float(f), failed, total, False


def _band_top(y_centre: float, band_h: int, h_lv: int, tile_h: int | None) -> int:
    """First level row of a band of ``band_h`` rows centred on ``y_centre``, moved
    into one row of tiles (the next one) when it would straddle two."""
    y_lv = min(max(0, round(y_centre - band_h / 2)), h_lv - band_h)
    if tile_h is not None and y_lv // tile_h != (y_lv + band_h - 1) // tile_h:
        y_lv = min((y_lv + band_h - 1) // tile_h * tile_h, h_lv - band_h)
    return y_lv


def _read_band(
    slide: Slide, level: int, y_lv: int, band_h: int, x0_lv: int, x1_lv: int, cols: int
) -> npt.NDArray[np.uint8] | None:
    """Level px ``[x0_lv, x1_lv) x [y_lv, y_lv + band_h)`` composited on white (alpha
    kept) and shrunk to ``[1, cols, 4]`` (INTER_AREA); None when undecodable."""
    chunk_w = 1 << 16
    band = np.empty((band_h, x1_lv - x0_lv, 4), dtype=np.uint8)
    for x_lv in range(x0_lv, x1_lv, chunk_w):
        cw = min(chunk_w, x1_lv - x_lv)
        rgba = _read_block(slide, level, x_lv, y_lv, cw, band_h)
        if rgba is None:
            return None
        band[:, x_lv - x0_lv : x_lv - x0_lv + cw] = _rgb_alpha_block(rgba)
    small = cv2.resize(band, (cols, 1), interpolation=cv2.INTER_AREA)
    return np.asarray(small, np.uint8).reshape(1, cols, 4)


def _scan_edge_columns(
    out: npt.NDArray[np.uint8], ok: list[bool], inward: int
) -> dict[int, npt.NDArray[np.bool_]]:
    """Mask columns to read again between bands ``g`` and ``g + 1``, per gap ``g``.

    A gap whose bands differ in opacity in a column holds the edge of the scanned
    area there; so may tissue in the ``inward`` gaps after it on the opaque side
    (a sparse TIFF writes the tiles that touch tissue: tissue starts within a tile
    of the edge). Columns next to those are taken too; failed bands start nothing.
    """
    alpha = out[..., 3]
    gaps: dict[int, npt.NDArray[np.bool_]] = {}
    last = alpha.shape[0] - 2
    for g in range(last + 1):
        if not (ok[g] and ok[g + 1]):
            continue
        above, below = alpha[g], alpha[g + 1]
        edge = above != below
        if not edge.any():
            continue
        edge = np.convolve(edge, np.ones(3), mode="same") > 0
        marks = [(g, edge)]
        for n in range(1, inward + 1):
            marks += [(g + n, edge & (below > above)), (g - n, edge & (above > below))]
        for k, cols in marks:
            if 0 <= k <= last and cols.any():
                gaps[k] = gaps[k] | cols if k in gaps else cols
    return gaps


def _read_bands(
    slide: Slide,
    level: int,
    w_lv: int,
    h_lv: int,
    options: TilingOptions,
    stop: threading.Event | None = None,
) -> tuple[npt.NDArray[np.uint8], float, float, int, int, bool]:
    budget = options.mask_max_read_px
    step = max(w_lv, h_lv) / options.mask_target_side_px  # level px per mask px
    w_m = max(1, math.ceil(w_lv / step))
    h_m = h_wanted = max(1, math.ceil(h_lv / step))
    if h_m * w_lv > budget:
        h_m = budget // w_lv
        if h_m < MIN_MASK_BANDS:
            raise SlideTooLargeError(
                f"the slide's coarsest level is {w_lv} px wide: too large to sample "
                "within the mask read budget"
            )
    band_h = int(max(1, min(math.floor(h_lv / h_m), budget // (h_m * w_lv), 64)))
    tile = slide.level_tile_size(level)
    if tile is not None:
        # A band stays inside one row of tiles, so it decodes exactly that row.
        tw, th = tile
        band_h = min(band_h, th)
        per_band = -(-w_lv // tw) * max(tw * th, _MIN_TILE_COST_PX)
    else:
        per_band = w_lv * band_h
    if h_m * per_band > options.mask_max_decode_px:
        h_m = min(h_m, options.mask_max_decode_px // per_band)
        if h_m < MIN_MASK_BANDS:
            stored = f"in tiles of {tile[0]} x {tile[1]} px" if tile else "untiled"
            raise SlideTooLargeError(
                f"the slide's coarsest level is {w_lv} px wide, {stored}: too costly to "
                "decode even a sampled tissue mask within the mask decode budget"
            )
    if h_m < h_wanted:
        # Rows between bands are interpolated; keep EDGE_REFINE_SHARE of the budgets to
        # read the rows at the edges of the scanned area instead (_refine_scan_edges).
        h_m = max(MIN_MASK_BANDS, math.floor(h_m * (1 - EDGE_REFINE_SHARE)))
    row_step = h_lv / h_m  # level px per mask row
    tile_h = tile[1] if tile is not None else None
    out = np.zeros((h_m, w_m, 4), dtype=np.uint8)
    out[..., :3] = 255
    ok = [False] * h_m
    for j in range(h_m):
        _check_stop(stop)
        y_lv = _band_top((j + 0.5) * row_step, band_h, h_lv, tile_h)
        row = _read_band(slide, level, y_lv, band_h, 0, w_lv, w_m)
        if row is not None:
            out[j : j + 1] = row
            ok[j] = True
    failed = ok.count(False)
    logger.info("mask sampled in %d bands of %d rows (level %d)", h_m, band_h, level)
    fx = w_lv / w_m
    if row_step <= 1.01 * fx:
        return out, fx, row_step, failed, h_m, True
    # Fewer bands than columns: interpolate rows between the bands so a mask pixel
    # is square again. The median blur and morphology then act on the same physical
    # size along both axes (with 20 bands on 16,000 px, a 7 x 7 median spanned 5.6 mm
    # of rows and erased a 1.2 mm tall strip of tissue).
    rows = max(1, round(h_lv / fx))
    fine = np.asarray(cv2.resize(out, (w_m, rows), interpolation=cv2.INTER_LINEAR), np.uint8)
    fy = h_lv / rows
    inward = max(1, math.ceil(tile_h / row_step)) if tile_h is not None else 1
    costs = _RefineBudget(
        read_px=budget - h_m * w_lv * band_h,
        decode_px=options.mask_max_decode_px - h_m * per_band,
        tile=tile,
        band_h=band_h,
    )
    _refine_scan_edges(
        slide, level, fine, _scan_edge_columns(out, ok, inward), row_step, fy, fx, costs, stop
    )
    return fine, fx, fy, failed, h_m, True


@dataclass
class _RefineBudget:
    """What is left of the read and decode budgets for :func:`_refine_scan_edges`."""

    read_px: int
    decode_px: int
    tile: tuple[int, int] | None
    band_h: int

    def take(self, x0_lv: int, x1_lv: int) -> bool:
        """Charge one band over level columns ``[x0_lv, x1_lv)``; False when it does not fit."""
        read = (x1_lv - x0_lv) * self.band_h
        if self.tile is None:
            decode = read
        else:
            tw, th = self.tile
            decode = (-(-x1_lv // tw) - x0_lv // tw) * max(tw * th, _MIN_TILE_COST_PX)
        if read > self.read_px or decode > self.decode_px:
            return False
        self.read_px -= read
        self.decode_px -= decode
        return True


def _refine_scan_edges(
    slide: Slide,
    level: int,
    fine: npt.NDArray[np.uint8],
    gaps: Mapping[int, npt.NDArray[np.bool_]],
    row_step: float,
    fy: float,
    fx: float,
    budget: _RefineBudget,
    stop: threading.Event | None,
) -> None:
    """Read the mask rows of ``gaps`` (see :func:`_scan_edge_columns`) instead of
    interpolating them, in place in ``fine``, only over the columns each gap names.

    Interpolating between a band inside the scanned area and one outside it (alpha
    0, white once composited) put the edge of the scan halfway between them and
    faded the colour towards white: tissue that reaches the edge of the scanned
    tiles lost up to half a band spacing (tester finding 8: 18 patches instead of
    24). The rows read here sample the slide as a band does, at the row's centre.
    Stops quietly when the budget left runs out (the rows stay interpolated).
    """
    h_lv = slide.metadata.level_dimensions[level][1]
    w_lv = slide.metadata.level_dimensions[level][0]
    tile_h = budget.tile[1] if budget.tile is not None else None
    read = skipped = 0
    for g in sorted(gaps):
        cols = gaps[g]
        top, bottom = (g + 0.5) * row_step, (g + 1.5) * row_step
        first = max(0, math.ceil(top / fy - 0.5))
        idx = np.flatnonzero(np.diff(np.concatenate(([0], cols.astype(np.int8), [0]))))
        for r in range(first, fine.shape[0]):
            y_centre = (r + 0.5) * fy
            if y_centre >= bottom:
                break
            if y_centre <= top:
                continue
            _check_stop(stop)
            y_lv = _band_top(y_centre, budget.band_h, h_lv, tile_h)
            for c0, c1 in zip(idx[::2], idx[1::2], strict=True):
                x0, x1 = math.floor(c0 * fx), min(w_lv, math.ceil(c1 * fx))
                if not budget.take(x0, x1):
                    skipped += 1
                    continue
                row = _read_band(slide, level, y_lv, budget.band_h, x0, x1, int(c1 - c0))
                if row is not None:
                    fine[r : r + 1, c0:c1] = row
                    read += 1
    if read or skipped:
        logger.info(
            "scan edges: %d mask row runs read, %d left interpolated (budget)", read, skipped
        )


def _remove_small(mask: npt.NDArray[np.bool_], min_px: float) -> npt.NDArray[np.bool_]:
    """Drop 8-connected True components with fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def _fill_holes(mask: npt.NDArray[np.bool_], max_px: float) -> npt.NDArray[np.bool_]:
    """Fill 4-connected False components (holes) smaller than ``max_px`` pixels."""
    if max_px <= 1 or mask.all():
        return mask
    _n, labels, stats, _ = cv2.connectedComponentsWithStats(
        (~mask).astype(np.uint8), connectivity=4
    )
    small = stats[:, cv2.CC_STAT_AREA] < max_px
    small[0] = False
    return mask | small[labels]


#: A tissue segmentation: ``(rgb, opaque, options, um2_per_px) -> (tissue, ink,
#: threshold, otsu_threshold)``, the contract of :func:`threshold_tissue`.
SegmentFn = Callable[
    [npt.NDArray[np.uint8], npt.NDArray[np.uint8], TilingOptions, float],
    tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], float, float],
]


@dataclass(frozen=True)
class MaskMethodSpec:
    """One tissue-mask method.

    Attributes:
        name: the ``mask_method`` option's value (``--mask-method``).
        label: what :attr:`TissueMask.method` reports, e.g. ``"otsu-hsv-saturation"``.
        segment: the segmentation (see :data:`SegmentFn`).
    """

    name: str
    label: str
    segment: SegmentFn


_MASK_METHODS: dict[str, MaskMethodSpec] = {}


def register_mask_method(spec: MaskMethodSpec) -> None:
    """Add a tissue-mask method (or replace one of the same name).

    ``TilingOptions.mask_method`` also checks the name against its own list
    (:data:`~.options.MaskMethod`), so options can be validated without OpenCV.
    """
    _MASK_METHODS[spec.name] = spec


def mask_methods() -> tuple[str, ...]:
    """Names of the registered tissue-mask methods, in registration order."""
    return tuple(_MASK_METHODS)


def get_mask_method(name: str) -> MaskMethodSpec:
    """The tissue-mask method registered as ``name``.

    Raises:
        InvalidOptionsError: no method of that name (the message lists the known ones).
    """
    try:
        return _MASK_METHODS[name]
    except KeyError:
        known = ", ".join(_MASK_METHODS)
        raise InvalidOptionsError(f"unknown tissue mask method {name!r} (known: {known})") from None


def _saturation_channel(
    rgb: npt.NDArray[np.uint8], hsv: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    return hsv[..., 1]


def _inverted_gray_channel(
    rgb: npt.NDArray[np.uint8], hsv: npt.NDArray[np.uint8]
) -> npt.NDArray[np.uint8]:
    return np.asarray(255 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)


def ink_masks(
    rgb: npt.NDArray[np.uint8],
    hsv: npt.NDArray[np.uint8],
    valid: npt.NDArray[np.bool_],
    options: TilingOptions,
) -> dict[str, npt.NDArray[np.bool_]]:
    """Marker ink per colour of :data:`INK_COLORS` in a low-resolution image.

    * ``green_blue``: OpenCV hue in :data:`_INK_HUE` (70-236 deg) and saturation above
      ``max(options.mask_min_saturation, 60)``;
    * ``red``: RGB in any box of :data:`RED_INK_BOXES` (python-wsi-preprocessing's
      ``filter_red_pen``) and hue within :data:`RED_INK_HUE`, opened by 3 x 3;
    * ``black``: HSV value in ``[BLACK_INK_MIN_VALUE, options.dark_value_max)`` and
      saturation at most :data:`BLACK_INK_MAX_SATURATION`, opened by 3 x 3; only with
      ``options.remove_dark`` (black ink is background because it is dark).

    All empty when ``options.remove_ink`` is off.

    Args:
        rgb: ``[h, w, 3]`` uint8 RGB, composited on white.
        hsv: ``[h, w, 3]`` uint8 OpenCV HSV of ``rgb`` (hue 0..180).
        valid: ``[h, w]`` bool, inside the scanned area.
        options: ``remove_ink``, ``remove_dark``, ``dark_value_max``,
            ``mask_min_saturation``.

    Returns:
        ``{colour: [h, w] bool}`` for every colour of :data:`INK_COLORS`.
    """
    none = np.zeros(valid.shape, dtype=bool)
    if not options.remove_ink:
        return dict.fromkeys(INK_COLORS, none)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    green_blue = (
        (hue >= _INK_HUE[0])
        & (hue <= _INK_HUE[1])
        & (sat > max(options.mask_min_saturation, _INK_MIN_SAT))
        & valid
    )
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = np.zeros_like(none)
    for r_min, g_max, b_max in RED_INK_BOXES:
        red |= (r > r_min) & (g < g_max) & (b < b_max)
    red &= (hue >= RED_INK_HUE[0]) | (hue <= RED_INK_HUE[1])
    black = none
    if options.remove_dark:
        black = (
            (val >= BLACK_INK_MIN_VALUE)
            & (val < options.dark_value_max)
            & (sat <= BLACK_INK_MAX_SATURATION)
            & valid
        )
    return {
        "green_blue": green_blue,
        "black": _open3(black),
        "red": _open3(red & valid & ~green_blue),
    }


def _open3(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Morphological opening by 3 x 3: marker strokes are wide, while scattered
    stain pixels of an ink's colour are not ink."""
    if not mask.any():
        return mask
    kernel = np.ones((3, 3), np.uint8)
    return np.asarray(cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel), bool)


def faint_tissue(
    rgb: npt.NDArray[np.uint8],
    allowed: npt.NDArray[np.bool_],
    options: TilingOptions,
    um2_per_px: float,
) -> npt.NDArray[np.bool_]:
    """Faint tissue: pixels that differ from the glass by more than its noise.

    The glass colour is the per-channel median of the brightest quarter of the allowed
    pixels (by grey value; so glass must cover at least a quarter of the view); each
    pixel's contrast is its Euclidean RGB distance from it after the median blur of
    ``options.mask_median_ksize``. Tissue is contrast above ``max(FAINT_MIN_CONTRAST,
    glass median + FAINT_NOISE_SIGMAS x robust sigma)`` (sigma = 1.4826 x the median
    absolute deviation of the glass's contrast), cleaned as the main mask (closing,
    small fragments and holes by area). Used when the saturation threshold's floor
    found nothing: tissue of ~228 grey on ~240 glass has a saturation of ~10.

    Args:
        rgb: ``[h, w, 3]`` uint8 RGB, composited on white.
        allowed: ``[h, w]`` bool pixels that may be tissue (scanned, not dark, not ink).
        options: median and closing kernels, area thresholds.
        um2_per_px: area of one pixel of ``rgb`` (um^2).

    Returns:
        ``[h, w]`` bool (all False when there is too little to measure).
    """
    empty = np.zeros(allowed.shape, dtype=bool)
    if allowed.sum() < 64:
        return empty
    k = options.mask_median_ksize
    blurred = np.asarray(cv2.medianBlur(rgb, k), np.uint8) if k > 1 else rgb
    gray = np.asarray(cv2.cvtColor(blurred, cv2.COLOR_RGB2GRAY), np.uint8)
    g = gray[allowed]
    glass = allowed & (gray >= np.percentile(g, 75))
    colour = np.median(blurred[glass].astype(np.float32), axis=0)
    contrast = np.sqrt(((blurred.astype(np.float32) - colour) ** 2).sum(axis=2))
    c_glass = contrast[glass]
    centre = float(np.median(c_glass))
    sigma = 1.4826 * float(np.median(np.abs(c_glass - centre)))
    threshold = max(FAINT_MIN_CONTRAST, centre + FAINT_NOISE_SIGMAS * sigma)
    return _clean((contrast > threshold) & allowed, allowed, options, um2_per_px)


def fluorescence_tissue(
    rgb: npt.NDArray[np.uint8],
    opaque: npt.NDArray[np.uint8],
    options: TilingOptions,
    um2_per_px: float,
    bits_per_sample: int = 8,
) -> npt.NDArray[np.bool_]:
    """Tissue of a fluorescence slide read as grey: brighter than the dark background.

    Otsu's threshold on the median-blurred grey value of the scanned pixels, at least
    :data:`FLUORESCENCE_MIN_GREY`, then the main mask's cleaning. No dark or ink rules
    (the background is dark; there is no marker ink in a fluorescence picture).
    A channel of more than 8 bits (a 16-bit QPTIFF) reaches us as its top 8 bits, so
    a typical signal (~2000 of 65535) is a grey of ~8: the grey is first stretched
    linearly so that its 99.9th percentile over the scan becomes 255 (a min-max
    contrast stretch, robust to a few hot pixels).

    Args:
        rgb: ``[h, w, 3]`` uint8 as OpenSlide renders the slide (grey for one channel).
        opaque: ``[h, w]`` uint8 alpha (below 128: outside the scan).
        options: median and closing kernels, area thresholds.
        um2_per_px: area of one pixel of ``rgb`` (um^2).
        bits_per_sample: bits of the channel in the file (8, 16 ...).

    Returns:
        ``[h, w]`` bool.
    """
    valid = opaque >= 128
    gray = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), np.uint8)
    if bits_per_sample > 8 and valid.any():
        top = float(np.percentile(gray[valid], 99.9))
        if 0 < top < 255:
            gray = np.asarray(np.clip(gray.astype(np.float32) * (255.0 / top), 0, 255), np.uint8)
    if options.mask_median_ksize > 1:
        gray = np.asarray(cv2.medianBlur(gray, options.mask_median_ksize), np.uint8)
    values = gray[valid]
    if values.size < 16:
        return np.zeros(valid.shape, dtype=bool)
    otsu, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    tissue = (gray > max(float(otsu), FLUORESCENCE_MIN_GREY)) & valid
    return _clean(tissue, valid, options, um2_per_px)


def _otsu_segmenter(
    channel_of: Callable[[npt.NDArray[np.uint8], npt.NDArray[np.uint8]], npt.NDArray[np.uint8]],
) -> SegmentFn:
    """This module's Otsu recipe (see its docstring) on one 0..255 channel.

    ``channel_of(rgb, hsv)`` gives the ``[h, w]`` uint8 channel in which tissue is
    high; the recipe median-blurs it, excludes dark, ink and outside-scan pixels,
    thresholds with Otsu and a floor, closes gaps, drops small fragments and fills
    small holes.
    """

    def segment(
        rgb: npt.NDArray[np.uint8],
        opaque: npt.NDArray[np.uint8],
        options: TilingOptions,
        um2_per_px: float,
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], float, float]:
        valid = opaque >= 128
        hsv = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV), dtype=np.uint8)
        val = hsv[..., 2]
        channel = channel_of(rgb, hsv)
        k = options.mask_median_ksize
        if k > 1:
            channel = np.asarray(cv2.medianBlur(channel, k), dtype=np.uint8)
        dark = val < options.dark_value_max if options.remove_dark else np.zeros_like(valid)
        inks = ink_masks(rgb, hsv, valid, options)
        ink = inks["green_blue"] | inks["red"]
        candidates = valid & ~dark & ~ink
        values = channel[candidates]
        if values.size < 16:
            empty = np.zeros_like(valid)
            return empty, ink, 255.0, 255.0
        otsu, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thr = max(float(otsu), float(options.mask_min_saturation))
        below = values[values <= otsu]
        if below.size == 0 or float(below.mean()) > 2 * options.mask_min_saturation:
            # Otsu's lower class is not glass-like: no glass in view (tissue everywhere),
            # and Otsu split the tissue itself (e.g. eosin vs haematoxylin). Use the floor.
            thr = float(options.mask_min_saturation)
        tissue = (channel > thr) & candidates
        return _clean(tissue, valid & ~ink & ~dark, options, um2_per_px), ink, thr, float(otsu)

    return segment


def _clean(
    tissue: npt.NDArray[np.bool_],
    allowed: npt.NDArray[np.bool_],
    options: TilingOptions,
    um2_per_px: float,
) -> npt.NDArray[np.bool_]:
    """Close small gaps, drop small fragments, fill small holes, keep ``allowed``."""
    if options.mask_close_ksize > 1:
        kernel = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (options.mask_close_ksize, options.mask_close_ksize)
        )
        tissue = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    min_frag_px = options.min_fragment_area_um2 / um2_per_px
    tissue = _remove_small(tissue, min_frag_px)
    tissue = _fill_holes(tissue, options.min_hole_area_um2 / um2_per_px)
    tissue &= allowed
    return _remove_small(tissue, min_frag_px)


register_mask_method(
    MaskMethodSpec("saturation", "otsu-hsv-saturation", _otsu_segmenter(_saturation_channel))
)
register_mask_method(
    MaskMethodSpec("gray", "otsu-grayscale", _otsu_segmenter(_inverted_gray_channel))
)


def threshold_tissue(
    rgb: npt.NDArray[np.uint8],
    opaque: npt.NDArray[np.uint8],
    options: TilingOptions,
    um2_per_px: float,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], float, float]:
    """Segment tissue in a low-resolution RGB image with ``options.mask_method``.

    Args:
        rgb: ``[h, w, 3]`` uint8, composited on white.
        opaque: ``[h, w]`` uint8 alpha (pixels below 128 are outside the scan).
        options: mask parameters of :class:`TilingOptions`.
        um2_per_px: physical area of one pixel of ``rgb`` (um^2), for the area
            thresholds.

    Returns:
        ``(tissue, ink, threshold, otsu_threshold)``: ``[h, w]`` bool masks and the
        thresholds on the 0..255 channel (after / before the floor).

    Raises:
        InvalidOptionsError: ``options.mask_method`` is not registered
            (:func:`mask_methods`).
    """
    return get_mask_method(options.mask_method).segment(rgb, opaque, options, um2_per_px)


def compute_tissue_mask(
    low: LowResImage,
    options: TilingOptions,
    mpp_x: float,
    mpp_y: float,
    width_l0: int,
    height_l0: int,
    *,
    fluorescence: bool = False,
    bits_per_sample: int = 8,
) -> TissueMask:
    """Tissue mask of a slide from its low-resolution image.

    Steps: the mask method's segmentation (:func:`threshold_tissue`); marker ink per
    colour (:func:`ink_masks`; green/blue and red never tissue); when that finds no
    tissue, the faint-tissue pass (:func:`faint_tissue`, flagged ``faint``). With
    ``fluorescence`` the segmentation is :func:`fluorescence_tissue` instead, and there
    is neither ink nor a faint pass.

    Args:
        low: from :func:`read_low_res`.
        options: mask parameters.
        mpp_x: level-0 um/px along x used for area thresholds (metadata, override or
            assumed).
        mpp_y: level-0 um/px along y.
        width_l0: slide width (level-0 px), for the tissue fraction.
        height_l0: slide height (level-0 px).
        fluorescence: segment a fluorescence slide read as grey (the operator's
            fluorescence mode).
        bits_per_sample: bits of the slide's channel (fluorescence only; see
            :func:`fluorescence_tissue`).

    Returns:
        :class:`TissueMask` in the frame of ``low`` (same size and scales).

    Raises:
        InvalidOptionsError: ``options.mask_method`` is not registered.
    """
    spec = get_mask_method(options.mask_method)
    um2_per_px = low.scale_x * mpp_x * low.scale_y * mpp_y
    slide_area_m = (width_l0 / low.scale_x) * (height_l0 / low.scale_y)
    if fluorescence:
        tissue = fluorescence_tissue(low.rgb, low.opaque, options, um2_per_px, bits_per_sample)
        tissue.setflags(write=False)
        return TissueMask(
            mask=tissue,
            scale_x=low.scale_x,
            scale_y=low.scale_y,
            tissue_fraction=float(min(1.0, tissue.sum() / slide_area_m)),
            method="otsu-grey-value-fluorescence",
            ink=np.zeros_like(tissue),
            level=low.level,
            sampled=low.sampled,
        )
    tissue, ink, thr, otsu = spec.segment(low.rgb, low.opaque, options, um2_per_px)
    valid = low.opaque >= 128
    hsv = np.asarray(cv2.cvtColor(low.rgb, cv2.COLOR_RGB2HSV), dtype=np.uint8)
    inks = ink_masks(low.rgb, hsv, valid, options)
    coloured = inks["green_blue"] | inks["red"]
    tissue = tissue & ~coloured  # a registered method may not know every colour
    faint = False
    if not tissue.any():
        allowed = valid & ~coloured
        if options.remove_dark:
            allowed &= hsv[..., 2] >= options.dark_value_max
        found = faint_tissue(low.rgb, allowed, options, um2_per_px)
        if found.any():
            tissue, faint = found, True
    ink = ink | coloured | inks["black"]
    for m in (tissue, ink, *inks.values()):
        m.setflags(write=False)
    return TissueMask(
        mask=tissue,
        scale_x=low.scale_x,
        scale_y=low.scale_y,
        tissue_fraction=float(min(1.0, tissue.sum() / slide_area_m)),
        method=spec.label + ("+faint-contrast" if faint else ""),
        threshold=thr,
        otsu_threshold=otsu,
        ink=ink,
        ink_fraction=float(min(1.0, ink.sum() / slide_area_m)),
        level=low.level,
        sampled=low.sampled,
        ink_by_color=inks,
        ink_fractions={c: float(min(1.0, m.sum() / slide_area_m)) for c, m in inks.items()},
        faint=faint,
    )
