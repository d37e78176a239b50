"""Model repository from the client side (issue 22): two models' results on the same
slides in one cohort run, side by side in cohort.csv; a re-run skips by model;
``histohelper info`` lists the repository; ``histohelper admin`` loads, unloads and
sets defaults. One real in-process server over a repository of two models (the two
seeded untrained exports)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from cohort_support import start_repository_server, write_small_slide

from histohelper.cli import main
from histohelper.client import SlideClient
from histohelper.client.cohort_runner import MANIFEST_NAME, TABLE_NAME
from histohelper.client.models import ModelRef


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model-cli-slides")
    write_small_slide(root / "a.tiff", seed=30)
    write_small_slide(root / "b.tiff", seed=31)
    return root


@pytest.fixture(scope="module")
def repository(
    tmp_path_factory: pytest.TempPathFactory, model_artifact: Path, model_artifact_v2: Path
) -> Path:
    """``tumour/1`` (seed 0) and ``stroma/1.pt`` (seed 1)."""
    repo = tmp_path_factory.mktemp("model-cli-repo")
    (repo / "tumour" / "1").mkdir(parents=True)
    (repo / "tumour" / "1" / "model.pt").symlink_to(model_artifact)
    (repo / "stroma").mkdir()
    (repo / "stroma" / "1.pt").symlink_to(model_artifact_v2)
    return repo


@pytest.fixture(scope="module")
def server(repository: Path, slide_root: Path):
    running = start_repository_server(repository, slide_root)
    yield running
    running.stop(grace=0, drain=0)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_two_models_side_by_side_in_one_cohort_run(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cohort"
    argv = ["analyze", "a.tiff", "b.tiff", "--server", server.target, "--out", str(out), "-q"]
    code, _, err = cli(capsys, *argv, "--model", "tumour", "--model", "stroma:1")
    assert code == 0, err
    with (out / TABLE_NAME).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["slide"], r["model"], r["model_version"]) for r in rows] == [
        ("a.tiff", "tumour", "1"), ("a.tiff", "stroma", "1"),
        ("b.tiff", "tumour", "1"), ("b.tiff", "stroma", "1"),
    ]  # fmt: skip
    assert [r["id"] for r in rows] == ["a--tumour", "a--stroma-1", "b--tumour", "b--stroma-1"]
    assert all(r["status"] == "done" and (out / r["id"] / "summary.json").is_file() for r in rows)
    # Each row holds its model's own result: the same as a one-model SDK call.
    with SlideClient(server.target) as client:
        for r in rows:
            single = client.analyze(r["slide"], model=ModelRef(r["model"], r["model_version"]))
            assert float(r["prob_malignant"]) == pytest.approx(
                single.prediction.probabilities[1], abs=1e-6
            )
    assert rows[0]["prob_malignant"] != rows[1]["prob_malignant"]  # two models differ
    entries = json.loads((out / MANIFEST_NAME).read_text())["slides"]
    assert entries["a--stroma-1"]["model"] == "stroma:1"
    assert entries["a--stroma-1"]["model_name"] == "stroma"
    # A re-run skips every slide of every model; the index page links each report.
    code, _, err = cli(capsys, *argv, "--model", "tumour", "--model", "stroma:1")
    assert code == 0, err
    with (out / TABLE_NAME).open(newline="") as fh:
        assert {r["status"] for r in csv.DictReader(fh)} == {"skipped"}
    index = (out / "index.html").read_text()
    assert all(f"{i}/report.html" in index for i in ("a--tumour", "a--stroma-1"))


def test_info_lists_the_repository_and_admin_changes_it(
    server, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "info", "--server", server.target, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"]["name"] == "tumour"
    states = {(m["name"], m["version"]): m["state"] for m in doc["repository"]}
    assert states == {("stroma", "1"): "loaded", ("tumour", "1"): "loaded"}
    code, out, err = cli(capsys, "info", "--server", server.target, "--model", "stroma")
    assert code == 0 and "model: stroma 1" in out and "repository" in out
    code, out, err = cli(capsys, "admin", "unload", "stroma:1", "--server", server.target)
    assert code == 1 and "MODEL_IN_USE" in err  # stroma's default version
    code, out, err = cli(capsys, "admin", "load", "stroma", "--server", server.target)
    assert code == 0 and "loaded" in out.splitlines()[0]
    code, _, err = cli(capsys, "admin", "unload", "nope:1", "--server", server.target)
    assert code == 1 and "MODEL_NOT_FOUND" in err
    with pytest.raises(SystemExit) as exc:  # argparse refuses it
        main(["analyze", "a.tiff", "--model", "a:b:c", "--out", os.devnull])
    assert exc.value.code == 2 and "NAME:VERSION" in capsys.readouterr().err


def test_tile_takes_patch_size_and_mpp_from_a_repository_model(
    server, slide_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["tile", "a.tiff", "--slide-root", str(slide_root), "--server", server.target]
    code, _, err = cli(capsys, *base, "--out", str(tmp_path / "t"), "--model", "stroma:1")
    assert code == 0, err
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    with SlideClient(server.target) as client:
        model = client.get_model_info(model="stroma:1").model
    assert summary["patch_size_px"] == model.patch_size_px
    assert summary["effective_mpp"] == pytest.approx(model.target_mpp, rel=0.05)
    code, _, err = cli(capsys, *base, "--out", str(tmp_path / "u"), "--model", "nope")
    assert code == 1 and "MODEL_NOT_FOUND" in err and not (tmp_path / "u").exists()
