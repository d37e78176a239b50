"""``histohelper tile --slide-root`` previews exactly the grid AnalyzeSlide analyses."""

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
from histohelper.v1 import slide_analysis_pb2 as pb

SLIDE = "real/CMU-1-Small-Region.svs"


def test_tile_defaults_equal_analyze_slide_defaults(model_artifact: Path, slides_dir: Path) -> None:
    """The options ``tile`` builds from its default flags are the TilingOptions the
    servicer builds from an empty AnalyzeSlide request with the served manifest."""
    from histohelper.server.cli import add_subcommands
    from histohelper.server.runtime.manifest import read_manifest
    from histohelper.server.servicer import SlideAnalysisServicer
    from histohelper.server.tiling import tiling_options_from_args

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    args = parser.parse_args(["tile", SLIDE, "--slide-root", str(slides_dir), "--out", "x"])
    manifest = read_manifest(model_artifact)
    fake = SimpleNamespace(
        runtime=SimpleNamespace(manifest=manifest),
        config=SimpleNamespace(batch_size=32, slide_root=slides_dir),
    )
    spec = SlideAnalysisServicer._spec(fake, pb.AnalyzeSlideRequest(slide_path=SLIDE), "r")  # type: ignore[arg-type]
    assert (manifest.patch_size_px, manifest.target_mpp) == (224, 0.5)
    assert tiling_options_from_args(args) == spec.tiling
    assert spec.slide_path == (slides_dir / SLIDE).resolve()


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
    assert grid.patch_count == len(boxes) == len(rows) == summary["patch_count"] == 43
    assert (grid.n_rows, grid.n_cols) == (summary["grid_rows"], summary["grid_cols"])
    assert (served[:, :2] == tile[:, :2]).all()  # same cells, same (row-major) order
    max_diff = float(np.abs(served[:, 2:] - tile[:, 2:]).max())
    assert max_diff <= 5e-4 + 1e-9  # patches.csv rounds to 3 decimals
    print(f"tile vs AnalyzeSlide: {len(rows)} patches, max |box difference| {max_diff:.2e} px")


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
