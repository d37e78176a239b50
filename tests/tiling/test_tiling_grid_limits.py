"""Grid shapes at the limits: empty axes, huge axes, strides longer than a patch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histohelper.errors import SlideTooLargeError
from histohelper.server.tiling import (
    PatchReader,
    Resolution,
    TilingOptions,
    open_slide,
    plan_tiling,
)

#: 8192 px at 0.01 um/px on a 0.16 um/px slide: a 512 level-0 px footprint (wider than
#: the 16 px slide) and a 1/16 level-0 px stride.
TALL = {"patch_size_px": 8192, "stride_px": 1, "target": Resolution(0.01)}


def test_drop_grid_without_columns_is_empty(tall_narrow_slide: Path) -> None:
    """No column fits ("drop"): the grid is 0 x 0 however many rows would, not
    0 columns x 6.7e7 rows (which passed the cell limit, looped over empty rows and
    overflowed the int32 grid size on the wire)."""
    with open_slide(tall_narrow_slide) as slide:
        plan = plan_tiling(slide, TilingOptions(edge_mode="drop", **TALL))
    assert (plan.grid.n_rows, plan.grid.n_cols) == (0, 0)
    assert len(plan.grid) == 0 and plan.no_tissue


def test_pad_grid_with_too_many_rows_is_refused(tall_narrow_slide: Path) -> None:
    """One padded column of 6.7e7 rows: refused by the cell limit before any work."""
    with open_slide(tall_narrow_slide) as slide, pytest.raises(SlideTooLargeError):
        plan_tiling(slide, TilingOptions(edge_mode="pad", **TALL))


@pytest.mark.parametrize(
    ("name", "options", "n_cells"),
    [
        (
            "CMU-1-Small-Region.svs",
            TilingOptions(stride_px=3000, min_tissue_fraction=0.0),
            (1, 1),
        ),
        (
            "CMU-1-Small-Region.svs",
            TilingOptions(stride_px=1200, min_tissue_fraction=0.0),
            (3, 2),
        ),
        (
            "tiny-16px.svs",
            TilingOptions(
                patch_size_px=8,
                stride_px=100,
                min_tissue_fraction=0.0,
                target=Resolution(0, "level"),
            ),
            (1, 1),
        ),
    ],
    ids=["cmu-stride-3000", "cmu-stride-1200", "tiny-stride-100"],
)
def test_pad_cells_never_start_past_the_edge(
    slides_dir: Path, name: str, options: TilingOptions, n_cells: tuple[int, int]
) -> None:
    """A stride longer than the slide's slack past one patch gave a cell starting
    beyond the edge, whose read failed the whole analysis (OUT_OF_RANGE)."""
    path = slides_dir / "real" / name
    with open_slide(path) as slide:
        md = slide.metadata
        grid = plan_tiling(slide, options).grid
    assert (grid.n_rows, grid.n_cols) == n_cells
    assert len(grid) == n_cells[0] * n_cells[1]
    assert (grid.x_l0 < md.width_l0).all() and (grid.y_l0 < md.height_l0).all()
    seen: list[int] = []
    for batch in PatchReader(path, grid, batch_size=4).iter_batches():
        assert batch.failed.size == 0
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(len(grid)))


@pytest.mark.parametrize(
    ("name", "mpp_override", "target_mpp", "n_cells"),
    [
        ("tiny-16px.svs", 0.1, 0.785, (3, 3)),  # OpenSlide reads it; origins 0, 7.85, 15.7
        ("CMU-1-Small-Region.svs", 0.01, 7.399, (5, 4)),  # fast path; last x 2219.7
    ],
    ids=["openslide", "tifffile"],
)
def test_cell_whose_read_rounds_past_the_edge_is_white(
    slides_dir: Path,
    name: str,
    mpp_override: float,
    target_mpp: float,
    n_cells: tuple[int, int],
) -> None:
    """The last column starts less than half a px inside the slide: its read, rounded
    to whole px, starts at the edge. That cell is white, not a failed analysis."""
    path = slides_dir / "real" / name
    options = TilingOptions(
        patch_size_px=1,
        stride_px=1,
        min_tissue_fraction=0.0,
        mpp_override=mpp_override,
        target=Resolution(target_mpp),
    )
    with open_slide(path) as slide:
        width = slide.metadata.width_l0
        grid = plan_tiling(slide, options).grid
    assert (grid.n_rows, grid.n_cols) == n_cells
    last = grid.col == grid.n_cols - 1
    assert (width - 0.5 < grid.x_l0[last]).all() and (grid.x_l0[last] < width).all()
    got = {}
    for batch in PatchReader(path, grid, max_failed_fraction=0.0).iter_batches():
        got.update(zip(batch.indices.tolist(), batch.images, strict=True))
    assert sorted(got) == list(range(len(grid)))
    assert all((got[i] == 255).all() for i in np.flatnonzero(last))
    assert any((got[i] < 250).any() for i in np.flatnonzero(~last))
