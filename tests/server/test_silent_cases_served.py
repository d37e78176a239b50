"""The tiler's silent cases (issue 21) through a real server on loopback: a multiplex
QPTIFF is refused as SLIDE_UNSUPPORTED saying why (or analysed under the operator's
``--fluorescence read``, saying so), and the marker-ink and faint-tissue QC figures
reach the client's SlideResult, summary.json and report.html."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import silent_case_slides as scs

from histohelper.client import AnalysisOptions, SlideClient
from histohelper.client.exports import save_json
from histohelper.client.report import write_report
from histohelper.errors import UnsupportedSlideError
from histohelper.server.tiling import Resolution, TilingOptions, open_slide, plan_tiling

#: 1 um/px patches (448 level-0 px): a quarter of the default's patches, so the test
#: stays fast on CPU; the QC figures are compared with the tiler's at the same target.
COARSE = AnalysisOptions(target_mpp=1.0)


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("silent-served")
    scs.write_qptiff(root / "mif.qptiff")
    scs.write_inked_slide(root / "inked.tiff")
    scs.write_faint_slide(root / "faint.tiff")
    return root


def test_multiplex_slide_is_refused_and_the_server_keeps_serving(
    start_inprocess_server, slide_root: Path
) -> None:
    """Before: OK, outcome NO_TISSUE (the DAPI channel read as a grey picture)."""
    running = start_inprocess_server(slide_root=slide_root)
    with SlideClient(running.target, tls=False) as client:
        with pytest.raises(UnsupportedSlideError) as info:
            client.analyze("mif.qptiff")
        assert "QPTIFF multiplex immunofluorescence" in str(info.value)
        assert "brightfield H&E model cannot read fluorescence" in str(info.value)
        assert "mif" not in str(info.value)
        assert client.get_model_info().model.name  # still serving


def test_fluorescence_read_mode_analyses_with_a_warning(
    start_inprocess_server, slide_root: Path
) -> None:
    running = start_inprocess_server(slide_root=slide_root, fluorescence="read")
    with SlideClient(running.target, tls=False) as client:
        result = client.analyze("mif.qptiff", COARSE)
    assert result.patch_count > 0
    assert any("fluorescence mode" in w and "out of domain" in w for w in result.qc.warnings)


def test_ink_and_faint_figures_reach_the_client(
    start_inprocess_server, slide_root: Path, tmp_path: Path
) -> None:
    """Before: no ink figures (black ink uncounted, red ink taken for tissue) and the
    faint slide was NO_TISSUE."""
    running = start_inprocess_server(slide_root=slide_root)
    with SlideClient(running.target, tls=False) as client:
        inked = client.analyze("inked.tiff", COARSE)
        faint = client.analyze("faint.tiff", COARSE)
    with open_slide(slide_root / "inked.tiff") as slide:
        local = plan_tiling(slide, TilingOptions(target=Resolution(1.0, "mpp")))
    figures = {f.color: f for f in inked.qc.ink}
    assert list(figures) == ["green_blue", "black", "red"]
    for f in local.ink:
        assert figures[f.color].slide_fraction == pytest.approx(f.slide_fraction)
        assert figures[f.color].inked_patch_count == f.inked_patch_count
    assert figures["black"].slide_fraction > 0.03 and figures["red"].slide_fraction > 0.03
    assert not inked.qc.faint_tissue
    assert faint.qc.faint_tissue and faint.outcome != "NO_TISSUE"
    summary = json.loads(save_json(inked, tmp_path / "summary.json").read_text())
    assert [f["color"] for f in summary["ink"]] == ["green_blue", "black", "red"]
    assert summary["ink"][1]["inked_patch_count"] == figures["black"].inked_patch_count
    assert summary["faint_tissue"] is False
    html = write_report(faint, tmp_path / "faint").read_text()
    assert "faint tissue (low contrast; check the mask)</th><td>yes" in html.replace("\n", "")
    html = write_report(inked, tmp_path / "inked").read_text()
    assert "black marker ink" in html and "red marker ink" in html
