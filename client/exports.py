"""Standard files from a :class:`~histohelper.client.result.SlideResult`: functions that
take the result (it never writes itself).

- PNG: the overlay figures (thumbnail framed by header, legend and scale bar).
- NPZ: heatmaps and the patch table as arrays (no pickles; ``np.load`` reads it).
- CSV: the patch table, one row per patch; its leading columns are the layout
  ``histohelper tile`` writes (:mod:`histohelper.patch_csv`).
- JSON: a summary (prediction with class names, patch count, tissue fraction, model
  version, untrained flag, timings).
- GeoJSON: one QuPath "tile" feature per patch, polygons in level-0 px, measurements =
  class probabilities and attention (QuPath: File > Import objects).
"""

from __future__ import annotations

import csv
import json
import math
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from histohelper import __version__
from histohelper.client.styles import (
    DEFAULT_ATTENTION_SCALE,
    DEFAULT_COLORMAP,
    check_attention_scale,
    check_colormap,
)
from histohelper.patch_csv import GEOMETRY_COLUMNS, format_fraction, geometry_cells

if TYPE_CHECKING:
    from histohelper.client.result import SlideResult

StrPath = str | PathLike[str]

# Class colours for QuPath classifications (RGB), cycled.
_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _finite(v: float) -> float | None:
    """A float for JSON: NaN and infinities become ``None``."""
    f = float(v)
    return f if math.isfinite(f) else None


def probability_column(class_name: str) -> str:
    """Name of a class's probability column / measurement, e.g. ``prob_tumor``."""
    return f"prob_{class_name}"


def summary_dict(result: SlideResult) -> dict[str, Any]:
    """The JSON summary of a result (finite floats only; NaN becomes ``null``)."""
    pred = result.prediction
    t = result.timings
    g = result.grid
    probs = result.patches.probabilities
    mean_probs = (
        {c: _finite(v) for c, v in zip(result.class_names, probs.mean(axis=0), strict=True)}
        if len(result.patches)
        else {}
    )
    argmax_counts = (
        {
            c: int(n)
            for c, n in zip(
                result.class_names,
                np.bincount(probs.argmax(axis=1), minlength=len(result.class_names)),
                strict=True,
            )
        }
        if len(result.patches)
        else {}
    )
    return {
        "request_id": result.request_id,
        "outcome": result.outcome,
        "cached": result.cached,
        "prediction": None
        if pred is None
        else {
            "predicted_class": pred.predicted_class,
            "probability": _finite(pred.probability),
            "class_names": list(pred.class_names),
            "probabilities": [_finite(p) for p in pred.probabilities],
            "logits": [_finite(v) for v in pred.logits],
        },
        "patch_count": result.patch_count,
        "failed_patch_count": result.qc.failed_patch_count,
        "roi_excluded_patch_count": result.qc.roi_excluded_patch_count,
        "tissue_fraction": _finite(result.qc.tissue_fraction),
        "faint_tissue": result.qc.faint_tissue,
        "ink": [
            {
                "color": f.color,
                "slide_fraction": _finite(f.slide_fraction),
                "inked_patch_count": f.inked_patch_count,
            }
            for f in result.qc.ink
        ],
        "warnings": list(result.qc.warnings),
        "patch_class_mean_probability": mean_probs,
        "patch_class_argmax_count": argmax_counts,
        "model": {
            "name": result.model.name,
            "version": result.model.version,
            "untrained": result.model.untrained,
            "untrained_parts": list(result.model.untrained_parts),
            "precision": result.model.precision,
            "device": result.model.device,
            "patch_classes": list(result.model.patch_classes),
            "slide_classes": list(result.model.slide_classes),
        },
        "stain_normalization": None if result.stain is None else result.stain.as_dict(),
        "slide": {
            "vendor": result.slide.vendor,
            "width_l0": result.slide.width_l0,
            "height_l0": result.slide.height_l0,
            "mpp_x": result.slide.mpp_x,
            "mpp_y": result.slide.mpp_y,
        },
        "grid": {
            "n_rows": g.n_rows,
            "n_cols": g.n_cols,
            "patch_size_px": g.patch_size_px,
            "stride_px": g.stride_px,
            "effective_mpp": _finite(g.effective_mpp),
            "mpp_source": g.mpp_source,
            "level": g.level,
            "patch_width_l0": _finite(g.patch_width_l0),
            "patch_height_l0": _finite(g.patch_height_l0),
            "min_tissue_fraction": _finite(g.min_tissue_fraction),
            "edge_mode": g.edge_mode,
        },
        "timings": {
            "tiling_s": _finite(t.tiling_s),
            "first_result_s": _finite(t.first_result_s),
            "inference_s": _finite(t.inference_s),
            "aggregate_s": _finite(t.aggregate_s),
            "total_s": _finite(t.total_s),
            "patches_per_s": _finite(t.patches_per_s),
            "client_wall_s": None if result.wall_s is None else _finite(result.wall_s),
        },
        "client_version": __version__,
    }


