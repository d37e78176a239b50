"""Patch-level evaluation of the *served* model on a labelled patch folder.

The folder has the ImageFolder layout (torchvision): one sub-folder per class name,
PNG/JPEG/TIFF patches of any size below it (searched recursively). Every patch is
sent through ``ClassifyPatches`` (the server decodes it and resizes it to the model's
patch size, exactly as the manifest says), and the predictions are scored against the
folder labels with scikit-learn:

- confusion matrix over the model's patch classes (rows: true, columns: predicted;
  prediction = argmax of the softmax probabilities);
- accuracy (all classes), and one-vs-rest for the *positive* class: sensitivity
  (recall of the positive class), specificity (recall of the rest), precision (PPV),
  NPV, F1, ROC AUC of the positive-class probability;
- per-class recall;
- 95 % confidence intervals. Proportions (accuracy, sensitivity, specificity, PPV,
  NPV, per-class recall) get the Clopper-Pearson exact binomial interval
  (:mod:`histohelper.client.intervals`; Clopper & Pearson, *Biometrika* 26, 1934),
  which stays honest at 0 and 1 where a percentile bootstrap collapses to a point
  (0 of 12 positives found: [0, 26.5 %], not [0, 0]). F1 and ROC AUC get a percentile
  bootstrap (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13),
  ``n_bootstrap`` resamples with a seeded ``numpy.random.Generator``. Patches of one
  slide are correlated, so when the folder says which slide (or patient) each patch
  comes from (``group_by``), proportions use the Korn-Graubard effective sample size
  of the groups and the bootstrap resamples whole groups with replacement (the cluster
  bootstrap: Davison & Hinkley, *Bootstrap Methods and their Application*, 1997,
  sec. 3.8); otherwise single patches count, and the report warns that the intervals
  are too narrow when several patches share a slide.

Unreadable files (the client cannot read them, or the server cannot decode them) are
listed and skipped, never fatal. Folder classes the model does not know raise
:class:`EvaluationError` before any image is sent.

scikit-learn (with scipy) is the ``evaluate`` extra: it is imported inside
:func:`compute_metrics` only, so importing this module needs neither scikit-learn,
scipy nor OpenCV.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from histohelper.client.events import ModelSummary
from histohelper.client.intervals import (
    CLUSTERED_PROPORTION_METHOD,
    PROPORTION_METHOD,
    clopper_pearson,
    effective_count,
)
from histohelper.client.patches import PatchInput

#: File suffixes taken as patches (case-insensitive); other files are listed as ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

#: Files larger than this are skipped rather than sent (the server's default message
#: limit is 16 MiB per request).
DEFAULT_MAX_IMAGE_BYTES = 12 * 1024 * 1024

DEFAULT_BOOTSTRAP = 1000
DEFAULT_SEED = 0

#: Binary metrics, in report order: name -> (label in the table, shown as percent).
METRIC_LABELS: dict[str, tuple[str, bool]] = {
    "accuracy": ("accuracy", True),
    "sensitivity": ("sensitivity", True),
    "specificity": ("specificity", True),
    "precision": ("precision/PPV", True),
    "npv": ("NPV", True),
    "f1": ("F1", True),
    "roc_auc": ("ROC AUC", False),
}

ProgressFn = Callable[[int, int], Any]

#: How patches are grouped into bootstrap units: ``"patch"`` (each patch alone),
#: ``"subfolder"`` (the first folder below the class folder, e.g.
#: ``tumour/<slide id>/x.png``) or a compiled regular expression searched in the path
#: below the class folder (its first capture group, else the whole match).
GroupBy = str | re.Pattern[str]


class EvaluationError(ValueError):
    """The folder cannot be evaluated against the served model (unknown class names,
    no patches, unknown positive class, nothing classified)."""


# --- folder ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelledPatch:
    """One patch file: path relative to the folder ("/"-separated) and its class."""

    rel_path: str
    label: str


@dataclass(frozen=True, slots=True)
class PatchFolder:
    """A scanned ImageFolder tree.

    Attributes:
        root: the folder.
        class_names: sub-folder names, sorted (each is a class).
        patches: image files, sorted by class then path.
        ignored: files that are not images by suffix (relative paths).
    """

    root: Path
    class_names: tuple[str, ...]
    patches: tuple[LabelledPatch, ...]
    ignored: tuple[str, ...]

    def count(self, class_name: str) -> int:
        """Image files under ``class_name``."""
        return sum(p.label == class_name for p in self.patches)


def patch_groups(folder: PatchFolder, group_by: GroupBy) -> list[str]:
    """The bootstrap group (slide, patient) of each patch of ``folder``, in order.

    Args:
        folder: a scanned folder.
        group_by: see :data:`GroupBy`. The same group name under two class folders
            is one group (a slide with tumour and normal patches).

    Returns:
        One group name per patch (``"patch"``: the patch's own path).

    Raises:
        EvaluationError: an unknown ``group_by``; with ``"subfolder"``, a patch lying
            directly in its class folder; with a regex, a path it does not match.
    """
    below = [p.rel_path.split("/", 1)[1] for p in folder.patches]
    if isinstance(group_by, re.Pattern):
        groups: list[str] = []
        for rel, path in zip(below, folder.patches, strict=True):
            m = group_by.search(rel)
            if m is None:
                raise EvaluationError(
                    f"the group pattern {group_by.pattern!r} does not match {path.rel_path} "
                    "(it is searched in the path below the class folder)"
                )
            groups.append(m.group(1) if group_by.groups else m.group(0))
        return groups
    if group_by == "patch":
        return [p.rel_path for p in folder.patches]
    if group_by == "subfolder":
        flat = [p.rel_path for p, rel in zip(folder.patches, below, strict=True) if "/" not in rel]
        if flat:
            raise EvaluationError(
                f"grouping by subfolder, but {len(flat)} patch(es) lie directly in a class "
                f"folder, e.g. {flat[0]} (expected DIR/<class>/<group>/<patch files>)"
            )
        return [rel.split("/", 1)[0] for rel in below]
    raise EvaluationError(f"unknown grouping {group_by!r} (patch, subfolder or a regex)")


def scan_patch_folder(root: str | os.PathLike[str]) -> PatchFolder:
    """List the patches of an ImageFolder tree (stat only, no image is read).

    Hidden entries (starting with ".") are left out.

    Raises:
        EvaluationError: ``root`` is not a directory, has no class sub-folder, or no
            image file.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise EvaluationError(f"not a directory: {root_path}")
    classes = sorted(
        d.name for d in root_path.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not classes:
        raise EvaluationError(
            f"{root_path} has no class sub-folders (expected DIR/<class name>/<patch files>)"
        )
    patches: list[LabelledPatch] = []
    ignored: list[str] = []
    for name in classes:
        for dirpath, dirnames, filenames in os.walk(root_path / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                rel = Path(dirpath, fname).relative_to(root_path).as_posix()
                if fname.lower().endswith(IMAGE_SUFFIXES):
                    patches.append(LabelledPatch(rel, name))
                else:
                    ignored.append(rel)
    if not patches:
        raise EvaluationError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) under the class folders of {root_path}"
        )
    return PatchFolder(root_path, tuple(classes), tuple(patches), tuple(ignored))


# --- metrics ----------------------------------------------------------------------------


#: Metrics that are proportions of patch counts: exact binomial intervals, not bootstrap.
PROPORTION_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "npv")


