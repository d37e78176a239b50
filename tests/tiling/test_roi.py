"""Regions of interest (server/tiling/roi.py): GeoJSON as QuPath writes it, refusals,
the centre-rule rasterisation against Shapely, and the grid rule in plan_tiling."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely

from histohelper.errors import InvalidOptionsError
from histohelper.server.tiling import TilingOptions, open_slide, plan_tiling
from histohelper.server.tiling.roi import (
    RegionLimits,
    parse_region,
    region_raster,
    scan_convert,
)

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "slides" / "real"
SMALL_REGION = REAL / "CMU-1-Small-Region.svs"

SHELL = [[300.5, 200.25], [1900.0, 250.0], [1800.0, 1900.0], [350.0, 1800.0], [300.5, 200.25]]
HOLE = [[800.0, 700.0], [1300.0, 720.0], [1250.0, 1200.0], [820.0, 1150.0], [800.0, 700.0]]


def qupath_feature(rings: list, kind: str = "Polygon", object_type: str = "annotation") -> dict:
    """One Feature as QuPath 0.4+ "Export objects as GeoJSON" writes it."""
    return {
        "type": "Feature",
        "id": "6b3a0f4e-0000-4000-8000-000000000000",
        "geometry": {"type": kind, "coordinates": rings},
        "properties": {
            "objectType": object_type,
            "classification": {"name": "Tumor", "color": [200, 0, 0]},
            "isLocked": False,
        },
    }


def collection(*features: dict) -> str:
    return json.dumps({"type": "FeatureCollection", "features": list(features)})


def test_feature_collection_feature_bare_geometry_and_array_are_one_region() -> None:
    poly = {"type": "Polygon", "coordinates": [SHELL, HOLE]}
    feature = qupath_feature([SHELL, HOLE])
    texts = [
        collection(feature),
        json.dumps(feature),
        json.dumps(poly),
        json.dumps([feature]),  # QuPath 0.2 writes a bare array
        json.dumps({"type": "MultiPolygon", "coordinates": [[SHELL, HOLE]]}),
        json.dumps({"type": "GeometryCollection", "geometries": [poly]}),
    ]
    regions = [parse_region(t) for t in texts]
    assert len({r.sha256 for r in regions if r is not None}) == 1
    region = regions[0]
    assert region is not None and region.include is not None
    expected = shapely.Polygon(SHELL, [HOLE]).area
    assert region.include.area == pytest.approx(expected)
    assert region.vertex_count == len(SHELL) + len(HOLE)


def test_points_lines_detections_and_null_geometries_are_ignored_with_a_note() -> None:
    text = collection(
        qupath_feature([SHELL]),
        qupath_feature([10.0, 10.0], kind="Point"),
        qupath_feature([[0.0, 0.0], [5.0, 5.0]], kind="LineString"),
        qupath_feature([[[0, 0], [9, 0], [9, 9], [0, 0]]], object_type="detection"),
        {"type": "Feature", "geometry": None, "properties": {}},
    )
    region = parse_region(text)
    assert region is not None and region.include is not None
    assert region.include.area == pytest.approx(shapely.Polygon(SHELL).area)
    (note,) = region.notes
    assert "1 Point" in note and "1 LineString" in note and "detection" in note


def test_empty_region_is_none_and_digest_ignores_formatting() -> None:
    assert parse_region() is None
    a = parse_region(collection(qupath_feature([SHELL])))
    b = parse_region(json.dumps({"type": "Polygon", "coordinates": [SHELL[::-1]]}, indent=4))
    assert a == b and hash(a) == hash(b)
    c = parse_region(collection(qupath_feature([SHELL, HOLE])))
    assert c != a


def poly(*rings: list) -> str:
    return json.dumps({"type": "Polygon", "coordinates": list(rings)})


BOWTIE = [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]
BOWTIE_HOLE = [[800, 700], [1300, 1200], [1300, 700], [800, 1200], [800, 700]]
FAR_HOLE = [[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5000]]
BAD_CASES = {
    "not-json": ("{'type': ", "not valid JSON"),
    "not-geojson": ("[1, 2, 3]", "not a GeoJSON object"),
    "unknown-type": (json.dumps({"type": "Circle", "coordinates": []}), "'Circle'"),
    "no-polygon": (json.dumps({"type": "Point", "coordinates": [1, 2]}), "no Polygon"),
    "bowtie": (poly(BOWTIE), "exterior ring crosses itself"),
    "bowtie-hole": (poly(SHELL, BOWTIE_HOLE), "hole 1 crosses itself"),
    "overlapping-multipolygon-parts": (
        json.dumps({"type": "MultiPolygon", "coordinates": [[SHELL], [HOLE]]}),
        "the geometry MultiPolygon is not valid",
    ),
    "huge": (poly([[0, 0], [1e308, 0], [1e308, 1e308], [0, 0]]), "coordinate of 1e+308"),
    "beyond-any-slide": (poly([[0, 0], [2e9, 0], [0, 5], [0, 0]]), "no slide is that large"),
    "two-points": (poly([[0, 0], [5, 5], [0, 0]]), "fewer than 3"),
    "nan": (
        '{"type": "Polygon", "coordinates": [[[0, 0], [NaN, 5], [5, 0], [0, 0]]]}',
        "non-finite",
    ),
    "strings": (json.dumps({"type": "Polygon", "coordinates": [["a", "b", "c"]]}), "positions"),
    "hole-outside": (poly(SHELL, FAR_HOLE), "not a valid polygon"),
    "deep-nesting": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize(("text", "needle"), BAD_CASES.values(), ids=BAD_CASES.keys())
def test_malformed_geojson_is_refused_without_echoing_it(text: str, needle: str) -> None:
    with pytest.raises(InvalidOptionsError) as info:
        parse_region(text)
    message = str(info.value)
    assert needle in message
    assert len(message) < 400


def test_multipolygon_of_disjoint_parts_and_separate_overlapping_features_are_accepted() -> None:
    """Only the parts of one MultiPolygon must not overlap (OGC validity); separate
    Features may (their union is taken)."""
    far = [[3000, 3000], [3500, 3000], [3500, 3500], [3000, 3000]]
    disjoint = parse_region(json.dumps({"type": "MultiPolygon", "coordinates": [[SHELL], [far]]}))
    assert disjoint is not None and disjoint.include is not None
    assert disjoint.include.area == pytest.approx(
        shapely.Polygon(SHELL).area + shapely.Polygon(far).area
    )
    overlapping = parse_region(collection(qupath_feature([SHELL]), qupath_feature([HOLE])))
    assert overlapping is not None and overlapping.include is not None
    assert overlapping.include.area == pytest.approx(shapely.Polygon(SHELL).area)


def test_region_covering_more_than_the_slide_is_clipped_to_it() -> None:
    roi = parse_region(poly([[-1e8, -1e8], [1e8, -1e8], [1e8, 1e8], [-1e8, 1e8], [-1e8, -1e8]]))
    assert roi is not None
    raster, notes = region_raster(roi, (10, 10), 100.0, 100.0, 1000, 1000)
    assert raster.all()
    assert "100.0% of the include region lies outside" in notes[0]


def test_vertex_and_byte_limits() -> None:
    text = collection(qupath_feature([SHELL, HOLE]))
    with pytest.raises(InvalidOptionsError, match="more than 9 vertices") as info:
        parse_region(text, limits=RegionLimits(max_vertices=9))
    assert "set by serve --roi-max-vertices" in str(info.value)  # tile has no such flag
    assert parse_region(text, limits=RegionLimits(max_vertices=10)) is not None
    with pytest.raises(InvalidOptionsError, match="at most 100 "):
        parse_region(text, limits=RegionLimits(max_bytes=100))


def test_exclude_covering_include_is_refused() -> None:
    inc = json.dumps({"type": "Polygon", "coordinates": [HOLE]})
    with pytest.raises(InvalidOptionsError, match="covers the whole include"):
        parse_region(inc, json.dumps({"type": "Polygon", "coordinates": [SHELL]}))


def _png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    assert ok
    return buf.tobytes()


def test_mask_png_refusals() -> None:
    good = _png(np.eye(4, dtype=bool))
    assert parse_region(mask_png=good, mask_downsample=16.0) is not None
    with pytest.raises(InvalidOptionsError, match="mask_downsample"):
        parse_region(mask_png=good, mask_downsample=0.0)
    with pytest.raises(InvalidOptionsError, match="not a PNG"):
        parse_region(mask_png=b"GIF89a" + bytes(40), mask_downsample=4.0)
    with pytest.raises(InvalidOptionsError, match="no nonzero"):
        parse_region(mask_png=_png(np.zeros((4, 4), bool)), mask_downsample=4.0)
    # A header claiming 100,000 x 100,000 px is refused before any decoding.
    huge = good[:16] + (100_000).to_bytes(4, "big") * 2 + good[24:]
    with pytest.raises(InvalidOptionsError, match="Mpx"):
        parse_region(mask_png=huge, mask_downsample=4.0)
    with pytest.raises(InvalidOptionsError, match="mask_png is empty"):
        parse_region(mask_downsample=4.0)


def test_scan_convert_is_the_centre_rule() -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        n = int(rng.integers(5, 80))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(200, 900, n)
        shell = np.c_[1000 + radius * np.cos(angles), 900 + radius * np.sin(angles)]
        hole = np.c_[1000 + 120 * np.cos(angles[::-1]), 900 + 120 * np.sin(angles[::-1])]
        geom = shapely.Polygon(shell, [hole])
        if not geom.is_valid:
            continue
        shape, sx, sy = (150, 170), 2100 / 170, 1900 / 150
        raster = scan_convert(geom, shape, sx, sy)
        jj, ii = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]))
        expected = shapely.contains_xy(geom, (jj + 0.5) * sx, (ii + 0.5) * sy)
        assert np.array_equal(raster, expected)


def test_region_raster_combines_include_mask_and_exclude() -> None:
    inc = json.dumps(
        {"type": "Polygon", "coordinates": [[[0, 0], [80, 0], [80, 80], [0, 80], [0, 0]]]}
    )
    exc = json.dumps(
        {"type": "Polygon", "coordinates": [[[0, 0], [20, 0], [20, 20], [0, 20], [0, 0]]]}
    )
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # x < 50 level-0 px (10 px per mask px)
    roi = parse_region(inc, exc, _png(mask), 10.0)
    assert roi is not None
    raster, notes = region_raster(roi, (10, 10), 10.0, 10.0, 100, 100)
    expected = np.zeros((10, 10), bool)
    expected[:8, :5] = True
    expected[:2, :2] = False
    assert np.array_equal(raster, expected) and notes == []


def test_region_outside_the_slide() -> None:
    far = parse_region(poly([[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]))
    assert far is not None
    with pytest.raises(InvalidOptionsError, match="wholly outside the slide"):
        region_raster(far, (10, 10), 100.0, 100.0, 1000, 1000)
    half = parse_region(poly([[500, 0], [1500, 0], [1500, 1000], [500, 1000], [500, 0]]))
    assert half is not None
    raster, notes = region_raster(half, (10, 10), 100.0, 100.0, 1000, 1000)
    assert raster[:, 5:].all() and not raster[:, :5].any()
    assert "50.0% of the include region lies outside" in notes[0]


@pytest.mark.skipif(not SMALL_REGION.exists(), reason="real test slide not in ../shared/slides")
def test_plan_keeps_only_patches_inside_the_region_and_counts_the_rest() -> None:
    roi = parse_region(collection(qupath_feature([SHELL, HOLE])))
    with open_slide(SMALL_REGION) as slide:
        whole = plan_tiling(slide, TilingOptions())
        inside = plan_tiling(slide, TilingOptions(roi=roi))
    assert inside.region is not None and whole.region is None
    kept = set(zip(inside.grid.row.tolist(), inside.grid.col.tolist(), strict=True))
    everywhere = set(zip(whole.grid.row.tolist(), whole.grid.col.tolist(), strict=True))
    assert kept < everywhere and len(kept) > 0
    assert inside.roi_excluded_patch_count == len(everywhere) - len(kept)
    assert whole.roi_excluded_patch_count == 0
    assert np.all(inside.grid.tissue_fraction <= 1.0)


@pytest.mark.skipif(not SMALL_REGION.exists(), reason="real test slide not in ../shared/slides")
def test_mask_png_and_polygon_of_the_same_area_give_the_same_grid() -> None:
    # A rectangle on whole 30 px mask cells (level-0 px 300..1500 x 600..2100): as a
    # polygon and as a mask PNG with 30 level-0 px per mask px.
    rect = parse_region(poly([[300, 600], [1500, 600], [1500, 2100], [300, 2100], [300, 600]]))
    mask = np.zeros((100, 74), bool)
    mask[20:70, 10:50] = True
    as_mask = parse_region(mask_png=_png(mask), mask_downsample=30.0)
    with open_slide(SMALL_REGION) as slide:
        a = plan_tiling(slide, TilingOptions(roi=rect))
        b = plan_tiling(slide, TilingOptions(roi=as_mask))
    assert a.region is not None and b.region is not None
    assert np.array_equal(a.region, b.region) and a.region.any()
    assert np.array_equal(a.grid.row, b.grid.row) and np.array_equal(a.grid.col, b.grid.col)
    assert a.roi_excluded_patch_count == b.roi_excluded_patch_count > 0