def save_png(result: SlideResult, path: StrPath, **overlay_kwargs: Any) -> Path:
    """Write :func:`histohelper.client.render.overlay` ``(result, **overlay_kwargs)`` as
    PNG. Returns the path."""
    from histohelper.client.render import overlay, write_png

    return write_png(path, overlay(result, **overlay_kwargs))


def save_npz(result: SlideResult, path: StrPath) -> Path:
    """Write arrays as compressed NPZ (readable with ``np.load``, no pickle).

    Keys:
        heatmaps: float32 ``[num_classes, n_rows, n_cols]``, NaN where no patch.
        attention_map: float32 ``[n_rows, n_cols]``, NaN where no patch / no attention.
        class_names: str ``[num_classes]``.
        patch_index, row, col: int32 ``[n]``.
        x_l0, y_l0, width_l0, height_l0: float64 ``[n]``, exact level-0 boxes.
        tissue_fraction: float32 ``[n]``; is_edge: bool ``[n]``.
        probabilities: float32 ``[n, num_classes]``; attention: float32 ``[n]``.
        thumbnail_scale_xy: float64 ``[2]``, level-0 px per thumbnail px.
        grid_origin_xy_l0, grid_stride_xy_l0, grid_patch_size_xy_l0: float64 ``[2]``.
        embeddings: float32 ``[n, embedding_dim]`` (only when requested).
    """
    p = result.patches
    g = result.grid
    arrays: dict[str, Any] = {
        "heatmaps": result.heatmaps,
        "attention_map": result.attention_map,
        "class_names": np.asarray(result.class_names, dtype=np.str_),
        "patch_index": p.patch_index,
        "row": p.row,
        "col": p.col,
        "x_l0": p.x_l0,
        "y_l0": p.y_l0,
        "width_l0": p.width_l0,
        "height_l0": p.height_l0,
        "tissue_fraction": p.tissue_fraction,
        "is_edge": p.is_edge,
        "probabilities": p.probabilities,
        "attention": p.attention,
        "thumbnail_scale_xy": np.array([result.thumbnail.scale_x, result.thumbnail.scale_y]),
        "grid_origin_xy_l0": np.array([g.origin_x_l0, g.origin_y_l0]),
        "grid_stride_xy_l0": np.array([g.stride_x_l0, g.stride_y_l0]),
        "grid_patch_size_xy_l0": np.array([g.patch_width_l0, g.patch_height_l0]),
    }
    if p.embeddings is not None:
        arrays["embeddings"] = p.embeddings
    out = Path(path)
    with out.open("wb") as fh:
        np.savez_compressed(fh, **arrays)
    return out


def save_csv(result: SlideResult, path: StrPath) -> Path:
    """Write the patch table as CSV, one row per patch in bag order.

    Columns: the geometry columns shared with ``histohelper tile``
    (:data:`histohelper.patch_csv.GEOMETRY_COLUMNS`: ``patch_index, row, col, x_l0,
    y_l0, width_l0, height_l0, tissue_fraction, is_edge``, in the same number
    formats), then ``prob_<class>...`` (``%.6g``) and ``attention`` (empty when not
    requested).
    """
    p = result.patches
    header = [
        *GEOMETRY_COLUMNS,
        *(probability_column(c) for c in result.class_names),
        "attention",
    ]
    out = Path(path)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in range(len(p)):
            geometry = geometry_cells(
                p.patch_index[i], p.row[i], p.col[i], p.x_l0[i], p.y_l0[i],
                p.width_l0[i], p.height_l0[i], p.tissue_fraction[i], p.is_edge[i],
            )  # fmt: skip
            model = [format_fraction(v) for v in p.probabilities[i]]
            writer.writerow([*geometry, *model, format_fraction(p.attention[i])])
    return out


