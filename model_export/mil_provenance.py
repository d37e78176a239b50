"""What ``export --mil-weights`` learns from a ``train-mil`` checkpoint and its report.

``histohelper train-mil`` writes ``mil_head.pt`` as ``{"state_dict", "slide_classes",
"attention_dim", "embedding_dim", "dropout", "epochs", "seed", "feature_model_hash",
"cohort_sha256"}`` and ``report.json`` beside it. A plain state_dict (weights made
elsewhere) carries none of that: then nothing is known but the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from histohelper.errors import InvalidOptionsError, WeightsError
from histohelper.server.runtime.manifest import MilTraining

#: The report's name beside the checkpoint.
REPORT_NAME = "report.json"


@dataclass(frozen=True)
class MilHeadInfo:
    """Metadata of a MIL-head checkpoint.

    Attributes:
        slide_classes: K class names in logit order, or None (plain state_dict).
        dropout: training dropout probability in [0, 1); 0 when not recorded.
        training: provenance for the manifest, or None (plain state_dict).
    """

    slide_classes: tuple[str, ...] | None
    dropout: float
    training: MilTraining | None


def _num(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(float(x)):
        return None
    return float(x)


def _ci(x: object) -> tuple[float, float] | None:
    if isinstance(x, list | tuple) and len(x) == 2:
        lo, hi = _num(x[0]), _num(x[1])
        if lo is not None and hi is not None:
            return (lo, hi)
    return None


def _metric(pooled: Mapping[str, object], key: str) -> tuple[float | None, tuple | None]:
    m = pooled.get(key)
    if not isinstance(m, Mapping):
        return None, None
    return _num(m.get("value")), _ci(m.get("ci95"))


def _report_fields(path: Path, cohort_sha256: object) -> dict[str, object]:
    raw = path.read_bytes()
    try:
        report = json.loads(raw)
    except ValueError as exc:
        raise InvalidOptionsError(f"MIL report {path.name} is not valid JSON: {exc}") from None
    if not isinstance(report, dict):
        raise InvalidOptionsError(f"MIL report {path.name} is not a JSON object")
    if cohort_sha256 is not None and report.get("cohort_sha256") != cohort_sha256:
        raise InvalidOptionsError(
            f"MIL report {path.name} is of another training run (its cohort hash differs "
            "from the checkpoint's); pass the report of this checkpoint with --mil-report"
        )
    pooled = report.get("pooled_out_of_fold")
    pooled = pooled if isinstance(pooled, Mapping) else {}
    auc, auc_ci = _metric(pooled, "auc")
    bacc, bacc_ci = _metric(pooled, "balanced_accuracy")
    folds = report.get("folds")
    return {
        "scheme": report.get("scheme") if isinstance(report.get("scheme"), str) else None,
        "folds": len(folds) if isinstance(folds, list) else None,
        "n_slides": report.get("n_slides") if isinstance(report.get("n_slides"), int) else None,
        "n_patients": report.get("n_patients")
        if isinstance(report.get("n_patients"), int)
        else None,
        "oof_auc": auc,
        "oof_auc_ci95": auc_ci,
        "oof_balanced_accuracy": bacc,
        "oof_balanced_accuracy_ci95": bacc_ci,
        "report_sha256": hashlib.sha256(raw).hexdigest(),
    }


def read_mil_head_info(
    path: str | os.PathLike[str], report: str | os.PathLike[str] | None = None
) -> MilHeadInfo:
    """Read a MIL checkpoint's metadata and, if found, its training report.

    Args:
        path: the checkpoint (``train-mil``'s ``mil_head.pt`` or a plain state_dict).
        report: ``report.json`` to record; None: :data:`REPORT_NAME` beside the
            checkpoint when it exists (and the checkpoint has ``train-mil`` metadata).

    Returns:
        :class:`MilHeadInfo`.

    Raises:
        WeightsError: the checkpoint cannot be read.
        InvalidOptionsError: an explicit report that is missing or unreadable, a report
            of another run (cohort hash differs), or a dropout outside [0, 1).
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p.name}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all end here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read weights file {p.name}: {first}") from None
    if report is not None and not Path(report).is_file():
        raise InvalidOptionsError(f"MIL report not found: {Path(report).name}")
    if not isinstance(obj, Mapping) or "state_dict" not in obj or "slide_classes" not in obj:
        return MilHeadInfo(None, 0.0, None)  # a plain state_dict: weights only
    classes = tuple(str(c) for c in obj["slide_classes"])
    dropout = _num(obj.get("dropout")) or 0.0
    if not 0.0 <= dropout < 1.0:
        raise InvalidOptionsError(f"MIL checkpoint dropout must be in [0, 1), got {dropout}")
    fields: dict[str, object] = {
        "cohort_sha256": obj.get("cohort_sha256"),
        "feature_model_hash": obj.get("feature_model_hash"),
        "seed": obj.get("seed"),
        "epochs": obj.get("epochs"),
        "dropout": dropout,
        "attention_dim": obj.get("attention_dim"),
    }
    rpath = Path(report) if report is not None else p.parent / REPORT_NAME
    if rpath.is_file():
        fields.update(_report_fields(rpath, obj.get("cohort_sha256")))
    return MilHeadInfo(classes, dropout, MilTraining.model_validate(fields))
