"""Regions of interest as the tiler and the client both see them: the GeoJSON walk
that finds a region's polygons, and the outline drawn on a thumbnail.

One walk (:func:`geojson_polygons`) serves the server's parser
(:mod:`histohelper.server.tiling.roi`, which validates the polygons with Shapely) and
the client's pictures (:func:`geojson_rings`), so the outline a report draws is made of
the polygons the server applied: QuPath's Polygon and MultiPolygon annotations (inside
Features, FeatureCollections, bare JSON arrays of Features and GeometryCollections),
never its points, lines, detections or cells. Coordinates are **level-0 px** of the
slide (x right, y down); ``*_l0`` names level-0 values, ``*_t`` thumbnail pixels.

Drawing (:func:`draw_rings`, :func:`draw_mask_outline`) is shared by ``histohelper
tile``'s ``grid.png`` and the client's overlay figures (``overlay.png``, the report).

Standard library and numpy at import; OpenCV is imported inside the drawing functions
(their callers, the tiler and the client's rendering helper, have it already).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from histohelper.errors import InvalidOptionsError

AREA_TYPES = ("Polygon", "MultiPolygon")
LINEAR_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")

#: Sub-pixel bits of the vertices handed to OpenCV's polyline drawing.
_SHIFT = 4

Colour = tuple[int, int, int]


def geojson_polygons(
    doc: Any, field: str, ignored: dict[str, int]
) -> list[tuple[str, list[Any], str]]:
    """Every polygon of a parsed GeoJSON document, with where it was found.

    Args:
        doc: the document (``json.loads`` of a FeatureCollection, a Feature, a bare
            geometry, or a JSON array of Features as QuPath 0.2 writes).
        field: the request field named in error messages (e.g. ``roi.include_geojson``).
        ignored: counts of what encloses no area or is not an annotation (Point,
            LineString..., features without geometry, QuPath objects whose
            ``objectType`` is not ``"annotation"``), updated in place.

    Returns:
        ``(label, rings, group)`` per polygon: ``label`` says where (``"feature 3
        polygon 1"``), ``rings`` are the GeoJSON rings as given (shell first, then
        holes; unchecked), ``group`` the MultiPolygon's label or ``""``.

    Raises:
        InvalidOptionsError: JSON that is not GeoJSON of these shapes (a message naming
            ``field`` and the place, never the input).
    """
    out: list[tuple[str, list[Any], str]] = []
    for label, geometry in _geometries(doc, field, ignored):
        _collect_polygons(label, geometry, field, out, ignored)
    return out


def geojson_rings(text: str) -> list[npt.NDArray[np.float64]]:
    """The rings (shells and holes) of a GeoJSON text's polygons, to draw them.

    Lenient: a ring that is not an array of at least two ``[x, y]`` positions is
    skipped (the server refuses such a region before any result exists).

    Args:
        text: GeoJSON as :func:`geojson_polygons` takes it (``""``: none).

    Returns:
        float64 ``[n, 2]`` arrays of level-0 (x, y), one per ring.

    Raises:
        InvalidOptionsError: text that is not JSON or not GeoJSON of these shapes.
    """
    if not text:
        return []
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidOptionsError("the region of interest is not valid JSON") from None
    rings: list[npt.NDArray[np.float64]] = []
    for _, polygon, _ in geojson_polygons(doc, "roi", {}):
        for ring in polygon:
            try:
                xy = np.asarray(ring, dtype=np.float64)
            except (TypeError, ValueError):
                continue
            if xy.ndim == 2 and xy.shape[0] >= 2 and xy.shape[1] >= 2:
                rings.append(xy[:, :2])
    return rings


def mask_inside(image: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
    """The inside pixels of a decoded region mask: nonzero grey, or nonzero in any
    colour channel. Alpha is always ignored: grey+alpha (``[h, w, 2]``) uses its grey
    channel, RGBA its first three. (OpenCV's ``imdecode(..., IMREAD_UNCHANGED)``
    expands a grey+alpha PNG to 4 channels, grey repeated; other decoders keep 2.)

    Args:
        image: ``[h, w]`` grey or ``[h, w, c]`` with c of 1 (grey), 2 (grey, alpha),
            3 (colour) or 4 (colour, alpha), any integer dtype.

    Returns:
        bool ``[h, w]``.
    """
    if image.ndim == 2:
        return np.asarray(image != 0)
    colour = 1 if image.shape[2] <= 2 else 3
    return np.asarray((image[..., :colour] != 0).any(axis=2))


def sample_mask(
    mask_r: npt.NDArray[np.bool_], downsample: float, shape: tuple[int, int], sx: float, sy: float
) -> npt.NDArray[np.bool_]:
    """A region mask resampled onto another pixel grid: each grid pixel takes the region
    mask pixel under its centre (nearest neighbour; outside the mask: outside).

    Args:
        mask_r: bool ``[h_r, w_r]`` region mask anchored at level-0 (0, 0).
        downsample: level-0 px per region-mask px (> 0).
        shape: ``(h, w)`` of the target grid.
        sx: level-0 px per target px along x (pixel (i, j) has its centre at level-0
            ``((j + 0.5) * sx, (i + 0.5) * sy)``); sy: along y.

    Returns:
        bool ``[h, w]``.
    """
    h, w = shape
    h_r, w_r = mask_r.shape
    cols_r = np.floor((np.arange(w) + 0.5) * sx / downsample).astype(np.int64)
    rows_r = np.floor((np.arange(h) + 0.5) * sy / downsample).astype(np.int64)
    ok_c, ok_r = cols_r < w_r, rows_r < h_r
    out = np.zeros(shape, dtype=bool)
    out[np.ix_(ok_r, ok_c)] = mask_r[np.ix_(rows_r[ok_r], cols_r[ok_c])]
    return out


def draw_rings(
    image: npt.NDArray[np.uint8],
    rings_l0: Sequence[npt.NDArray[np.float64]],
    scale_x: float,
    scale_y: float,
    colour: Colour,
    thickness: int = 2,
    halo: Colour | None = None,
) -> None:
    """Draw closed level-0 rings on a thumbnail, in place (OpenCV ``polylines``).

    Thumbnail pixel (i, j) covers level-0 ``[j * scale_x, (j + 1) * scale_x) x
    [i * scale_y, (i + 1) * scale_y)``, so a vertex maps to ``x_l0 / scale_x - 0.5`` in
    OpenCV's pixel-centre coordinates (drawn with 4 sub-pixel bits).

    Args:
        image: uint8 ``[h, w, 3]`` in the thumbnail frame (changed in place).
        rings_l0: float ``[n, 2]`` level-0 (x, y) rings (closed when drawn).
        scale_x: level-0 px per thumbnail px along x; scale_y: along y.
        colour: the line's RGB colour; thickness: its width in px.
        halo: a colour drawn first, 2 px wider, so the line shows on any background.
    """
    import cv2

    pts = [
        np.round((np.asarray(r, np.float64) / (scale_x, scale_y) - 0.5) * (1 << _SHIFT)).astype(
            np.int32
        )
        for r in rings_l0
        if len(r) >= 2
    ]
    if not pts:
        return
    if halo is not None:
        cv2.polylines(image, pts, True, halo, thickness + 2, cv2.LINE_8, _SHIFT)
    cv2.polylines(image, pts, True, colour, thickness, cv2.LINE_8, _SHIFT)


def draw_mask_outline(
    image: npt.NDArray[np.uint8],
    mask_t: npt.NDArray[Any],
    colour: Colour,
    thickness: int = 2,
    halo: Colour | None = None,
) -> None:
    """Draw the outline (outer borders and holes) of a binary mask already in the
    image's frame, in place (OpenCV ``findContours`` with ``RETR_CCOMP``,
    ``drawContours``).

    Args:
        image: uint8 ``[h, w, 3]`` (changed in place).
        mask_t: uint8 ``[h, w]`` (nonzero = inside) in the image's pixel grid.
        colour, thickness, halo: as :func:`draw_rings`.
    """
    import cv2

    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask_t, dtype=np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if halo is not None:
        cv2.drawContours(image, contours, -1, halo, thickness + 2)
    cv2.drawContours(image, contours, -1, colour, thickness)


# --- the GeoJSON walk ---------------------------------------------------------------


def _geometries(doc: Any, field: str, ignored: dict[str, int]) -> Iterator[tuple[str, Any]]:
    """(label, geometry dict) of every Feature / geometry of a GeoJSON document."""
    if isinstance(doc, list):  # QuPath 0.2 writes a bare array of Features
        for i, item in enumerate(doc):
            yield from _feature(item, f"item {i}", field, ignored)
        return
    if not isinstance(doc, dict):
        raise InvalidOptionsError(f"{field} is JSON but not a GeoJSON object")
    if doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise InvalidOptionsError(f"{field}: a FeatureCollection needs a 'features' array")
        for i, item in enumerate(features):
            yield from _feature(item, f"feature {i}", field, ignored)
        return
    yield from _feature(doc, "the geometry", field, ignored)


def _feature(
    item: Any, label: str, field: str, ignored: dict[str, int]
) -> Iterator[tuple[str, Any]]:
    if not isinstance(item, dict):
        raise InvalidOptionsError(f"{field}: {label} is not a GeoJSON object")
    if item.get("type") != "Feature":
        yield label, item  # a bare geometry
        return
    props = item.get("properties")
    kind = props.get("objectType") if isinstance(props, dict) else None
    if isinstance(kind, str) and kind != "annotation":
        _count(ignored, f"QuPath {kind[:20]} object(s)")
        return
    geometry = item.get("geometry")
    if geometry is None:
        _count(ignored, "feature(s) without geometry")
        return
    yield label, geometry


def _count(ignored: dict[str, int], what: str) -> None:
    ignored[what] = ignored.get(what, 0) + 1


def _collect_polygons(
    label: str,
    geometry: Any,
    field: str,
    out: list[tuple[str, list[Any], str]],
    ignored: dict[str, int],
) -> None:
    """Append (label, rings, MultiPolygon label or "") of each polygon of ``geometry``;
    count what has no area."""
    if not isinstance(geometry, dict) or not isinstance(geometry.get("type"), str):
        raise InvalidOptionsError(f"{field}: {label} is not a GeoJSON geometry (no 'type')")
    kind = geometry["type"]
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise InvalidOptionsError(f"{field}: {label} GeometryCollection has no 'geometries'")
        for j, part in enumerate(parts):
            _collect_polygons(f"{label} part {j}", part, field, out, ignored)
        return
    if kind in LINEAR_TYPES:
        _count(ignored, kind)
        return
    if kind not in AREA_TYPES:
        raise InvalidOptionsError(
            f"{field}: {label} has geometry type {kind[:40]!r}; GeoJSON types are Polygon, "
            "MultiPolygon (bounding a region), Point, MultiPoint, LineString, "
            "MultiLineString (ignored) and GeometryCollection"
        )
    coords = geometry.get("coordinates")
    polys = [coords] if kind == "Polygon" else coords
    if not isinstance(polys, list):
        raise InvalidOptionsError(f"{field}: {label} {kind} has no 'coordinates' array")
    for p, rings in enumerate(polys):
        where = label if kind == "Polygon" else f"{label} polygon {p}"
        if not isinstance(rings, list) or not rings:
            raise InvalidOptionsError(f"{field}: {where} has no rings")
        out.append((where, rings, label if kind == "MultiPolygon" else ""))
