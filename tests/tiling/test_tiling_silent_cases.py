"""The slides the tiler used to get silently wrong (issue 21, "the tiler's silent cases").

Fluorescence and multiplex slides are refused (or read in the operator's fluorescence
mode, saying so); the pixel size comes from TIFF resolution tags and vendor
descriptions where OpenSlide gives none; black and red marker ink are counted in QC;
faint tissue is found (and flagged) rather than reported as no tissue; pad-mode edge
patches are judged on their in-slide area. Slides from tests/silent_case_slides.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import silent_case_slides as scs

from histohelper.errors import UnsupportedSlideError
from histohelper.server.tiling import TilingOptions, open_slide, plan_tiling


def _plan(path: Path, **kw: object):
    with open_slide(path) as slide:
        return plan_tiling(slide, TilingOptions(**kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def silent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("silent_cases")


# --- fluorescence and multiplex slides -------------------------------------------------


@pytest.fixture(scope="module")
def multiplex_slides(silent_dir: Path) -> dict[str, Path]:
    return {
        "qptiff-8bit": scs.write_qptiff(silent_dir / "mif8.qptiff"),
        "qptiff-16bit": scs.write_qptiff(silent_dir / "mif16.qptiff", dtype=np.uint16),
        "ome-3-channels": scs.write_ome_channels(silent_dir / "mif.ome.tif"),
        "grey-channel-pages": scs.write_grey_channel_pages(silent_dir / "channels.tif"),
    }


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("qptiff-8bit", "QPTIFF"),
        ("qptiff-16bit", "QPTIFF"),
        ("ome-3-channels", "OME"),
        ("grey-channel-pages", "greyscale"),
    ],
)
def test_fluorescence_slides_are_refused_saying_why(
    multiplex_slides: dict[str, Path], name: str, why: str
) -> None:
    """Before: planned as a grey brightfield picture of the first channel (no error,
    "no tissue" or a mask of a grey picture)."""
    with pytest.raises(UnsupportedSlideError) as info:
        _plan(multiplex_slides[name])
    msg = str(info.value)
    assert why in msg
    assert "brightfield H&E model cannot read fluorescence" in msg
    assert "--fluorescence read" in msg  # how the operator can opt in
    assert str(multiplex_slides[name].name) not in msg  # never the file name


def test_fluorescence_mode_read_finds_the_core_and_says_what_it_did(
    multiplex_slides: dict[str, Path],
) -> None:
    """Before: the 8-bit QPTIFF gave "no tissue" (a grey picture has no saturation)."""
    plan = _plan(multiplex_slides["qptiff-8bit"], fluorescence="read")
    assert not plan.no_tissue
    # The core is a disc of radius 0.4 * 1024 px in a 1536 x 1024 slide: 34 % of it.
    assert plan.mask.tissue_fraction == pytest.approx(np.pi * 409.6**2 / (1536 * 1024), rel=0.1)
    note = next(w for w in plan.warnings if "fluorescence" in w)
    assert "first channel" in note and "brighter than the dark background" in note
    assert "out of domain" in note
    assert plan.mpp_source == "metadata" and plan.mpp_x == pytest.approx(scs.QPTIFF_MPP)


def test_fluorescence_mode_read_finds_tissue_on_a_dim_16_bit_channel(silent_dir: Path) -> None:
    """Before: tissue ~2000 and background < 50 of 65535 reached the mask as grey 8 vs 0
    (OpenSlide renders the top 8 bits), under the grey floor: "no tissue"."""
    path = scs.write_qptiff(silent_dir / "mif16-dim.qptiff", dtype=np.uint16, dim=True)
    with open_slide(path) as slide:
        assert slide.metadata.bits_per_sample == 16
    plan = _plan(path, fluorescence="read")
    assert not plan.no_tissue
    assert plan.mask.tissue_fraction == pytest.approx(np.pi * 409.6**2 / (1536 * 1024), rel=0.1)


def test_brightfield_slides_are_not_taken_for_fluorescence(
    real_slide: Path, silent_dir: Path
) -> None:
    ome_rgb = scs.write_ome_rgb(silent_dir / "bf.ome.tif", 0.25, "µm")
    for path in (real_slide, ome_rgb, scs.write_qptiff_brightfield(silent_dir / "bf.qptiff")):
        with open_slide(path) as slide:
            assert slide.metadata.fluorescence == ""
            plan_tiling(slide, TilingOptions())  # no error


# --- pixel size from resolution tags and vendor descriptions ----------------------------


@pytest.mark.parametrize(
    ("writer", "expected", "declared_by"),
    [
        # Failed before ("assumed" 0.5): OpenSlide refuses untiled TIFFs, and the plain
        # image reader knows no resolution tags.
        (lambda d: scs.write_stripped_tiff(d / "s_cm.tif", 0.25, "CENTIMETER"), 0.25, "tiff"),
        (lambda d: scs.write_stripped_tiff(d / "s_in.tif", 0.3, "INCH"), 0.3, "tiff"),
        # Failed before: OME's PhysicalSizeX/Y (here in nm) is the only pixel size.
        (lambda d: scs.write_ome_rgb(d / "nm.ome.tif", 275.0, "nm"), 0.275, "OME"),
        (lambda d: scs.write_ome_rgb(d / "um.ome.tif", 0.25, "µm"), 0.25, "OME"),
        # Failed before: QPTIFF's PixelSizeMicrons, no resolution tags.
        (lambda d: scs.write_qptiff_brightfield(d / "bf.qptiff"), scs.QPTIFF_MPP, "QPTIFF"),
    ],
    ids=["stripped-cm", "stripped-inch", "ome-nm", "ome-um", "qptiff-description"],
)
def test_declared_pixel_size_is_read_where_openslide_gives_none(
    silent_dir: Path, writer, expected: float, declared_by: str
) -> None:
    plan = _plan(writer(silent_dir))
    assert plan.mpp_source == "metadata"
    assert (plan.mpp_x, plan.mpp_y) == (pytest.approx(expected), pytest.approx(expected))
    assert declared_by in plan.metadata.mpp_declared_by
    assert not any("assumed" in w for w in plan.warnings)


def test_tiled_tiff_resolution_tags_give_mpp(silent_dir: Path) -> None:
    """Passed before too (OpenSlide 4 reads centimetre and inch tags of tiled TIFFs):
    a regression guard that the added readers do not override it."""
    import synthetic_slides as ss

    path = ss.write_slide(silent_dir / "tags.tiff", scs.brightfield_rgb(), mpp=0.35)
    plan = _plan(path)
    assert plan.mpp_source == "metadata" and plan.mpp_x == pytest.approx(0.35)
    assert plan.metadata.mpp_declared_by == "openslide.mpp-x/y"


def test_implausible_resolution_tags_are_not_a_pixel_size(silent_dir: Path) -> None:
    """72 dpi (a writer's default, 352.8 um/px) is no scan resolution: still assumed."""
    plan = _plan(scs.write_stripped_tiff(silent_dir / "dpi72.tif", 25_400 / 72, "INCH"))
    assert plan.mpp_source == "assumed"


# --- marker ink ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inked_plan(silent_dir: Path):
    return _plan(scs.write_inked_slide(silent_dir / "inked.tiff"))


def test_black_and_red_ink_are_counted_per_colour(inked_plan) -> None:
    """Before: black ink was dark background but "0 kept patches are >25% ink", and red
    ink was not looked for (it counted as tissue)."""
    figures = {f.color: f for f in inked_plan.ink}
    assert list(figures) == ["green_blue", "black", "red"]
    # Each stroke is 110 px wide over 2,400 px: 264,000 px of a 6 Mpx slide (4.4 %).
    for color in ("black", "red"):
        assert figures[color].slide_fraction == pytest.approx(0.044, rel=0.25), color
        assert figures[color].inked_patch_count >= 5, color
    assert figures["green_blue"].slide_fraction < 0.001
    assert figures["green_blue"].inked_patch_count == 0
    total = int((inked_plan.grid.ink_fraction > 0.25).sum())
    assert total >= figures["black"].inked_patch_count + figures["red"].inked_patch_count - 1
    note = next(w for w in inked_plan.warnings if "marker ink" in w)
    assert f"{total} kept patches are >25% ink" in note
    assert f"black {figures['black'].inked_patch_count}" in note
    assert f"red {figures['red'].inked_patch_count}" in note


def test_black_ink_stays_background_and_red_ink_is_not_tissue(inked_plan) -> None:
    m = inked_plan.mask
    for color in ("black", "red"):
        ink = m.ink_by_color[color]
        assert ink.sum() > 0
        assert not np.any(ink & m.mask), color


def test_eosin_is_not_red_ink_on_the_real_slide(real_slide: Path) -> None:
    plan = _plan(real_slide)
    figures = {f.color: f for f in plan.ink}
    assert figures["red"].slide_fraction < 0.0005
    assert figures["red"].inked_patch_count == 0
    assert figures["black"].inked_patch_count == 0


# --- faint tissue --------------------------------------------------------------------------


def test_faint_tissue_is_found_and_flagged(silent_dir: Path) -> None:
    """Before: "no tissue" (saturation ~10 is under the threshold's floor of 20)."""
    plan = _plan(scs.write_faint_slide(silent_dir / "faint.tiff"))
    assert not plan.no_tissue
    assert plan.mask.faint
    # The faint box is 1000 x 700 of 2000 x 1500 px: 23 % of the slide.
    assert plan.mask.tissue_fraction == pytest.approx(0.233, rel=0.15)
    assert any("faint tissue" in w for w in plan.warnings)
    g = plan.grid
    inside = (g.x_l0 >= 500 - 112) & (g.x_l0 + g.width_l0 <= 1500 + 112)
    assert len(g) >= 8 and inside.all()


def test_real_slide_mask_is_not_faint(real_slide: Path) -> None:
    plan = _plan(real_slide)
    assert not plan.mask.faint
    assert not any("faint" in w for w in plan.warnings)


# --- edge patches in pad mode ----------------------------------------------------------------


def test_edge_patch_is_judged_on_its_in_slide_area(silent_dir: Path) -> None:
    """Before: column 4 scored 0.40 / 0.09 over the whole footprint and was dropped."""
    plan = _plan(scs.write_edge_slide(silent_dir / "edge.tiff"))
    g = plan.grid
    assert g.n_cols == 5 and g.n_rows == 3
    assert sorted(zip(g.row.tolist(), g.col.tolist(), strict=True)) == [(0, 4), (1, 4), (2, 4)]
    assert g.is_edge.all()
    np.testing.assert_allclose(g.tissue_fraction, 90 / 104, atol=0.03)
    # Drop mode still drops the overhanging column.
    assert len(_plan(scs.write_edge_slide(silent_dir / "edge2.tiff"), edge_mode="drop").grid) == 0


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        (  # the real dicom-boxes series: brightfield, RGB
            {
                "dicom.OpticalPathSequence[0].IlluminationTypeCodeSequence[0].CodeValue": "111744",
                "dicom.PhotometricInterpretation": "RGB",
                "dicom.SamplesPerPixel": "3",
            },
            "",
        ),
        (
            {
                "dicom.OpticalPathSequence[0].IlluminationTypeCodeSequence[0].CodeValue": "111743",
                "dicom.OpticalPathSequence[1].IlluminationTypeCodeSequence[0].CodeValue": "111743",
            },
            "2 epifluorescence optical path(s)",
        ),
        (
            {"dicom.PhotometricInterpretation": "MONOCHROME2", "dicom.SamplesPerPixel": "1"},
            "monochrome",
        ),
    ],
    ids=["brightfield", "epifluorescence", "monochrome"],
)
def test_openslide_dicom_properties_tell_fluorescence(props: dict[str, str], expected: str) -> None:
    from histohelper.server.tiling.slide import _fluorescence_from_properties

    reason = _fluorescence_from_properties(props)
    assert (expected in reason) if expected else reason == ""
