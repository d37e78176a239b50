"""The region-of-interest flags: ``histohelper tile --roi`` (local preview),
``histohelper analyze --roi`` (over a loopback server, into summary.json) and the cohort
manifest's ``roi`` column."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from histohelper.cli import main
from histohelper.client import RegionOfInterest
from histohelper.client.cohort_runner import options_identity, slides_from_manifest
from histohelper.client.options import AnalysisOptions
from histohelper.errors import InvalidOptionsError

SLIDE = "real/CMU-1-Small-Region.svs"
SHELL = [[300.5, 200.25], [1900.0, 250.0], [1800.0, 1900.0], [350.0, 1800.0], [300.5, 200.25]]
HOLE = [[800.0, 700.0], [1300.0, 720.0], [1250.0, 1200.0], [820.0, 1150.0], [800.0, 700.0]]


def _annotations(path: Path) -> Path:
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [SHELL, HOLE]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def test_tile_previews_the_region(slides_dir: Path, tmp_path: Path, capsys) -> None:
    roi = _annotations(tmp_path / "a.geojson")
    plain, inside = tmp_path / "plain", tmp_path / "roi"
    assert main(["tile", str(slides_dir / SLIDE), "--out", str(plain)]) == 0
    args = ["tile", str(slides_dir / SLIDE), "--out", str(inside), "--roi", str(roi)]
    assert main(args) == 0
    assert "left out by the region of interest" in capsys.readouterr().out
    a = json.loads((plain / "summary.json").read_text())
    b = json.loads((inside / "summary.json").read_text())
    assert a["roi_sha256"] is None and a["roi_excluded_patch_count"] == 0
    assert len(b["roi_sha256"]) == 64
    assert b["patch_count"] + b["roi_excluded_patch_count"] == a["patch_count"]
    assert 0 < b["patch_count"] < a["patch_count"]
    # grid.png draws the region's outline in red (230, 0, 0): absent without a region.
    red = [np.all(cv2.imread(str(d / "grid.png"))[..., ::-1] == (230, 0, 0), axis=2).sum()
           for d in (plain, inside)]  # fmt: skip
    assert red[0] == 0 and red[1] > 100


def test_tile_refuses_a_bad_region(slides_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "Polygon", "coordinates": [[[0, 0], [9, 9], [9, 0], [0, 9], [0, 0]]]}')
    args = ["tile", str(slides_dir / SLIDE), "--out", str(tmp_path / "o"), "--roi", str(bad)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Self-intersection" in err and "[INVALID_OPTIONS]" in err


def test_analyze_roi_flag_writes_the_count(start_inprocess_server, tmp_path: Path) -> None:
    server = start_inprocess_server()
    roi = _annotations(tmp_path / "a.geojson")
    out = tmp_path / "out"
    args = ["analyze", SLIDE, "--server", f"127.0.0.1:{server.port}", "--out", str(out), "-q"]
    assert main([*args, "--roi", str(roi)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["roi_excluded_patch_count"] > 0 and summary["patch_count"] > 0
    assert "left out by the region of interest" in (out / "report.html").read_text()


def test_manifest_roi_column(tmp_path: Path) -> None:
    _annotations(tmp_path / "a.geojson")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide,roi\nreal/one.svs,a.geojson\nreal/two.svs,\n")
    one, two = slides_from_manifest(manifest, AnalysisOptions(), upload=False)
    assert one.options is not None and one.options.roi is not None
    assert "Tumor" in one.options.roi.include_geojson
    assert two.options is None
    identity = options_identity(one.options, {})
    assert identity["roi"] == one.options.roi.sha256()
    json.dumps(identity)


def test_sdk_region_checks_and_wire_form(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionsError, match="needs include"):
        RegionOfInterest()
    with pytest.raises(InvalidOptionsError, match="mask_downsample"):
        RegionOfInterest(mask_png=b"png")
    with pytest.raises(InvalidOptionsError, match="no mask"):
        RegionOfInterest(include_geojson="{}", mask_downsample=2.0)
    roi = RegionOfInterest.from_files(_annotations(tmp_path / "a.geojson"))
    wire = AnalysisOptions(roi=roi).to_proto()
    assert wire.roi.include_geojson == roi.include_geojson and not wire.roi.mask_png
    assert not AnalysisOptions().to_proto().HasField("roi")


def test_explain_takes_the_region_and_stain_flags(
    start_inprocess_server, tmp_path: Path, capsys
) -> None:
    """explain analyses with the same region and stain options as analyze (finding 19)."""
    server = start_inprocess_server()
    roi = _annotations(tmp_path / "a.geojson")
    args = ["explain", SLIDE, "--server", f"127.0.0.1:{server.port}", "--top-k", "1", "-q"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    plain = capsys.readouterr().out
    region = ["--roi", str(roi), "--stain-normalization", "macenko"]
    assert main([*args, "--out", str(tmp_path / "roi"), *region]) == 0
    inside = capsys.readouterr().out

    def patch_count(line: str) -> int:
        return int(line.split(" of ")[1].split()[0])

    assert 0 < patch_count(inside) < patch_count(plain)
    report = (tmp_path / "roi" / "report.html").read_text()
    assert "left out by the region of interest" in report and "macenko" in report


def test_explain_usage_errors_name_the_command(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["explain", SLIDE, "--out", str(tmp_path), "--roi-typo", "a.geojson"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "histohelper explain: error: unrecognized arguments: --roi-typo" in err
    mask_only = ["explain", SLIDE, "--out", str(tmp_path), "--roi-mask", "m.png"]
    assert main(mask_only) == 2
    assert capsys.readouterr().err.startswith("histohelper explain: error: --roi-mask needs")
