"""Overlay rendering (thumbnail size, no footprint drift) and the standard exports."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
from client_fakes import StreamSpec, build_stream
from hypothesis import given, settings
from hypothesis import strategies as st

from histohelper.client import ResultCollector, SlideResult, event_from_proto
from histohelper.client.exports import save_all, save_csv
from histohelper.client.render import (
    box_to_pixels,
    overlay,
    paint_boxes,
    render_overlay,
    thumbnail_heatmap,
)


def make_result(**kw) -> tuple[SlideResult, object]:
    msgs, exp = build_stream(StreamSpec(**kw))
    collector = ResultCollector()
    for m in msgs:
        collector.add(event_from_proto(m))
    return collector.result(), exp


@settings(max_examples=60, deadline=None)
@given(
    origin=st.floats(0, 50),
    stride=st.floats(3, 300),
    n=st.integers(1, 30),
    scale=st.floats(0.7, 40),
)
def test_adjacent_boxes_tile_without_gaps_or_overlaps(origin, stride, n, scale) -> None:
    starts = origin + stride * np.arange(n)
    sizes = np.full(n, stride)
    limit = int(np.ceil((origin + stride * n) / scale)) + 2
    lo, hi = box_to_pixels(starts, sizes, scale, limit)
    # Each patch ends where the next begins, unless a patch is under one pixel wide.
    if stride / scale >= 1:
        assert np.array_equal(hi[:-1], lo[1:])
    cover = np.zeros(limit, np.int32)
    for a, b in zip(lo, hi, strict=True):
        cover[a:b] += 1
    if stride / scale >= 1:
        assert cover.max() <= 1
    # The union spans the rounded extent of the whole row.
    assert lo[0] == int(np.floor(origin / scale + 0.5))
    assert hi[-1] == max(int(np.floor((origin + stride * n) / scale + 0.5)), lo[-1] + 1)


def test_paint_boxes_averages_overlaps_and_leaves_nan() -> None:
    x = np.array([0.0, 10.0])
    y = np.array([0.0, 0.0])
    w = np.array([20.0, 20.0])
    h = np.array([10.0, 10.0])
    heat = paint_boxes(
        x, y, w, h, np.array([1.0, 3.0]), scale_x=1, scale_y=1, width_px=40, height_px=12
    )
    assert heat.shape == (12, 40) and heat.dtype == np.float32
    assert np.all(heat[:10, :10] == 1) and np.all(heat[:10, 10:20] == 2)
    assert np.all(heat[:10, 20:30] == 3)
    assert np.isnan(heat[:10, 30:]).all() and np.isnan(heat[10:]).all()


def test_thumbnail_heatmap_covers_exactly_the_patch_boxes() -> None:
    result, exp = make_result()
    t = result.thumbnail
    heat = thumbnail_heatmap(result, np.ones(result.patch_count))
    expected = np.zeros((t.height_px, t.width_px), bool)
    for x, y, w, h in exp.boxes:
        x0, x1 = box_to_pixels(np.array([x]), np.array([w]), t.scale_x, t.width_px)
        y0, y1 = box_to_pixels(np.array([y]), np.array([h]), t.scale_y, t.height_px)
        expected[y0[0] : y1[0], x0[0] : x1[0]] = True
    assert np.array_equal(~np.isnan(heat), expected)


def test_overlay_is_thumbnail_sized_and_keeps_uncovered_pixels() -> None:
    result, exp = make_result()
    thumb = result.thumbnail_rgb()
    np.testing.assert_array_equal(thumb, exp.thumbnail_rgb)
    plain = overlay(result, legend=False)
    assert plain.shape == thumb.shape and plain.dtype == np.uint8
    covered = ~np.isnan(thumbnail_heatmap(result, np.ones(result.patch_count)))
    assert np.array_equal(plain[~covered], thumb[~covered])
    assert np.any(plain[covered] != thumb[covered])
    with_legend = overlay(result)  # a figure: the blend framed by margins
    assert with_legend.shape[0] > thumb.shape[0] and with_legend.shape[1] > thumb.shape[1]
    att = overlay(result, attention=True, legend=False)
    assert att.shape == thumb.shape


def test_overlay_colours_follow_jet() -> None:
    thumb = np.full((64, 64, 3), 255, np.uint8)
    heat = np.full((64, 64), np.nan, np.float32)
    heat[:, :32] = 0.0
    heat[:, 32:] = 1.0
    out = render_overlay(thumb, heat, alpha=1.0, title=None)
    assert tuple(out[0, 0]) == (0, 0, 128)  # JET low end: dark blue (RGB)
    assert tuple(out[0, 63]) == (128, 0, 0)  # JET high end: dark red
    with pytest.raises(ValueError, match="does not match"):
        render_overlay(thumb, heat[:10], title=None)


def test_save_all_writes_the_standard_files(tmp_path) -> None:
    result, exp = make_result()
    written = save_all(result, tmp_path / "out")
    assert set(written) == {
        "overlay.png",
        "attention_overlay.png",
        "heatmap.npz",
        "patches.csv",
        "tiles.geojson",
        "summary.json",
        "report.html",
    }
    png = cv2.imread(str(written["overlay.png"]))
    assert png.shape[:2] == overlay(result).shape[:2]  # the framed figure

    with np.load(written["heatmap.npz"]) as npz:  # no pickle needed
        np.testing.assert_array_equal(npz["heatmaps"], result.heatmaps)
        assert list(npz["class_names"]) == list(result.class_names)
        np.testing.assert_array_equal(npz["x_l0"], exp.boxes[:, 0])
        np.testing.assert_array_equal(npz["attention_map"], result.attention_map)

    with written["patches.csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == result.patch_count
    assert float(rows[0]["x_l0"]) == exp.boxes[0, 0]
    assert float(rows[0]["prob_tumor"]) == pytest.approx(exp.probabilities[0, 0], rel=1e-5)

    summary = json.loads(written["summary.json"].read_text())
    assert summary["prediction"]["predicted_class"] == "positive"
    assert summary["prediction"]["class_names"] == ["negative", "positive"]
    assert summary["patch_count"] == result.patch_count
    assert summary["tissue_fraction"] == pytest.approx(0.42)
    assert summary["model"]["version"] == "0.0.1" and summary["model"]["untrained"] is True
    assert summary["timings"]["total_s"] == pytest.approx(0.25)


def test_geojson_is_qupath_tiles_with_exact_boxes(tmp_path) -> None:
    result, exp = make_result()
    doc = json.loads(result.save_geojson(tmp_path / "tiles.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    assert len(feats) == result.patch_count
    for f, (x, y, w, h), probs, att in zip(
        feats, exp.boxes, exp.probabilities, exp.attention, strict=True
    ):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert ring.shape == (5, 2) and np.array_equal(ring[0], ring[-1])
        assert ring[:, 0].min() == x and ring[:, 0].max() == x + w
        assert ring[:, 1].min() == y and ring[:, 1].max() == y + h
        props = f["properties"]
        assert props["objectType"] == "tile"
        m = props["measurements"]
        assert [m[f"prob_{c}"] for c in result.class_names] == pytest.approx(probs.tolist())
        assert m["attention"] == pytest.approx(float(att))
        assert props["classification"]["name"] == result.class_names[int(np.argmax(probs))]


def test_no_tissue_exports(tmp_path) -> None:
    result, _ = make_result(no_tissue=True)
    written = save_all(result, tmp_path)
    assert "attention_overlay.png" not in written
    assert json.loads(written["tiles.geojson"].read_text())["features"] == []
    summary = json.loads(written["summary.json"].read_text())
    assert summary["prediction"] is None and summary["outcome"] == "no_tissue"
    png = cv2.imread(str(written["overlay.png"]))
    assert png.shape[0] > result.thumbnail.height_px and png.shape[1] > result.thumbnail.width_px


def test_without_attention_exports_strict_json(tmp_path) -> None:
    result, _ = make_result(attention=False)
    doc = json.loads(result.save_geojson(tmp_path / "t.geojson").read_text())
    assert "attention" not in doc["features"][0]["properties"]["measurements"]
    rows = list(csv.DictReader(save_csv(result, tmp_path / "p.csv").open()))
    assert rows[0]["attention"] == ""
