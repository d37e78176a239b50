"""The region of interest a request sent, outlined on the overlays and in report.html.

An analysis of the real test slide with an include polygon (with a hole) and an exclude
square, over an in-process server on loopback; the outline pixels are checked where the
level-0 polygon edges map on the thumbnail, and checked absent without the region.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import re
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from histohelper.client import AnalysisOptions, RegionOfInterest, SlideClient
from histohelper.client.render import (
    ROI_EXCLUDE_COLOUR,
    ROI_INCLUDE_COLOUR,
    overlay,
    region_outlines,
)
from histohelper.client.report import write_report

SLIDE = "real/CMU-1-Small-Region.svs"
SHELL = [[300.5, 200.25], [1900.0, 250.0], [1800.0, 1900.0], [350.0, 1800.0], [300.5, 200.25]]
HOLE = [[800.0, 700.0], [1300.0, 720.0], [1250.0, 1200.0], [820.0, 1150.0], [800.0, 700.0]]
SQUARE = [[1450.0, 1300.0], [1650.0, 1300.0], [1650.0, 1500.0], [1450.0, 1500.0], [1450.0, 1300.0]]


def _collection(*rings_list: list) -> str:
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation"},
        }
        for rings in rings_list
    ]
    return json.dumps({"type": "FeatureCollection", "features": features})


REGION = RegionOfInterest(
    include_geojson=_collection([SHELL, HOLE]), exclude_geojson=_collection([SQUARE])
)


@pytest.fixture(scope="module")
def target(model_artifact, served_runtime, slides_dir: Path):
    """An in-process server on loopback for the module."""
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    config = ServerConfig(
        model_path=model_artifact, slide_root=slides_dir, port=0, precision="fp32", grace_s=2.0
    )
    running = start_server(config, runtime=served_runtime)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop(grace=0, drain=0)


@pytest.fixture(scope="module")
def roi_result(target: str):
    """One analysis (2 um/px: a few dozen patches) with the region."""
    with SlideClient(target, timeout=300) as client:
        return client.analyze(SLIDE, AnalysisOptions(target_mpp=2.0, roi=REGION))


def _edge_pixels(rings: list[list[list[float]]], sx: float, sy: float) -> npt.NDArray[np.int64]:
    """Thumbnail (row, col) of points along each ring's edges (away from vertices)."""
    out = []
    for ring in rings:
        xy = np.asarray(ring, np.float64)
        for a, b in itertools.pairwise(xy):
            for t in np.linspace(0.15, 0.85, 8):
                x, y = a + t * (b - a)
                out.append((round(y / sy - 0.5), round(x / sx - 0.5)))
    return np.asarray(out, np.int64)


def _share(image: npt.NDArray[np.uint8], rc: npt.NDArray[np.int64], colour: tuple) -> float:
    """Share of the points whose pixel has exactly ``colour``."""
    return float(np.all(image[rc[:, 0], rc[:, 1]] == colour, axis=1).mean())


def test_overlay_draws_include_and_exclude_where_the_polygons_are(roi_result) -> None:
    assert roi_result.roi == REGION  # the client keeps the region it sent
    t = roi_result.thumbnail
    include = _edge_pixels([SHELL, HOLE], t.scale_x, t.scale_y)
    exclude = _edge_pixels([SQUARE], t.scale_x, t.scale_y)
    for kwargs in ({}, {"attention": True}):
        bare = overlay(roi_result, legend=False, **kwargs)
        assert _share(bare, include, ROI_INCLUDE_COLOUR) == 1.0
        assert _share(bare, exclude, ROI_EXCLUDE_COLOUR) == 1.0
        # Far from every edge (the hole's centre) the blend is left alone.
        assert not np.all(bare[round(950 / t.scale_y), round(1050 / t.scale_x)] == 255)
    plain = overlay(dataclasses.replace(roi_result, roi=None), legend=False)
    assert _share(plain, include, ROI_INCLUDE_COLOUR) < 0.1
    assert _share(plain, exclude, ROI_EXCLUDE_COLOUR) == 0.0
    # roi_outline=False leaves the region out too.
    off = overlay(roi_result, legend=False, roi_outline=False)
    assert np.array_equal(off, plain)


def _offset(figure: npt.NDArray[np.uint8], bare: npt.NDArray[np.uint8]) -> tuple[int, int]:
    """Where the (unchanged) bare overlay lies inside its framed figure."""
    score = cv2.matchTemplate(figure, bare, cv2.TM_SQDIFF)
    _, _, (x, y), _ = cv2.minMaxLoc(score)  # float32 sums: check the match exactly
    h, w = bare.shape[:2]
    assert np.array_equal(figure[y : y + h, x : x + w], bare)
    return y, x


