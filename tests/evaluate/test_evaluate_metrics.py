"""Metric maths of ``histohelper.client.evaluate`` against hand-computed confusion matrices,
the folder scan, and the evaluation flow over a fake client (no server)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from histohelper.client.evaluate import (
    EvaluationError,
    compute_metrics,
    evaluate_folder,
    format_metrics,
    patch_groups,
    scan_patch_folder,
)
from histohelper.client.events import ModelSummary
from histohelper.client.patches import PatchPrediction

CLASSES = ("benign", "malignant")


def _binary(tp: int, fn: int, tn: int, fp: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and hard-ish probabilities (0.9 on the predicted class) for a 2x2 matrix."""
    y = np.array([1] * (tp + fn) + [0] * (tn + fp))
    pred = np.array([1] * tp + [0] * fn + [0] * tn + [1] * fp)
    probs = np.where(pred[:, None] == np.arange(2), 0.9, 0.1)
    return y, probs


def test_research_table_reproduced() -> None:
    """The research's 948 TP / 51 FN / 973 TN / 28 FP -> 96.05 %, 94.89 %, 97.20 %."""
    y, probs = _binary(948, 51, 973, 28)
    m = compute_metrics(y, probs, CLASSES, "malignant", n_bootstrap=200, seed=0)
    assert (m.tp, m.fn, m.tn, m.fp) == (948, 51, 973, 28)
    assert m.confusion.tolist() == [[973, 28], [51, 948]]
    e = {k: v.value for k, v in m.estimates.items()}
    assert round(100 * e["accuracy"], 2) == 96.05  # 1921 / 2000
    assert round(100 * e["sensitivity"], 2) == 94.89  # 948 / 999
    assert round(100 * e["specificity"], 2) == 97.20  # 973 / 1001
    assert e["precision"] == pytest.approx(948 / 976)
    assert e["f1"] == pytest.approx(2 * 948 / (2 * 948 + 28 + 51))  # 96.00 %
    # With two score levels the ROC curve has one corner: AUC = (sens + spec) / 2.
    assert e["roc_auc"] == pytest.approx((948 / 999 + 973 / 1001) / 2)
    assert m.per_class_recall["malignant"] == m.estimates["sensitivity"]
    assert m.per_class_recall["benign"] == m.estimates["specificity"]
    for est in m.estimates.values():
        assert est.ci_low is not None and est.ci_high is not None
        assert est.ci_low <= est.value <= est.ci_high
    # Binomial SE of the accuracy is ~0.44 %: the 95 % interval is about +-0.85 %.
    acc = m.estimates["accuracy"]
    assert 0.5 < 100 * (acc.ci_high - acc.ci_low) < 2.5
    table = "\n".join(format_metrics(m))
    for text in ("96.05 %", "94.89 %", "97.20 %", "948 TP / 51 FN", "973 TN / 28 FP"):
        assert text in table


def test_positive_class_swaps_sensitivity_and_specificity() -> None:
    y, probs = _binary(948, 51, 973, 28)
    m = compute_metrics(y, probs, CLASSES, "benign", n_bootstrap=0)
    assert (m.tp, m.fn, m.tn, m.fp) == (973, 28, 948, 51)
    assert m.estimates["sensitivity"].value == pytest.approx(973 / 1001)
    assert m.estimates["roc_auc"].value == pytest.approx((948 / 999 + 973 / 1001) / 2)
    # No resamples: no bootstrap interval (F1, AUC); proportions keep their exact one.
    assert m.estimates["roc_auc"].ci_low is None and m.estimates["f1"].ci_low is None
    assert m.estimates["accuracy"].method == "clopper-pearson"
    assert m.estimates["accuracy"].ci_low is not None


def test_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    probs = rng.dirichlet([1, 1], 300)
    a = compute_metrics(y, probs, CLASSES, "malignant", n_bootstrap=100, seed=7)
    b = compute_metrics(y, probs, CLASSES, "malignant", n_bootstrap=100, seed=7)
    c = compute_metrics(y, probs, CLASSES, "malignant", n_bootstrap=100, seed=8)
    assert a.estimates == b.estimates
    assert a.estimates["roc_auc"] != c.estimates["roc_auc"]


def test_three_classes_hand_computed() -> None:
    """Rows true, columns predicted:  a: 5 1 0 / b: 2 6 2 / c: 0 1 3."""
    cm = np.array([[5, 1, 0], [2, 6, 2], [0, 1, 3]])
    y = np.concatenate([np.full(cm[i].sum(), i) for i in range(3)])
    pred = np.concatenate([np.repeat(np.arange(3), cm[i]) for i in range(3)])
    probs = np.full((y.size, 3), 0.1)
    probs[np.arange(y.size), pred] = 0.8
    m = compute_metrics(y, probs, ("a", "b", "c"), "c", n_bootstrap=50)
    assert m.confusion.tolist() == cm.tolist()
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 2, 14)
    assert m.estimates["accuracy"].value == pytest.approx(14 / 20)
    assert m.estimates["sensitivity"].value == pytest.approx(3 / 4)
    assert m.estimates["specificity"].value == pytest.approx(14 / 16)
    assert m.estimates["precision"].value == pytest.approx(3 / 5)
    recall = {k: v.value for k, v in m.per_class_recall.items()}
    assert recall == pytest.approx({"a": 5 / 6, "b": 6 / 10, "c": 3 / 4})
    assert "per-class recall" in "\n".join(format_metrics(m))


