"""End to end through a real server process (``analysis_server``, slide root ../shared/slides).

Acceptance of the client issue, on real/CMU-1-Small-Region.svs: the overlay PNG exists
and frames the thumbnail (legend in a margin); heatmaps are NaN exactly where the grid has no patch;
the GeoJSON parses, has one feature per patch, and its polygons are the patch boxes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from histohelper.client import AnalysisOptions, AsyncSlideClient, SlideClient, SlideResult
from histohelper.client.cli import main
from histohelper.client.render import overlay
from histohelper.errors import SlideNotFoundError, SlidePathError

SLIDE = "real/CMU-1-Small-Region.svs"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Any:
    """The session's real server (tests/server_fixtures.py); skips where it is not wired."""
    try:
        return request.getfixturevalue("analysis_server")
    except pytest.FixtureLookupError:
        pytest.skip("the analysis_server fixture is not registered in tests/conftest.py yet")


@pytest.fixture(scope="module")
def sdk_result(server: Any) -> SlideResult:
    with SlideClient(server.target, timeout=300) as client:
        return client.analyze(SLIDE, AnalysisOptions(return_attention=True))


@pytest.fixture(scope="module")
def cli_out(server: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analyze-out")
    rc = main(["analyze", SLIDE, "--server", server.target, "--out", str(out), "-q"])
    assert rc == 0
    return out


def test_sdk_result_is_consistent(sdk_result: SlideResult) -> None:
    r = sdk_result
    assert r.outcome == "completed"
    assert r.patch_count == r.grid.patch_count - r.qc.failed_patch_count > 0
    assert r.prediction is not None
    assert r.prediction.predicted_class in r.prediction.class_names
    assert sum(r.prediction.probabilities) == pytest.approx(1.0, abs=1e-4)
    assert r.has_attention
    assert float(np.nansum(r.attention_map)) == pytest.approx(1.0, abs=1e-3)
    assert r.slide.width_l0 == 2220 and r.slide.height_l0 == 2967


def test_overlay_has_the_thumbnails_size(sdk_result: SlideResult, cli_out: Path) -> None:
    thumb = sdk_result.thumbnail_rgb()
    t = sdk_result.thumbnail
    assert thumb.shape == (t.height_px, t.width_px, 3)
    png = cv2.imread(str(cli_out / "overlay.png"), cv2.IMREAD_UNCHANGED)
    assert png is not None
    assert png.shape[:2] == overlay(sdk_result).shape[:2]  # the figure: margins around it
    assert png.shape[0] > thumb.shape[0] and png.shape[1] > thumb.shape[1]
    assert overlay(sdk_result, legend=False).shape == thumb.shape


def test_heatmap_nan_exactly_where_grid_has_no_patch(
    sdk_result: SlideResult, cli_out: Path
) -> None:
    g = sdk_result.grid
    has_patch = np.zeros((g.n_rows, g.n_cols), bool)
    has_patch[sdk_result.patches.row, sdk_result.patches.col] = True
    with np.load(cli_out / "heatmap.npz") as npz:
        heatmaps = npz["heatmaps"]
        assert heatmaps.shape == (len(sdk_result.class_names), g.n_rows, g.n_cols)
        assert heatmaps.dtype == np.float32
        for plane in heatmaps:
            assert np.array_equal(np.isnan(plane), ~has_patch)
        # The CLI's file has the same cells as the SDK's table, with each patch's probabilities.
        rows, cols = npz["row"], npz["col"]
        np.testing.assert_array_equal(heatmaps[:, rows, cols].T, npz["probabilities"])
        assert np.array_equal(np.isnan(npz["attention_map"]), ~has_patch)
    assert 0 < has_patch.sum() < has_patch.size  # the slide has background cells


def test_geojson_one_feature_per_patch_with_box_polygons(
    sdk_result: SlideResult, cli_out: Path
) -> None:
    doc = json.loads((cli_out / "tiles.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    p = sdk_result.patches
    assert len(feats) == len(p)
    rings = np.array([f["geometry"]["coordinates"][0] for f in feats])  # [n, 5, 2]
    boxes = np.stack(
        [
            np.stack([p.x_l0, p.y_l0], 1),
            np.stack([p.x_l0 + p.width_l0, p.y_l0], 1),
            np.stack([p.x_l0 + p.width_l0, p.y_l0 + p.height_l0], 1),
            np.stack([p.x_l0, p.y_l0 + p.height_l0], 1),
            np.stack([p.x_l0, p.y_l0], 1),
        ],
        axis=1,
    )
    assert float(np.abs(rings - boxes).max()) == 0.0
    for f in feats:
        props = f["properties"]
        assert f["geometry"]["type"] == "Polygon" and props["objectType"] == "tile"
        assert set(props["measurements"]) >= {f"prob_{c}" for c in sdk_result.class_names}
        assert "attention" in props["measurements"]


def test_summary_json(sdk_result: SlideResult, cli_out: Path) -> None:
    s = json.loads((cli_out / "summary.json").read_text())
    assert s["outcome"] == "completed"
    assert s["patch_count"] == sdk_result.patch_count
    assert s["prediction"]["class_names"] == list(sdk_result.model.slide_classes)
    assert 0 < s["tissue_fraction"] <= 1
    assert s["model"]["version"] == sdk_result.model.version
    assert s["model"]["untrained"] is True  # the session artifact is the seeded model
    assert s["timings"]["total_s"] > 0


def test_slide_errors_map_back(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with SlideClient(server.target) as client:
        with pytest.raises(SlideNotFoundError):
            client.analyze("real/no-such-slide.svs")
        with pytest.raises(SlidePathError):
            client.analyze("../outside.svs")
    argv = ["analyze", "real/no-such-slide.svs", "--server", server.target]
    rc = main([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "[SLIDE_NOT_FOUND]" in err


def test_info_and_async_client(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--server", server.target, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["patch_classes"]

    async def info():
        async with AsyncSlideClient(server.target) as client:
            return await client.get_model_info()

    assert list(asyncio.run(info()).model.patch_classes) == doc["model"]["patch_classes"]