def save_json(result: SlideResult, path: StrPath) -> Path:
    """Write :func:`summary_dict` as indented JSON (strict: no NaN)."""
    out = Path(path)
    out.write_text(json.dumps(summary_dict(result), indent=2, allow_nan=False) + "\n")
    return out


def tile_features(result: SlideResult) -> dict[str, Any]:
    """One GeoJSON Feature per patch in QuPath's object format.

    Each feature: ``geometry`` a closed Polygon of the exact level-0 box
    ``[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]``; ``properties``:
    ``objectType: "tile"``, ``name: "r<row> c<col>"``, ``classification`` (the patch's
    most probable class, with a colour), ``measurements`` (``prob_<class>`` per class,
    ``attention`` when present, ``tissue_fraction``, ``row``, ``col``).

    Returns:
        A GeoJSON FeatureCollection (dict).
    """
    p = result.patches
    classes = result.class_names
    features = []
    for i in range(len(p)):
        x, y = float(p.x_l0[i]), float(p.y_l0[i])
        x1, y1 = x + float(p.width_l0[i]), y + float(p.height_l0[i])
        measurements: dict[str, float] = {
            probability_column(c): float(v)
            for c, v in zip(classes, p.probabilities[i], strict=True)
        }
        att = float(p.attention[i])
        if math.isfinite(att):
            measurements["attention"] = att
        measurements["tissue_fraction"] = float(p.tissue_fraction[i])
        measurements["row"] = int(p.row[i])
        measurements["col"] = int(p.col[i])
        props: dict[str, Any] = {
            "objectType": "tile",
            "name": f"r{int(p.row[i])} c{int(p.col[i])}",
        }
        if classes:
            k = int(np.argmax(p.probabilities[i]))
            props["classification"] = {
                "name": classes[k],
                "color": list(_PALETTE[k % len(_PALETTE)]),
            }
        props["measurements"] = measurements
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]],
                },
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def save_geojson(result: SlideResult, path: StrPath) -> Path:
    """Write :func:`tile_features` as GeoJSON (strict JSON: no NaN)."""
    out = Path(path)
    out.write_text(json.dumps(tile_features(result), allow_nan=False))
    return out


def save_all(
    result: SlideResult,
    out_dir: StrPath,
    *,
    class_name: str | int | None = None,
    alpha: float = 0.5,
    colormap: str = DEFAULT_COLORMAP,
    attention_scale: str = DEFAULT_ATTENTION_SCALE,
    report: bool = True,
    slide_name: str | None = None,
) -> dict[str, Path]:
    """Write the standard set of files into ``out_dir`` (created if missing).

    Files: ``overlay.png`` (``class_name``, default the predicted class; a figure with
    header, legend and scale bar around the thumbnail), ``attention_overlay.png`` (when
    attention was returned; percentile rank or raw weight by ``attention_scale``),
    ``heatmap.npz``, ``patches.csv``, ``tiles.geojson``, ``summary.json`` and
    ``report.html`` (:func:`histohelper.client.report.write_report`; unless ``report``
    is False).

    Args:
        result: the analysed slide.
        out_dir: the folder.
        class_name, alpha, colormap, attention_scale: as
            :func:`histohelper.client.render.overlay`.
        report: also write ``report.html``.
        slide_name: the slide's name in the report's title (user data; default "slide").

    Returns:
        ``{file name: path}``.

    Raises:
        KeyError: unknown class.
        ValueError: unknown colour map or attention scale, or ``alpha`` outside [0, 1].
    """
    check_colormap(colormap)
    check_attention_scale(attention_scale)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    style: dict[str, Any] = {"alpha": alpha, "colormap": colormap}
    written = {"overlay.png": save_png(result, out / "overlay.png", class_name=class_name, **style)}
    if result.has_attention:
        written["attention_overlay.png"] = save_png(
            result,
            out / "attention_overlay.png",
            attention=True,
            attention_scale=attention_scale,
            **style,
        )
    written["heatmap.npz"] = save_npz(result, out / "heatmap.npz")
    written["patches.csv"] = save_csv(result, out / "patches.csv")
    written["tiles.geojson"] = save_geojson(result, out / "tiles.geojson")
    written["summary.json"] = save_json(result, out / "summary.json")
    if report:
        from histohelper.client.report import REPORT_NAME, write_report

        written[REPORT_NAME] = write_report(
            result,
            out,
            slide_name=slide_name,
            class_name=class_name,
            attention_scale=attention_scale,
            **style,
        )
    return written