def _report_figure(html: str, alt: str) -> npt.NDArray[np.uint8]:
    match = re.search(r'<img src="data:image/jpeg;base64,([^"]+)" alt="' + alt + '"', html)
    assert match is not None, alt
    data = np.frombuffer(base64.b64decode(match.group(1)), np.uint8)
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    ("alt", "kwargs"),
    [("probability overlay", {}), ("attention overlay", {"attention": True})],
    ids=["probability", "attention"],
)
def test_report_overlays_outline_the_region_with_a_legend_key(
    roi_result, tmp_path: Path, alt: str, kwargs: dict
) -> None:
    t = roi_result.thumbnail
    include = _edge_pixels([SHELL, HOLE], t.scale_x, t.scale_y)
    exclude = _edge_pixels([SQUARE], t.scale_x, t.scale_y)
    results = {"roi": roi_result, "plain": dataclasses.replace(roi_result, roi=None)}
    seen = {}
    for name, result in results.items():
        html = write_report(result, tmp_path / name).read_text()
        figure = _report_figure(html, alt)
        framed = overlay(result, **kwargs)
        assert figure.shape == framed.shape
        y0, x0 = _offset(framed, overlay(result, legend=False, **kwargs))
        inc = figure[include[:, 0] + y0, include[:, 1] + x0].astype(int)
        exc = figure[exclude[:, 0] + y0, exclude[:, 1] + x0].astype(int)
        magenta = (exc[:, 0] > 170) & (exc[:, 2] > 170) & (exc[:, 1] < 90)
        # The legend key: an exact magenta sample right of the image (the report's JPEG
        # is checked against the lossless figure it encodes).
        legend = framed[:, x0 + t.width_px :]
        key = bool(np.all(legend == ROI_EXCLUDE_COLOUR, axis=2).any())
        seen[name] = (float(inc.min(axis=1).mean()), float(magenta.mean()), key)
        assert np.abs(figure.astype(int) - framed).mean() < 3.0  # the report embeds it
    assert seen["roi"][0] > 200 and seen["roi"][1] > 0.9 and seen["roi"][2]
    assert seen["plain"][1] < 0.1 and not seen["plain"][2]
    assert seen["plain"][0] < seen["roi"][0] - 20


def test_mask_region_outline_is_the_mask_border() -> None:
    """A mask ROI (no GeoJSON): its inside resampled to the thumbnail, border drawn."""
    mask = np.zeros((50, 80), np.uint8)
    mask[10:30, 20:60] = 255  # level-0 x 80..240, y 40..120 at downsample 4
    ok, png = cv2.imencode(".png", mask)
    assert ok
    roi = RegionOfInterest(mask_png=png.tobytes(), mask_downsample=4.0)
    (outline,) = region_outlines(roi, 2.0, 2.0, 160, 100)  # thumbnail 2 level-0 px / px
    assert outline.label == "ROI include" and outline.colour == ROI_INCLUDE_COLOUR
    image = np.full((100, 160, 3), 128, np.uint8)
    outline.draw(image)
    white = np.all(image == ROI_INCLUDE_COLOUR, axis=2)
    # Thumbnail px 40..119 x 20..59 are inside; the border runs along them.
    assert white[20, 40:120].all() and white[59, 40:120].all()
    assert white[20:60, 40].all() and white[20:60, 119].all()
    assert not white[30:50, 50:110].any() and not white[:15].any()
    assert region_outlines(None, 2.0, 2.0, 160, 100) == ()


def test_analyze_cli_overlays_outline_the_region_files(target: str, tmp_path: Path) -> None:
    """``histohelper analyze --roi A --roi-exclude B``: overlay.png and
    attention_overlay.png (lossless) carry the exclude outline's exact magenta (its
    edges and the legend key); without the flags they carry none."""
    from histohelper.cli import main

    include, exclude = tmp_path / "in.geojson", tmp_path / "out.geojson"
    include.write_text(REGION.include_geojson)
    exclude.write_text(REGION.exclude_geojson)
    args = ["analyze", SLIDE, "--server", target, "--mpp", "2.0", "-q"]
    roi = ["--roi", str(include), "--roi-exclude", str(exclude)]
    assert main([*args, "--out", str(tmp_path / "roi"), *roi]) == 0
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    for name in ("overlay.png", "attention_overlay.png"):
        counts = []
        for run in ("roi", "plain"):
            rgb = cv2.cvtColor(cv2.imread(str(tmp_path / run / name)), cv2.COLOR_BGR2RGB)
            counts.append(int(np.all(rgb == ROI_EXCLUDE_COLOUR, axis=2).sum()))
        assert counts[0] > 300 and counts[1] == 0, (name, counts)
