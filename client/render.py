"""Rendering: PNG/JPEG decode/encode, box painting, colour-mapped overlay figures.

Low-level helpers take arrays (:func:`paint_boxes`, :func:`render_overlay`); the
result-level functions take a :class:`~histohelper.client.result.SlideResult`
(:func:`thumbnail_heatmap`, :func:`cam_heatmap`, :func:`overlay`). A result is data;
it never renders itself.

The only client module that imports OpenCV at import time; the rest of the client
imports this module lazily, so ``import histohelper.client`` stays free of cv2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.client.explain import cell_boxes
from histohelper.client.styles import (
    DEFAULT_ATTENTION_SCALE,
    DEFAULT_COLORMAP,
    check_attention_scale,
    check_colormap,
)
from histohelper.model_parts import describe_untrained
from histohelper.regions import (
    draw_mask_outline,
    draw_rings,
    geojson_rings,
    mask_inside,
    sample_mask,
)

if TYPE_CHECKING:
    from histohelper.client.result import SlideResult
    from histohelper.client.roi import RegionOfInterest

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def decode_png_rgb(png: bytes) -> npt.NDArray[np.uint8]:
    """Decode a PNG to RGB.

    Returns:
        uint8 ``(height, width, 3)`` RGB.

    Raises:
        ValueError: the bytes are not a decodable image.
    """
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("not a decodable PNG image")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def decode_png_gray(png: bytes) -> npt.NDArray[np.uint8]:
    """Decode a PNG to one channel, uint8 ``(height, width)``.

    Raises:
        ValueError: the bytes are not a decodable image.
    """
    gray = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise ValueError("not a decodable PNG image")
    return np.asarray(gray, dtype=np.uint8)


def encode_png(rgb: npt.NDArray[np.uint8]) -> bytes:
    """Encode uint8 ``(h, w, 3)`` RGB (or ``(h, w)`` gray) as PNG bytes."""
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - cv2 fails only on invalid arrays
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(rgb: npt.NDArray[np.uint8], quality: int = 88) -> bytes:
    """Encode uint8 ``(h, w, 3)`` RGB as JPEG bytes (``quality`` 1..100)."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:  # pragma: no cover - cv2 fails only on invalid arrays
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def write_png(path: str | PathLike[str], rgb: npt.NDArray[np.uint8]) -> Path:
    """Write an RGB (or gray) uint8 image as PNG. Returns the path."""
    out = Path(path)
    out.write_bytes(encode_png(rgb))
    return out


