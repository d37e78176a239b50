"""``histohelper train-mil`` on synthetic HDF5 bags written here (no server).

The cohort: 40 slides of 20 patients (2 slides each, one label per patient, 10
positive patients); bags of 30-80 standard-normal 512-d features; in positive slides
10 % of the patches (at least 3) are shifted by 10 along one fixed unit direction, a
"planted morphology" negative slides never show.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histohelper.model_export import cli
from histohelper.model_export.export import UntrainedModelWarning, export_model
from histohelper.model_export.modules import GatedAttentionMIL
from histohelper.model_export.train_mil import (
    CohortError,
    TrainOptions,
    TrainResult,
    locate_features,
    patient_folds,
    train_mil,
    wilson,
)
from histohelper.model_export.weights import read_checkpoint
from histohelper.server.runtime import load_runtime

OPTS = TrainOptions(max_epochs=15, patience=5, lr=1e-3, bootstrap=200, seed=0)


def _write_bag(path: Path, slide: str, feats: np.ndarray, model_hash: str = "hash-a") -> None:
    with h5py.File(path, "w") as h5:
        h5["features"] = feats.astype(np.float32)
        h5["coords"] = np.stack([np.arange(len(feats)) * 224, np.zeros(len(feats))], 1).astype(
            np.int64
        )
        h5.attrs["slide"] = slide
        h5.attrs["model_hash"] = model_hash
        h5.attrs["options"] = "{}"


def make_cohort(
    root: Path, *, n_slides: int = 40, seed: int = 0, shift: float = 10.0, index: bool = True
) -> dict[str, set[int]]:
    """Write bags, cohort.csv and features_index.csv; returns slide -> planted rows."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(512)
    u /= np.linalg.norm(u)
    planted: dict[str, set[int]] = {}
    rows, idx = [], []
    for s in range(n_slides):
        patient = s // 2
        label = "pos" if patient % 2 else "neg"
        n = int(rng.integers(30, 81))
        feats = rng.standard_normal((n, 512))
        name = f"slide-{s:02d}"
        if label == "pos":
            which = rng.choice(n, max(3, int(0.1 * n)), replace=False)
            feats[which] += shift * u
            planted[name] = {int(i) for i in which}
        _write_bag(root / f"{name}.h5", name, feats)
        rows.append((name, label, f"patient-{patient:02d}"))
        idx.append((name, f"{name}.h5", n, "ok", ""))
    with open(root / "cohort.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "patient"])
        w.writerows(rows)
    if index:
        with open(root / "features_index.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slide", "file", "n_patches", "status", "reason"])
            w.writerows(idx)
    return planted


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[int]]]:
    root = tmp_path_factory.mktemp("features")
    return root, make_cohort(root)