@dataclass(frozen=True, slots=True)
class Estimate:
    """A figure with its confidence interval (``None`` where undefined, e.g. sensitivity
    without positive patches, AUC with one class only) and the interval's method
    (:data:`~histohelper.client.intervals.PROPORTION_METHOD`, its clustered variant, or
    ``"percentile bootstrap"``; empty without an interval)."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": [self.ci_low, self.ci_high], "ci_method": self.method}


@dataclass(frozen=True)
class Metrics:
    """Patch-level figures of one evaluation.

    Attributes:
        class_names: the model's patch classes (confusion-matrix order).
        positive: the positive class (one of ``class_names``).
        confusion: int64 ``[C, C]``, rows true class, columns predicted class.
        tp, fn, tn, fp: one-vs-rest counts for ``positive``.
        estimates: ``accuracy``, ``sensitivity``, ``specificity``, ``precision`` (PPV),
            ``npv``, ``f1``, ``roc_auc`` (fractions in [0, 1]).
        per_class_recall: recall of each class in ``class_names``.
        n_bootstrap, seed, confidence: bootstrap settings (percentile intervals of F1
            and ROC AUC) and the coverage of every interval.
        n_groups: bootstrap units: groups when the patches were grouped (cluster
            bootstrap), else the number of patches.
        grouped: whether whole groups were resampled.
    """

    class_names: tuple[str, ...]
    positive: str
    confusion: npt.NDArray[np.int64]
    tp: int
    fn: int
    tn: int
    fp: int
    estimates: dict[str, Estimate]
    per_class_recall: dict[str, Estimate]
    n_bootstrap: int
    seed: int
    confidence: float
    n_groups: int = 0
    grouped: bool = False

    @property
    def n(self) -> int:
        """Patches scored."""
        return int(self.confusion.sum())


def _figures(
    y_true: npt.NDArray[np.int64],
    y_pred: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float64],
    positive: int,
    n_classes: int,
    per_class: bool,
) -> list[float]:
    """accuracy, sensitivity, specificity, precision, NPV, F1, ROC AUC [, recall per
    class] by scikit-learn; NaN where undefined."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    true_pos = (y_true == positive).astype(np.int64)
    pred_pos = (y_pred == positive).astype(np.int64)
    precision, recall, f1, _ = precision_recall_fscore_support(
        true_pos, pred_pos, labels=[0, 1], zero_division=np.nan
    )
    auc = roc_auc_score(true_pos, scores) if 0 < true_pos.sum() < len(true_pos) else np.nan
    out = [
        float(accuracy_score(y_true, y_pred)),
        float(recall[1]),  # sensitivity: recall of the positive class
        float(recall[0]),  # specificity: recall of the negative (rest) class
        float(precision[1]),
        float(precision[0]),  # NPV: precision of the negative (rest) class
        float(f1[1]),
        float(auc),
    ]
    if per_class:
        _, rec, _, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(n_classes)), zero_division=np.nan
        )
        out.extend(float(r) for r in rec)
    return out