def box_to_pixels(
    start_l0: npt.NDArray[np.float64],
    size_l0: npt.NDArray[np.float64],
    scale: float,
    limit_px: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Map level-0 intervals ``[start, start + size)`` to half-open thumbnail pixel ranges.

    Each edge is rounded on its own (``floor(edge / scale + 0.5)``), never
    ``round(start) + round(size)``, so patches that share a level-0 edge share a
    thumbnail edge: fractional footprints do not drift into gaps or overlaps. A patch
    smaller than one thumbnail pixel still covers the pixel holding its start.

    Args:
        start_l0, size_l0: float ``[n]`` in level-0 px.
        scale: level-0 px per thumbnail px along this axis.
        limit_px: the thumbnail's size along this axis.

    Returns:
        ``(lo, hi)`` int64 ``[n]``, clipped to ``[0, limit_px]``; ``hi > lo`` unless the
        interval lies wholly outside the thumbnail.
    """
    lo = np.floor(start_l0 / scale + 0.5).astype(np.int64)
    hi = np.floor((start_l0 + size_l0) / scale + 0.5).astype(np.int64)
    hi = np.maximum(hi, lo + 1)
    return np.clip(lo, 0, limit_px), np.clip(hi, 0, limit_px)


def paint_boxes(
    x_l0: npt.NDArray[np.float64],
    y_l0: npt.NDArray[np.float64],
    width_l0: npt.NDArray[np.float64],
    height_l0: npt.NDArray[np.float64],
    values: npt.NDArray[np.float64],
    *,
    scale_x: float,
    scale_y: float,
    width_px: int,
    height_px: int,
) -> npt.NDArray[np.float32]:
    """Paint one value per level-0 box onto a thumbnail-sized grid.

    Args:
        x_l0, y_l0, width_l0, height_l0: float ``[n]``, boxes in level-0 px.
        values: float ``[n]``; NaN values are skipped.
        scale_x, scale_y: level-0 px per thumbnail px.
        width_px, height_px: thumbnail size.

    Returns:
        float32 ``(height_px, width_px)``: mean value of the boxes covering each pixel
        (boxes that overlap are averaged), NaN where no box does.
    """
    total = np.zeros((height_px, width_px), np.float64)
    count = np.zeros((height_px, width_px), np.int32)
    if len(values):
        x0, x1 = box_to_pixels(np.asarray(x_l0), np.asarray(width_l0), scale_x, width_px)
        y0, y1 = box_to_pixels(np.asarray(y_l0), np.asarray(height_l0), scale_y, height_px)
        for i in np.flatnonzero(np.isfinite(values)):
            total[y0[i] : y1[i], x0[i] : x1[i]] += values[i]
            count[y0[i] : y1[i], x0[i] : x1[i]] += 1
    out = np.full((height_px, width_px), np.nan, np.float32)
    covered = count > 0
    out[covered] = total[covered] / count[covered]
    return out


COLORMAPS: dict[str, int] = {
    "jet": cv2.COLORMAP_JET,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "magma": cv2.COLORMAP_MAGMA,
    "turbo": cv2.COLORMAP_TURBO,
}
"""OpenCV colour-map table of each name in :data:`histohelper.client.styles.COLORMAP_NAMES`."""


def colormap_rgb(
    values01: npt.NDArray[np.floating], colormap: str = DEFAULT_COLORMAP
) -> npt.NDArray[np.uint8]:
    """An OpenCV colour map (``COLORMAP_JET``, ``_VIRIDIS``, ``_MAGMA``, ``_TURBO``) of
    values in [0, 1] (clipped; NaN maps to 0), quantised to 256 levels.

    Returns:
        uint8 ``(*values01.shape, 3)`` RGB.

    Raises:
        ValueError: unknown colour map.
    """
    table = COLORMAPS[check_colormap(colormap)]
    v = np.nan_to_num(np.clip(values01, 0.0, 1.0), nan=0.0)
    u8 = np.round(v * 255.0).astype(np.uint8)
    bgr = cv2.applyColorMap(u8.reshape(u8.shape[0], -1), table)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).reshape(*values01.shape, 3)


def jet_rgb(values01: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """OpenCV COLORMAP_JET of values in [0, 1]: :func:`colormap_rgb` with ``"jet"``."""
    return colormap_rgb(values01, "jet")


def attention_rank(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Percentile rank of each value among the finite values, in ``(0, 1]``.

    ``rank / N`` with 1-based ranks, ties sharing their mean rank: the same figure as
    ``scipy.stats.percentileofscore(values, v, kind="rank") / 100``, which CLAM uses to
    draw attention heatmaps (Lu et al., Nat. Biomed. Eng. 2021). Attention weights of
    one slide often span a narrow range (0.0221..0.0248 over 43 patches); their ranks
    still spread evenly from ``1/N`` to 1.

    Args:
        values: float ``[n]`` (NaN for patches without a value).

    Returns:
        float64 ``[n]``: the rank fraction; NaN where the value is not finite.
    """
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, np.nan)
    finite = np.isfinite(v)
    n = int(finite.sum())
    if n == 0:
        return out
    _, inverse, counts = np.unique(v[finite], return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    mean_rank = last - (counts - 1) / 2.0
    out[finite] = mean_rank[inverse] / n
    return out


def blend_cam(
    image_rgb: npt.NDArray[np.uint8],
    cam01: npt.NDArray[np.floating],
    *,
    alpha: float = 0.45,
    colormap: str = DEFAULT_COLORMAP,
) -> npt.NDArray[np.uint8]:
    """A patch with its Grad-CAM: the ``[s, s]`` map in [0, 1] upsampled bilinearly to
    the image (OpenCV ``INTER_LINEAR``), colour-mapped and blended.

    Args:
        image_rgb: uint8 ``(h, w, 3)`` RGB.
        cam01: float ``[s, s]`` in [0, 1] (e.g. ``PatchExplanation.grad_cam_normalised()``).
        alpha: heatmap opacity in [0, 1].
        colormap: a name from :data:`histohelper.client.styles.COLORMAP_NAMES`.

    Returns:
        uint8 ``(h, w, 3)`` RGB.
    """
    h, w = image_rgb.shape[:2]
    cam = cv2.resize(np.asarray(cam01, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = colormap_rgb(np.asarray(cam, np.float32), colormap)
    return np.asarray(cv2.addWeighted(image_rgb, 1 - alpha, heat, alpha, 0), dtype=np.uint8)


def render_overlay(
    thumbnail_rgb: npt.NDArray[np.uint8],
    heat: npt.NDArray[np.float32],
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    alpha: float = 0.5,
    title: str | None = None,
    ticks: Sequence[float] = (0.0, 0.5, 1.0),
    tick_labels: Sequence[str] | None = None,
    warning: str | None = None,
    notes: Sequence[str] = (),
    headline: str | None = None,
    colormap: str = DEFAULT_COLORMAP,
    um_per_px: float | None = None,
    scale_note: str = "",
    outlines: Sequence[Outline] = (),
) -> npt.NDArray[np.uint8]:
    """Blend a colour-mapped heatmap over a thumbnail; with ``title``, frame it as a figure.

    Without ``title`` the result has the thumbnail's size. With it, the blended image is
    placed unchanged on a white canvas whose margins hold everything else, so nothing is
    drawn over tissue: a header above (``headline``, ``warning`` in red, ``notes``), the
    legend to the right (title lines split at ``"\\n"``, vertical colour bar, ticks) and
    a scale bar below when ``um_per_px`` is known (:func:`figure_layout` says where the
    image lies).

    Args:
        thumbnail_rgb: uint8 ``(h, w, 3)`` RGB.
        heat: float ``(h, w)`` in thumbnail px; NaN pixels keep the thumbnail's colour.
        vmin, vmax: values mapped to the ends of the colour map.
        alpha: heatmap opacity in [0, 1].
        title: legend title; ``None`` draws no figure frame (thumbnail-sized output).
        ticks: values labelled on the colour bar.
        tick_labels: their labels (default: the values, formatted).
        warning: a red header line (e.g. "UNTRAINED").
        notes: header lines under it (e.g. the slide prediction's uncertainty).
        headline: the first header line (e.g. the slide prediction).
        colormap: a name from :data:`histohelper.client.styles.COLORMAP_NAMES`.
        um_per_px: micrometres per thumbnail pixel, for the scale bar (``None``: none).
        scale_note: text after the scale bar's length (e.g. "mpp assumed").
        outlines: closed outlines drawn over the blend (e.g. :func:`region_outlines`),
            each with a key under the colour bar (one per label) when framed.

    Returns:
        uint8 RGB: ``(h, w, 3)`` without ``title``, larger with it.

    Raises:
        ValueError: ``heat`` and the thumbnail differ in size, ``alpha`` is outside
            [0, 1], or the colour map is unknown.
    """
    h, w = thumbnail_rgb.shape[:2]
    if heat.shape != (h, w):
        raise ValueError(f"heat map {heat.shape} does not match thumbnail {(h, w)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    check_colormap(colormap)
    span = vmax - vmin if vmax > vmin else 1.0
    covered = np.isfinite(heat)
    out = thumbnail_rgb.copy()
    if covered.any():
        colours = colormap_rgb((heat - vmin) / span, colormap)
        blended = (1.0 - alpha) * thumbnail_rgb[covered] + alpha * colours[covered]
        out[covered] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    keys: dict[str, tuple[int, int, int]] = {}
    for line in outlines:
        line.draw(out)
        keys.setdefault(line.label, line.colour)
    if title is None:
        return out
    labels = [_fmt(t) for t in ticks] if tick_labels is None else list(tick_labels)
    if len(labels) != len(ticks):
        raise ValueError("tick_labels and ticks differ in length")
    header = [(headline, _BLACK)] if headline else []
    header += [(warning, _RED)] if warning else []
    header += [(n, _BLACK) for n in notes]
    legend = _Legend(
        title_lines=tuple(title.split("\n")), ticks=tuple(ticks), tick_labels=tuple(labels),
        vmin=vmin, span=span, colormap=colormap, keys=tuple(keys.items()),
    )  # fmt: skip
    return _compose_figure(out, header, legend, um_per_px, scale_note)


# --- region-of-interest outlines ----------------------------------------------------

#: RGB of the outline of a region of interest's include part (GeoJSON or mask).
ROI_INCLUDE_COLOUR = (255, 255, 255)
#: RGB of the outline of its exclude part.
ROI_EXCLUDE_COLOUR = (255, 0, 255)
#: RGB of the halo under both outlines (2 px line on a 4 px halo), so they show over
#: tissue, glass and every colour map.
ROI_HALO_COLOUR = (0, 0, 0)


@dataclass(frozen=True, slots=True)
class Outline:
    """A closed outline to draw over an overlay, with its legend key.

    Attributes:
        label: the legend key's text (e.g. ``"ROI include"``).
        colour: RGB of the 2 px line (drawn over a 4 px :data:`ROI_HALO_COLOUR` halo).
        rings_l0: float ``[n, 2]`` level-0 (x, y) rings, mapped with ``scale_x``,
            ``scale_y`` (level-0 px per image px).
        mask_t: uint8 ``[h, w]`` mask (nonzero = inside) in the image's frame whose
            border is drawn, or None.
    """

    label: str
    colour: tuple[int, int, int]
    rings_l0: tuple[npt.NDArray[np.float64], ...] = ()
    scale_x: float = 1.0
    scale_y: float = 1.0
    mask_t: npt.NDArray[np.uint8] | None = None

    def draw(self, image: npt.NDArray[np.uint8]) -> None:
        """Draw the outline on ``image`` (uint8 ``[h, w, 3]`` RGB), in place."""
        if self.rings_l0:
            draw_rings(image, self.rings_l0, self.scale_x, self.scale_y, self.colour, 2,
                       ROI_HALO_COLOUR)  # fmt: skip
        if self.mask_t is not None:
            draw_mask_outline(image, self.mask_t, self.colour, 2, ROI_HALO_COLOUR)


def region_outlines(
    roi: RegionOfInterest | None,
    scale_x: float,
    scale_y: float,
    width_px: int,
    height_px: int,
) -> tuple[Outline, ...]:
    """The outlines of a region of interest as the request sent it, on a thumbnail.

    GeoJSON polygons (the ones the server applies: :func:`histohelper.regions.geojson_rings`)
    are drawn from their level-0 vertices; a mask PNG is resampled to the thumbnail's
    pixel grid (the mask pixel under each thumbnail pixel's centre) and its border is
    drawn, as ``histohelper tile`` draws the region on ``grid.png``. Include parts (the
    polygons and the mask) are white, exclude parts magenta, both on a black halo.

    Args:
        roi: the region (``SlideResult.roi``), or None.
        scale_x, scale_y: level-0 px per thumbnail px.
        width_px, height_px: the thumbnail's size.

    Returns:
        The outlines (none without a region), include first.

    Raises:
        InvalidOptionsError: a GeoJSON text that is not GeoJSON.
    """
    if roi is None:
        return ()
    out: list[Outline] = []
    include = tuple(geojson_rings(roi.include_geojson))
    if include:
        out.append(Outline("ROI include", ROI_INCLUDE_COLOUR, include, scale_x, scale_y))
    if roi.mask_png and roi.mask_downsample > 0:
        decoded = cv2.imdecode(np.frombuffer(roi.mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
        if decoded is not None and decoded.size:
            inside = sample_mask(
                mask_inside(decoded), roi.mask_downsample, (height_px, width_px), scale_x, scale_y
            )
            label = "ROI mask" if include else "ROI include"
            out.append(Outline(label, ROI_INCLUDE_COLOUR, mask_t=inside.astype(np.uint8)))
    exclude = tuple(geojson_rings(roi.exclude_geojson))
    if exclude:
        out.append(Outline("ROI exclude", ROI_EXCLUDE_COLOUR, exclude, scale_x, scale_y))
    return tuple(out)


# --- the figure around the image ----------------------------------------------------

_BLACK = (0, 0, 0)
_RED = (200, 0, 0)
_GREY = (90, 90, 90)


@dataclass(frozen=True, slots=True)
class _Legend:
    title_lines: tuple[str, ...]
    ticks: tuple[float, ...]
    tick_labels: tuple[str, ...]
    vmin: float
    span: float
    colormap: str
    keys: tuple[tuple[str, tuple[int, int, int]], ...] = ()


@dataclass(frozen=True, slots=True)
class FigureLayout:
    """Where the parts of an overlay figure lie, in figure pixels.

    Attributes:
        width_px, height_px: the figure's size.
        image_x, image_y: top-left corner of the (unchanged) blended thumbnail.
        body_height_px: height of the band holding the image and the legend beside it
            (the scale bar lies below it).
        text_px: height of one text line; pad_px: the spacing unit.
    """

    width_px: int
    height_px: int
    image_x: int
    image_y: int
    body_height_px: int
    text_px: int
    pad_px: int


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.2g}" if abs(v) >= 1e-3 else f"{v:.1e}"


def _text_metrics(image_h: int, image_w: int) -> tuple[int, float, int, int]:
    """(text height px, Hershey scale, stroke thickness, pad px) for an image size."""
    text_px = int(np.clip(round(max(image_h, image_w) / 48), 11, 22))
    scale = text_px / 22.0  # Hershey simplex capitals are ~22 px tall at scale 1
    return text_px, scale, max(1, round(scale * 1.6)), max(4, text_px // 2)


def _text_width(text: str, scale: float, thick: int) -> int:
    return int(cv2.getTextSize(text.replace("µ", "u"), _FONT, scale, thick)[0][0])


def _put_text(
    img: npt.NDArray[np.uint8],
    text: str,
    org: tuple[int, int],
    scale: float,
    colour: tuple[int, int, int],
    thick: int,
) -> None:
    """``cv2.putText`` that also draws the micro sign: Hershey fonts are ASCII only, so
    each ``µ`` is written as ``u`` with a descender on its left stem."""
    x, y = org
    parts = text.split("µ")
    for k, part in enumerate(parts):
        if part:
            cv2.putText(img, part, (x, y), _FONT, scale, colour, thick, cv2.LINE_AA)
            x += _text_width(part, scale, thick)
        if k < len(parts) - 1:
            cv2.putText(img, "u", (x, y), _FONT, scale, colour, thick, cv2.LINE_AA)
            stem_x = x + max(1, round(4.5 * scale))
            cv2.line(img, (stem_x, y - round(10 * scale)), (stem_x, y + round(7 * scale)),
                     colour, thick, cv2.LINE_AA)  # fmt: skip
            x += _text_width("u", scale, thick)


def nice_scale_length_um(um_per_px: float, target_px: float) -> float:
    """The round length (1, 2 or 5 x 10^k um) whose bar is at most ``target_px`` long.

    Args:
        um_per_px: micrometres per image pixel (> 0).
        target_px: the longest bar wanted, in image pixels (> 0).

    Returns:
        The length in micrometres (at least one pixel's worth, rounded down to 1/2/5).
    """
    want = max(um_per_px, um_per_px * target_px)
    exponent = math.floor(math.log10(want))
    for mantissa in (5.0, 2.0, 1.0):
        length = mantissa * 10.0**exponent
        if length <= want * (1 + 1e-9):
            return length
    return 10.0**exponent  # pragma: no cover - 1 x 10^floor(log10) always fits


def scale_label(length_um: float) -> str:
    """``"500 µm"``, ``"1 mm"``, ``"2.5 mm"``: micrometres below 1 mm, else millimetres."""
    if length_um >= 1000:
        return f"{length_um / 1000:g} mm"
    return f"{length_um:g} µm"


def figure_layout(
    image_h: int,
    image_w: int,
    *,
    header_lines: Sequence[str] = (),
    legend_lines: Sequence[str] = (),
    tick_labels: Sequence[str] = (),
    scale_text: str | None = None,
    key_lines: Sequence[str] = (),
) -> FigureLayout:
    """The layout of an overlay figure (see :func:`render_overlay`): header band, image,
    legend panel to its right (title, colour bar, then one key per outline), scale-bar
    band below."""
    text_px, scale, thick, pad = _text_metrics(image_h, image_w)
    header_h = pad + len(header_lines) * (text_px + pad) + (pad if header_lines else 0)
    bar_w = max(10, text_px)
    legend_w = max(
        [_text_width(s, scale, thick) for s in legend_lines]
        + [bar_w + pad + max([_text_width(s, scale, thick) for s in tick_labels] + [0])]
        + [_KEY_SAMPLE * text_px + pad + _text_width(s, scale, thick) for s in key_lines]
    )
    legend_h = len(legend_lines) * (text_px + pad) + pad + 6 * text_px + text_px
    legend_h += _keys_height(len(key_lines), text_px, pad)
    bottom_h = (4 * pad + text_px) if scale_text is not None else pad  # µ's descender
    width = 2 * pad + image_w + 2 * pad + legend_w + 2 * pad
    if header_lines:  # measured in the bolder stroke of the warning line
        width = max(width, 4 * pad + max(_text_width(s, scale, thick + 1) for s in header_lines))
    if scale_text is not None:  # bar (at most 0.3 of the image) and its label
        bar_max = math.ceil(0.3 * image_w)
        width = max(width, 5 * pad + bar_max + _text_width(scale_text, scale, thick))
    body_h = max(image_h, legend_h)
    return FigureLayout(
        width, header_h + body_h + bottom_h, 2 * pad, header_h, body_h, text_px, pad
    )


#: Length of a legend key's line sample, in text heights.
_KEY_SAMPLE = 2


def _keys_height(n: int, text_px: int, pad: int) -> int:
    """Height the legend keeps under the colour bar for ``n`` outline keys."""
    return n * (text_px + pad) + pad if n else 0


def _compose_figure(
    image: npt.NDArray[np.uint8],
    header: Sequence[tuple[str, tuple[int, int, int]]],
    legend: _Legend,
    um_per_px: float | None,
    scale_note: str,
) -> npt.NDArray[np.uint8]:
    """Place ``image`` unchanged on a white canvas; draw header, legend and scale bar in
    the margins."""
    h, w = image.shape[:2]
    length_um: float | None = None
    scale_text: str | None = None
    if um_per_px is not None and math.isfinite(um_per_px) and um_per_px > 0:
        length_um = nice_scale_length_um(um_per_px, 0.3 * w)
        scale_text = scale_label(length_um) + (f" ({scale_note})" if scale_note else "")
    lay = figure_layout(
        h, w, header_lines=[s for s, _ in header], legend_lines=legend.title_lines,
        tick_labels=legend.tick_labels, scale_text=scale_text,
        key_lines=[k for k, _ in legend.keys],
    )  # fmt: skip
    text_px, scale, thick, pad = _text_metrics(h, w)
    canvas = np.full((lay.height_px, lay.width_px, 3), 255, np.uint8)
    x0, y0 = lay.image_x, lay.image_y
    canvas[y0 : y0 + h, x0 : x0 + w] = image
    cv2.rectangle(canvas, (x0 - 1, y0 - 1), (x0 + w, y0 + h), (200, 200, 200), 1)
    ty = pad
    for text, colour in header:
        ty += text_px
        _put_text(canvas, text, (x0, ty), scale, colour, thick + (colour == _RED))
        ty += pad
    # Legend panel right of the image: title lines, then the colour bar (top = vmax).
    lx, ly = x0 + w + 2 * pad, y0
    for text in legend.title_lines:
        ly += text_px
        _put_text(canvas, text, (lx, ly), scale, _BLACK, thick)
        ly += pad
    bar_w = max(10, text_px)
    by0 = ly + pad
    keys_h = _keys_height(len(legend.keys), text_px, pad)
    by1 = by0 + int(np.clip(h - (by0 - y0) - text_px - keys_h, 6 * text_px, 14 * text_px))
    n = by1 - by0
    ramp = np.linspace(1.0, 0.0, n, dtype=np.float32)[:, None].repeat(bar_w, axis=1)
    canvas[by0:by1, lx : lx + bar_w] = colormap_rgb(ramp, legend.colormap)
    cv2.rectangle(canvas, (lx, by0), (lx + bar_w - 1, by1 - 1), (60, 60, 60), 1)
    for value, label in zip(legend.ticks, legend.tick_labels, strict=True):
        frac = (value - legend.vmin) / legend.span
        if not math.isfinite(frac):
            continue
        yy = round(by1 - 1 - frac * (n - 1))
        cv2.line(canvas, (lx + bar_w, yy), (lx + bar_w + pad // 2 + 1, yy), _BLACK, 1)
        _put_text(canvas, label, (lx + bar_w + pad, yy + text_px // 2), scale, _BLACK, thick)
    # Outline keys under the colour bar: a line sample as drawn over the image, the label.
    for k, (label, colour) in enumerate(legend.keys):
        base = by1 + text_px // 2 + (k + 1) * (text_px + pad)
        ky = base - text_px // 2
        x1 = lx + _KEY_SAMPLE * text_px - 1
        cv2.line(canvas, (lx, ky), (x1, ky), ROI_HALO_COLOUR, 4)
        cv2.line(canvas, (lx, ky), (x1, ky), colour, 2)
        _put_text(canvas, label, (lx + _KEY_SAMPLE * text_px + pad, base), scale, _BLACK, thick)
    # Scale bar under the image's left edge.
    if length_um is not None and scale_text is not None and um_per_px is not None:
        bar_px = max(1, round(length_um / um_per_px))
        sy = y0 + lay.body_height_px + 2 * pad + text_px // 2
        cv2.rectangle(canvas, (x0, sy - 2), (x0 + bar_px - 1, sy + 2), _BLACK, -1)
        for end in (x0, x0 + bar_px - 1):
            cv2.line(canvas, (end, sy - pad), (end, sy + pad), _BLACK, max(1, thick))
        _put_text(canvas, scale_text, (x0 + bar_px + pad, sy + text_px // 2), scale, _BLACK,
                  thick)  # fmt: skip
    return canvas


# --- a result's pictures ------------------------------------------------------------


def thumbnail_heatmap(result: SlideResult, values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Paint per-patch values onto the thumbnail grid from the exact level-0 boxes.

    Args:
        result: the analysed slide.
        values: float ``[n]`` parallel to ``result.patches`` (NaN values are skipped).

    Returns:
        float32 ``(thumbnail.height_px, thumbnail.width_px)``: the mean of the values
        of the patches covering each thumbnail pixel, NaN where none does.
    """
    t = result.thumbnail
    p = result.patches
    return paint_boxes(
        p.x_l0, p.y_l0, p.width_l0, p.height_l0, np.asarray(values, dtype=np.float64),
        scale_x=t.scale_x, scale_y=t.scale_y, width_px=t.width_px, height_px=t.height_px,
    )  # fmt: skip


def cam_heatmap(
    result: SlideResult,
    class_name: str | int,
    *,
    l0_per_px: float | None = None,
    remove_position_bias: bool = True,
) -> tuple[npt.NDArray[np.float32], float]:
    """Sub-patch-resolution probability map stitched from the per-patch CAMs.

    Each patch's class activation maps (``s x s`` cells, 7 x 7 for 224 px ResNet18
    patches) plus the fc bias are local logits; their softmax over classes is a
    local class probability (:func:`histohelper.client.explain.local_probabilities`).
    The position pattern every patch's CAM shares (a zero-padding artefact that drew
    the patch grid as bright edges) is removed first
    (:func:`histohelper.client.explain.cam_position_bias`). Every cell is painted over
    its exact level-0 box (the patch box split into ``s x s``) and overlapping cells
    are averaged, so overlapping patches blend.

    Args:
        result: the analysed slide, requested with ``return_cams``.
        class_name: patch class (name or index).
        l0_per_px: level-0 px per output pixel; default: one CAM cell per pixel.
        remove_position_bias: subtract the shared position pattern (default True).

    Returns:
        (map, l0_per_px): float32 ``[ceil(height_l0 / l0_per_px),
        ceil(width_l0 / l0_per_px)]`` in [0, 1], NaN where no patch covers; and the
        scale used.

    Raises:
        KeyError: unknown class.
        ValueError: the result carries no CAMs (request ``return_cams``).
    """
    p = result.patches
    if p.cams is None or p.logits is None:
        raise ValueError("this result carries no CAMs (set return_cams)")
    idx = result.class_index(class_name)
    s = p.cams.shape[-1]
    if l0_per_px is None:
        l0_per_px = float(np.median(p.width_l0)) / s if len(p) else 1.0
    x, y, w, h, v = cell_boxes(p, idx, remove_position_bias=remove_position_bias)
    width_px = max(1, int(np.ceil(result.slide.width_l0 / l0_per_px)))
    height_px = max(1, int(np.ceil(result.slide.height_l0 / l0_per_px)))
    heat = paint_boxes(
        x, y, w, h, v,
        scale_x=l0_per_px, scale_y=l0_per_px, width_px=width_px, height_px=height_px,
    )  # fmt: skip
    return heat, l0_per_px


def thumbnail_um_per_px(result: SlideResult) -> float | None:
    """Micrometres per thumbnail pixel along x, from the analysis' effective mpp.

    The grid's ``effective_mpp`` (um per patch pixel) times ``patch_size_px /
    patch_width_l0`` is the level-0 mpp the analysis used (the slide's own, an
    override, or an assumed one: ``grid.mpp_source`` says which); times the
    thumbnail's ``scale_x`` (level-0 px per thumbnail px) it is um per thumbnail px.

    Returns:
        um per thumbnail px, or ``None`` when the geometry does not give one.
    """
    g, t = result.grid, result.thumbnail
    if g.effective_mpp > 0 and g.patch_size_px > 0 and g.patch_width_l0 > 0:
        mpp_l0 = g.effective_mpp * g.patch_size_px / g.patch_width_l0
    elif result.slide.mpp_x:
        mpp_l0 = float(result.slide.mpp_x)
    else:
        return None
    um = mpp_l0 * t.scale_x
    return um if math.isfinite(um) and um > 0 else None


def _header(result: SlideResult) -> tuple[str | None, str | None, tuple[str, ...]]:
    """(headline, warning, notes) of a result's figure: the slide prediction, the
    UNTRAINED flag (with the untrained parts when the server names them), and the MC
    dropout uncertainty."""
    p = result.prediction
    if p is None:
        headline = "Slide: no tissue found" if result.outcome == "no_tissue" else None
    else:
        headline = f"Slide: {p.predicted_class} p={p.probability:.3f}"
    warning = None
    if result.model.untrained:
        warning = f"UNTRAINED: {describe_untrained(result.model.untrained_parts)}"
    return headline, warning, _uncertainty_notes(result)


def overlay(
    result: SlideResult,
    class_name: str | int | None = None,
    *,
    attention: bool = False,
    alpha: float = 0.5,
    legend: bool = True,
    cams: bool = False,
    colormap: str = DEFAULT_COLORMAP,
    attention_scale: str = DEFAULT_ATTENTION_SCALE,
    roi_outline: bool = True,
) -> npt.NDArray[np.uint8]:
    """Blend a colour-mapped heatmap over the thumbnail, framed as a figure.

    Probabilities are shown on a fixed 0..1 scale. Attention is shown as each patch's
    percentile rank within the slide (``attention_scale="rank"``, :func:`attention_rank`)
    or as the raw weight on 0..max (``"raw"``); the legend says which. Pixels no patch
    covers keep the thumbnail's colours.

    With ``legend`` (the default) the blended thumbnail sits unchanged inside white
    margins that hold a header (slide prediction and probability, MC dropout
    uncertainty when present, UNTRAINED in red when the model is flagged), the legend
    (title, colour bar, ticks) and a scale bar in um or mm from the effective mpp
    (:func:`thumbnail_um_per_px`): nothing is drawn over tissue but the outline of the
    region of interest the request sent (``result.roi``; :func:`region_outlines`:
    include white, exclude magenta, each keyed in the legend).

    Args:
        result: the analysed slide.
        class_name: patch class (name or index) to show; default
            ``result.default_class()``.
        attention: show the attention map instead of a class probability.
        alpha: heatmap opacity in [0, 1].
        legend: frame the image with header, legend and scale bar; ``False`` returns
            the bare blend at the thumbnail's size.
        cams: paint the sub-patch CAM probability map (:func:`cam_heatmap`) instead
            of one value per patch (needs ``return_cams``).
        colormap: ``"jet"`` (default), ``"viridis"``, ``"magma"`` or ``"turbo"``.
        attention_scale: ``"rank"`` (default) or ``"raw"``.
        roi_outline: draw the region of interest's outline when the result has one.

    Returns:
        uint8 RGB: ``(thumbnail.height_px, thumbnail.width_px, 3)`` without legend, larger
        with it (:func:`figure_layout`).

    Raises:
        KeyError: unknown class.
        ValueError: ``attention=True`` but the result carries no attention, ``cams=True``
            but it carries no CAMs, or an unknown colour map or attention scale.
    """
    check_colormap(colormap)
    check_attention_scale(attention_scale)
    t = result.thumbnail
    tick_labels: tuple[str, ...] | None = None
    if attention:
        if not result.has_attention:
            raise ValueError("this result carries no attention (set return_attention)")
        raw = result.patches.attention.astype(np.float64)
        if attention_scale == "rank":
            values = attention_rank(raw)
            vmax, ticks, tick_labels = 1.0, (0.0, 0.5, 1.0), ("0", "50", "100")
            title = "MIL attention\npercentile rank\nwithin slide"
        else:
            values = raw
            vmax = float(np.nanmax(raw)) if np.isfinite(raw).any() else 1.0
            vmax = vmax if vmax > 0 else 1.0
            ticks = (0.0, vmax / 2, vmax)
            title = "MIL attention\nraw weight"
        heat = thumbnail_heatmap(result, values)
    else:
        name = result.default_class() if class_name is None else class_name
        vmax, ticks = 1.0, (0.0, 0.5, 1.0)
        if name is None:
            title, heat = "no classes", thumbnail_heatmap(result, np.zeros(0))
        elif cams:
            if result.patches.cams is None or result.patches.logits is None:
                raise ValueError("this result carries no CAMs (set return_cams)")
            idx = result.class_index(name)
            x, y, w, h, v = cell_boxes(result.patches, idx)
            title = f"CAM\nP({result.class_names[idx]})"
            heat = paint_boxes(
                x, y, w, h, v, scale_x=t.scale_x, scale_y=t.scale_y,
                width_px=t.width_px, height_px=t.height_px,
            )  # fmt: skip
        else:
            idx = result.class_index(name)
            title = f"P({result.class_names[idx]})"
            heat = thumbnail_heatmap(result, result.patches.probabilities[:, idx])
    headline, warning, notes = _header(result)
    return render_overlay(
        result.thumbnail_rgb(),
        heat,
        vmin=0.0,
        vmax=vmax,
        alpha=alpha,
        title=title if legend else None,
        ticks=ticks,
        tick_labels=tick_labels,
        warning=warning,
        notes=notes,
        headline=headline,
        colormap=colormap,
        um_per_px=thumbnail_um_per_px(result),
        scale_note="mpp assumed" if result.grid.mpp_source == "assumed" else "",
        outlines=region_outlines(result.roi, t.scale_x, t.scale_y, t.width_px, t.height_px)
        if roi_outline
        else (),
    )


def _uncertainty_notes(result: SlideResult) -> tuple[str, ...]:
    """Header line for the slide prediction's MC dropout summary (none without it)."""
    p = result.prediction
    if p is None or p.uncertainty is None or p.predicted_class not in p.class_names:
        return ()
    u, i = p.uncertainty, p.class_names.index(p.predicted_class)
    return (
        f"MC dropout ({u.passes} passes): {p.predicted_class} {u.mean[i]:.3f} +/- "
        f"{u.std[i]:.3f}, entropy {u.entropy_nats:.2f} nats",
    )
