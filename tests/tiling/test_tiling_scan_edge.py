"""Band-sampled tissue masks keep tissue next to unscanned (transparent) tiles.

Tester finding 8: a level-less 100,000 x 60,000 px sparse TIFF gave 18 patches where
the same slide with levels gave 24. Its mask was sampled in 83 bands, one per 7.4
mask rows, and the rows between were interpolated: between a band inside the
scanned tiles and one outside them the edge of the scan fell halfway and the colour
faded to white. The geometry here is that one scaled down (16,384 x 9,984 px, 256 px
tiles, 84 bands' decode budget: a band per 7.4 mask rows): the slide with levels
4 and 16 reads its mask from level 16 in blocks, at the same 16 level-0 px per mask
px as the level-less slide's sampled mask, so both must keep the same patches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from synthetic_slides import write_sparse_slide

from histohelper.server.tiling import (
    LowResImage,
    TilingOptions,
    open_slide,
    plan_tiling,
    read_low_res,
)
from histohelper.server.tiling.plan import TilingPlan

W, H = 16_384, 9_984
TILE = 256
#: Tissue 64 px below the first scanned tile row (5120) and ending at the scanned
#: area's lower edge (6656 = 26 tiles); both edges fall mid-way between two bands.
BOX = (5008, 5184, 3008, 1472)
#: Decode budget of 84 bands of 64 tiles: one band per 7.4 mask rows.
DECODE_PX = 84 * (W // TILE) * TILE * TILE
Region = tuple[int, int, int, int]
READ_PX = 4_000_000  # below the 163 Mpx level: the level-less mask is sampled


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("scan_edge")
    flat = write_sparse_slide(d / "nolevels.tiff", W, H, [BOX], mpp=0.5)
    levels = write_sparse_slide(d / "levels.tiff", W, H, [BOX], mpp=0.5, downsamples=(4, 16))
    return flat, levels


def _plan(path: Path, **kw: int) -> TilingPlan:
    with open_slide(path) as slide:
        return plan_tiling(slide, TilingOptions(mask_max_read_px=READ_PX, **kw))


def _boxes(plan: TilingPlan) -> set[tuple[float, float]]:
    g = plan.grid
    return {(float(g.x_l0[i]), float(g.y_l0[i])) for i in range(len(g))}


def test_sampled_mask_keeps_tissue_at_the_scan_edge_as_the_levels_do(
    slides: tuple[Path, Path],
) -> None:
    flat, levels = slides
    sampled = _plan(flat, mask_max_decode_px=DECODE_PX)
    read = _plan(levels, mask_max_decode_px=DECODE_PX)
    assert sampled.mask.sampled and not read.mask.sampled
    assert sampled.mask.scale_x == read.mask.scale_x == 16.0
    assert abs(sampled.mask.scale_y - 16.0) < 1e-9
    # Before the fix: 94 patches against 97, tissue fraction 0.02558 against 0.02704.
    assert len(sampled.grid) == len(read.grid) == 97
    assert _boxes(sampled) == _boxes(read)
    assert sampled.mask.tissue_fraction == pytest.approx(read.mask.tissue_fraction, rel=1e-3)
    rows = np.flatnonzero(sampled.mask.mask.any(axis=1))
    assert (rows[0], rows[-1]) == (5184 // 16, (5184 + 1472) // 16 - 1)


def _counted_low_res(path: Path, decode_px: int) -> tuple[LowResImage, list[Region]]:
    """read_low_res of the real slide, recording every region it reads."""
    calls: list[Region] = []
    with open_slide(path) as slide:
        read_region_rgba = slide.read_region_rgba

        def counted(x: int, y: int, level: int, w: int, h: int) -> npt.NDArray[np.uint8]:
            calls.append((x, y, w, h))
            return read_region_rgba(x, y, level, w, h)

        slide.read_region_rgba = counted  # type: ignore[method-assign]
        opts = TilingOptions(mask_max_read_px=READ_PX, mask_max_decode_px=decode_px)
        return read_low_res(slide, opts), calls


def test_scan_edge_rows_stay_within_the_mask_budgets(slides: tuple[Path, Path]) -> None:
    """Every read (bands and the rows read again at scan edges) counted as OpenSlide
    decodes it, whole tiles: within mask_max_read_px and mask_max_decode_px."""
    low, calls = _counted_low_res(slides[0], DECODE_PX)
    assert low.sampled and low.total_reads == 73  # 84 bands less the 1/8 kept for edges
    assert len(calls) > low.total_reads  # scan-edge rows were read
    read = sum(w * h for _x, _y, w, h in calls)
    tiles = sum(
        (-(-(x + w) // TILE) - x // TILE) * (-(-(y + h) // TILE) - y // TILE)
        for x, y, w, h in calls
    )
    assert read <= READ_PX
    assert tiles * TILE * TILE <= DECODE_PX


def test_scan_edge_rows_are_left_interpolated_without_budget(slides: tuple[Path, Path]) -> None:
    """With no room left (the 16-band minimum takes the whole decode budget) nothing
    more is read; the rows between bands stay interpolated and tissue is still found."""
    low, calls = _counted_low_res(slides[0], 16 * (W // TILE) * TILE * TILE)
    assert low.sampled and low.total_reads == len(calls) == 16
    assert len(_plan(slides[0], mask_max_decode_px=16 * (W // TILE) * TILE * TILE).grid) > 0
