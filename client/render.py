"""Rendering: PNG decode/encode, box painting, JET overlays with an inset legend.

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
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.client.explain import cell_boxes

if TYPE_CHECKING:
    from histohelper.client.result import SlideResult

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


def jet_rgb(values01: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """OpenCV COLORMAP_JET of values in [0, 1] (clipped; NaN maps to 0).

    Returns:
        uint8 ``(*values01.shape, 3)`` RGB.
    """
    v = np.nan_to_num(np.clip(values01, 0.0, 1.0), nan=0.0)
    u8 = np.round(v * 255.0).astype(np.uint8)
    bgr = cv2.applyColorMap(u8.reshape(u8.shape[0], -1), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).reshape(*values01.shape, 3)


def render_overlay(
    thumbnail_rgb: npt.NDArray[np.uint8],
    heat: npt.NDArray[np.float32],
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    alpha: float = 0.5,
    title: str | None = None,
    ticks: Sequence[float] = (0.0, 0.5, 1.0),
    warning: str | None = None,
    notes: Sequence[str] = (),
) -> npt.NDArray[np.uint8]:
    """Blend a JET heatmap over a thumbnail; draw an inset legend when ``title`` is set.

    Args:
        thumbnail_rgb: uint8 ``(h, w, 3)`` RGB.
        heat: float ``(h, w)`` in thumbnail px; NaN pixels keep the thumbnail's colour.
        vmin, vmax: values mapped to the ends of the colour map.
        alpha: heatmap opacity in [0, 1].
        title: legend title; ``None`` draws no legend.
        ticks: values labelled on the colour bar.
        warning: a red line under the title (e.g. "UNTRAINED").
        notes: black lines under those (e.g. the slide prediction's uncertainty).

    Returns:
        uint8 ``(h, w, 3)`` RGB, the thumbnail's size.

    Raises:
        ValueError: ``heat`` and the thumbnail differ in size, or ``alpha`` is outside [0, 1].
    """
    h, w = thumbnail_rgb.shape[:2]
    if heat.shape != (h, w):
        raise ValueError(f"heat map {heat.shape} does not match thumbnail {(h, w)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    span = vmax - vmin if vmax > vmin else 1.0
    covered = np.isfinite(heat)
    out = thumbnail_rgb.copy()
    if covered.any():
        colours = jet_rgb((heat - vmin) / span)
        blended = (1.0 - alpha) * thumbnail_rgb[covered] + alpha * colours[covered]
        out[covered] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    if title is not None:
        _draw_legend(
            out, covered, title=title, ticks=ticks, vmin=vmin, span=span, warning=warning,
            notes=notes,
        )  # fmt: skip
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.2g}" if abs(v) >= 1e-3 else f"{v:.1e}"


def _draw_legend(
    img: npt.NDArray[np.uint8],
    covered: npt.NDArray[np.bool_],
    *,
    title: str,
    ticks: Sequence[float],
    vmin: float,
    span: float,
    warning: str | None,
    notes: Sequence[str] = (),
) -> None:
    """Draw a legend box (title, vertical JET bar, tick labels) into the least covered
    corner of ``img``, in place. Skipped on images too small to hold it."""
    h, w = img.shape[:2]
    box_h = round(min(0.35 * h, 0.5 * w, 260))
    if box_h < 48:
        return
    pad = max(3, box_h // 20)
    text_h = max(7, box_h // 13)
    scale = text_h / 22.0  # Hershey simplex is ~22 px tall at scale 1
    thick = max(1, round(scale * 1.6))
    bar_w = max(6, box_h // 10)
    lines = [(title, (0, 0, 0))] + ([(warning, (200, 0, 0))] if warning else [])
    lines += [(n, (0, 0, 0)) for n in notes]
    tick_labels = [_fmt(t) for t in ticks]
    line_w = max(cv2.getTextSize(s, _FONT, scale, thick)[0][0] for s, _ in lines)
    tick_w = max(cv2.getTextSize(s, _FONT, scale, thick)[0][0] for s in tick_labels)
    box_w = min(w - 2, max(line_w, bar_w + pad + tick_w) + 2 * pad)
    header = len(lines) * (text_h + pad) + pad
    bar_h = box_h - header - pad - text_h // 2
    if bar_h < 16:
        return
    # Least covered corner, so the legend hides as little heat map as possible.
    margin = pad
    corners = {
        (margin, margin): covered[:box_h, :box_w].sum(),
        (w - box_w - margin, margin): covered[:box_h, w - box_w :].sum(),
        (margin, h - box_h - margin): covered[h - box_h :, :box_w].sum(),
        (w - box_w - margin, h - box_h - margin): covered[h - box_h :, w - box_w :].sum(),
    }
    x0, y0 = min(corners, key=lambda k: corners[k])
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(w, x0 + box_w), min(h, y0 + box_h)
    # Translucent white panel with a thin grey frame.
    panel = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = np.round(0.15 * panel + 0.85 * 255).astype(np.uint8)
    cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (90, 90, 90), 1)
    ty = y0 + pad
    for text, colour in lines:
        ty += text_h
        cv2.putText(img, text, (x0 + pad, ty), _FONT, scale, colour, thick, cv2.LINE_AA)
        ty += pad
    # Colour bar: top is vmax, bottom is vmin.
    bx0, by0 = x0 + pad, ty + pad // 2 + text_h // 4
    by1 = min(y1 - pad - text_h // 4, by0 + bar_h)
    n = by1 - by0
    if n < 8:
        return
    ramp = jet_rgb(np.linspace(1.0, 0.0, n, dtype=np.float32)[:, None].repeat(bar_w, axis=1))
    img[by0:by1, bx0 : bx0 + bar_w] = ramp
    cv2.rectangle(img, (bx0, by0), (bx0 + bar_w - 1, by1 - 1), (60, 60, 60), 1)
    for value, label in zip(ticks, tick_labels, strict=True):
        frac = (value - vmin) / span
        if not math.isfinite(frac):
            continue
        yy = round(by1 - 1 - frac * (n - 1))
        cv2.line(img, (bx0 + bar_w, yy), (bx0 + bar_w + pad // 2 + 1, yy), (0, 0, 0), 1)
        cv2.putText(
            img,
            label,
            (bx0 + bar_w + pad, yy + text_h // 2),
            _FONT,
            scale,
            (0, 0, 0),
            thick,
            cv2.LINE_AA,
        )


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
    result: SlideResult, class_name: str | int, *, l0_per_px: float | None = None
) -> tuple[npt.NDArray[np.float32], float]:
    """Sub-patch-resolution probability map stitched from the per-patch CAMs.

    Each patch's class activation maps (``s x s`` cells, 7 x 7 for 224 px ResNet18
    patches) plus the fc bias are local logits; their softmax over classes is a
    local class probability (:func:`histohelper.client.explain.local_probabilities`).
    Every cell is painted over its exact level-0 box (the patch box split into
    ``s x s``) and overlapping cells are averaged, so overlapping patches blend.

    Args:
        result: the analysed slide, requested with ``return_cams``.
        class_name: patch class (name or index).
        l0_per_px: level-0 px per output pixel; default: one CAM cell per pixel.

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
    x, y, w, h, v = cell_boxes(p, idx)
    width_px = max(1, int(np.ceil(result.slide.width_l0 / l0_per_px)))
    height_px = max(1, int(np.ceil(result.slide.height_l0 / l0_per_px)))
    heat = paint_boxes(
        x, y, w, h, v,
        scale_x=l0_per_px, scale_y=l0_per_px, width_px=width_px, height_px=height_px,
    )  # fmt: skip
    return heat, l0_per_px