def compute_metrics(
    y_true: Sequence[int] | npt.NDArray[np.integer],
    probabilities: npt.ArrayLike,
    class_names: Sequence[str],
    positive: str,
    *,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
    groups: Sequence[str] | None = None,
) -> Metrics:
    """Score predictions against labels with scikit-learn, with confidence intervals:
    exact binomial (Clopper-Pearson) for proportions, percentile bootstrap for F1 and
    ROC AUC (see the module docstring).

    Args:
        y_true: int ``[n]`` true class index into ``class_names``.
        probabilities: float ``[n, C]`` class probabilities; the prediction is their
            argmax (first class on ties), the ROC score the positive column.
        class_names: the ``C`` class names.
        positive: the positive class for sensitivity, specificity, precision, F1, AUC.
        n_bootstrap: resamples for the F1 and ROC AUC intervals (0: none for them;
            proportions always get theirs).
        seed: seed of ``numpy.random.default_rng`` for the resampling.
        confidence: coverage of every interval, in (0, 1).
        groups: ``[n]`` group (slide, patient) of each patch: proportions use the
            Korn-Graubard effective sample size, and each resample draws whole groups
            with replacement (cluster bootstrap). Default: each patch is its own group.

    Returns:
        :class:`Metrics`.

    Raises:
        EvaluationError: no patches, shapes disagree (``groups`` included), or
            ``positive`` unknown.
        ImportError: scikit-learn is missing (``pip install "histohelper[evaluate]"``).
    """
    from sklearn.metrics import confusion_matrix

    names = tuple(class_names)
    y, probs = _checked_inputs(y_true, probabilities, names, positive, confidence, groups)
    members = _group_members(groups, y.size)
    pos = names.index(positive)
    y_pred = probs.argmax(axis=1).astype(np.int64)
    n_classes = len(names)
    cm = confusion_matrix(y, y_pred, labels=list(range(n_classes))).astype(np.int64)
    tp = int(cm[pos, pos])
    fn = int(cm[pos].sum() - tp)
    fp = int(cm[:, pos].sum() - tp)
    tn = int(cm.sum() - tp - fn - fp)
    multi = n_classes > 2  # two classes: per-class recall is sensitivity/specificity
    point, lo, hi = _bootstrap(
        y, y_pred, probs[:, pos], pos, n_classes, multi,
        members=members if groups is not None else None,
        n_bootstrap=n_bootstrap, seed=seed, confidence=confidence,
    )  # fmt: skip

    def est(i: int) -> Estimate:
        def f(v: float) -> float | None:
            return None if not np.isfinite(v) else float(v)

        low, high = f(lo[i]), f(hi[i])
        return Estimate(f(point[i]), low, high, "percentile bootstrap" if low is not None else "")

    proportion = _ProportionIntervals(members if groups is not None else None, confidence)
    true_pos, pred_pos = y == pos, y_pred == pos
    counted = {  # metric -> (patches in its denominator, which of them count as successes)
        "accuracy": (np.ones(y.size, dtype=bool), y == y_pred),
        "sensitivity": (true_pos, pred_pos),
        "specificity": (~true_pos, ~pred_pos),
        "precision": (pred_pos, true_pos),
        "npv": (~pred_pos, ~true_pos),
    }
    estimates = {
        name: proportion(point[i], *counted[name]) if name in counted else est(i)
        for i, name in enumerate(METRIC_LABELS)
    }
    if multi:
        base = len(METRIC_LABELS)
        per_class = {
            name: proportion(point[base + i], y == i, y_pred == i) for i, name in enumerate(names)
        }
    else:
        per_class = {
            name: estimates["sensitivity" if i == pos else "specificity"]
            for i, name in enumerate(names)
        }
    return Metrics(
        names,
        positive,
        cm,
        tp,
        fn,
        tn,
        fp,
        estimates,
        per_class,
        n_bootstrap,
        seed,
        confidence,
        n_groups=len(members),
        grouped=groups is not None,
    )


