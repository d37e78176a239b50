"""``histohelper features``: HDF5 bags per cohort slide, over a real server process
(``analysis_server``, slide root ../shared/slides)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from histohelper.client.cli import main  # noqa: E402
from histohelper.client.features import (  # noqa: E402
    FORMAT,
    feature_file_name,
    options_json,
)
from histohelper.client.options import AnalysisOptions  # noqa: E402
from histohelper.client.sync import SlideClient  # noqa: E402

SMALL = "real/CMU-1-Small-Region.svs"
TINY = "real/tiny-16px.svs"
MISSING = "real/no-such-slide.svs"


@dataclass
class Run:
    code: int
    out: str
    err: str
    index: dict[str, dict[str, str]]


def _run(capsys: pytest.CaptureFixture[str], out_dir: Path, *argv: str) -> Run:
    code = main(["features", *argv, "--out", str(out_dir), "--quiet"])
    captured = capsys.readouterr()
    index_path = out_dir / "features_index.csv"
    index = {}
    if index_path.exists():
        with index_path.open(newline="") as fh:
            index = {r["slide"]: r for r in csv.DictReader(fh)}
    return Run(code, captured.out, captured.err, index)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest):
    return request.getfixturevalue("analysis_server")


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    path = tmp_path / "cohort.csv"
    path.write_text(
        f"slide,label,patient\n{SMALL},pulmonary,p1\n{TINY},cerebral,p2\n{MISSING},cerebral,p3\n"
    )
    return path


def _mtimes(out_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.h5")}


def test_features_cohort_bags_match_sdk_and_rerun_skips(
    server, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "bags"
    first = _run(capsys, out_dir, str(cohort), "--server", server.target, "--jobs", "2")

    # The missing slide is reported, the others complete.
    assert first.code == 1, first.err
    assert MISSING in first.err and "1 slide(s) failed" in first.err
    assert first.index[MISSING]["status"] == "failed"
    assert first.index[MISSING]["reason"]
    assert first.index[MISSING]["file"] == ""
    assert first.index[SMALL]["status"] == "written"
    assert first.index[TINY]["status"] in ("written", "no_tissue")
    assert sorted(p.name for p in out_dir.glob("*.h5")) == sorted(
        [feature_file_name(SMALL), feature_file_name(TINY)]
    )
    assert not list(out_dir.glob("*.tmp"))  # atomic writes leave no temp files

    with SlideClient(server.target) as client:
        info = client.get_model_info()
        direct = client.analyze(
            SMALL, AnalysisOptions(return_embeddings=True, return_attention=False)
        )
    p = direct.patches
    assert p.embeddings is not None and len(p) > 0
    with h5py.File(out_dir / feature_file_name(SMALL), "r") as f:
        features, coords = f["features"][...], f["coords"][...]
        attrs = dict(f.attrs)
        coord_attrs = dict(f["coords"].attrs)
    assert features.dtype == np.float32 and features.shape == (len(p), 512)
    assert coords.dtype == np.int64 and coords.shape == (len(p), 2)
    assert int(first.index[SMALL]["n_patches"]) == len(p)
    np.testing.assert_array_equal(coords[:, 0], np.rint(p.x_l0).astype(np.int64))
    np.testing.assert_array_equal(coords[:, 1], np.rint(p.y_l0).astype(np.int64))
    np.testing.assert_allclose(features, p.embeddings, rtol=0, atol=1e-5)
    assert coord_attrs["frame"] == "level0_px" and coord_attrs["patch_level"] == 0
    assert attrs["format"] == FORMAT
    assert attrs["slide"] == SMALL and attrs["label"] == "pulmonary" and attrs["patient"] == "p1"
    assert attrs["patch_size_l0"] == pytest.approx(direct.grid.patch_width_l0)
    assert attrs["effective_mpp"] == pytest.approx(direct.grid.effective_mpp)
    assert attrs["mpp_source"] == direct.grid.mpp_source
    assert attrs["model_name"] == info.model.name
    assert attrs["model_version"] == info.model.version
    assert attrs["model_hash_source"] == "server:artifact_sha256"  # the served file's hash
    assert len(attrs["model_hash"]) == 64
    assert attrs["options_json"] == options_json(AnalysisOptions())
    with h5py.File(out_dir / feature_file_name(TINY), "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape[1] == 512
        assert f["coords"].shape == (f["features"].shape[0], 2)

    # A re-run skips both finished slides (files untouched) and retries the failed one.
    before = _mtimes(out_dir)
    second = _run(capsys, out_dir, str(cohort), "--server", server.target)
    assert second.code == 1
    assert second.index[SMALL]["status"] == "skipped"
    assert second.index[TINY]["status"] == "skipped"
    assert second.index[SMALL]["n_patches"] == first.index[SMALL]["n_patches"]
    assert second.index[MISSING]["status"] == "failed"
    assert _mtimes(out_dir) == before

    # Other bag-shaping options recompute.
    third = _run(capsys, out_dir, str(cohort), "--server", server.target, "--min-tissue", "0.9")
    assert third.index[SMALL]["status"] == "written"
    assert _mtimes(out_dir)[feature_file_name(SMALL)] != before[feature_file_name(SMALL)]
    with h5py.File(out_dir / feature_file_name(SMALL), "r") as f:
        assert '"min_tissue_fraction": 0.9' in f.attrs["options_json"]


def test_features_refuses_to_mix_models(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(f"slide\n{TINY}\n")
    out_dir = tmp_path / "bags"
    assert _run(capsys, out_dir, str(cohort), "--server", server.target).code == 0
    bag = out_dir / feature_file_name(TINY)
    with h5py.File(bag, "a") as f:
        real_hash = f.attrs["model_hash"]
        f.attrs["model_hash"] = "0" * 64  # as if written by another model
    before = bag.stat().st_mtime_ns

    refused = _run(capsys, out_dir, str(cohort), "--server", server.target)
    assert refused.code == 2
    assert "another model" in refused.err and feature_file_name(TINY) in refused.err
    assert bag.stat().st_mtime_ns == before

    forced = _run(capsys, out_dir, str(cohort), "--server", server.target, "--overwrite")
    assert forced.code == 0, forced.err
    with h5py.File(bag, "r") as f:
        assert f.attrs["model_hash"] == real_hash


def test_features_refuses_unknown_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(f"slide,diagnosis\n{SMALL},x\n")
    run = _run(capsys, tmp_path / "bags", str(cohort), "--server", "127.0.0.1:1")
    assert run.code == 2
    assert "'diagnosis'" in run.err and "slide, label, patient, split" in run.err


def test_feature_file_names_do_not_collide() -> None:
    a, b = feature_file_name("a/slide 1.svs"), feature_file_name("b/slide 1.svs")
    assert a != b and a.startswith("slide_1-") and a.endswith(".h5")
    assert feature_file_name("../x/..svs").endswith(".h5")