def overlay(
    result: SlideResult,
    class_name: str | int | None = None,
    *,
    attention: bool = False,
    alpha: float = 0.5,
    legend: bool = True,
    cams: bool = False,
) -> npt.NDArray[np.uint8]:
    """Blend a COLORMAP_JET heatmap over the thumbnail, with an inset colour bar/legend.

    The image has exactly the thumbnail's size. Probabilities are shown on a fixed
    0..1 scale; attention relative to its maximum (0..max). Pixels no patch covers
    keep the thumbnail's colours.

    Args:
        result: the analysed slide.
        class_name: patch class (name or index) to show; default
            ``result.default_class()``.
        attention: show the attention map instead of a class probability.
        alpha: heatmap opacity in [0, 1].
        legend: draw the inset legend (title, colour bar, ticks; "UNTRAINED" when so;
            the slide prediction's MC dropout mean, std and entropy when present).
        cams: paint the sub-patch CAM probability map (:func:`cam_heatmap`) instead
            of one value per patch (needs ``return_cams``).

    Returns:
        uint8 ``(thumbnail.height_px, thumbnail.width_px, 3)`` RGB.

    Raises:
        KeyError: unknown class.
        ValueError: ``attention=True`` but the result carries no attention, or
            ``cams=True`` but it carries no CAMs.
    """
    t = result.thumbnail
    if attention:
        if not result.has_attention:
            raise ValueError("this result carries no attention (set return_attention)")
        values = result.patches.attention.astype(np.float64)
        vmax = float(np.nanmax(values)) if len(values) else 1.0
        vmax = vmax if vmax > 0 else 1.0
        title, ticks = "MIL attention", (0.0, vmax / 2, vmax)
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
            title = f"CAM P({result.class_names[idx]})"
            heat = paint_boxes(
                x, y, w, h, v, scale_x=t.scale_x, scale_y=t.scale_y,
                width_px=t.width_px, height_px=t.height_px,
            )  # fmt: skip
        else:
            idx = result.class_index(name)
            title = f"P({result.class_names[idx]})"
            heat = thumbnail_heatmap(result, result.patches.probabilities[:, idx])
    return render_overlay(
        result.thumbnail_rgb(),
        heat,
        vmin=0.0,
        vmax=vmax,
        alpha=alpha,
        title=title if legend else None,
        ticks=ticks,
        warning="UNTRAINED" if result.model.untrained else None,
        notes=_uncertainty_notes(result),
    )


def _uncertainty_notes(result: SlideResult) -> tuple[str, ...]:
    """Legend lines for the slide prediction's MC dropout summary (none without it)."""
    p = result.prediction
    if p is None or p.uncertainty is None or p.predicted_class not in p.class_names:
        return ()
    u, i = p.uncertainty, p.class_names.index(p.predicted_class)
    return (
        f"{p.predicted_class} {u.mean[i]:.2f}+-{u.std[i]:.2f}",
        f"H {u.entropy_nats:.2f} nats ({u.passes} MC)",
    )
