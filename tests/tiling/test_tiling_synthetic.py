"""Real-world tiling cases on small synthetic slides (tests/synthetic_slides.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as ss
import tifffile

from histohelper.errors import (
    AnalysisCancelledError,
    HistoHelperError,
    SlideTooLargeError,
    UnsupportedSlideError,
)
from histohelper.geometry import in_slide_fractions
from histohelper.server.tiling import (
    Resolution,
    SlideMetadata,
    TilingOptions,
    open_slide,
    plan_tiling,
    read_low_res,
    read_patch,
    resolve_mpp,
    threshold_tissue,
)

BOX = (600, 500, 1400, 900)  # the tissue box of the odd_pyramid fixture


def _plan(path: Path, **kw: object):
    with open_slide(path) as slide:
        return plan_tiling(slide, TilingOptions(**kw))  # type: ignore[arg-type]


def _box_overlap(grid, i: int, box: tuple[int, int, int, int]) -> float:
    x, y, w, h = box
    ox = max(0.0, min(grid.x_l0[i] + grid.width_l0[i], x + w) - max(grid.x_l0[i], x))
    oy = max(0.0, min(grid.y_l0[i] + grid.height_l0[i], y + h) - max(grid.y_l0[i], y))
    return ox * oy / (grid.width_l0[i] * grid.height_l0[i])


# --- pyramids with non-integer downsamples ------------------------------------------


def test_odd_downsamples_are_exact_per_axis(odd_pyramid: Path) -> None:
    with open_slide(odd_pyramid) as slide:
        md = slide.metadata
    assert md.level_dimensions == ((3001, 2003), (750, 500), (187, 125))
    assert md.level_downsamples[1] == (3001 / 750, 2003 / 500)
    assert md.level_downsamples[2] == (3001 / 187, 2003 / 125)
    assert md.mpp_x == pytest.approx(0.25, rel=1e-3)


@pytest.mark.parametrize(("target_mpp", "level"), [(1.0, 1), (0.5, 0), (4.0, 2)])
def test_patch_pixels_match_level0_read_resized(
    odd_pyramid: Path, target_mpp: float, level: int
) -> None:
    plan = _plan(odd_pyramid, target=Resolution(target_mpp, "mpp"), patch_size_px=32)
    g = plan.grid
    assert g.level == level
    assert len(g) > 0
    inner = [i for i in range(len(g)) if _box_overlap(g, i, BOX) == 1.0]
    assert inner, "expected patches wholly inside the tissue box"
    with open_slide(odd_pyramid) as slide:
        for i in (inner[0], inner[-1]):  # first and far-corner patch: no drift
            patch = read_patch(slide, g, i)
            assert patch.shape == (32, 32, 3) and patch.dtype == np.uint8
            fw = round(g.width_l0[i])
            ref = slide.read_region_rgb(round(g.x_l0[i]), round(g.y_l0[i]), 0, fw, fw)
            import cv2

            ref = cv2.resize(ref, (32, 32), interpolation=cv2.INTER_AREA)
            diff = np.abs(patch.astype(int) - ref.astype(int)).mean()
            assert diff < 4.0, f"patch {i} differs from level-0 read by {diff:.2f}"


# --- metadata -----------------------------------------------------------------------


def test_no_mpp_assumes_level0_with_warning(no_mpp_slide: Path) -> None:
    plan = _plan(no_mpp_slide)
    assert plan.metadata.mpp_x is None
    assert plan.mpp_source == "assumed"
    assert any("no mpp" in w for w in plan.warnings)
    assert plan.grid.level == 0 and plan.grid.read_width_px == 224
    assert plan.grid.width_l0[0] == 224.0
    assert len(plan.grid) > 0


def _md(**kw: object) -> SlideMetadata:
    base = dict(
        vendor="x",
        level_dimensions=((1000, 1000),),
        level_downsamples=((1.0, 1.0),),
        openslide_downsamples=(1.0,),
        mpp_x=None,
        mpp_y=None,
        objective_power=None,
        width_l0=1000,
        height_l0=1000,
        level_count=1,
    )
    base.update(kw)
    return SlideMetadata(**base)  # type: ignore[arg-type]


def test_mpp_falls_back_to_objective_power() -> None:
    mpp_x, mpp_y, source, notes = resolve_mpp(_md(objective_power=40.0), TilingOptions())
    assert (mpp_x, mpp_y, source) == (0.25, 0.25, "objective_power") and notes


def test_mpp_override_wins(no_mpp_slide: Path) -> None:
    plan = _plan(no_mpp_slide, mpp_override=0.25)
    assert plan.mpp_source == "override"
    assert plan.grid.width_l0[0] == pytest.approx(448.0)


# --- transparency, black backgrounds, ink -------------------------------------------


def test_transparent_areas_are_never_tissue(rgba_slide: Path) -> None:
    plan = _plan(rgba_slide, min_tissue_fraction=0.01)
    g = plan.grid
    assert len(g) > 0
    # No kept patch lies wholly inside the transparent left column / top band.
    assert not np.any((g.x_l0 + g.width_l0 <= 500) | (g.y_l0 + g.height_l0 <= 200))
    # Why alpha matters: dropping it would show those areas black, and Otsu on
    # saturation then calls black noise tissue.
    with open_slide(rgba_slide) as slide:
        rgba = slide.read_region_rgba(0, 0, 1, 500, 375)
    black_rgb = np.ascontiguousarray(rgba[..., :3])
    black_rgb[:, :125] = np.random.default_rng(0).integers(0, 6, (375, 125, 3))
    opts = TilingOptions(remove_dark=False)
    wrong, *_ = threshold_tissue(black_rgb, np.full((375, 500), 255, np.uint8), opts, 4.0)
    right, *_ = threshold_tissue(black_rgb, rgba[..., 3], opts, 4.0)
    assert wrong[:, :125].mean() > 0.5
    assert right[:, :125].mean() == 0.0


def test_black_opaque_background_is_not_tissue(black_background_slide: Path) -> None:
    plan = _plan(black_background_slide)
    box = (700, 400, 800, 700)
    assert plan.mask.tissue_fraction == pytest.approx(800 * 700 / (2000 * 1500), rel=0.15)
    assert len(plan.grid) > 0
    assert all(_box_overlap(plan.grid, i, box) > 0.3 for i in range(len(plan.grid)))


def test_pen_ink_only_patches_are_dropped_and_flagged(pen_slide: Path) -> None:
    plan = _plan(pen_slide)
    g = plan.grid
    assert len(g) > 0
    # Ink strokes lie at x < 1400 over glass: no patch kept there.
    assert not np.any(g.x_l0 + g.width_l0 < 1500)
    # The blue stroke crossing the tissue is flagged on the patches it covers.
    assert g.ink_fraction.max() > 0.1
    assert any("ink" in w for w in plan.warnings)
    # Without ink removal, the coloured strokes would be called tissue.
    no_ink = _plan(pen_slide, remove_ink=False, remove_dark=False)
    assert np.any(no_ink.grid.x_l0 + no_ink.grid.width_l0 < 1500)


# --- no tissue ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["glass_slide", "faint_slide", "small_blob_slide"])
def test_no_tissue_is_an_explicit_outcome(name: str, request: pytest.FixtureRequest) -> None:
    plan = _plan(request.getfixturevalue(name))
    assert plan.no_tissue
    assert len(plan.grid) == 0
    assert any("no tissue" in w for w in plan.warnings)
    assert plan.mask.tissue_fraction < 0.002  # never speckle


# --- target resolution not in the pyramid; fractional footprints --------------------


def test_target_between_levels_reads_finer_and_resizes(fine_base_slide: Path) -> None:
    plan = _plan(fine_base_slide)  # 0.25 um/px base, levels 1/4/16, target 0.5
    g = plan.grid
    assert g.level == 0 and g.read_width_px == 448 and g.patch_size_px == 224
    assert g.width_l0[0] == pytest.approx(448.0)
    with open_slide(fine_base_slide) as slide:
        assert read_patch(slide, g, 0).shape == (224, 224, 3)


def test_fractional_footprints_with_overlap_do_not_drift(fine_base_slide: Path) -> None:
    plan = _plan(fine_base_slide, mpp_override=0.2456, stride_px=112)
    g = plan.grid
    fp = 224 * 0.5 / 0.2456
    assert g.width_l0[0] == pytest.approx(fp)
    assert g.stride_x_l0 == pytest.approx(fp / 2)
    np.testing.assert_array_equal(g.x_l0, g.col * g.stride_x_l0)
    np.testing.assert_array_equal(g.y_l0, g.row * g.stride_y_l0)
    # Tissue is the left half (x < 2000): the far-most kept patch still starts inside it.
    assert g.x_l0.max() < 2000
    assert g.x_l0.max() + fp > 1900
    assert g.n_rows == int(np.ceil((4000 - fp) / (fp / 2))) + 1


def test_mask_scales_per_axis_map_corner_tissue(indivisible_slide: Path, odd_pyramid: Path) -> None:
    plan = _plan(indivisible_slide)
    box = (2400, 1400, 601, 599)
    g = plan.grid
    assert len(g) > 0
    # Edge cells (the box reaches the right and bottom edges) are judged on their
    # in-slide area (issue 21), so the overlap is measured the same way.
    inside = in_slide_fractions(g.x_l0, g.y_l0, g.width_l0, g.height_l0, 3001, 1999)
    assert all(_box_overlap(g, i, box) / inside[i] >= 0.45 for i in range(len(g)))
    assert g.is_edge.any()
    # Per-axis-different mask scales (level 1 of the odd pyramid, 4.0013 x 4.006).
    plan2 = _plan(odd_pyramid, mask_target_side_px=200)
    assert plan2.mask.scale_x != plan2.mask.scale_y
    g = plan2.grid
    for i in range(len(g)):
        assert abs(g.tissue_fraction[i] - _box_overlap(g, i, BOX)) < 0.12


# --- huge lowest level: sampled mask -------------------------------------------------


def test_huge_single_level_is_sampled_with_bounded_reads(sparse_one_level: Path) -> None:
    plan = _plan(sparse_one_level, mask_max_read_px=4_000_000)
    assert plan.mask.sampled
    assert any("sampled" in w for w in plan.warnings)
    box = (8000, 6000, 3000, 2000)
    g = plan.grid
    assert len(g) > 0
    assert all(_box_overlap(g, i, box) > 0.3 for i in range(len(g)))
    # Full grid over the box area: ~ (3000/224) * (2000/224) patches.
    assert 90 <= len(g) <= 150
    assert max(plan.thumbnail.shape) <= 1024


def test_sampled_mask_stays_within_the_decode_budget(sparse_one_level: Path) -> None:
    """20,000 px wide in 256 px tiles: each band decodes its 79 tiles (5.2 Mpx) whole,
    so the decode budget sets how many bands are taken, and under 16 it refuses."""
    with open_slide(sparse_one_level) as slide:
        assert slide.level_tile_size(0) == (256, 256)
    per_band = 79 * 256 * 256
    opts = TilingOptions(mask_max_read_px=4_000_000, mask_max_decode_px=80 * per_band)
    with open_slide(sparse_one_level) as slide:
        assert read_low_res(slide, opts).total_reads == 70  # bands read (1/8 kept for scan edges)
    plan = _plan(sparse_one_level, mask_max_read_px=4_000_000, mask_max_decode_px=80 * per_band)
    assert plan.mask.sampled
    box = (8000, 6000, 3000, 2000)
    assert len(plan.grid) > 0
    assert all(_box_overlap(plan.grid, i, box) > 0 for i in range(len(plan.grid)))
    with pytest.raises(SlideTooLargeError, match="decode"):
        _plan(sparse_one_level, mask_max_read_px=4_000_000, mask_max_decode_px=15 * per_band)


def test_sparse_bands_keep_a_thin_strip_of_tissue(tmp_path: Path) -> None:
    """20 bands over 16,000 px rows (one per 800 px) against 1,024 columns (one per
    19.5 px): rows are interpolated to square mask pixels, so the 7 px median keeps a
    2,400 px (1.2 mm) tall strip that it erased when it spanned 7 bands."""
    strip = (2000, 6000, 16000, 2400)
    path = ss.write_sparse_slide(tmp_path / "strip.tiff", 20_000, 16_000, [strip], mpp=0.5)
    plan = _plan(path, mask_max_read_px=4_000_000, mask_max_decode_px=20 * 79 * 256 * 256)
    assert plan.mask.sampled and not plan.no_tissue
    assert abs(plan.mask.scale_x - plan.mask.scale_y) < 0.05 * plan.mask.scale_x
    g = plan.grid
    # The whole-level read finds 755 patches in 11 rows; 3 bands cross the strip.
    assert len(g) >= 500
    assert all(_box_overlap(g, i, (2000, 5400, 16000, 3600)) > 0 for i in range(len(g)))


def test_crafted_wide_one_level_slide_is_refused_before_decoding(tmp_path: Path) -> None:
    """200,000 x 20,000 px in 1,024 px tiles (a 40 KB file): every band of a sampled
    mask would decode 196 Mpx, so even 16 bands exceed the default 2 Gpx budget."""
    path = ss.write_sparse_slide(tmp_path / "wide.tiff", 200_000, 20_000, [], tile=1024)
    with pytest.raises(SlideTooLargeError, match="decode budget"):
        _plan(path)


def test_tiling_ends_when_stop_is_set(real_slide: Path, sparse_one_level: Path) -> None:
    """Both the block read and the band sampling check the stop event."""
    stop = threading.Event()
    stop.set()
    with open_slide(real_slide) as slide, pytest.raises(AnalysisCancelledError):
        plan_tiling(slide, TilingOptions(), stop)
    with open_slide(sparse_one_level) as slide, pytest.raises(AnalysisCancelledError):
        plan_tiling(slide, TilingOptions(mask_max_read_px=4_000_000), stop)


# --- edges ---------------------------------------------------------------------------


def test_edge_patch_is_full_size_and_white_padded(small_slide: Path) -> None:
    plan = _plan(small_slide, min_tissue_fraction=0.1, min_fragment_area_um2=0)
    g = plan.grid
    assert len(g) == 1 and bool(g.is_edge[0])
    with open_slide(small_slide) as slide:
        patch = read_patch(slide, g, 0)
    assert patch.shape == (224, 224, 3)
    assert (patch[80:, :] == 255).all() and (patch[:, 100:] == 255).all()
    assert patch[:80, :100].mean() < 200
    dropped = _plan(small_slide, edge_mode="drop", min_fragment_area_um2=0)
    assert len(dropped.grid) == 0 and dropped.no_tissue


# --- TIFF variants -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make", "readable"),
    [
        ("stripped-rgb8", lambda b: (b, {}), True),
        ("tiled-rgb16", lambda b: (b.astype(np.uint16) * 257, {"tile": (256, 256)}), True),
        ("stripped-rgb16", lambda b: (b.astype(np.uint16) * 257, {}), True),
        ("tiled-gray8", lambda b: (b[..., 0], {"tile": (256, 256)}), True),
        ("tiled-float32", lambda b: (b.astype(np.float32) / 255, {"tile": (256, 256)}), False),
    ],
)
def test_tiff_variants_open_or_are_refused_clearly(
    tmp_path: Path,
    name: str,
    make,
    readable: bool,
) -> None:
    base = ss.tissue_rgb(512, 512, seed=1)
    data, kw = make(base)
    path = tmp_path / f"{name}.tiff"
    tifffile.imwrite(path, data, photometric="rgb" if data.ndim == 3 else "minisblack", **kw)
    if readable:
        with open_slide(path) as slide:
            rgb = slide.read_region_rgb(0, 0, 0, 32, 32)
        assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
        expect = base[5, 5] if data.ndim == 3 else np.repeat(base[5, 5, 0], 3)
        assert np.abs(rgb[5, 5].astype(int) - expect.astype(int)).max() <= 2
    else:
        with pytest.raises(UnsupportedSlideError) as err:
            open_slide(path)
        assert name not in str(err.value) and str(tmp_path) not in str(err.value)


def test_errors_are_histohelper_errors() -> None:
    assert issubclass(UnsupportedSlideError, HistoHelperError)
