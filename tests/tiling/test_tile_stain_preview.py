"""``histohelper tile --stain-normalization``: a local preview of the stain normalisation
AnalyzeSlide applies, on the real test slide (no server, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from histohelper.cli import main
from histohelper.server.tiling import PatchReader, TilingOptions, open_slide, plan_tiling
from histohelper.server.tiling.stain import PUBLISHED, StainChoice, fit_normalizer

S = 224  # patch side at the default 224 px


def _pair(sheet: np.ndarray, k: int, columns: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Patch k of stain_preview.png as read and as normalised (the sheet's layout: a
    28 px title band, then rows of pairs, 8 px apart, 20 px captions)."""
    r, c = divmod(k, columns)
    y0, x0 = 28 + r * (S + 28), c * (2 * S + 24) + 8
    return sheet[y0 : y0 + S, x0 : x0 + S], sheet[y0 : y0 + S, x0 + S + 8 : x0 + 2 * S + 8]


def test_preview_shows_what_the_analysis_reader_feeds_the_model(
    real_slide: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tile"
    args = ["tile", str(real_slide), "--out", str(out), "--stride", "448"]
    assert main([*args, "--stain-normalization", "macenko", "--stain-previews", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())["stain_normalization"]
    assert [summary[k] for k in ("method", "reference", "warning")] == ["macenko", "published", ""]
    assert len(summary["fitted_stain_matrix"]) == 6
    indices = summary["preview_patch_indices"]
    assert len(indices) == 5 and indices == sorted(set(indices))
    sheet = cv2.cvtColor(cv2.imread(str(out / "stain_preview.png")), cv2.COLOR_BGR2RGB)
    # The same plan and fit as the analysis, and the analysis' reader with the fitted
    # normalizer as its transform (what Analyzer feeds the model).
    options = TilingOptions(stride_px=448)
    with open_slide(real_slide) as slide:
        plan = plan_tiling(slide, options)
    choice = StainChoice("macenko", "published", "request", PUBLISHED["macenko"])
    normalizer, applied = fit_normalizer(choice, plan.tissue_rgb)
    assert list(applied.fitted.stain_matrix) == pytest.approx(summary["fitted_stain_matrix"])
    reader = PatchReader(real_slide, plan.grid, batch_size=8, transform=normalizer)
    (batch,) = list(reader.iter_batches(indices=indices))
    plain_reader = PatchReader(real_slide, plan.grid, batch_size=8)
    (plain,) = list(plain_reader.iter_batches(indices=indices))
    for k in range(5):
        read, normed = _pair(sheet, k)
        assert np.array_equal(read, plain.images[k])
        assert np.array_equal(normed, batch.images[k])
        assert np.abs(read.astype(int) - normed).mean() > 2.0  # it did change colours


def test_reference_image_and_no_preview_without_the_flag(real_slide: Path, tmp_path: Path) -> None:
    import openslide

    with openslide.OpenSlide(str(real_slide)) as slide:
        rgb = np.asarray(slide.read_region((600, 800), 0, (600, 600)).convert("RGB"))
    ref = tmp_path / "ref.png"
    assert cv2.imwrite(str(ref), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "ref"
    args = ["tile", str(real_slide), "--out", str(out), "--stride", "448"]
    assert main([*args, "--stain-normalization", "reinhard", "--stain-reference", str(ref)]) == 0
    summary = json.loads((out / "summary.json").read_text())["stain_normalization"]
    assert (summary["method"], summary["reference"]) == ("reinhard", "image")
    assert len(summary["fitted_means"]) == 3 and (out / "stain_preview.png").is_file()
    plain = tmp_path / "plain"
    assert main(["tile", str(real_slide), "--out", str(plain), "--stride", "448"]) == 0
    assert json.loads((plain / "summary.json").read_text())["stain_normalization"] is None
    assert not (plain / "stain_preview.png").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stain-normalization", "vahadane"], "unknown stain method 'vahadane'"),
        (["--stain-normalization", "macenko", "--stain-reference", "model"], "model stain"),
        (["--stain-normalization", "macenko", "--stain-previews", "0"], "1..64"),
        (["--stain-normalization", "macenko", "--stain-reference", "nope.png"], "could not"),
    ],
    ids=["unknown-method", "model-reference", "zero-previews", "missing-image"],
)
def test_bad_stain_flags_are_one_line_errors(
    real_slide: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags, message
) -> None:
    args = ["tile", str(real_slide), "--out", str(tmp_path / "o"), "--stride", "448", *flags]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "[INVALID_OPTIONS]" in err, err
