"""Overlay figures, pixel by pixel: the margin holds everything but the slide image, the
colour map option changes the colours, attention ranks spread a narrow raw range over
the colour map, the scale bar has a round length, and stitched CAMs do not draw the
patch grid."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from client_fakes import collect_result

from histohelper.client import SlideResult
from histohelper.client.explain import cam_position_bias
from histohelper.client.render import (
    COLORMAPS,
    attention_rank,
    cam_heatmap,
    colormap_rgb,
    nice_scale_length_um,
    overlay,
    render_overlay,
    scale_label,
    thumbnail_um_per_px,
)
from histohelper.client.styles import COLORMAP_NAMES


def make_result(**kw: object) -> SlideResult:
    return collect_result(**kw)


def find_exact(figure: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    """Top-left (x, y) where ``image`` appears pixel for pixel in ``figure``, or None."""
    scores = cv2.matchTemplate(figure.astype(np.float32), image.astype(np.float32), cv2.TM_SQDIFF)
    min_val, _, min_loc, _ = cv2.minMaxLoc(scores)
    return (int(min_loc[0]), int(min_loc[1])) if min_val == 0 else None


def with_attention(result: SlideResult, attention: np.ndarray) -> SlideResult:
    patches = dataclasses.replace(result.patches, attention=attention.astype(np.float32))
    return dataclasses.replace(result, patches=patches)


def patch_centres_px(result: SlideResult) -> tuple[np.ndarray, np.ndarray]:
    p, t = result.patches, result.thumbnail
    cx = ((p.x_l0 + p.width_l0 / 2) / t.scale_x).astype(int)
    cy = ((p.y_l0 + p.height_l0 / 2) / t.scale_y).astype(int)
    return cx, cy


@pytest.mark.parametrize("kind", ["probability", "attention"])
def test_margin_holds_legend_and_the_slide_image_is_untouched(kind: str) -> None:
    result = make_result()
    attention = kind == "attention"
    plain = overlay(result, attention=attention, legend=False)
    figure = overlay(result, attention=attention)
    h, w = plain.shape[:2]
    assert figure.shape[0] > h and figure.shape[1] > w
    at = find_exact(figure, plain)
    assert at is not None, "the blended thumbnail is not in the figure unchanged"
    x, y = at
    # Header above, legend to the right, scale bar below: ink in each margin.
    assert (figure[:y] < 128).any()
    assert (figure[y : y + h, x + w + 2 :] != 255).any(axis=2).sum() > 100  # colour bar
    assert (figure[y + h + 2 :, x : x + w] < 128).any()  # scale bar


def test_header_says_untrained_and_the_prediction() -> None:
    untrained = make_result(untrained=True)
    trained = dataclasses.replace(
        untrained, model=dataclasses.replace(untrained.model, untrained=False)
    )
    a, b = overlay(untrained), overlay(trained)

    def red_in_header(figure: np.ndarray, result: SlideResult) -> int:
        at = find_exact(figure, overlay(result, legend=False))
        assert at is not None
        head = figure[: at[1]]
        return int(((head[..., 0] > 150) & (head[..., 1] < 80) & (head[..., 2] < 80)).sum())

    assert red_in_header(a, untrained) > 50  # "UNTRAINED" in red above the image
    assert red_in_header(b, trained) == 0
    no_pred = dataclasses.replace(trained, prediction=None)
    assert overlay(no_pred).shape[0] < overlay(trained).shape[0]  # one header line fewer


@pytest.mark.parametrize("name", COLORMAP_NAMES)
def test_colormap_option_sets_the_colours(name: str) -> None:
    thumb = np.full((60, 80, 3), 255, np.uint8)
    heat = np.full((60, 80), np.nan, np.float32)
    heat[:, :40], heat[:, 40:] = 0.0, 1.0
    out = render_overlay(thumb, heat, alpha=1.0, colormap=name)
    lut = cv2.cvtColor(
        cv2.applyColorMap(np.array([[0, 255]], np.uint8), COLORMAPS[name]), cv2.COLOR_BGR2RGB
    )[0]
    assert tuple(out[0, 0]) == tuple(lut[0]) and tuple(out[0, 79]) == tuple(lut[1])


def test_colormap_changes_overlay_colours_and_jet_stays_default() -> None:
    result = make_result()
    jet = overlay(result, legend=False)
    assert np.array_equal(jet, overlay(result, legend=False, colormap="jet"))
    viridis = overlay(result, legend=False, colormap="viridis")
    assert not np.array_equal(jet, viridis)
    cx, cy = patch_centres_px(result)
    assert (jet[cy, cx] != viridis[cy, cx]).any(axis=1).all()  # every patch recoloured
    with pytest.raises(ValueError, match="unknown colour map"):
        overlay(result, colormap="rainbow")
    with pytest.raises(ValueError, match="unknown attention scale"):
        overlay(result, attention=True, attention_scale="log")


def test_attention_rank_equals_percentileofscore_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats", reason="scipy gives the reference figure")
    values = np.array([0.3, 0.1, 0.2, 0.2, np.nan, 0.5, 0.2])
    ranks = attention_rank(values)
    finite = values[np.isfinite(values)]
    expected = [stats.percentileofscore(finite, v, kind="rank") / 100 for v in finite]
    np.testing.assert_allclose(ranks[np.isfinite(values)], expected)
    assert np.isnan(ranks[4])
    assert np.isnan(attention_rank(np.array([np.nan]))).all()


def test_attention_rank_spreads_a_narrow_range_over_the_colour_map() -> None:
    result = make_result()
    n = result.patch_count
    raw = np.random.default_rng(1).permutation(np.linspace(0.0221, 0.0248, n))
    result = with_attention(result, raw)
    cx, cy = patch_centres_px(result)
    ranked = overlay(result, attention=True, legend=False, alpha=1.0)[cy, cx]
    rawmap = overlay(result, attention=True, legend=False, alpha=1.0, attention_scale="raw")
    rawmap = rawmap[cy, cx]
    order = np.argsort(raw)
    lo, hi = order[0], order[-1]
    expected = colormap_rgb(np.array([1.0 / n, 1.0], np.float32), "jet")
    assert tuple(ranked[lo]) == tuple(expected[0]) and tuple(ranked[hi]) == tuple(expected[1])
    # Raw 0..max paints every patch in the top 11 % of the colour map (all red)...
    top = colormap_rgb(np.linspace(0.89, 1.0, 30, dtype=np.float32), "jet")
    assert all((top == c).all(axis=1).any() for c in rawmap)
    # ...ranks give every patch its own colour.
    assert len({tuple(c) for c in ranked}) == n
    # The legend says which scale: the panels right of the image differ.
    a = overlay(result, attention=True)
    b = overlay(result, attention=True, attention_scale="raw")
    w = result.thumbnail.width_px
    assert not np.array_equal(a[:, w + 20 :], b[:, w + 20 :])


@pytest.mark.parametrize(
    ("um_per_px", "target_px", "length_um", "label"),
    [
        (1.497, 222.0, 200.0, "200 µm"),
        (1.497, 400.0, 500.0, "500 µm"),
        (30.0, 300.0, 5000.0, "5 mm"),
        (8.0, 300.0, 2000.0, "2 mm"),
        (0.25, 30.0, 5.0, "5 µm"),
        (0.5, 2.5, 1.0, "1 µm"),
    ],
)
def test_scale_bar_has_a_round_length(
    um_per_px: float, target_px: float, length_um: float, label: str
) -> None:
    got = nice_scale_length_um(um_per_px, target_px)
    assert got == pytest.approx(length_um)
    assert got / um_per_px <= target_px * (1 + 1e-9)
    assert scale_label(got) == label


def test_scale_comes_from_the_effective_mpp() -> None:
    result = make_result()
    g, t = result.grid, result.thumbnail
    expected = g.effective_mpp * g.patch_size_px / g.patch_width_l0 * t.scale_x
    assert thumbnail_um_per_px(result) == pytest.approx(expected)


def _border_and_inner_jumps(heat: np.ndarray, s: int) -> tuple[float, float]:
    dx = np.abs(np.diff(heat, axis=1))
    at_border = (np.arange(dx.shape[1]) % s) == s - 1
    return float(np.nanmean(dx[:, at_border])), float(np.nanmean(dx[:, ~at_border]))


def test_stitched_cams_do_not_draw_the_patch_grid() -> None:
    spec = {
        "n_rows": 3,
        "n_cols": 4,
        "cells": [(r, c) for r in range(3) for c in range(4)],
        "origin_l0": (0.0, 0.0),
        "stride_l0": (98.0, 98.0),
        "patch_l0": (98.0, 98.0),
    }
    result = make_result(**spec)
    n, s = result.patch_count, 7
    rng = np.random.default_rng(0)
    # Every patch's CAM: tissue signal (noise) plus one shared position pattern, bright
    # at the top-left border as a zero-padded CNN draws it.
    pattern = np.zeros((s, s), np.float32)
    pattern[0, :], pattern[:, 0] = 2.5, 2.5
    cams = rng.normal(0, 0.4, (n, 2, s, s)).astype(np.float32)
    cams[:, 1] += pattern
    logits = cams.mean(axis=(2, 3))
    patches = dataclasses.replace(result.patches, cams=cams, logits=logits)
    result = dataclasses.replace(result, patches=patches)
    raw, _ = cam_heatmap(result, 1, remove_position_bias=False)
    fixed, _ = cam_heatmap(result, 1)
    raw_border, raw_inner = _border_and_inner_jumps(raw, s)
    border, inner = _border_and_inner_jumps(fixed, s)
    assert raw_border > 2 * raw_inner  # the artefact: patch edges stand out
    assert border < 1.3 * inner  # removed: borders look like any cell edge
    bias = cam_position_bias(cams)
    np.testing.assert_allclose(bias.mean(axis=(1, 2)), 0.0, atol=1e-6)  # logits kept
    assert not cam_position_bias(cams[:3]).any()  # too few patches: left alone


@pytest.mark.parametrize("thumb_px", [(16, 16), (173, 137), (40, 300)], ids=str)
def test_nothing_runs_off_the_figure(thumb_px: tuple[int, int]) -> None:
    result = make_result(thumb_px=thumb_px)
    for figure in (overlay(result), overlay(result, attention=True)):
        assert (figure[:, -3:] == 255).all() and (figure[-2:] == 255).all()
        assert (figure[:, :3] == 255).all() and (figure[:2] == 255).all()