def test_undefined_metrics_are_none() -> None:
    """Only negatives: sensitivity and AUC are undefined, never a crash or a fake 0."""
    y = np.zeros(10, dtype=int)
    probs = np.tile([0.7, 0.3], (10, 1))
    m = compute_metrics(y, probs, CLASSES, "malignant", n_bootstrap=20)
    assert m.estimates["sensitivity"].value is None
    assert m.estimates["roc_auc"].value is None
    assert m.estimates["specificity"].value == 1.0
    assert "n/a" in "\n".join(format_metrics(m))


@pytest.mark.parametrize(
    ("y", "probs", "positive"),
    [
        ([], np.zeros((0, 2)), "malignant"),
        ([0, 1], np.zeros((2, 3)), "malignant"),
        ([0, 1], np.zeros((2, 2)), "tumour"),
    ],
    ids=["empty", "shape", "unknown-positive"],
)
def test_compute_metrics_rejects(y: list[int], probs: np.ndarray, positive: str) -> None:
    with pytest.raises(EvaluationError):
        compute_metrics(y, probs, CLASSES, positive)


# --- folder scan and flow over a fake client ------------------------------------------


def _write_folder(root: Path, layout: dict[str, list[str]]) -> Path:
    for cls, names in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / cls / name).write_bytes(b"x" * 10)
    return root


def test_scan_folder_layout(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"benign": ["a.png", "b.JPG", "notes.txt"], "malignant": []})
    (root / "malignant" / "deep").mkdir()
    (root / "malignant" / "deep" / "c.tiff").write_bytes(b"y")
    (root / ".cache").mkdir()
    folder = scan_patch_folder(root)
    assert folder.class_names == ("benign", "malignant")
    assert [p.rel_path for p in folder.patches] == [
        "benign/a.png",
        "benign/b.JPG",
        "malignant/deep/c.tiff",
    ]
    assert folder.ignored == ("benign/notes.txt",)


@pytest.mark.parametrize(
    "layout", [{}, {"benign": ["x.txt"]}], ids=["no-class-folders", "no-images"]
)
def test_scan_folder_rejects(tmp_path: Path, layout: dict[str, list[str]]) -> None:
    with pytest.raises(EvaluationError):
        scan_patch_folder(_write_folder(tmp_path, layout))


class FakeClient:
    """get_model_info + classify: probabilities from the file's first byte."""

    def __init__(self) -> None:
        self.classified = 0

    def get_model_info(self, model=None):  # the SDK takes model= (unused here)
        class Info:
            model = ModelSummary("fake", "0", CLASSES, CLASSES, True, "fp32", "cpu", 224, 0.5, 512)

        return Info()

    def classify(self, images, **_kw) -> Iterator[PatchPrediction]:
        for image_id, data in images:
            self.classified += 1
            empty = np.zeros(0, np.float32)
            if data.startswith(b"bad"):
                yield PatchPrediction(image_id, empty, empty, None, "not decodable")
            else:
                p = 0.8 if data.startswith(b"m") else 0.2
                probs = np.array([1 - p, p], np.float32)
                yield PatchPrediction(image_id, probs, probs, None, "")


def test_unknown_class_fails_before_any_image_is_sent(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"benign": ["a.png"], "tumor": ["b.png"], "zzz": ["c.png"]})
    client = FakeClient()
    with pytest.raises(EvaluationError, match=r"'tumor', 'zzz'.*benign, malignant"):
        evaluate_folder(client, root)
    assert client.classified == 0
    with pytest.raises(EvaluationError, match="positive class 'tumour'"):
        evaluate_folder(
            client, _write_folder(tmp_path / "ok", {"benign": ["a.png"]}), positive="tumour"
        )
    assert client.classified == 0


def test_flow_skips_unreadable_and_counts_them(tmp_path: Path) -> None:
    (tmp_path / "benign").mkdir()
    (tmp_path / "malignant").mkdir()
    (tmp_path / "benign" / "b1.png").write_bytes(b"b-pixels")
    (tmp_path / "benign" / "b2.png").write_bytes(b"m-pixels")  # predicted malignant: FP
    (tmp_path / "benign" / "empty.png").write_bytes(b"")
    (tmp_path / "malignant" / "m1.png").write_bytes(b"m-pixels")
    (tmp_path / "malignant" / "bad.png").write_bytes(b"bad bytes")
    (tmp_path / "malignant" / "dir.png").mkdir()  # a folder named like an image: not a file
    progress: list[tuple[int, int]] = []
    report = evaluate_folder(
        FakeClient(), tmp_path, n_bootstrap=10, on_progress=lambda d, t: progress.append((d, t))
    )
    m = report.metrics
    assert (m.tp, m.fn, m.tn, m.fp) == (1, 0, 1, 1)
    assert report.files == ("benign/b1.png", "benign/b2.png", "malignant/m1.png")
    assert {(s.file, s.reason) for s in report.skipped} == {
        ("benign/empty.png", "empty file"),
        ("malignant/bad.png", "not decodable"),
    }
    assert progress[-1] == (5, 5)
    doc = report.to_dict()
    assert doc["n_images"] == 5 and doc["n_skipped"] == 2 and doc["n_classified"] == 3
    assert doc["model"]["untrained"] is True and doc["positive_class"] == "malignant"