class _ProportionIntervals:
    """Clopper-Pearson intervals of proportions over the scored patches; with groups, at
    the Korn-Graubard effective sample size (:mod:`histohelper.client.intervals`)."""

    def __init__(self, members: list[npt.NDArray[np.intp]] | None, confidence: float) -> None:
        self.members, self.confidence = members, confidence

    def __call__(
        self, value: float, denominator: npt.NDArray[np.bool_], success: npt.NDArray[np.bool_]
    ) -> Estimate:
        """The estimate of ``success[denominator].mean()`` (``value``, NaN: undefined)."""
        if not np.isfinite(value) or not denominator.any():
            return Estimate(None, None, None)
        hits = success[denominator]
        if self.members is None:
            x, n, method = float(hits.sum()), float(hits.size), PROPORTION_METHOD
        else:
            position = np.cumsum(denominator) - 1  # patch index -> index into ``hits``
            kept = [position[idx[denominator[idx]]] for idx in self.members]
            x, n = effective_count(hits, [k for k in kept if k.size], self.confidence)
            method = CLUSTERED_PROPORTION_METHOD
        ci = clopper_pearson(x, n, self.confidence)
        assert ci is not None  # n > 0: the denominator has patches
        return Estimate(float(value), ci[0], ci[1], method)


def _checked_inputs(
    y_true: Sequence[int] | npt.NDArray[np.integer],
    probabilities: npt.ArrayLike,
    names: tuple[str, ...],
    positive: str,
    confidence: float,
    groups: Sequence[str] | None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Labels as int64 ``[n]`` and probabilities as float64 ``[n, C]``, checked.

    Raises:
        EvaluationError: as :func:`compute_metrics`.
    """
    if positive not in names:
        raise EvaluationError(f"positive class {positive!r} is not one of {', '.join(names)}")
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise EvaluationError("no patches to score")
    if probs.shape != (y.size, len(names)):
        raise EvaluationError(
            f"probabilities have shape {probs.shape}, expected ({y.size}, {len(names)})"
        )
    if y.min() < 0 or y.max() >= len(names):
        raise EvaluationError("true class indices out of range")
    if not 0.0 < confidence < 1.0:
        raise EvaluationError("confidence must be in (0, 1)")
    if groups is not None and len(groups) != y.size:
        raise EvaluationError(f"{len(groups)} groups given for {y.size} patches")
    return y, probs


def _group_members(groups: Sequence[str] | None, n: int) -> list[npt.NDArray[np.intp]]:
    """``members[g]``: the patch indices of group ``g`` (groups in first-appearance order;
    each patch its own group when ``groups`` is None)."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    code_of: dict[str, int] = {}
    codes = np.array([code_of.setdefault(str(g), len(code_of)) for g in groups])
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.cumsum(np.bincount(codes))[:-1])


