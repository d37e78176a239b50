"""``histohelper tile --slide-root`` previews exactly the grid AnalyzeSlide analyses, and
writes its ``patches.csv`` in the layout ``histohelper analyze`` writes."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from histohelper.cli import main
from histohelper.client import PatchBatch, SlideClient, Started
from histohelper.patch_csv import GEOMETRY_COLUMNS
from histohelper.v1 import slide_analysis_pb2 as pb

SLIDE = "real/CMU-1-Small-Region.svs"


def test_tile_defaults_equal_analyze_slide_defaults(model_artifact: Path, slides_dir: Path) -> None:
    """The options ``tile`` builds from its default flags are the TilingOptions the
    servicer builds from an empty AnalyzeSlide request with the served manifest."""
    from histohelper.server.cli import add_subcommands
    from histohelper.server.convert import tiling_options
    from histohelper.server.runtime.manifest import read_manifest
    from histohelper.server.sandbox import resolve_slide_path
    from histohelper.server.tiling import tiling_options_from_args

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    args = parser.parse_args(["tile", SLIDE, "--slide-root", str(slides_dir), "--out", "x"])
    manifest = read_manifest(model_artifact)
    runtime = SimpleNamespace(manifest=manifest)
    tiling, batch_size = tiling_options(pb.AnalysisOptions(), runtime, 32)  # type: ignore[arg-type]
    assert (manifest.patch_size_px, manifest.target_mpp, batch_size) == (224, 0.5, 32)
    assert tiling_options_from_args(args) == tiling
    assert resolve_slide_path(slides_dir, SLIDE) == (slides_dir / SLIDE).resolve()


def test_tile_patches_equal_analyze_slide_grid(
    analysis_server, slides_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tile"
    assert main(["tile", SLIDE, "--slide-root", str(slides_dir), "--out", str(out)]) == 0
    with open(out / "patches.csv") as fh:
        rows = list(csv.DictReader(fh))
    tile = np.array(
        [
            [float(r[k]) for k in ("row", "col", "x_l0", "y_l0", "width_l0", "height_l0")]
            for r in rows
        ]
    )
    summary = json.loads((out / "summary.json").read_text())

    boxes: dict[int, list[float]] = {}
    with SlideClient(analysis_server.target) as client:
        for event in client.stream(SLIDE):
            if isinstance(event, Started):
                grid = event.grid
            elif isinstance(event, PatchBatch):
                for i, idx in enumerate(event.patch_index):
                    boxes[int(idx)] = [
                        float(event.row[i]),
                        float(event.col[i]),
                        event.x_l0[i],
                        event.y_l0[i],
                        event.width_l0[i],
                        event.height_l0[i],
                    ]
    served = np.array([boxes[i] for i in range(len(boxes))])
    assert grid.patch_count == len(boxes) == len(rows) == summary["patch_count"] == 49
    assert (grid.n_rows, grid.n_cols) == (summary["grid_rows"], summary["grid_cols"])
    assert (served[:, :2] == tile[:, :2]).all()  # same cells, same (row-major) order
    assert (served[:, 2:] == tile[:, 2:]).all()  # patches.csv boxes are exact (repr)


def test_tile_and_analyze_write_one_patches_csv_layout(
    analysis_server, slides_dir: Path, tmp_path: Path
) -> None:
    """Same leading columns, same names, same number formats: on the same slide the
    geometry cells of the two files are identical strings."""
    tile_out, analyze_out = tmp_path / "tile", tmp_path / "analyze"
    assert main(["tile", SLIDE, "--slide-root", str(slides_dir), "--out", str(tile_out)]) == 0
    argv = ["analyze", SLIDE, "--server", analysis_server.target, "--out", str(analyze_out)]
    assert main([*argv, "-q"]) == 0
    with open(tile_out / "patches.csv", newline="") as fh:
        tile_header, *tile_rows = list(csv.reader(fh))
    with open(analyze_out / "patches.csv", newline="") as fh:
        analyze_header, *analyze_rows = list(csv.reader(fh))

    n = len(GEOMETRY_COLUMNS)
    assert GEOMETRY_COLUMNS[:9] == (
        "patch_index", "row", "col", "x_l0", "y_l0", "width_l0", "height_l0",
        "tissue_fraction", "is_edge",
    )  # fmt: skip
    assert tile_header[:n] == analyze_header[:n] == list(GEOMETRY_COLUMNS)
    assert tile_header[n:] == ["ink_fraction"]
    classes = json.loads((analyze_out / "summary.json").read_text())["model"]["patch_classes"]
    assert analyze_header[n:] == [*(f"prob_{c}" for c in classes), "attention"]
    # 49: 43 cells inside the slide + 6 bottom-row edge cells (judged on their in-slide
    # area since issue 21).
    assert len(tile_rows) == len(analyze_rows) == 49
    assert [r[:n] for r in tile_rows] == [r[:n] for r in analyze_rows]
    assert [int(r[0]) for r in tile_rows] == list(range(49))  # bag order


@pytest.mark.parametrize(
    ("slide", "message"),
    [
        ("../slides/real/CMU-1-Small-Region.svs", "[SLIDE_PATH_INVALID]"),
        ("/etc/passwd", "[SLIDE_PATH_INVALID]"),
        ("real/missing.svs", "[SLIDE_NOT_FOUND]"),
    ],
    ids=["dotdot", "absolute", "missing"],
)
def test_tile_slide_root_sandbox(
    slides_dir: Path, tmp_path: Path, capsys, slide: str, message: str
) -> None:
    rc = main(["tile", slide, "--slide-root", str(slides_dir), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tile_slide_root_symlink_outside_is_denied(
    real_slide: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.svs").symlink_to(real_slide)
    rc = main(["tile", "link.svs", "--slide-root", str(root), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "[SLIDE_PATH_DENIED]" in capsys.readouterr().err


def test_tile_patches_csv_has_the_shared_layout_and_exact_boxes(
    real_slide: Path, tmp_path: Path
) -> None:
    """No server: the header is the shared prefix plus ``ink_fraction``, and every box
    reads back as exactly the tiler's float64 (no rounding)."""
    from histohelper.server.tiling import TilingOptions, open_slide, plan_tiling

    out = tmp_path / "tile"
    assert main(["tile", str(real_slide), "--out", str(out)]) == 0
    with open(out / "patches.csv", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    assert header == [*GEOMETRY_COLUMNS, "ink_fraction"]
    with open_slide(real_slide) as slide:
        grid = plan_tiling(slide, TilingOptions()).grid
    assert len(rows) == len(grid) > 0
    cols = {name: [r[k] for r in rows] for k, name in enumerate(header)}
    assert cols["patch_index"] == [str(i) for i in range(len(grid))]
    for name in ("x_l0", "y_l0", "width_l0", "height_l0"):
        assert [float(v) for v in cols[name]] == getattr(grid, name).tolist()
    assert [float(v) for v in cols["tissue_fraction"]] == pytest.approx(
        grid.tissue_fraction.tolist(), abs=5e-7
    )
    assert cols["is_edge"] == [str(int(e)) for e in grid.is_edge]
