"""The ROI exclusion count (``QualityControl.roi_excluded_patch_count``) is counted,
not built: the same number as the grid without the region, in memory bounded by one
chunk of cells however large the grid."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as ss

from histohelper.server.tiling import Resolution, TilingOptions, open_slide, plan_tiling
from histohelper.server.tiling.plan import MAX_GRID_CELLS, build_grid, count_kept_patches
from histohelper.server.tiling.roi import parse_region


def _region(*rings: list[list[float]]) -> str:
    return json.dumps({"type": "Polygon", "coordinates": [list(r) for r in rings]})


SHELL = [[300.5, 200.25], [1900.0, 250.0], [1800.0, 1900.0], [350.0, 1800.0], [300.5, 200.25]]
HOLE = [[800.0, 700.0], [1300.0, 720.0], [1250.0, 1200.0], [820.0, 1150.0], [800.0, 700.0]]
STRIP = [[0.0, 900.0], [3001.0, 900.0], [3001.0, 1100.0], [0.0, 1100.0], [0.0, 900.0]]


def _ds(plan) -> tuple[float, float]:
    """Level-0 px per output px of a plan's grid."""
    g = plan.grid
    return g.footprint_x_l0 / g.patch_size_px, g.footprint_y_l0 / g.patch_size_px


@pytest.mark.parametrize(
    ("slide_name", "options", "region"),
    [
        ("real", TilingOptions(), _region(SHELL, HOLE)),
        ("real", TilingOptions(stride_px=112, min_tissue_fraction=0.25), _region(SHELL)),
        ("real", TilingOptions(min_tissue_fraction=0.0, edge_mode="drop"), _region(SHELL)),
        (
            "odd",
            TilingOptions(patch_size_px=64, target=Resolution(0, "level"), min_tissue_fraction=0.0),
            _region(STRIP),
        ),
        (
            "odd",
            TilingOptions(patch_size_px=100, stride_px=70, target=Resolution(0.5)),
            _region(STRIP),
        ),
    ],
    ids=["default-hole", "overlap-0.25", "drop-touch", "odd-level0-touch", "odd-stride"],
)
def test_count_equals_the_grid_built_without_the_region(
    real_slide: Path, odd_pyramid: Path, slide_name: str, options: TilingOptions, region: str
) -> None:
    path = real_slide if slide_name == "real" else odd_pyramid
    with open_slide(path) as slide:
        plain = plan_tiling(slide, options)
        inside = plan_tiling(slide, replace(options, roi=parse_region(region)))
    ds_x, ds_y = _ds(plain)
    # The old pass: build_grid on the tissue alone with no kept-patch limit.
    built = build_grid(
        plain.metadata, plain.mask, replace(options, max_patches=MAX_GRID_CELLS), ds_x, ds_y,
        plain.grid.level, plain.effective_mpp,
    )  # fmt: skip
    assert count_kept_patches(plain.metadata, plain.mask, options, ds_x, ds_y) == len(built)
    assert len(built) == len(plain.grid) > 0
    assert 0 < len(inside.grid) <= len(plain.grid)
    assert inside.roi_excluded_patch_count == len(plain.grid) - len(inside.grid)


def test_count_on_a_huge_grid_is_streamed(tmp_path: Path) -> None:
    """A declared 20,000 x 16,000 px slide with one small tissue box, 8 px patches at
    level 0 and no minimum tissue: 2,500 x 2,000 = 5 million grid cells, all kept
    without the region. The old passes built them all (~60 B each, about 300 MB, and
    refused the analysis: more than max_patches, 2 million, kept before the patches
    touching the region were picked); now the region's patches are picked as the grid
    is built, one chunk of cells at a time, and the count needs no grid."""
    path = ss.write_sparse_slide(
        tmp_path / "huge.tiff", 20_000, 16_000, [(8000, 6000, 600, 400)], mpp=0.5,
        downsamples=(4, 16, 64),
    )  # fmt: skip
    box = [[7900.0, 5900.0], [8700.0, 5900.0], [8700.0, 6500.0], [7900.0, 6500.0], [7900.0, 5900.0]]
    options = TilingOptions(
        patch_size_px=8, target=Resolution(0, "level"), min_tissue_fraction=0.0,
        roi=parse_region(_region(box)),
    )  # fmt: skip
    tracemalloc.start()
    try:
        with open_slide(path) as slide:
            plan = plan_tiling(slide, options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    g = plan.grid
    assert (g.n_rows, g.n_cols) == (2000, 2500)
    # Every cell is kept without the region (min_tissue_fraction 0): the count is exact.
    assert plan.roi_excluded_patch_count == g.n_rows * g.n_cols - len(g)
    assert 0 < len(g) < 10_000
    # One chunk of cells (~220 MiB measured, the same at 20 million cells), not the grid.
    assert peak < 320 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    # The patches touch the region's raster on the tissue mask's pixel grid.
    margin = plan.mask.scale_x + 8
    assert np.all(g.x_l0 > 7900 - margin) and np.all(g.x_l0 < 8700 + margin)
