"""Regions of interest over a real loopback server (issue 21).

Acceptance: a QuPath-style GeoJSON annotation (a polygon with a hole, written exactly as
QuPath's "Export objects as GeoJSON" writes it) drawn over part of the real test slide;
the analysed patches are exactly those the stated rule selects, computed here
independently of the tiler's code (Shapely's point-in-polygon on the tissue mask's
pixel centres, per-cell area overlaps by separable products instead of summed-area
tables). Refusals: each is INVALID_OPTIONS and the server goes on serving.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import shapely

from histohelper.client import AnalysisOptions, RegionOfInterest, SlideClient
from histohelper.errors import InvalidOptionsError

SLIDE = "real/CMU-1-Small-Region.svs"
# Level-0 px of CMU-1-Small-Region.svs (2220 x 2967): a shell over the upper middle of
# the tissue and a hole in it; kept clear of the grid's edge cells (x >= 2020, y >= 2917).
SHELL = [[300.5, 200.25], [1900.0, 250.0], [1800.0, 1900.0], [350.0, 1800.0], [300.5, 200.25]]
HOLE = [[800.0, 700.0], [1300.0, 720.0], [1250.0, 1200.0], [820.0, 1150.0], [800.0, 700.0]]


def qupath_export(rings: list, path: Path) -> Path:
    """Write one annotation as QuPath 0.4/0.5 exports it (FeatureCollection, pretty)."""
    doc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "0f3c9a52-6d1e-4b8e-9a53-2f6b1c1d7e21",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "isLocked": False,
                },
            }
        ],
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


def _overlaps(edges_l0: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Length of [lo, hi) inside each mask pixel [edges[k], edges[k + 1]) (level-0 px)."""
    return np.clip(np.minimum(edges_l0[1:], hi) - np.maximum(edges_l0[:-1], lo), 0.0, None)


