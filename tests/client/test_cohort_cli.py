"""``histohelper analyze`` with many slides: the cohort table, statuses and reasons, exit
code, per-slide folders equal to a one-slide run, resume, manifest CSV with per-slide
options, uploads. A real in-process server (audit log = its call counter) on a slide
root of small synthetic slides."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from cohort_support import audit_records, write_corrupt_slide, write_small_slide

from histohelper.client.cli import main
from histohelper.client.cohort import CohortSlide
from histohelper.client.cohort_runner import (
    MANIFEST_NAME,
    TABLE_NAME,
    assign_ids,
    slides_from_arguments,
    slides_from_manifest,
)
from histohelper.client.options import AnalysisOptions
from histohelper.cohort_csv import CohortError


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort-cli-slides")
    write_small_slide(root / "a.tiff", seed=20)
    write_small_slide(root / "b.tiff", seed=21)
    write_small_slide(root / "glass.tiff", seed=22, tissue=False)
    write_corrupt_slide(root / "bad.tiff")
    return root


@pytest.fixture
def server(start_inprocess_server, slide_root: Path, tmp_path: Path):
    return start_inprocess_server(slide_root=slide_root, audit_log=tmp_path / "audit.jsonl")


def analyses(tmp_path: Path) -> int:
    return len(audit_records(tmp_path / "audit.jsonl"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["analyze", *argv, "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def table(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / TABLE_NAME).open(newline="") as fh:
        return list(csv.DictReader(fh))


def manifest(out_dir: Path) -> dict[str, dict[str, object]]:
    return json.loads((out_dir / MANIFEST_NAME).read_text())["slides"]  # type: ignore[no-any-return]


def test_cohort_table_statuses_outputs_and_resume(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cohort"
    slides = ["a.tiff", "b.tiff", "missing.tiff", "bad.tiff", "glass.tiff"]
    code, stdout, stderr = run(capsys, *slides, "--server", server.target, "--out", str(out))
    assert code == 1, stderr

    rows = table(out)
    assert [r["id"] for r in rows] == ["a", "b", "missing", "bad", "glass"]  # input order
    assert [r["slide"] for r in rows] == slides
    status = {r["id"]: r["status"] for r in rows}
    assert status == {
        "a": "done", "b": "done", "missing": "failed", "bad": "failed", "glass": "no_tissue",
    }  # fmt: skip
    by_id = {r["id"]: r for r in rows}
    assert by_id["missing"]["error"].startswith("SLIDE_NOT_FOUND: ")
    assert by_id["bad"]["error"].startswith("SLIDE_CORRUPT: ")
    assert str(slide_root_of(server)) not in stderr  # never the server's paths
    assert "2 slide(s) failed" in stderr and "SLIDE_NOT_FOUND" in stderr
    assert "2 done, 0 skipped, 1 without tissue, 2 failed of 5 slides" in stdout
    a = by_id["a"]
    assert a["predicted_class"] and float(a["prob_benign"]) + float(a["prob_malignant"]) == (
        pytest.approx(1.0, abs=1e-5)
    )
    assert int(a["patch_count"]) > 0 and float(a["tissue_fraction"]) > 0
    assert float(a["effective_mpp"]) == pytest.approx(0.5) and a["mpp_source"]
    assert a["attempts"] == "1" and a["request_id"]
    assert by_id["glass"]["patch_count"] == "0" and by_id["missing"]["patch_count"] == ""
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a", "b", "glass"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    if (out / "a" / "report.html").is_file():  # the per-slide report, linked from the index
        assert a["report"] == "a/report.html" and (out / "index.html").is_file()

    entries = manifest(out)
    assert set(entries) == {"a", "b", "missing", "bad", "glass"}
    assert entries["a"]["status"] == "done" and len(str(entries["a"]["model_hash"])) == 64
    assert entries["bad"]["status"] == "failed" and "SLIDE_CORRUPT" in str(entries["bad"]["error"])
    assert entries["a"]["options"]["min_tissue_fraction"] is None  # type: ignore[index]

    # The files of a cohort slide are those of a one-slide run of it.
    single = tmp_path / "single"
    code, stdout, _ = run(capsys, "a.tiff", "--server", server.target, "--out", str(single))
    assert code == 0 and stdout.startswith("a.tiff: ")
    assert sorted(p.name for p in (out / "a").iterdir()) == sorted(p.name for p in single.iterdir())
    assert (out / "a" / "patches.csv").read_text() == (single / "patches.csv").read_text()
    with np.load(out / "a" / "heatmap.npz") as x, np.load(single / "heatmap.npz") as y:
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key], strict=True)

    # Re-running the finished slides calls no analysis; entries of other slides stay.
    calls = analyses(tmp_path)
    code, stdout, _ = run(
        capsys, "a.tiff", "b.tiff", "glass.tiff", "--server", server.target, "--out", str(out)
    )
    assert code == 0
    assert analyses(tmp_path) == calls
    assert {r["status"] for r in table(out)} == {"skipped"}
    assert manifest(out)["bad"] == entries["bad"]

    # A changed option re-runs exactly the slides it applies to (all of this run).
    code, _, _ = run(
        capsys, "a.tiff", "b.tiff", "--server", server.target, "--out", str(out),
        "--min-tissue", "0.9",
    )  # fmt: skip
    assert code == 0 and analyses(tmp_path) == calls + 2
    assert [r["status"] for r in table(out)] == ["done", "done"]
    assert manifest(out)["a"]["options"]["min_tissue_fraction"] == 0.9  # type: ignore[index]


def slide_root_of(server) -> Path:
    return Path(server.config.slide_root)


def test_manifest_csv_with_per_slide_options(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cohort"
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(
        "slide,id,min_tissue_fraction,patch_size\na.tiff,first,,\nb.tiff,second,0.9,\n"
    )
    code, _, stderr = run(capsys, str(cohort), "--server", server.target, "--out", str(out))
    assert code == 0, stderr
    assert [r["id"] for r in table(out)] == ["first", "second"]
    entries = manifest(out)
    assert entries["first"]["options"]["min_tissue_fraction"] is None  # type: ignore[index]
    assert entries["second"]["options"]["min_tissue_fraction"] == 0.9  # type: ignore[index]

    def tissue(slide_id: str) -> list[float]:
        with (out / slide_id / "patches.csv").open(newline="") as fh:
            return [float(r["tissue_fraction"]) for r in csv.DictReader(fh)]

    assert min(tissue("second")) >= 0.9 > min(tissue("first"))  # each slide its options

    # Changing one slide's cell re-runs that slide alone.
    calls = analyses(tmp_path)
    cohort.write_text(
        "slide,id,min_tissue_fraction,patch_size\na.tiff,first,,\nb.tiff,second,0.5,\n"
    )
    code, _, _ = run(capsys, str(cohort), "--server", server.target, "--out", str(out))
    assert code == 0 and analyses(tmp_path) == calls + 1
    assert [r["status"] for r in table(out)] == ["skipped", "done"]

    # Unknown columns are refused before any call, with the allowed ones listed.
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\na.tiff,x\n")
    code, _, stderr = run(capsys, str(bad), "--server", server.target, "--out", str(out))
    assert code == 2 and "unknown column(s) 'label'" in stderr and "min_tissue_fraction" in stderr
    assert analyses(tmp_path) == calls + 1


def test_uploaded_folder_cohort(
    server, slide_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "a.tiff").write_bytes((slide_root / "a.tiff").read_bytes())
    (local / "sub" / "a.tiff").write_bytes((slide_root / "b.tiff").read_bytes())
    (local / "notes.txt").write_text("not a slide")
    out = tmp_path / "cohort"
    code, _, stderr = run(
        capsys, str(local), "--upload", "--server", server.target, "--out", str(out)
    )
    assert code == 0, stderr
    rows = table(out)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert rows[0]["id"] != rows[1]["id"] and all(r["id"].startswith("a-") for r in rows)
    assert len(audit_records(tmp_path / "audit.jsonl", "UploadSlide")) == 2


def test_inputs_folders_ids_and_manifest_cells(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "set" / ".hidden").mkdir(parents=True)
    for name in ("x.svs", "y.ome.tiff", "Z.NDPI", "skip.txt", ".hidden/h.svs"):
        (root / "set" / name).write_bytes(b"")
    items = slides_from_arguments(["set", "other/q.svs"], slide_root=root, upload=False)
    assert [i.slide for i in items] == ["set/Z.NDPI", "set/x.svs", "set/y.ome.tiff", "other/q.svs"]
    assert [i.id for i in assign_ids(items)] == ["Z", "x", "y", "q"]
    (root / "empty" / ".hidden").mkdir(parents=True)
    (root / "empty" / ".hidden" / "h.svs").write_bytes(b"")
    with pytest.raises(CohortError, match="no slide files"):
        slides_from_arguments(["empty"], slide_root=root, upload=False)
    with pytest.raises(CohortError, match="not under the slide root"):
        slides_from_arguments([str(root / "set")], slide_root=root / "empty", upload=False)

    ids = assign_ids([CohortSlide("a/s.svs"), CohortSlide("b/s.svs"), CohortSlide("t.svs", id="s")])
    assert ids[2].id == "s" and ids[0].id != ids[1].id and ids[0].id.startswith("s-")
    with pytest.raises(CohortError, match="listed twice"):
        assign_ids([CohortSlide("a", id="k"), CohortSlide("b", id="k")])
    with pytest.raises(CohortError, match="folder name"):
        assign_ids([CohortSlide("a", id="../up")])

    csv_path = tmp_path / "m.csv"
    base = AnalysisOptions(target_magnification=20, min_tissue_fraction=0.3)
    csv_path.write_text("slide,mpp,stride,edge_mode\na.svs,0.25,112,drop\nb.svs,,,\n")
    a, b = slides_from_manifest(csv_path, base, upload=False)
    assert a.options == AnalysisOptions(
        target_mpp=0.25, stride_px=112, edge_mode="drop", min_tissue_fraction=0.3
    )  # a per-slide resolution replaces the command line's
    assert b.options is None  # the command line's options
    csv_path.write_text("slide,patch_size\na.svs,big\n")
    with pytest.raises(CohortError, match="line 2: patch_size = 'big' is not an integer"):
        slides_from_manifest(csv_path, base, upload=False)
    csv_path.write_text("slide,min_tissue\na.svs,2\n")
    with pytest.raises(CohortError, match="line 2: min_tissue_fraction must be in"):
        slides_from_manifest(csv_path, base, upload=False)


def test_one_server_gets_no_more_than_its_slots(
    start_inprocess_server, slide_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--jobs 3 against one server with one analysis slot: jobs is capped at the slots
    GetModelInfo reports, so no call is refused (SERVER_BUSY) and every slide is done."""
    audit = tmp_path / "audit.jsonl"
    server = start_inprocess_server(
        slide_root=slide_root, max_concurrent_analyses=1, audit_log=audit
    )
    out = tmp_path / "cohort"
    code, _, stderr = run(
        capsys, "a.tiff", "b.tiff", "glass.tiff", "--server", server.target, "--jobs", "3",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    records = audit_records(audit)
    assert [r["outcome"] for r in records] == ["OK"] * 3
    assert [r["attempts"] for r in table(out)] == ["1", "1", "1"]
