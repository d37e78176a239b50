"""Calibration patches come from the server's tiler: same grid, reader and resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as ss

from histohelper.errors import InvalidOptionsError
from histohelper.model_export.calibration import slide_patches
from histohelper.server.tiling import (
    PatchReader,
    Resolution,
    TilingOptions,
    open_slide,
    plan_tiling,
)

REAL_SLIDE = Path(__file__).resolve().parents[2] / "../shared/slides/real/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.25 um/px level 0 with a 2x level: a 0.5 um/px model is served from level 1
    (the old calibration read level 0 and resized it with PIL instead)."""
    rgb = ss.slide_with_tissue(1536, 2048, [(200, 150, 1200, 900), (1500, 1000, 400, 400)])
    path = tmp_path_factory.mktemp("calib") / "pyramid.tiff"
    return ss.write_slide(path, rgb, [(1024, 768)], mpp=0.25)


def _served(path: Path, opts: TilingOptions, size_px: int) -> dict[tuple[float, float], np.ndarray]:
    """Every kept cell's patch as the server's reader yields it, by level-0 origin."""
    with open_slide(path) as slide:
        grid = plan_tiling(slide, opts).grid
    out = {}
    for batch in PatchReader(path, grid, output_size_px=size_px).iter_batches():
        for i, image in zip(batch.indices, batch.images, strict=True):
            out[(float(grid.x_l0[i]), float(grid.y_l0[i]))] = image
    return out


@pytest.mark.parametrize(
    ("slide", "size_px", "mpp"),
    [("pyramid", 64, 0.5), ("pyramid", 96, 0.4), ("real", 224, 0.5)],
    ids=["level-1", "resized", "cmu1-small"],
)
def test_calibration_patches_are_the_served_patches(
    pyramid_slide: Path, slide: str, size_px: int, mpp: float
) -> None:
    path = pyramid_slide if slide == "pyramid" else REAL_SLIDE
    if not path.exists():
        pytest.skip("real slide missing")
    cal = slide_patches(path, size_px=size_px, target_mpp=mpp, max_patches=12)
    # The server's grid at the model's patch size and resolution, half-patch stride.
    opts = TilingOptions(
        patch_size_px=size_px, target=Resolution(mpp, "mpp"), stride_px=size_px // 2
    )
    served = _served(path, opts, size_px)
    assert cal.images.shape == (12, size_px, size_px, 3) and cal.grid_cells == len(served)
    assert len(cal.x_l0) == len(cal.y_l0) == 12
    for k, origin in enumerate(zip(cal.x_l0.tolist(), cal.y_l0.tolist(), strict=True)):
        np.testing.assert_array_equal(cal.images[k], served[origin])


def test_calibration_spreads_over_the_grid_and_caps(pyramid_slide: Path) -> None:
    few = slide_patches(pyramid_slide, size_px=64, target_mpp=0.5, max_patches=5)
    assert len(few.images) == 5 and few.source.startswith("slide-sha256:")
    assert few.x_l0.min() < 600 < few.x_l0.max()  # both tissue boxes are visited
    many = slide_patches(pyramid_slide, size_px=64, target_mpp=0.5, max_patches=100_000)
    assert len(many.images) == many.grid_cells


def test_calibration_slide_without_tissue_is_refused(tmp_path: Path) -> None:
    path = ss.write_slide(tmp_path / "glass.tiff", ss.glass_rgb(512, 512), mpp=0.5)
    with pytest.raises(InvalidOptionsError, match="no tissue"):
        slide_patches(path, size_px=64, target_mpp=0.5)