def expected_cells(
    tissue: np.ndarray, scale: tuple[float, float], region: shapely.Geometry, grid, threshold: float
) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(cells kept inside the region, cells kept on the whole slide) by the stated rule,
    for grid cells wholly inside the slide: tissue (inside the region) area over the
    footprint area >= threshold (and > 0)."""
    sx, sy = scale
    h, w = tissue.shape
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    inside = shapely.contains_xy(region, (jj + 0.5) * sx, (ii + 0.5) * sy)
    xe, ye = np.arange(w + 1) * sx, np.arange(h + 1) * sy
    kept, whole = set(), set()
    area = grid.patch_width_l0 * grid.patch_height_l0
    for r in range(grid.n_rows):
        y0 = grid.origin_y_l0 + r * grid.stride_y_l0
        for c in range(grid.n_cols):
            x0 = grid.origin_x_l0 + c * grid.stride_x_l0
            if x0 + grid.patch_width_l0 > 2220 or y0 + grid.patch_height_l0 > 2967:
                continue  # edge cells: not under test here (the region avoids them)
            weight = np.outer(
                _overlaps(ye, y0, y0 + grid.patch_height_l0),
                _overlaps(xe, x0, x0 + grid.patch_width_l0),
            )
            f_in = float((weight * (tissue & inside)).sum()) / area
            f_all = float((weight * tissue).sum()) / area
            if f_in >= threshold and f_in > 0:
                kept.add((r, c))
            if f_all >= threshold and f_all > 0:
                whole.add((r, c))
    return kept, whole


@pytest.fixture
def roi_server(start_inprocess_server):
    """An in-process server with small region limits (60 vertices, 4 KiB)."""
    return start_inprocess_server(roi_max_vertices=60, roi_max_bytes=4096)


def test_qupath_annotation_round_trip(roi_server, slides_dir: Path, tmp_path: Path) -> None:
    from histohelper.server.tiling import TilingOptions, open_slide, plan_tiling

    path = qupath_export([SHELL, HOLE], tmp_path / "annotations.geojson")
    options = AnalysisOptions(roi=RegionOfInterest.from_files(path))
    with SlideClient(f"127.0.0.1:{roi_server.port}") as client:
        result = client.analyze(SLIDE, options)
        explained = client.explain(SLIDE, top_k=2, options=options)

    # The tissue mask the server used (checked equal to the served one) and its scale.
    with open_slide(slides_dir / SLIDE) as slide:
        reference = plan_tiling(slide, TilingOptions())
    tissue = reference.mask.mask
    assert np.array_equal(result.tissue_mask() > 0, tissue)
    region = shapely.Polygon(SHELL, [HOLE])
    kept, whole = expected_cells(
        tissue,
        (reference.mask.scale_x, reference.mask.scale_y),
        region,
        result.grid,
        result.grid.min_tissue_fraction,
    )
    got = set(zip(result.patches.row.tolist(), result.patches.col.tolist(), strict=True))
    g = reference.grid  # the same grid without the region, by the tiler
    everywhere = set(zip(g.row.tolist(), g.col.tolist(), strict=True))
    assert got == kept
    assert whole <= everywhere and got < everywhere
    assert result.qc.roi_excluded_patch_count == len(everywhere) - len(got) > 0
    assert any("region of interest" in w for w in result.qc.warnings)
    # ExplainPatches takes the same options: it ranks only the region's patches.
    assert {(e.row, e.col) for e in explained} <= got
    print(
        f"ROI round trip: {len(got)} patches kept inside the region, "
        f"{result.qc.roi_excluded_patch_count} removed by it ({len(everywhere)} without it)"
    )


def _geojson(rings: list) -> str:
    return json.dumps({"type": "Polygon", "coordinates": rings})


def _circle(n: int) -> list[list[float]]:
    ring = [[500 + 400 * np.cos(a), 900 + 400 * np.sin(a)] for a in np.linspace(0, 6.28, n)]
    return [*ring, ring[0]]


BOWTIE = [[0, 0], [900, 900], [900, 0], [0, 900], [0, 0]]
FAR = [[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]
REFUSALS = {
    "malformed-json": ({"include_geojson": '{"type": "Feature", "geometry": ['}, "not valid JSON"),
    "not-geojson": ({"include_geojson": '{"type": "Circle", "radius": 5}'}, "'Circle'"),
    "self-intersecting": ({"include_geojson": _geojson([BOWTIE])}, "Self-intersection"),
    "outside-the-slide": ({"include_geojson": _geojson([FAR])}, "wholly outside the slide"),
    "too-many-vertices": ({"include_geojson": _geojson([_circle(70)])}, "more than 60 vertices"),
    "too-many-bytes": ({"include_geojson": _geojson([SHELL]) + " " * 5000}, "at most 4,096"),
    "mask-without-downsample": ({"mask_png": b"\x89PNG\r\n\x1a\n" + bytes(30)}, "mask_downsample"),
}


def test_bad_regions_are_invalid_options_and_the_server_goes_on(roi_server) -> None:
    from histohelper.v1 import slide_analysis_pb2 as pb

    with SlideClient(f"127.0.0.1:{roi_server.port}") as client:
        for case, (fields, needle) in REFUSALS.items():
            options = AnalysisOptions(min_tissue_fraction=0.99)
            wire = options.to_proto()
            wire.roi.CopyFrom(pb.RegionOfInterest(**fields))  # as any client could send it
            with pytest.raises(InvalidOptionsError) as info:
                client.analyze(SLIDE, _RawOptions(options, wire))
            assert info.value.reason == "INVALID_OPTIONS", case
            assert needle in str(info.value), case
            assert len(str(info.value)) < 500, case  # never the input echoed back
        # The server went on serving: an analysis after all the refusals completes.
        ok = client.analyze(SLIDE, AnalysisOptions(min_tissue_fraction=0.99))
        assert ok.outcome in ("completed", "no_tissue")


@dataclasses.dataclass(frozen=True)
class _RawOptions:
    """Options whose wire form is given (bypasses the SDK's own checks)."""

    base: AnalysisOptions
    wire: object

    def to_proto(self) -> object:
        return self.wire

    def __getattr__(self, name: str) -> object:
        return getattr(self.base, name)


def test_result_cache_keys_on_the_normalised_region() -> None:
    from histohelper.server.cache import ModelIdentity, analysis_key
    from histohelper.server.pipeline import AnalysisSpec
    from histohelper.server.tiling import TilingOptions
    from histohelper.server.tiling.roi import parse_region

    model = ModelIdentity(
        artifact_sha256="a" * 64, engine="torchscript", precision="fp32", device="cpu",
        concurrency=1,
    )  # fmt: skip

    def key(roi: object) -> str:
        spec = AnalysisSpec("r1", Path("s.svs"), TilingOptions(roi=roi), 8)  # type: ignore[arg-type]
        return analysis_key(spec, "b" * 64, model, "code")

    region = parse_region(_geojson([SHELL, HOLE]))
    feature = {"type": "Feature", "geometry": json.loads(_geojson([HOLE[::-1], SHELL[::-1]][::-1]))}
    same = parse_region(json.dumps({"type": "FeatureCollection", "features": [feature]}, indent=2))
    other = parse_region(_geojson([SHELL]))
    assert key(region) == key(same)
    assert len({key(None), key(region), key(other)}) == 3
