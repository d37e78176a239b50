"""Import boundary and the ``histohelper tile`` command."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from histohelper.cli import main


def test_tiling_imports_neither_grpc_nor_torch() -> None:
    code = (
        "import sys, histohelper.server.tiling, histohelper.geometry\n"
        "bad = [m for m in ('grpc', 'torch', 'histohelper.server.runtime') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_geometry_imports_only_numpy() -> None:
    code = (
        "import sys, histohelper.geometry\n"
        "print(','.join(m for m in ('cv2', 'openslide', 'grpc', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_tile_command_writes_outputs(real_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["tile", str(real_slide), "--out", str(out)]) == 0
    for name in ("tissue_mask.png", "grid.png", "patches.csv", "summary.json"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    # 43 cells inside the slide + 6 bottom-row edge cells judged on their in-slide area.
    assert summary["patch_count"] == 49 and summary["mpp_source"] == "metadata"
    assert [f["color"] for f in summary["ink"]] == ["green_blue", "black", "red"]
    assert summary["faint_tissue"] is False
    with open(out / "patches.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 49 and {"row", "col", "x_l0", "y_l0", "tissue_fraction"} <= set(rows[0])


def test_tile_command_reports_bad_slide(slides_dir: Path, tmp_path: Path, capsys) -> None:
    rc = main(["tile", str(slides_dir / "bad" / "not-a-tiff.svs"), "--out", str(tmp_path)])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("histohelper tile: error: ") and "[SLIDE_UNSUPPORTED]" in err


def test_tile_flags_register_without_openslide_or_cv2() -> None:
    """The dispatcher builds its parser where only the thin client is installed."""
    code = (
        "import sys, argparse\n"
        "from histohelper.server.cli import add_subcommands\n"
        "p = argparse.ArgumentParser(); add_subcommands(p.add_subparsers())\n"
        "p.parse_args(['tile', 'x.svs', '--out', 'o', '--target-mpp', '1'])\n"
        "print(','.join(m for m in ('cv2', 'openslide', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