@pytest.fixture(scope="module")
def trained(
    cohort: tuple[Path, dict[str, set[int]]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, Path]:
    root, _ = cohort
    out = tmp_path_factory.mktemp("run") / "mil_head.pt"
    return train_mil(root / "cohort.csv", root, out, OPTS), out


def test_out_of_fold_auc_and_attention(
    trained: tuple[TrainResult, Path], cohort: tuple[Path, dict[str, set[int]]]
) -> None:
    result, out = trained
    _, planted = cohort
    report = json.loads((out.parent / "report.json").read_text())
    pooled = report["pooled_out_of_fold"]
    assert pooled["auc"]["value"] >= 0.9, pooled["auc"]
    lo, hi = pooled["auc"]["ci95"]
    assert lo <= pooled["auc"]["value"] <= hi
    assert pooled["n_slides"] == 40 and len(report["folds"]) == 5
    # each patient's slides in one validation fold
    fold_of = {s: f["fold"] for f in report["folds"] for s in f["slides"]}
    assert all(
        fold_of[f"slide-{2 * p:02d}"] == fold_of[f"slide-{2 * p + 1:02d}"] for p in range(20)
    )
    for key in ("sensitivity", "specificity"):
        v = pooled[key]
        assert v["ci95"][0] <= v["value"] <= v["ci95"][1]
    assert np.array(pooled["confusion_matrix"]["counts"]).sum() == 40
    best = sorted(f["best_epoch"] for f in report["folds"])
    assert report["final"]["epochs"] == int(np.ceil(np.median(best)))
    assert "median" in report["final"]["why"]
    assert report["seed"] == 0 and report["feature_model_hash"] == "hash-a"
    assert len(report["cohort_sha256"]) == 64
    assert {"roc.png", "loss.png"} <= {p.name for p in out.parent.iterdir()}
    # top-5 attention (top-k, k = planted count, where fewer than 5 are planted)
    hits = []
    for slide, rows in planted.items():
        k = min(5, len(rows))
        top = np.argsort(-result.oof_attention[slide])[:k]
        hits.append(set(top.tolist()) <= rows)
    assert np.mean(hits) >= 0.8, np.mean(hits)


def test_shuffled_labels_give_chance_auc(
    cohort: tuple[Path, dict[str, set[int]]], tmp_path: Path
) -> None:
    root, _ = cohort
    with open(root / "cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(1)
    labels = {f"patient-{p:02d}": lbl for p, lbl in enumerate(rng.permutation(["neg", "pos"] * 10))}
    shuffled = tmp_path / "shuffled.csv"
    with open(shuffled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "patient"])
        w.writerows((r["slide"], labels[r["patient"]], r["patient"]) for r in rows)
    opts = TrainOptions(max_epochs=15, patience=5, lr=1e-3, bootstrap=50, plots=False)
    result = train_mil(shuffled, root, tmp_path / "mil_head.pt", opts)
    assert result.report["pooled_out_of_fold"]["auc"]["value"] <= 0.7


def test_deterministic_under_seed(tmp_path: Path) -> None:
    make_cohort(tmp_path / "f", n_slides=16, seed=3)
    opts = TrainOptions(folds=2, max_epochs=4, patience=2, lr=1e-3, bootstrap=20, plots=False)
    a = train_mil(tmp_path / "f/cohort.csv", tmp_path / "f", tmp_path / "a/mil_head.pt", opts)
    train_mil(tmp_path / "f/cohort.csv", tmp_path / "f", tmp_path / "b/mil_head.pt", opts)
    assert (tmp_path / "a/report.json").read_bytes() == (tmp_path / "b/report.json").read_bytes()
    wa, wb = (torch.load(tmp_path / f"{d}/mil_head.pt")["state_dict"] for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.report["seed"] == 0
    c = train_mil(
        tmp_path / "f/cohort.csv",
        tmp_path / "f",
        tmp_path / "c/mil_head.pt",
        TrainOptions(**{**opts.__dict__, "seed": 1}),
    )
    wc = torch.load(tmp_path / "c/mil_head.pt")["state_dict"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert c.report["seed"] == 1


def test_export_round_trip(
    trained: tuple[TrainResult, Path], cohort: tuple[Path, dict[str, set[int]]], tmp_path: Path
) -> None:
    result, out = trained
    root, _ = cohort
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["slide_classes"] == ["neg", "pos"]
    # the export reader accepts the checkpoint, keys unchanged by the dropout layers
    assert set(read_checkpoint(out)) == set(GatedAttentionMIL().state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedModelWarning)
        manifest = export_model(
            tmp_path / "model.pt",
            mil_weights=out,
            slide_classes=ckpt["slide_classes"],
            variants=(),
            check_served=False,
        )
    assert "mil" not in manifest.untrained_parts
    runtime = load_runtime(tmp_path / "model.pt", device="cpu", precision="fp32")
    assert result.head is not None and not result.head.training
    with h5py.File(root / "slide-01.h5", "r") as h5:
        bag = np.asarray(h5["features"], dtype=np.float32)
    with torch.no_grad():
        want_logits, want_att = result.head(torch.from_numpy(bag))
    got = runtime.aggregate(bag)
    want_probs = torch.softmax(want_logits, 0).numpy()
    assert np.abs(np.asarray(got.logits) - want_logits.numpy()).max() <= 1e-5
    assert np.abs(np.asarray(got.probabilities) - want_probs).max() <= 1e-5
    assert np.abs(np.asarray(got.attention) - want_att.numpy()).max() <= 1e-5


def test_dropout_only_in_train_mode_and_old_keys_load() -> None:
    torch.manual_seed(0)
    old = GatedAttentionMIL(512, 128, 2)
    new = GatedAttentionMIL(512, 128, 2, dropout=0.5)
    new.load_state_dict(old.state_dict(), strict=True)
    h = torch.randn(20, 512)
    new.eval()
    assert torch.equal(new(h)[0], old(h)[0])
    new.train()
    assert not torch.equal(new(h)[0], old(h)[0])


def test_fallback_without_index_and_folds(tmp_path: Path) -> None:
    make_cohort(tmp_path, n_slides=12, index=False)
    paths, model_hash = locate_features(tmp_path, [f"slide-{i:02d}" for i in range(12)])
    assert model_hash == "hash-a" and paths["slide-03"].name == "slide-03.h5"
    y = np.array([(i // 2) % 2 for i in range(12)])
    folds = patient_folds([f"p{i // 2}" for i in range(12)], y, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(12))
    assert all(set(y[f]) == {0, 1} for f in folds)
    w = wilson(8, 10)
    assert w["ci95"][0] == pytest.approx(0.4902, abs=1e-3)
    assert w["ci95"][1] == pytest.approx(0.9433, abs=1e-3)


def _refusal_case(root: Path, case: str) -> Path:
    """A copy of a small valid cohort in ``root`` broken in one way; returns the CSV."""
    make_cohort(root, n_slides=20, seed=5)
    csv_path = root / "cohort.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = ["slide", "label", "patient"]
    if case == "label_once":
        rows[0]["label"] = "rare"
    elif case == "single_class":
        for r in rows:
            r["label"] = "neg"
    elif case == "few_per_class":
        rows = [r for r in rows if r["label"] == "neg"] + [r for r in rows if r["label"] == "pos"][
            :4
        ]
    elif case == "patient_two_labels":
        rows[1]["label"] = "pos" if rows[1]["label"] == "neg" else "neg"
    elif case == "no_features":
        rows.append({"slide": "slide-99", "label": "neg", "patient": "patient-99"})
    elif case == "different_models":
        _write_bag(root / "slide-00.h5", "slide-00", np.zeros((5, 512)), model_hash="hash-b")
    elif case == "unknown_column":
        header.append("site")
        for r in rows:
            r["site"] = "x"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return csv_path


REFUSALS = {
    "label_once": "seen only once",
    "single_class": "single-class",
    "few_per_class": "fewer slides per class than folds",
    "patient_two_labels": "two labels",
    "no_features": "no features",
    "different_models": "different models",
    "unknown_column": "unknown column",
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_refused_before_work(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    csv_path = _refusal_case(tmp_path / "f", case)
    with pytest.raises(CohortError, match=REFUSALS[case]):
        train_mil(csv_path, tmp_path / "f", tmp_path / "o/mil_head.pt", OPTS)
    assert not (tmp_path / "o").exists()
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_subcommands(parser.add_subparsers())
    args = parser.parse_args(
        [
            "train-mil",
            str(csv_path),
            "--features",
            str(tmp_path / "f"),
            "--out",
            str(tmp_path / "o/mil_head.pt"),
        ]
    )
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert REFUSALS[case] in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from histohelper.cli import main

    make_cohort(tmp_path / "f", n_slides=12, seed=7)
    rc = main(
        [
            "train-mil",
            str(tmp_path / "f/cohort.csv"),
            "--features",
            str(tmp_path / "f"),
            "--out",
            str(tmp_path / "o/mil_head.pt"),
            "--folds",
            "2",
            "--max-epochs",
            "2",
            "--bootstrap",
            "10",
            "--no-plots",
        ]
    )
    assert rc == 0
    assert "--mil-weights" in capsys.readouterr().out
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert report["final"]["epochs"] >= 1


def test_split_column(tmp_path: Path) -> None:
    make_cohort(tmp_path / "f", n_slides=24, seed=11)
    with open(tmp_path / "f/cohort.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    parts = {0: "train", 1: "train", 2: "train", 3: "val", 4: "test"}  # by patient % 5 ...
    with open(tmp_path / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "patient", "split"])
        for r in rows:
            p = int(r["patient"].split("-")[1])
            w.writerow((r["slide"], r["label"], r["patient"], parts[(p // 2) % 5]))
    opts = TrainOptions(max_epochs=3, patience=2, lr=1e-3, bootstrap=10, plots=False)
    result = train_mil(tmp_path / "split.csv", tmp_path / "f", tmp_path / "o/mil_head.pt", opts)
    report = result.report
    assert report["scheme"].startswith("split column") and len(report["folds"]) == 1
    assert report["final"]["n_train"] == report["folds"][0]["n_train"] + len(
        report["folds"][0]["slides"]
    )
    assert report["test"]["n_slides"] > 0
