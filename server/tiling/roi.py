"""Regions of interest: parse, validate and rasterise the region a request restricts
the grid to (``AnalysisOptions.roi``), knowing nothing of gRPC.

A region is made of up to three parts, each optional, all in **level-0 px** of the
slide (x right, y down, origin at the slide's top-left corner, as QuPath exports):

* ``include``: GeoJSON of Polygon / MultiPolygon geometries (their union);
* ``exclude``: GeoJSON of the same kinds, taken away;
* ``mask``: a binary image (PNG; nonzero = inside) anchored at level-0 (0, 0) with
  ``mask_downsample`` level-0 px per mask px.

A point (x, y) is **inside** when it lies in the include union (or there is none), on a
nonzero mask pixel (or there is no mask), and not in the exclude union.

**GeoJSON accepted** (RFC 7946 shapes, as QuPath's "Export objects as GeoJSON" writes
them): a FeatureCollection, a single Feature, a bare geometry, or a JSON array of
Features (QuPath 0.2 writes one). Features may carry any ``properties`` (QuPath's
``objectType``, ``classification``, ``isLocked``, ``name`` ... are tolerated and, except
``objectType``, ignored). Polygon and MultiPolygon bound the region, holes (the rings
after the first) honoured; GeometryCollections are looked into. **Ignored, with a
reason in the QC warnings**: Point, MultiPoint, LineString and MultiLineString (they
enclose no area: QuPath's points and polylines), Features whose ``geometry`` is null,
and QuPath objects whose ``objectType`` is not ``"annotation"`` (detections, cells,
tiles: measurements, not regions). **Refused** (:class:`InvalidOptionsError`): text
that is not JSON or not GeoJSON of these shapes, an unknown geometry type, a ring of
fewer than 3 distinct points or with non-finite coordinates or coordinates beyond
+-1e9 px (no slide is that large), an invalid polygon
(self-intersecting ring, overlapping parts of a MultiPolygon, a hole outside its shell;
Shapely's ``is_valid`` / ``is_valid_reason``, i.e. GEOS's OGC validity), nothing
left to bound a region, more vertices than the server's limit, more bytes than its
limit, and an undecodable or oversized mask. Messages name the feature and ring by index
and never echo the input. Unclosed rings are closed (Shapely does), a ``z`` coordinate
is ignored.

**Rasterisation** (:func:`region_raster`): a mask pixel belongs to the region when its
**centre** is inside (the centre rule of scan conversion, as GDAL/rasterio's default
``all_touched=False``). Polygons are scan-converted with the even-odd rule over all
rings of the include (or exclude) geometry, computed exactly in float64 per pixel row
(Foley, van Dam et al., *Computer Graphics: Principles and Practice*, 3.6 "Filling
polygons"): each edge's crossing of a row's centre line toggles the parity of the
pixels whose centres lie at or to its right. OpenCV's ``cv2.fillPoly`` was not used:
its fixed-point vertices and inclusive edges move boundary pixels by up to one, so the
kept grid would not be the stated rule's (benchmarks/RESULTS.md has the comparison).
The union of valid geometries (:func:`shapely.union_all`) has non-overlapping parts, so
even-odd parity is exactly "inside a shell and not in one of its holes".

Coordinates frames in names: ``*_l0`` level-0 px, ``*_m`` tissue-mask px, ``*_r``
region-mask (PNG) px.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry.base import BaseGeometry

from histohelper.errors import InvalidOptionsError
from histohelper.regions import geojson_polygons, mask_inside, sample_mask

#: Most decoded pixels a region mask PNG may have (read from its header before decoding).
MAX_MASK_PX = 256 * 2**20
#: Most row crossings a rasterisation may compute (edges x mask rows they span); a
#: polygon past it (a comb of thousands of teeth, each spanning the mask) is refused.
MAX_CROSSINGS = 64_000_000
_CHUNK_CROSSINGS = 4_000_000
#: Largest |coordinate| (level-0 px) a region may have: far beyond any slide (the
#: largest are ~2e5 px), small enough that areas and bounds stay exact in float64.
MAX_COORDINATE = 1e9
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class RegionLimits:
    """The server's bounds on a region of interest (``serve --roi-max-vertices`` ...).

    Attributes:
        max_vertices: most coordinate positions over include and exclude together.
        max_bytes: most bytes of GeoJSON text and mask PNG together.
    """

    max_vertices: int = 100_000
    max_bytes: int = 8 * 2**20


class RegionOfInterest:
    """A parsed, validated region of interest; immutable, compared by its digest.

    Not a dataclass on purpose: a :class:`~.options.TilingOptions` holding one is
    copied by ``dataclasses.asdict`` (the result cache's key), which must not copy
    vertex arrays; the cache keys on :attr:`sha256` instead.

    Attributes:
        include: union of the include polygons (Shapely Polygon / MultiPolygon, level-0
            px), or None for "everywhere".
        exclude: union of the exclude polygons, or None.
        mask: ``[h_r, w_r]`` bool region mask (True = inside), or None.
        mask_downsample: level-0 px per region-mask px (0 without a mask).
        vertex_count: coordinate positions read from the GeoJSON (include + exclude).
        notes: human-readable notes on what was ignored (go to the QC warnings).
        sha256: hex digest of the normalised region (Shapely ``normalize`` + WKB of each
            union, the mask's shape, packed bits and downsample): the same region written
            differently (property order, whitespace, feature order of disjoint polygons)
            has the same digest.
    """

    __slots__ = ("exclude", "include", "mask", "mask_downsample", "notes", "sha256", "vertex_count")

    include: BaseGeometry | None
    exclude: BaseGeometry | None
    mask: npt.NDArray[np.bool_] | None
    mask_downsample: float
    vertex_count: int
    notes: tuple[str, ...]
    sha256: str

    def __init__(
        self,
        include: BaseGeometry | None = None,
        exclude: BaseGeometry | None = None,
        mask: npt.NDArray[np.bool_] | None = None,
        mask_downsample: float = 0.0,
        vertex_count: int = 0,
        notes: tuple[str, ...] = (),
    ) -> None:
        if mask is not None:
            mask = np.array(mask, dtype=bool, copy=True)
            mask.setflags(write=False)
        digest = hashlib.sha256(b"histohelper-roi/1")
        for name, geom in (("include", include), ("exclude", exclude)):
            digest.update(name.encode())
            if geom is not None:
                digest.update(shapely.to_wkb(shapely.normalize(geom), output_dimension=2))
        if mask is not None:
            digest.update(b"mask" + struct.pack(">IId", *mask.shape, float(mask_downsample)))
            digest.update(np.packbits(mask).tobytes())
        for k, v in (
            ("include", include),
            ("exclude", exclude),
            ("mask", mask),
            ("mask_downsample", float(mask_downsample)),
            ("vertex_count", int(vertex_count)),
            ("notes", tuple(notes)),
            ("sha256", digest.hexdigest()),
        ):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RegionOfInterest is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegionOfInterest) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __copy__(self) -> RegionOfInterest:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> RegionOfInterest:
        return self

    def __repr__(self) -> str:
        parts = [n for n in ("include", "exclude", "mask") if getattr(self, n) is not None]
        return (
            f"RegionOfInterest({'+'.join(parts) or 'empty'}, vertices={self.vertex_count}, "
            f"sha256={self.sha256[:16]})"
        )


# --- parsing ------------------------------------------------------------------------------


def parse_region(
    include_geojson: str = "",
    exclude_geojson: str = "",
    mask_png: bytes = b"",
    mask_downsample: float = 0.0,
    limits: RegionLimits | None = None,
) -> RegionOfInterest | None:
    """Parse and validate a request's region of interest.

    Args:
        include_geojson: GeoJSON text (see the module docstring), level-0 px; "" = none.
        exclude_geojson: GeoJSON text of regions to leave out; "" = none.
        mask_png: PNG bytes of a binary mask (nonzero = inside); b"" = none.
        mask_downsample: level-0 px per mask px (> 0 when ``mask_png`` is given).
        limits: the server's bounds (defaults: :class:`RegionLimits`).

    Returns:
        The :class:`RegionOfInterest`, or None when all three parts are empty.

    Raises:
        InvalidOptionsError: see the module docstring; the message says what and where
            (feature, polygon and ring indices), never the input.
    """
    limits = limits or RegionLimits()
    if not include_geojson and not exclude_geojson and not mask_png:
        if mask_downsample:
            raise InvalidOptionsError("roi.mask_downsample is set but roi.mask_png is empty")
        return None
    size = len(include_geojson.encode()) + len(exclude_geojson.encode()) + len(mask_png)
    if size > limits.max_bytes:
        raise InvalidOptionsError(
            f"the region of interest is {size:,} bytes; this server accepts at most "
            f"{limits.max_bytes:,} (simplify the annotations, or send a mask image)"
        )
    notes: list[str] = []
    budget = limits.max_vertices
    include = exclude = None
    counted = 0
    if include_geojson:
        include, n = _parse_geojson(include_geojson, "include", budget, notes)
        counted += n
    if exclude_geojson:
        exclude, n = _parse_geojson(exclude_geojson, "exclude", budget - counted, notes)
        counted += n
    mask = None
    if mask_png:
        mask = decode_mask_png(mask_png, mask_downsample)
    elif mask_downsample:
        raise InvalidOptionsError("roi.mask_downsample is set but roi.mask_png is empty")
    if (
        include is not None
        and exclude is not None
        and mask is None
        and shapely.difference(include, exclude).is_empty
    ):
        raise InvalidOptionsError(
            "the exclude region covers the whole include region: nothing would be analysed"
        )
    return RegionOfInterest(include, exclude, mask, mask_downsample, counted, tuple(notes))


def decode_mask_png(data: bytes, downsample: float) -> npt.NDArray[np.bool_]:
    """Decode a binary region mask (OpenCV ``imdecode``, any bit depth; nonzero = inside).

    The size is read from the PNG header before decoding, so a small file that would
    decode to a huge image is refused without the allocation.

    Args:
        data: PNG bytes (grey, grey+alpha, RGB or RGBA; a pixel is inside when any
            colour channel is nonzero; alpha is ignored).
        downsample: level-0 px per mask px, finite and > 0.

    Returns:
        ``[h_r, w_r]`` bool.

    Raises:
        InvalidOptionsError: not a PNG, undecodable, more than :data:`MAX_MASK_PX`
            pixels, a bad downsample, or no nonzero pixel.
    """
    if not (isinstance(downsample, int | float) and math.isfinite(downsample) and downsample > 0):
        raise InvalidOptionsError("roi.mask_downsample must be a finite number > 0")
    if len(data) < 24 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise InvalidOptionsError("roi.mask_png is not a PNG image")
    w_r, h_r = struct.unpack(">II", data[16:24])
    if w_r * h_r > MAX_MASK_PX:
        raise InvalidOptionsError(
            f"roi.mask_png is {w_r} x {h_r} px; at most {MAX_MASK_PX // 2**20} Mpx are "
            "accepted (send a coarser mask with a larger mask_downsample)"
        )
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim not in (2, 3) or image.size == 0:
        raise InvalidOptionsError("roi.mask_png could not be decoded")
    mask = mask_inside(image)
    if not mask.any():
        raise InvalidOptionsError("roi.mask_png has no nonzero (inside) pixel")
    return np.asarray(mask, dtype=bool)


def _parse_geojson(
    text: str, what: str, max_vertices: int, notes: list[str]
) -> tuple[BaseGeometry, int]:
    """Union of the Polygon / MultiPolygon geometries of one GeoJSON text, and its
    vertex count. Raises :class:`InvalidOptionsError` (see :func:`parse_region`)."""
    field = f"roi.{what}_geojson"
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = ""
        if isinstance(exc, json.JSONDecodeError):
            where = f" (line {exc.lineno}, column {exc.colno})"
        raise InvalidOptionsError(f"{field} is not valid JSON{where}") from None
    ignored: dict[str, int] = {}
    polygons = geojson_polygons(doc, field, ignored)
    vertex_count = sum(len(ring) for _, rings, _ in polygons for ring in rings)
    if vertex_count > max_vertices:
        raise InvalidOptionsError(
            f"the region of interest has more than {max_vertices:,} vertices (the limit; "
            f"a server's is set by serve --roi-max-vertices); {field} alone has "
            f"{vertex_count:,}: simplify the "
            "annotations (QuPath: Objects > Annotations... > Simplify shape)"
        )
    if ignored:
        listed = ", ".join(f"{n} {k}" for k, n in sorted(ignored.items()))
        notes.append(
            f"region of interest: {field} ignored {listed} (only Polygon and MultiPolygon "
            "annotations bound a region)"
        )
    if not polygons:
        raise InvalidOptionsError(
            f"{field} has no Polygon or MultiPolygon annotation to bound a region"
            + (f" (ignored: {', '.join(sorted(ignored))})" if ignored else "")
        )
    shapes = [_polygon(label, rings, field) for label, rings, _ in polygons]
    _check_multipolygons(polygons, shapes, field)
    return shapely.union_all(shapes), vertex_count


def _check_multipolygons(
    polygons: list[tuple[str, list[Any], str]], shapes: list[shapely.Polygon], field: str
) -> None:
    """Refuse a MultiPolygon whose (each valid) parts overlap: validate it whole."""
    groups: dict[str, list[shapely.Polygon]] = {}
    for (_, _, group), shape in zip(polygons, shapes, strict=True):
        if group:
            groups.setdefault(group, []).append(shape)
    for group, parts in groups.items():
        multi = shapely.MultiPolygon(parts)
        if len(parts) > 1 and not multi.is_valid:
            reason = shapely.is_valid_reason(multi)[:120]
            raise InvalidOptionsError(
                f"{field}: {group} MultiPolygon is not valid ({reason}; level-0 px): its "
                "polygons overlap or touch along an edge; draw overlapping areas as one "
                "polygon, or send them as separate Features (their union is taken)"
            )


def _polygon(label: str, rings: list[Any], field: str) -> shapely.Polygon:
    """A valid Shapely Polygon of GeoJSON rings (shell first, then holes)."""
    arrays = []
    for r, ring in enumerate(rings):
        name = "exterior ring" if r == 0 else f"hole {r}"
        try:
            xy = np.array(ring, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidOptionsError(
                f"{field}: {label} {name} is not an array of [x, y] positions"
            ) from None
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise InvalidOptionsError(
                f"{field}: {label} {name} is not an array of [x, y] positions"
            )
        xy = xy[:, :2]
        if not np.isfinite(xy).all():
            raise InvalidOptionsError(f"{field}: {label} {name} has a non-finite coordinate")
        if np.abs(xy).max() > MAX_COORDINATE:
            raise InvalidOptionsError(
                f"{field}: {label} {name} has a coordinate of {np.abs(xy).max():.3g} level-0 "
                f"px; no slide is that large (at most {MAX_COORDINATE:.0e} accepted): "
                "coordinates must be level-0 px of this slide"
            )
        if len(np.unique(xy, axis=0)) < 3:
            raise InvalidOptionsError(f"{field}: {label} {name} has fewer than 3 distinct points")
        arrays.append(xy)
    poly = shapely.Polygon(arrays[0], arrays[1:])
    if not poly.is_valid:
        reason = shapely.is_valid_reason(poly)[:120]
        crossing = [
            "exterior ring" if r == 0 else f"hole {r}"
            for r, xy in enumerate(arrays)
            if not shapely.LinearRing(xy).is_simple
        ]
        what = (
            f"its {', '.join(crossing)} crosses itself (a bow-tie)"
            if crossing
            else "its rings cross or touch each other, or a hole lies outside its shell"
        )
        raise InvalidOptionsError(
            f"{field}: {label} is not a valid polygon ({reason}; level-0 px): {what}; "
            "redraw the annotation without crossing edges"
        )
    return poly


# --- rasterisation ------------------------------------------------------------------------


def region_raster(
    roi: RegionOfInterest,
    shape: tuple[int, int],
    scale_x: float,
    scale_y: float,
    width_l0: int,
    height_l0: int,
) -> tuple[npt.NDArray[np.bool_], list[str]]:
    """The region on a tissue mask's pixel grid, by the centre rule.

    Args:
        roi: the region.
        shape: ``(h_m, w_m)`` of the tissue mask.
        scale_x: level-0 px per mask px along x (mask px (i, j) covers level-0
            ``[j * scale_x, (j + 1) * scale_x) x [i * scale_y, (i + 1) * scale_y)``).
        scale_y: as above, y.
        width_l0: slide width, level-0 px.
        height_l0: slide height, level-0 px.

    Returns:
        ``([h_m, w_m] bool raster, notes)``; notes say how much of the region lies
        outside the slide (ignored).

    Raises:
        InvalidOptionsError: the include region lies wholly outside the slide, or its
            outline is too complex for the mask (:data:`MAX_CROSSINGS`).
    """
    notes: list[str] = []
    slide = shapely.box(0, 0, width_l0, height_l0)
    if roi.include is not None:
        x0, y0, x1, y1 = roi.include.bounds
        if x0 < 0 or y0 < 0 or x1 > width_l0 or y1 > height_l0:
            area = roi.include.area
            inside = shapely.intersection(roi.include, slide).area
            if inside <= 0:
                raise InvalidOptionsError(
                    f"the include region (bounds x {x0:.6g}..{x1:.6g}, y {y0:.6g}..{y1:.6g} "
                    f"level-0 px) lies wholly outside the slide ({width_l0} x {height_l0} px): "
                    "coordinates must be level-0 px of this slide"
                )
            if area - inside > 0.001 * area:
                notes.append(
                    f"region of interest: {100 * (1 - inside / area):.1f}% of the include "
                    "region lies outside the slide and is ignored"
                )
    if roi.mask is not None:
        h_r, w_r = roi.mask.shape
        if roi.mask_downsample * min(w_r, h_r) <= 0 or not (
            roi.mask[: math.ceil(height_l0 / roi.mask_downsample),
                     : math.ceil(width_l0 / roi.mask_downsample)].any()
        ):  # fmt: skip
            raise InvalidOptionsError(
                "the region mask has no inside pixel over the slide: check mask_downsample "
                f"({roi.mask_downsample:g} level-0 px per mask px)"
            )
    raster = np.ones(shape, dtype=bool)
    if roi.include is not None:
        raster &= scan_convert(roi.include, shape, scale_x, scale_y)
    if roi.mask is not None:
        raster &= sample_mask(roi.mask, roi.mask_downsample, shape, scale_x, scale_y)
    if roi.exclude is not None:
        raster &= ~scan_convert(roi.exclude, shape, scale_x, scale_y)
    return raster, notes


def _rings(geom: BaseGeometry) -> list[npt.NDArray[np.float64]]:
    """Every ring (shells and holes) of a Polygon / MultiPolygon, as [n, 2] arrays."""
    out = []
    for poly in shapely.get_parts(geom):
        if not isinstance(poly, shapely.Polygon) or poly.is_empty:
            continue
        out.append(np.asarray(poly.exterior.coords, dtype=np.float64)[:, :2])
        out += [np.asarray(r.coords, dtype=np.float64)[:, :2] for r in poly.interiors]
    return out


def scan_convert(
    geom: BaseGeometry, shape: tuple[int, int], scale_x: float, scale_y: float
) -> npt.NDArray[np.bool_]:
    """Pixels of a grid whose centres lie inside a (Multi)Polygon (even-odd rule).

    Args:
        geom: a valid Polygon / MultiPolygon (non-overlapping parts), level-0 px.
        shape: ``(h, w)`` of the pixel grid.
        scale_x: level-0 px per grid px along x; pixel (i, j) has its centre at level-0
            ``((j + 0.5) * scale_x, (i + 0.5) * scale_y)``.
        scale_y: as above, y.

    Returns:
        ``[h, w]`` bool. A centre exactly on an edge may fall on either side.

    Raises:
        InvalidOptionsError: more than :data:`MAX_CROSSINGS` row crossings.
    """
    h, w = shape
    rings = _rings(geom)
    if not rings or h == 0 or w == 0:
        return np.zeros(shape, dtype=bool)
    # Edges in mask-centre coordinates: pixel centres sit on integers.
    pts = [r / (scale_x, scale_y) - 0.5 for r in rings]
    u0 = np.concatenate([p[:-1, 0] for p in pts])
    v0 = np.concatenate([p[:-1, 1] for p in pts])
    u1 = np.concatenate([p[1:, 0] for p in pts])
    v1 = np.concatenate([p[1:, 1] for p in pts])
    # Rows i with min(v) <= i < max(v) (half-open: a vertex on a row counts once).
    lo = np.clip(np.ceil(np.minimum(v0, v1)), 0, h).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(v0, v1)), 0, h).astype(np.int64)
    n = np.maximum(hi - lo, 0)
    total = int(n.sum())
    if total > MAX_CROSSINGS:
        raise InvalidOptionsError(
            f"the region's outline crosses the tissue mask's rows {total:,} times (limit "
            f"{MAX_CROSSINGS:,}): simplify the annotations"
        )
    toggles = np.zeros(h * (w + 1), dtype=np.int64)
    keep = np.flatnonzero(n)
    ends = np.cumsum(n[keep])
    start = 0
    while start < len(keep):
        # A chunk of whole edges with at most _CHUNK_CROSSINGS crossings (at least one edge).
        base = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _CHUNK_CROSSINGS, side="right")))
        e = keep[start:stop]
        counts = n[e]
        edge = np.repeat(e, counts)
        offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        row = lo[edge] + offset
        t = (row - v0[edge]) / (v1[edge] - v0[edge])
        u = u0[edge] + t * (u1[edge] - u0[edge])
        # The crossing toggles pixels j >= u, i.e. from column ceil(u) on.
        col = np.clip(np.ceil(u), 0, w).astype(np.int64)
        toggles += np.bincount(row * (w + 1) + col, minlength=h * (w + 1))
        start = stop
    parity = np.cumsum(toggles.reshape(h, w + 1)[:, :w], axis=1) & 1
    return parity.astype(bool)