def test_evaluate_module_is_light() -> None:
    """Importing the client, its evaluation and CLI pulls no sklearn, cv2, torch, OpenSlide."""
    code = (
        "import sys, histohelper.client, histohelper.client.evaluate, histohelper.client.cli\n"
        "bad = ('sklearn', 'cv2', 'torch', 'openslide', 'histohelper.server')\n"
        "print(','.join(m for m in bad if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cluster_bootstrap_widens_intervals_of_correlated_patches() -> None:
    """Four slides of 25 patches, each slide all right or all wrong: accuracy 0.5.

    Resampling patches one by one pretends there are 100 independent answers (a
    narrow interval); resampling slides knows there are four.
    """
    y = np.array([1] * 50 + [0] * 50)
    right = np.array([True] * 25 + [False] * 25 + [True] * 25 + [False] * 25)
    pred = np.where(right, y, 1 - y)
    probs = np.where(pred[:, None] == np.arange(2), 0.9, 0.1)
    slides = [f"slide-{i // 25}" for i in range(100)]
    per_patch = compute_metrics(y, probs, CLASSES, "malignant", n_bootstrap=400, seed=3)
    per_slide = compute_metrics(
        y, probs, CLASSES, "malignant", n_bootstrap=400, seed=3, groups=slides
    )
    a, b = per_patch.estimates["accuracy"], per_slide.estimates["accuracy"]
    assert a.value == b.value == 0.5
    assert (b.ci_high - b.ci_low) > 2.5 * (a.ci_high - a.ci_low)
    assert b.ci_low <= 0.25 and b.ci_high >= 0.75  # draws of 4 slides: k/4 right
    assert (per_slide.n_groups, per_slide.grouped) == (4, True)
    assert (per_patch.n_groups, per_patch.grouped) == (100, False)
    text = "\n".join(format_metrics(per_slide))
    assert "the 4 groups of the 100 patches" in text and "rough" in text
    assert "too narrow" in "\n".join(format_metrics(per_patch))


def test_singleton_groups_resample_like_patches() -> None:
    y, probs = _binary(30, 10, 40, 20)
    plain = compute_metrics(y, probs, CLASSES, "malignant", n_bootstrap=50, seed=9)
    single = compute_metrics(
        y, probs, CLASSES, "malignant", n_bootstrap=50, seed=9, groups=[str(i) for i in range(100)]
    )
    # Same figures and intervals (the clustered method finds no design effect).
    for name, a in plain.estimates.items():
        b = single.estimates[name]
        assert (b.value, b.ci_low, b.ci_high) == pytest.approx((a.value, a.ci_low, a.ci_high))
    with pytest.raises(EvaluationError, match="3 groups given for 100 patches"):
        compute_metrics(y, probs, CLASSES, "malignant", groups=["a", "b", "c"])


def test_patch_groups(tmp_path: Path) -> None:
    root = tmp_path / "f"
    for rel in ["benign/s1/a.png", "benign/s2/b.png", "malignant/s1/c.png", "malignant/s3/x/d.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    folder = scan_patch_folder(root)
    assert patch_groups(folder, "subfolder") == ["s1", "s2", "s1", "s3"]
    assert patch_groups(folder, "patch") == [p.rel_path for p in folder.patches]
    assert patch_groups(folder, re.compile(r"s(\d)")) == ["1", "2", "1", "3"]
    assert patch_groups(folder, re.compile(r"s\d")) == ["s1", "s2", "s1", "s3"]
    with pytest.raises(EvaluationError, match=re.escape("does not match benign/s1/a.png")):
        patch_groups(folder, re.compile("TCGA"))
    with pytest.raises(EvaluationError, match="unknown grouping"):
        patch_groups(folder, "slide")
    (root / "benign" / "flat.png").write_bytes(b"x")
    with pytest.raises(
        EvaluationError, match=re.escape("directly in a class folder, e.g. benign/flat.png")
    ):
        patch_groups(scan_patch_folder(root), "subfolder")


def test_flow_groups_by_subfolder(tmp_path: Path) -> None:
    for rel, data in [
        ("benign/s1/a.png", b"b"),
        ("benign/s2/b.png", b"m"),
        ("malignant/s1/c.png", b"m"),
        ("malignant/s3/d.png", b"bad"),
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    report = evaluate_folder(FakeClient(), tmp_path, n_bootstrap=20, group_by="subfolder")
    # s3's only patch is undecodable: two groups remain over three patches.
    assert report.metrics.n == 3 and report.metrics.n_groups == 2 and report.metrics.grouped
    assert report.to_dict()["bootstrap"]["unit"] == "group"