def _bootstrap(
    y: npt.NDArray[np.int64],
    y_pred: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float64],
    pos: int,
    n_classes: int,
    multi: bool,
    *,
    members: list[npt.NDArray[np.intp]] | None,
    n_bootstrap: int,
    seed: int,
    confidence: float,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Point figures (:data:`METRIC_LABELS`, then per-class recall when ``multi``) and
    their percentile-bootstrap interval ``(point, lo, hi)``, each float64 ``[k]``.

    Each resample draws ``len(members)`` groups with replacement (``members`` None:
    patches one by one); figures undefined in a resample are NaN and left out.
    """
    n_units = len(members) if members is not None else y.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined metrics in a resample are NaN
        point = np.array(_figures(y, y_pred, scores, pos, n_classes, multi))
        k = len(point)
        samples = np.full((max(n_bootstrap, 0), k), np.nan)
        rng = np.random.default_rng(seed)
        for b in range(samples.shape[0]):
            draw = rng.integers(0, n_units, n_units)
            idx = draw if members is None else np.concatenate([members[g] for g in draw])
            samples[b] = _figures(y[idx], y_pred[idx], scores[idx], pos, n_classes, multi)
        alpha = (1.0 - confidence) / 2.0
        if samples.shape[0]:
            lo, hi = np.nanpercentile(samples, [100 * alpha, 100 * (1 - alpha)], axis=0)
        else:
            lo = hi = np.full(k, np.nan)
    return point, lo, hi


# --- evaluation -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A patch left out: its path relative to the folder and why."""

    file: str
    reason: str


