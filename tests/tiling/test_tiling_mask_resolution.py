"""``mask_min_um_per_px``: a small biopsy's tissue mask from a reduced level, same grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as ss

from histohelper.errors import InvalidOptionsError
from histohelper.server.tiling import TilingOptions, open_slide, plan_tiling


@pytest.fixture(scope="module")
def biopsy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,400 x 2,000 px at 0.5 um/px (1.2 x 1.0 mm), levels at 1/4 and 1/16, two tissue pieces."""
    img = ss.slide_with_tissue(2000, 2400, [(150, 200, 900, 1300), (1300, 400, 800, 1200)], seed=3)
    path = tmp_path_factory.mktemp("biopsy") / "biopsy.tiff"
    return ss.write_slide(path, img, [(600, 500), (150, 125)])


def _plan(path: Path, **kw: object):
    with open_slide(path) as slide:
        return plan_tiling(slide, TilingOptions(**kw))  # type: ignore[arg-type]


def test_default_reads_level_0_and_the_bound_reads_a_reduced_level(biopsy: Path) -> None:
    fine = _plan(biopsy)
    coarse = _plan(biopsy, mask_min_um_per_px=4.0)
    assert fine.mask.level == 0  # 1,024 px target: finer than level 1 (600 px)
    assert coarse.mask.level == 1  # 1,200 um / 4 um = 300 px: level 1, halved
    assert max(coarse.mask.mask.shape) == 300
    assert coarse.mask.scale_x == pytest.approx(8.0)  # level-0 px per mask px = 4 um
    # The grid is the same to within the cells on the tissue's border.
    keep_fine = {(int(r), int(c)) for r, c in zip(fine.grid.row, fine.grid.col, strict=True)}
    keep_coarse = {(int(r), int(c)) for r, c in zip(coarse.grid.row, coarse.grid.col, strict=True)}
    assert len(keep_fine) > 20
    assert len(keep_fine ^ keep_coarse) <= 0.1 * len(keep_fine)
    assert coarse.mask.tissue_fraction == pytest.approx(fine.mask.tissue_fraction, abs=0.02)


def test_the_bound_never_makes_a_mask_finer(biopsy: Path) -> None:
    """A bound finer than the 1,024 px mask (here ~1.2 um/px) changes nothing."""
    a = _plan(biopsy, mask_min_um_per_px=0.5)
    b = _plan(biopsy)
    assert a.mask.level == b.mask.level
    np.testing.assert_array_equal(a.mask.mask, b.mask.mask)


@pytest.mark.parametrize("value", [-1.0, 1001.0], ids=["negative", "huge"])
def test_out_of_range_bound_is_refused(value: float) -> None:
    with pytest.raises(InvalidOptionsError, match="mask_min_um_per_px"):
        TilingOptions(mask_min_um_per_px=value)
