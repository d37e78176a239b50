"""The shared real and deliberately broken slides (read from ../shared/slides)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from histohelper.errors import CorruptSlideError, SlideNotFoundError, UnsupportedSlideError
from histohelper.server.tiling import (
    PatchReader,
    TilingOptions,
    open_slide,
    plan_tiling,
)
from histohelper.server.tiling.plan import build_grid
from histohelper.server.tiling.render import grid_overlay, mask_image

LOOK_DIR = Path("/tmp/tiler-look")


def test_cmu_mask_and_grid(real_slide: Path, tmp_path: Path) -> None:
    with open_slide(real_slide) as slide:
        md = slide.metadata
        plan = plan_tiling(slide, TilingOptions())
        gray = plan_tiling(slide, TilingOptions(mask_method="gray"))
    assert md.vendor == "aperio" and md.level_dimensions == ((2220, 2967),)
    assert md.mpp_x == pytest.approx(0.499) and md.objective_power == 20
    assert plan.mpp_source == "metadata" and plan.effective_mpp == 0.5
    # Measured: saturation 0.332, grayscale 0.342 (docs/tiling.md). The tissue is a
    # central vertical strip; the rest (about two thirds) is glass.
    assert 0.25 < plan.mask.tissue_fraction < 0.45
    assert 0.25 < gray.mask.tissue_fraction < 0.45
    g = plan.grid
    # At defaults (224 px at 0.5 um/px): 43 cells inside the slide plus 6 of the bottom
    # row, 22 % inside the slide and 52-100 % tissue there (edge cells are judged on
    # their in-slide area since issue 21; over the whole footprint they scored < 0.25).
    assert len(g) == 49 and int(g.is_edge.sum()) == 6
    assert (g.n_rows, g.n_cols) == (14, 10)
    assert g.width_l0[0] == pytest.approx(224 * 0.5 / 0.499)
    # Blank corners: top-left, bottom-left, top-right hold no kept patch.
    for x0, y0, x1, y1 in [(0, 0, 600, 600), (0, 2500, 400, 2967), (1800, 0, 2220, 400)]:
        inside = (
            (g.x_l0 < x1) & (g.x_l0 + g.width_l0 > x0) & (g.y_l0 < y1) & (g.y_l0 + g.height_l0 > y0)
        )
        assert not inside.any(), f"kept patch in blank corner {(x0, y0, x1, y1)}"
    assert not plan.no_tissue
    mask_png = tmp_path / "tissue_mask.png"
    grid_png = tmp_path / "grid.png"
    assert cv2.imwrite(str(mask_png), mask_image(plan))
    assert cv2.imwrite(str(grid_png), cv2.cvtColor(grid_overlay(plan), cv2.COLOR_RGB2BGR))
    assert cv2.imread(str(mask_png)).shape[:2] == plan.mask.mask.shape
    LOOK_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(mask_png, LOOK_DIR / "cmu_tissue_mask.png")
    shutil.copy(grid_png, LOOK_DIR / "cmu_grid.png")


def test_cmu_patches_read_in_batches(real_slide: Path) -> None:
    with open_slide(real_slide) as slide:
        plan = plan_tiling(slide, TilingOptions())
    seen: list[int] = []
    for batch in PatchReader(real_slide, plan.grid, batch_size=8).iter_batches():
        assert batch.images.shape[1:] == (224, 224, 3) and batch.images.dtype == np.uint8
        assert batch.failed.size == 0
        # Kept patches are tissue: clearly not white glass. Edge patches are judged on
        # their in-slide part (issue 21): the bottom row's padding is pure white.
        for image in batch.images:
            px = image.reshape(-1, 3)
            assert px[(px != 255).any(axis=1)].mean() < 235
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(len(plan.grid)))


def test_tiny_slide_gives_zero_patches_and_no_tissue(slides_dir: Path) -> None:
    """16 x 16 px: one grid cell whose footprint is at most 0.5% tissue -> no patch.

    Documented behaviour: zero patches, ``no_tissue`` True, never a crash.
    """
    with open_slide(slides_dir / "real" / "tiny-16px.svs") as slide:
        plan = plan_tiling(slide, TilingOptions())
    assert (plan.grid.n_rows, plan.grid.n_cols) == (1, 1)
    assert len(plan.grid) == 0 and plan.no_tissue
    assert plan.thumbnail.shape == (16, 16, 3)


def test_dicom_series_opens(slides_dir: Path) -> None:
    with open_slide(slides_dir / "dicom-boxes" / "boxes_0.dcm") as slide:
        assert slide.metadata.vendor == "dicom"
        assert slide.metadata.level_dimensions[0] == (16, 16)
        assert slide.read_region_rgb(0, 0, 0, 16, 16).shape == (16, 16, 3)
        plan = plan_tiling(slide, TilingOptions())
    assert plan.grid.n_rows == 1


@pytest.mark.parametrize("name", ["not-a-tiff.svs", "unsupported-compression.tiff"])
def test_bad_slides_are_unsupported(slides_dir: Path, name: str) -> None:
    with pytest.raises(UnsupportedSlideError) as err:
        open_slide(slides_dir / "bad" / name)
    msg = str(err.value)
    assert name not in msg and str(slides_dir) not in msg and "bad" not in msg.split()


def test_missing_slide_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError) as err:
        open_slide(tmp_path / "patient-1234.svs")
    assert "patient" not in str(err.value)


def test_corrupt_tile_slide_fails_with_recorded_failures(slides_dir: Path) -> None:
    path = slides_dir / "bad" / "corrupt-tile.svs"
    with open_slide(path) as slide:  # the header opens
        with pytest.raises(CorruptSlideError) as err:
            plan_tiling(slide, TilingOptions())
        assert "corrupt-tile" not in str(err.value)
        with pytest.raises(CorruptSlideError):
            slide.read_region_rgb(0, 0, 0, 8, 8)
        # ...the handle was reopened, not left poisoned: it fails the same way again.
        with pytest.raises(CorruptSlideError):
            slide.read_region_rgb(0, 0, 0, 8, 8)
        # A grid laid out regardless of the mask (everything "tissue").
        from histohelper.server.tiling import TissueMask

        everything = TissueMask(np.ones((4, 4), bool), 4.0, 4.0, 1.0, "all")
        grid = build_grid(
            slide.metadata,
            everything,
            TilingOptions(patch_size_px=4, min_tissue_fraction=0.0),
            1.0,
            1.0,
            0,
            0.499,
        )
    assert len(grid) == 16
    reader = PatchReader(path, grid, batch_size=4, max_failed_fraction=0.25)
    with pytest.raises(CorruptSlideError) as err:
        for _ in reader.iter_batches():
            pass
    assert len(reader.failed_indices) > 4  # recorded, and past the threshold
    assert err.value.metadata["requested_patches"] == "16"