@dataclass(frozen=True)
class EvaluationReport:
    """Result of :func:`evaluate_folder`.

    Attributes:
        folder: the evaluated folder.
        model: the served model's summary.
        metrics: the figures over the classified patches.
        folder_counts: image files per folder class.
        skipped: patches left out (unreadable, undecodable, too large).
        ignored: non-image files in the class folders.
        files: relative paths of the classified patches, in order.
        y_true: int64 ``[n]`` true class index (model class order) of each.
        probabilities: float32 ``[n, C]`` served probabilities of each.
    """

    folder: Path
    model: ModelSummary
    metrics: Metrics
    folder_counts: dict[str, int]
    skipped: tuple[SkippedFile, ...]
    ignored: tuple[str, ...]
    files: tuple[str, ...] = field(repr=False)
    y_true: npt.NDArray[np.int64] = field(repr=False)
    probabilities: npt.NDArray[np.float32] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-patch rows)."""
        m, s = self.metrics, self.model
        return {
            "folder": str(self.folder),
            "model": {
                "name": s.name,
                "version": s.version,
                "untrained": s.untrained,
                "untrained_parts": list(s.untrained_parts),
                "precision": s.precision,
                "device": s.device,
                "patch_size_px": s.patch_size_px,
                "patch_classes": list(s.patch_classes),
            },
            "positive_class": m.positive,
            "folder_counts": dict(self.folder_counts),
            "n_images": sum(self.folder_counts.values()),
            "n_classified": m.n,
            "n_skipped": len(self.skipped),
            "confusion_matrix": {
                "rows": "true class",
                "columns": "predicted class",
                "labels": list(m.class_names),
                "matrix": m.confusion.tolist(),
            },
            "counts": {"tp": m.tp, "fn": m.fn, "tn": m.tn, "fp": m.fp},
            "metrics": {name: e.to_dict() for name, e in m.estimates.items()},
            "per_class_recall": {name: e.to_dict() for name, e in m.per_class_recall.items()},
            "intervals": {
                "proportions": (CLUSTERED_PROPORTION_METHOD if m.grouped else PROPORTION_METHOD),
                "proportion_metrics": [*PROPORTION_METRICS, "per_class_recall"],
                "bootstrap_metrics": [k for k in METRIC_LABELS if k not in PROPORTION_METRICS],
                "confidence": m.confidence,
            },
            "bootstrap": {
                "resamples": m.n_bootstrap,
                "seed": m.seed,
                "confidence": m.confidence,
                "method": "percentile",
                "unit": "group" if m.grouped else "patch",
                "units": m.n_groups,
            },
            "skipped": [{"file": f.file, "reason": f.reason} for f in self.skipped],
            "ignored": list(self.ignored),
        }

    def format_table(self) -> str:
        """The report as text, in the research's style (percentages with counts)."""
        return format_report(self)


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"


