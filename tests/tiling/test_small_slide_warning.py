"""The QC warning of a slide smaller than one patch says which side is smaller
(tester A finding 10(b): a 4000 x 3000 px slide under 3584 x 3574 px patches was said
to be "smaller than one patch" although only its height was)."""

from __future__ import annotations

from pathlib import Path

import pytest
import synthetic_slides as ss

from histohelper.server.tiling import TilingOptions, open_slide, plan_tiling


@pytest.mark.parametrize(
    ("width", "height", "says"),
    [
        (
            1000,
            100,
            "the slide's height (100 px) is smaller than one patch's (224 x 224 level-0 px); "
            "its width (1000 px) is not: one row of white-padded patches",
        ),
        (
            100,
            1000,
            "the slide's width (100 px) is smaller than one patch's (224 x 224 level-0 px); "
            "its height (1000 px) is not: one column of white-padded patches",
        ),
        (
            100,
            80,
            "the slide (100 x 80 px) is smaller than one patch (224 x 224 level-0 px) in width "
            "and height: at most one white-padded patch",
        ),
    ],
)
def test_the_warning_names_the_smaller_side(
    tmp_path: Path, width: int, height: int, says: str
) -> None:
    path = ss.write_slide(tmp_path / "s.tiff", ss.tissue_rgb(height, width, seed=3), mpp=0.5)
    with open_slide(path) as slide:
        plan = plan_tiling(slide, TilingOptions(min_fragment_area_um2=0))
    assert any(w.startswith(says) for w in plan.warnings), plan.warnings
    assert (plan.grid.n_rows, plan.grid.n_cols)[0 if height < 224 else 1] == 1