def format_metrics(m: Metrics) -> list[str]:
    """Confusion matrix and metric table lines for :class:`Metrics`."""
    width = max(9, *(len(c) for c in m.class_names)) + 2
    lines = ["confusion matrix (rows: true class, columns: predicted class)"]
    lines.append(" " * width + "".join(f"{c:>{width}}" for c in m.class_names))
    for name, row in zip(m.class_names, m.confusion, strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{int(v):>{width}}" for v in row))
    n_correct = int(np.trace(m.confusion))
    counts = {
        "accuracy": f"{n_correct} / {m.n}",
        "sensitivity": f"{m.tp} TP / {m.fn} FN",
        "specificity": f"{m.tn} TN / {m.fp} FP",
        "precision": f"{m.tp} TP / {m.fp} FP",
        "npv": f"{m.tn} TN / {m.fn} FN",
        "f1": "",
        "roc_auc": f"score: p({m.positive})",
    }
    ci_label = f"{100 * m.confidence:g} % CI"
    lines += ["", f"{'metric':<13}{'value':>10}  {ci_label:<18}  counts"]
    for name, (label, percent) in METRIC_LABELS.items():
        e = m.estimates[name]
        unit = " %" if percent else "  "
        value = _fmt(e.value, percent) + (unit if e.value is not None else "  ")
        ci = (
            f"[{_fmt(e.ci_low, percent)}, {_fmt(e.ci_high, percent)}]"
            if e.ci_low is not None and e.ci_high is not None
            else "n/a"
        )
        lines.append(f"{label:<13}{value:>10}  {ci:<18}  {counts[name]}".rstrip())
    if len(m.class_names) > 2:
        lines += ["", "per-class recall"]
        for name, e in m.per_class_recall.items():
            ci = (
                f"[{_fmt(e.ci_low, True)}, {_fmt(e.ci_high, True)}]"
                if e.ci_low is not None and e.ci_high is not None
                else "n/a"
            )
            lines.append(f"  {name:<{width}}{_fmt(e.value, True):>8} %  {ci}")
    lines.append("")
    units = f"the {m.n_groups} groups of the {m.n} patches" if m.grouped else f"the {m.n} patches"
    exact = (
        f"Clopper-Pearson exact binomial at the Korn-Graubard effective n of {units}"
        if m.grouped
        else f"Clopper-Pearson exact binomial over {units}"
    )
    lines.append(f"positive class: {m.positive}")
    lines.append(f"intervals of proportions (accuracy to NPV, recall): {exact}")
    lines.append(
        f"intervals of F1 and ROC AUC: percentile bootstrap, {m.n_bootstrap} resamples of "
        f"{units}, seed {m.seed}"
        if m.n_bootstrap
        else "intervals of F1 and ROC AUC: none (--bootstrap 0)"
    )
    if not m.grouped:
        lines.append(
            "note: patches were counted one by one; if several come from one slide the "
            "intervals are too narrow (group them: --group-by subfolder or --group-regex)"
        )
    elif m.n_groups < 10:
        lines.append(f"note: only {m.n_groups} groups: the intervals are rough")
    flat = [
        METRIC_LABELS[k][0]
        for k, e in m.estimates.items()
        if e.method == "percentile bootstrap" and e.ci_low == e.ci_high
    ]
    if flat:
        lines.append(
            f"note: the bootstrap interval of {' and '.join(flat)} has width 0 (every "
            "resample gave the same figure): that is the bootstrap's limit, not certainty"
        )
    return lines


def format_report(report: EvaluationReport) -> str:
    """Header, :func:`format_metrics` and the skipped files as one text block."""
    s, m = report.model, report.metrics
    model = f"{s.name} {s.version}".strip()
    lines = [f"patch-level evaluation of {model} ({s.precision} on {s.device})"]
    # Patch figures come from the patch classifier alone: an untrained MIL head is moot.
    if s.untrained and (not s.untrained_parts or "patch" in s.untrained_parts):
        lines.append(
            "WARNING: untrained patch classifier (seeded random init): figures mean nothing"
        )
    lines.append(
        f"folder: {report.folder} | {sum(report.folder_counts.values())} images, "
        f"{m.n} classified, {len(report.skipped)} skipped"
    )
    lines.append("")
    lines += format_metrics(m)
    if report.skipped:
        lines += ["", f"skipped files ({len(report.skipped)}):"]
        lines += [f"  {f.file}: {f.reason}" for f in report.skipped]
    if report.ignored:
        lines.append(f"ignored {len(report.ignored)} non-image file(s), e.g. {report.ignored[0]}")
    return "\n".join(lines)


def _read_inputs(
    folder: PatchFolder,
    skipped: dict[int, SkippedFile],
    max_image_bytes: int,
) -> Iterator[PatchInput]:
    """Yield ``(str(index), bytes)`` per readable patch; record the others in ``skipped``."""
    for i, patch in enumerate(folder.patches):
        path = folder.root / patch.rel_path
        try:
            size = path.stat().st_size
            if size > max_image_bytes:
                skipped[i] = SkippedFile(
                    patch.rel_path, f"file of {size} bytes exceeds {max_image_bytes}"
                )
                continue
            data = path.read_bytes()
        except OSError as exc:
            skipped[i] = SkippedFile(patch.rel_path, f"cannot read: {exc.strerror or exc}")
            continue
        if not data:
            skipped[i] = SkippedFile(patch.rel_path, "empty file")
            continue
        yield str(i), data


def _served_positive(scanned: PatchFolder, classes: tuple[str, ...], positive: str | None) -> str:
    """The positive class (default the model's last), once every folder class is one of
    the model's ``classes``.

    Raises:
        EvaluationError: a folder class or ``positive`` the model does not know.
    """
    unknown = [c for c in scanned.class_names if c not in classes]
    if unknown:
        raise EvaluationError(
            f"class folder(s) {', '.join(repr(c) for c in unknown)} in {scanned.root} "
            f"are not classes of the served model (its patch classes: {', '.join(classes)})"
        )
    positive = classes[-1] if positive is None else positive
    if positive not in classes:
        raise EvaluationError(
            f"positive class {positive!r} is not a class of the served model "
            f"(its patch classes: {', '.join(classes)})"
        )
    return positive


def _collect_predictions(
    predictions: Iterable[Any],
    scanned: PatchFolder,
    classes: tuple[str, ...],
    skipped: dict[int, SkippedFile],
    on_progress: ProgressFn | None,
) -> tuple[list[int], list[npt.NDArray[np.float32]]]:
    """Take the server's answers: ``(kept, rows)``, the patch indices classified and
    their float32 ``[C]`` probabilities; errors and wrong shapes go to ``skipped``.

    Raises:
        EvaluationError: no patch was classified.
    """
    kept: list[int] = []
    rows: list[npt.NDArray[np.float32]] = []
    total = len(scanned.patches)
    for pred in predictions:
        i = int(pred.id)
        if pred.error:
            skipped[i] = SkippedFile(scanned.patches[i].rel_path, pred.error)
        elif pred.probabilities.shape != (len(classes),):
            skipped[i] = SkippedFile(
                scanned.patches[i].rel_path,
                f"server returned {pred.probabilities.size} probabilities for "
                f"{len(classes)} classes",
            )
        else:
            kept.append(i)
            rows.append(pred.probabilities)
        if on_progress is not None:
            on_progress(len(kept) + len(skipped), total)
    if on_progress is not None:
        on_progress(len(kept) + len(skipped), total)  # files skipped after the last answer
    if not kept:
        raise EvaluationError(f"none of the {total} patches could be classified")
    return kept, rows


def evaluate_folder(
    client: Any,
    folder: str | os.PathLike[str] | PatchFolder,
    *,
    positive: str | None = None,
    batch_size: int = 32,
    max_in_flight: int = 2,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    on_progress: ProgressFn | None = None,
    group_by: GroupBy = "patch",
    model: str | None = None,
) -> EvaluationReport:
    """Classify every patch of a labelled folder on the server and score the results.

    Args:
        client: a :class:`~histohelper.client.SlideClient` (``get_model_info``,
            ``classify``).
        folder: an ImageFolder tree, or its :func:`scan_patch_folder` result.
        positive: positive class; default the model's last patch class.
        batch_size: images per ``ClassifyPatches`` request.
        max_in_flight: requests unanswered at a time (at most
            ``batch_size * (max_in_flight + 1)`` files in memory).
        n_bootstrap, seed: bootstrap resamples and seed.
        max_image_bytes: larger files are skipped.
        on_progress: called with ``(done, total)`` after each answered image.
        group_by: bootstrap units (:func:`patch_groups`); default each patch.
        model: the server's repository model, ``"NAME[:VERSION]"`` (``None``: its
            default model and version).

    Returns:
        :class:`EvaluationReport`.

    Raises:
        EvaluationError: folder class names the model does not know, unknown
            ``positive``, an empty folder, a patch without a group, or no patch
            classified (raised before any image is sent, except the last).
        HistoHelperError: the server call failed.
    """
    scanned = folder if isinstance(folder, PatchFolder) else scan_patch_folder(folder)
    served = client.get_model_info(model=model).model
    classes = tuple(served.patch_classes)
    positive = _served_positive(scanned, classes, positive)
    groups = patch_groups(scanned, group_by)
    skipped: dict[int, SkippedFile] = {}  # filled by the reader and by the answers
    predictions = client.classify(
        _read_inputs(scanned, skipped, max_image_bytes),
        batch_size=batch_size,
        max_in_flight=max_in_flight,
        model=model,
    )
    kept, rows = _collect_predictions(predictions, scanned, classes, skipped, on_progress)
    y_true = np.array([classes.index(scanned.patches[i].label) for i in kept], dtype=np.int64)
    probs = np.stack(rows).astype(np.float32)
    metrics = compute_metrics(
        y_true,
        probs,
        classes,
        positive,
        n_bootstrap=n_bootstrap,
        seed=seed,
        groups=None if group_by == "patch" else [groups[i] for i in kept],
    )
    return EvaluationReport(
        folder=scanned.root,
        model=served,
        metrics=metrics,
        folder_counts={c: scanned.count(c) for c in scanned.class_names},
        skipped=tuple(skipped[i] for i in sorted(skipped)),
        ignored=scanned.ignored,
        files=tuple(scanned.patches[i].rel_path for i in kept),
        y_true=y_true,
        probabilities=probs,
    )
