"""``histohelper train-mil``: train the gated-attention MIL slide head on served features.

Reads a cohort CSV (``slide``, ``label``; optional ``patient``, ``split``) and the
per-slide HDF5 bags written by ``histohelper features`` (dataset ``features`` float32
``[N, 512]``, dataset ``coords`` int64 ``[N, 2]`` level-0 x, y; attributes ``slide``,
``model_hash``, ...), found through ``features_index.csv`` in the feature folder (or,
without an index, by the ``slide`` attribute of every ``*.h5`` there).

The head is :class:`~histohelper.model_export.modules.GatedAttentionMIL`, the very
module ``histohelper export`` scripts, so the written ``mil_head.pt`` loads with
``histohelper export --mil-weights``. Training: patient-level stratified k-fold
cross-validation (or the CSV's ``split`` column), class-weighted cross-entropy
(weights ``n / (K n_k)`` of the training fold), Adam, one bag per step, early stopping
on the validation fold's loss; then a final head on every training slide for the
median of the folds' best epoch counts. Bags are held in memory, or streamed from
their HDF5 files (read when needed, an LRU up to the memory budget, one bag read ahead)
when their float32 total exceeds the budget (float32: 1,000 slides x 10,000 patches is
~20 GB); both give the same result.

Everything runs on the CPU and is deterministic under ``seed``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from histohelper.cohort_csv import CohortError as CohortError  # re-exported
from histohelper.cohort_csv import read_cohort_csv

from .modules import GatedAttentionMIL

log = logging.getLogger(__name__)

ALLOWED_COLUMNS = ("slide", "label", "patient", "split")
SPLITS = ("train", "val", "test")
INDEX_NAME = "features_index.csv"
#: index ``status`` values that mean the slide's file was written (case-insensitive).
_DONE_STATUSES = {"ok", "done", "written", "skipped", "cached", "exists", ""}
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class TrainOptions:
    """Training settings of :func:`train_mil`.

    Attributes:
        folds: k of the patient-level stratified k-fold CV (ignored with a ``split``
            column).
        seed: seeds folds, init, bag order, dropout and the bootstrap.
        max_epochs: upper bound on epochs per fold.
        patience: epochs without a lower validation loss before stopping.
        lr: Adam learning rate.
        weight_decay: Adam L2 weight decay.
        dropout: dropout probability of the head in training.
        attention_dim: hidden size L of the gated attention (must match export's
            ``--attention-dim``).
        bootstrap: patient-level bootstrap resamples for the AUC / balanced-accuracy CIs.
        classes: slide class names in output order; default: sorted labels.
        plots: write ROC and loss-curve PNGs (needs OpenCV).
    """

    folds: int = 5
    seed: int = 0
    max_epochs: int = 100
    patience: int = 10
    lr: float = 2e-4
    weight_decay: float = 1e-5
    dropout: float = 0.25
    attention_dim: int = 128
    bootstrap: int = 1000
    classes: tuple[str, ...] | None = None
    plots: bool = True


@dataclass
class Cohort:
    """The parsed cohort: one entry per slide, in CSV order."""

    slides: list[str]
    labels: list[str]
    patients: list[str]
    splits: list[str] | None
    classes: tuple[str, ...]
    sha256: str

    @property
    def y(self) -> npt.NDArray[np.int64]:
        """Class indices ``[S]`` into :attr:`classes`."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[lbl] for lbl in self.labels], dtype=np.int64)


@dataclass
class TrainResult:
    """What :func:`train_mil` returns besides the files it writes.

    Attributes:
        report: the content of ``report.json``.
        oof_probs: slide -> out-of-fold class probabilities float64 ``[K]``.
        oof_attention: slide -> attention float32 ``[N]`` of its held-out head.
        head: the final head (eval mode), as saved.
    """

    report: dict
    oof_probs: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    oof_attention: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    head: GatedAttentionMIL | None = None


# --- inputs -----------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_cohort(
    path: str | os.PathLike[str], *, folds: int, classes: Sequence[str] | None = None
) -> Cohort:
    """Parse and validate the cohort CSV.

    Raises:
        CohortError: unknown or missing columns, empty or duplicate slides, empty labels,
            a label seen once, one class only, a patient under two labels, unknown
            ``split`` values, fewer slides (or patients) per class than ``folds``, or a
            split without every class in train and val.
    """
    p = Path(path)
    if not p.is_file():
        raise CohortError(f"cohort file not found: {p}")
    columns, csv_rows = read_cohort_csv(p, ALLOWED_COLUMNS, required=("slide", "label"))
    rows = [r.cells for r in csv_rows]
    slides = [r["slide"] for r in rows]
    labels = [r["label"] for r in rows]
    empty = [s for s, lbl in zip(slides, labels, strict=True) if not lbl]
    if empty:
        raise CohortError(f"{len(empty)} slide(s) without a label, e.g. {empty[0]!r}")
    patients = [r.get("patient") or r["slide"] for r in rows]
    splits = [r.get("split", "").lower() for r in rows] if "split" in columns else None
    counts = {lbl: labels.count(lbl) for lbl in sorted(set(labels))}
    if len(counts) < 2:
        raise CohortError(f"single-class cohort (only {list(counts)}): nothing to learn")
    once = [lbl for lbl, n in counts.items() if n == 1]
    if once:
        raise CohortError(f"label(s) seen only once: {once}; every class needs >= 2 slides")
    by_patient: dict[str, set[str]] = {}
    for pt, lbl in zip(patients, labels, strict=True):
        by_patient.setdefault(pt, set()).add(lbl)
    mixed = sorted(pt for pt, ls in by_patient.items() if len(ls) > 1)
    if mixed:
        raise CohortError(
            f"{len(mixed)} patient(s) under two labels, e.g. {mixed[0]!r} "
            f"({sorted(by_patient[mixed[0]])}); a patient's slides must share one label"
        )
    if classes:
        classes = tuple(classes)
        extra = sorted(set(labels) - set(classes))
        if extra or len(set(classes)) != len(classes):
            raise CohortError(f"--classes {list(classes)} do not cover the labels {extra}")
    else:
        classes = tuple(counts)
    if splits is not None:
        bad = sorted({s for s in splits if s not in SPLITS})
        if bad:
            raise CohortError(f"split value(s) {bad}; allowed: {list(SPLITS)}")
        for part in ("train", "val"):
            have = {lbl for lbl, s in zip(labels, splits, strict=True) if s == part}
            if have != set(counts):
                raise CohortError(f"split {part!r} lacks class(es) {sorted(set(counts) - have)}")
    else:
        few = {lbl: n for lbl, n in counts.items() if n < folds}
        if few:
            raise CohortError(f"fewer slides per class than folds ({folds}): {few}; lower --folds")
        pcount = {lbl: sum(1 for ls in by_patient.values() if lbl in ls) for lbl in counts}
        few = {lbl: n for lbl, n in pcount.items() if n < folds}
        if few:
            raise CohortError(
                f"fewer patients per class than folds ({folds}): {few}; lower --folds"
            )
    return Cohort(slides, labels, patients, splits, classes, _sha256(p))


def _attr_str(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value.item())
    return str(value)


def locate_features(
    features_dir: str | os.PathLike[str], slides: Sequence[str]
) -> tuple[dict[str, Path], str]:
    """Find each slide's HDF5 bag and check they all come from one feature model.

    Uses ``features_index.csv`` (columns ``slide``, ``file``, ``status``; a ``file``
    relative to the folder) when present; slides it lacks, and every slide without an
    index, are matched by the ``slide`` attribute of the folder's ``*.h5`` files.
    Opens each file for its attributes only.

    Returns:
        ``({slide: path}, model_hash)``.

    Raises:
        CohortError: missing folder, slides without a (readable, non-empty) feature file,
            features without a ``model_hash`` or from different models.
    """
    import h5py

    root = Path(features_dir)
    if not root.is_dir():
        raise CohortError(f"features folder not found: {root}")
    wanted = set(slides)
    found: dict[str, Path] = {}
    index = root / INDEX_NAME
    if index.is_file():
        with open(index, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                s, fname = (row.get("slide") or "").strip(), (row.get("file") or "").strip()
                status = (row.get("status") or "").strip().lower()
                if s in wanted and fname and status in _DONE_STATUSES:
                    path = Path(fname) if os.path.isabs(fname) else root / fname
                    if path.is_file():
                        found[s] = path
    if len(found) < len(wanted):
        for path in sorted(root.glob("*.h5")):
            if path in found.values():
                continue
            try:
                with h5py.File(path, "r") as h5:
                    s = _attr_str(h5.attrs.get("slide", ""))
            except OSError:
                continue
            if s in wanted and s not in found:
                found[s] = path
    missing = [s for s in slides if s not in found]
    if missing:
        raise CohortError(
            f"{len(missing)} slide(s) in the cohort have no features in {root}, e.g. "
            f"{missing[0]!r}; run `histohelper features` for them or drop them from the CSV"
        )
    hashes: dict[str, list[str]] = {}
    for s in slides:
        try:
            with h5py.File(found[s], "r") as h5:
                mh = _attr_str(h5.attrs.get("model_hash", ""))
                shape = h5["features"].shape if "features" in h5 else None
        except OSError as exc:
            raise CohortError(f"unreadable feature file {found[s].name}: {exc}") from None
        if shape is None or len(shape) != 2 or shape[0] == 0:
            raise CohortError(f"feature file {found[s].name} has no [N, D] features, N >= 1")
        if not mh:
            raise CohortError(f"feature file {found[s].name} has no model_hash attribute")
        hashes.setdefault(mh, []).append(s)
    if len(hashes) > 1:
        desc = ", ".join(f"{h[:12]}... ({len(v)} slides)" for h, v in hashes.items())
        raise CohortError(
            f"features come from different models: {desc}; extract all slides with one model"
        )
    return found, next(iter(hashes))


def load_bags(paths: Sequence[Path]) -> list[torch.Tensor]:
    """Read each file's ``features`` as float32 ``[N, D]`` CPU tensors (all the same D).

    Raises:
        CohortError: bags of different embedding sizes.
    """
    import h5py

    bags = []
    for path in paths:
        with h5py.File(path, "r") as h5:
            bags.append(torch.from_numpy(np.asarray(h5["features"], dtype=np.float32)))
    dims = {b.shape[1] for b in bags}
    if len(dims) != 1:
        raise CohortError(f"feature files disagree on the embedding size: {sorted(dims)}")
    return bags


# --- bag sources ------------------------------------------------------------------


def mem_available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux); elsewhere the physical
    memory from ``sysconf``; 0 when neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError, AttributeError):
        return 0


@dataclass(frozen=True)
class BagOptions:
    """Where the bags live while training (results are the same either way).

    Attributes:
        stream: True: always stream from HDF5; False: always hold in memory; None
            (default): stream when the bags' total float32 bytes exceed
            ``max_memory_bytes``.
        max_memory_bytes: memory budget for bags in bytes; also the most the streamed
            source's LRU keeps. None: half of ``MemAvailable`` at the call.
        prefetch: streamed only: bags read ahead on a background thread while the
            current one trains (0 turns read-ahead off).
    """

    stream: bool | None = None
    max_memory_bytes: int | None = None
    prefetch: int = 1


class BagSource:
    """Indexable bags: ``source[i]`` is slide ``i``'s float32 ``[N_i, D]`` CPU tensor.

    Attributes:
        mode: ``"memory"`` or ``"streamed"``.
        dim: D, the embedding size shared by every bag.
        n_patches: N_i per slide.
    """

    mode: str
    dim: int
    n_patches: list[int]

    def __len__(self) -> int:
        return len(self.n_patches)

    def __getitem__(self, i: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def iterate(self, indices: Sequence[int]) -> Iterator[torch.Tensor]:
        """The bags of ``indices`` in that order (streamed: read ahead)."""
        for i in indices:
            yield self[int(i)]

    @property
    def total_bytes(self) -> int:
        """float32 bytes of all bags together."""
        return 4 * self.dim * sum(self.n_patches)


class InMemoryBags(BagSource):
    """Every bag read once into memory (``load_bags``)."""

    mode = "memory"

    def __init__(self, bags: list[torch.Tensor]) -> None:
        self._bags = bags
        self.dim = int(bags[0].shape[1])
        self.n_patches = [int(b.shape[0]) for b in bags]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._bags[i]


def _read_bag(path: Path) -> torch.Tensor:
    import h5py

    with h5py.File(path, "r") as h5:
        return torch.from_numpy(np.asarray(h5["features"], dtype=np.float32))


class StreamedBags(BagSource):
    """Each bag read from its HDF5 file when needed, with an LRU of at most
    ``cache_bytes`` (float32 bytes) and ``prefetch`` bags read ahead by
    :meth:`iterate` on one background thread (h5py holds the GIL while it reads;
    torch's kernels release it, so reading overlaps the training step).

    The tensors are exactly those :func:`load_bags` returns (same file, same float32
    conversion), so training is bit-identical to :class:`InMemoryBags`.

    Raises:
        CohortError: (at construction) a file without 2-d ``features`` or bags of
            different embedding sizes.
    """

    mode = "streamed"

    def __init__(self, paths: Sequence[Path], cache_bytes: int = 0, prefetch: int = 1) -> None:
        import h5py

        self._paths = list(paths)
        shapes = []
        for path in self._paths:
            with h5py.File(path, "r") as h5:
                shapes.append(tuple(h5["features"].shape))
        dims = {s[1] for s in shapes}
        if len(dims) != 1:
            raise CohortError(f"feature files disagree on the embedding size: {sorted(dims)}")
        self.dim = int(next(iter(dims)))
        self.n_patches = [int(s[0]) for s in shapes]
        self.cache_bytes = max(0, int(cache_bytes))
        self.prefetch = max(0, int(prefetch))
        self._lru: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cached = 0
        self.reads = 0  # files read (cache misses), for tests and benchmarks

    def _load(self, i: int) -> torch.Tensor:
        self.reads += 1
        return _read_bag(self._paths[i])

    def _remember(self, i: int, bag: torch.Tensor) -> None:
        size = 4 * self.dim * self.n_patches[i]
        if size > self.cache_bytes or i in self._lru:
            return
        while self._lru and self._cached + size > self.cache_bytes:
            _, old = self._lru.popitem(last=False)
            self._cached -= 4 * int(old.numel())
        self._lru[i] = bag
        self._cached += size

    def __getitem__(self, i: int) -> torch.Tensor:
        bag = self._lru.get(i)
        if bag is not None:
            self._lru.move_to_end(i)
            return bag
        bag = self._load(i)
        self._remember(i, bag)
        return bag

    def iterate(self, indices: Sequence[int]) -> Iterator[torch.Tensor]:
        """The bags of ``indices`` in that order, up to ``prefetch`` read ahead."""
        order = [int(i) for i in indices]
        if self.prefetch == 0 or len(order) < 2:
            yield from super().iterate(order)
            return
        from concurrent.futures import Future, ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="bag-reader") as pool:
            pending: deque[tuple[int, Future[torch.Tensor] | None]] = deque()
            nxt = 0

            def submit() -> None:
                nonlocal nxt
                i = order[nxt]
                nxt += 1
                hit = i in self._lru
                pending.append((i, None if hit else pool.submit(self._load, i)))

            try:
                while nxt < len(order) and len(pending) <= self.prefetch:
                    submit()
                while pending:
                    i, fut = pending.popleft()
                    if nxt < len(order):
                        submit()
                    if fut is None:
                        yield self[i]
                    else:
                        bag = fut.result()
                        self._remember(i, bag)
                        yield bag
            finally:
                for _, fut in pending:
                    if fut is not None:
                        fut.cancel()


def open_bags(paths: Sequence[Path], opts: BagOptions = BagOptions()) -> BagSource:
    """The bag source for ``paths``: in memory, or streamed when forced or when the
    bags' total float32 bytes exceed the memory budget (see :class:`BagOptions`).

    Raises:
        CohortError: bags of different embedding sizes.
    """
    budget = opts.max_memory_bytes
    if budget is None:
        budget = mem_available_bytes() // 2
    streamed = StreamedBags(paths, cache_bytes=0, prefetch=opts.prefetch)
    stream = opts.stream if opts.stream is not None else streamed.total_bytes > budget
    if stream:
        streamed.cache_bytes = max(0, budget)
        log.info(
            "streaming %d bags (%.2f GiB) from HDF5, LRU <= %.2f GiB",
            len(streamed),
            streamed.total_bytes / 2**30,
            budget / 2**30,
        )
        return streamed
    return InMemoryBags(load_bags(paths))


# --- folds ------------------------------------------------------------------------


def patient_folds(
    patients: Sequence[str], y: npt.NDArray[np.int64], k: int, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Patient-level stratified k-fold: each patient's slides in one fold, classes
    balanced across folds (greedy: patients of each class, shuffled, largest first,
    go to the fold with fewest slides of that class, ties to the smaller fold).

    Args:
        patients: patient id per slide ``[S]``.
        y: class index per slide ``[S]`` (one class per patient).
        k: number of folds.
        seed: shuffles patients.

    Returns:
        k arrays of slide indices (the validation sets), disjoint, covering all slides.
    """
    rng = np.random.default_rng(seed)
    by_patient: dict[str, list[int]] = {}
    for i, pt in enumerate(patients):
        by_patient.setdefault(pt, []).append(i)
    fold_of_class = np.zeros((k, int(y.max()) + 1), dtype=np.int64)
    fold_size = np.zeros(k, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(k)]
    for c in range(int(y.max()) + 1):
        pts = [pt for pt, idx in by_patient.items() if y[idx[0]] == c]
        order = rng.permutation(len(pts))
        pts = sorted((pts[i] for i in order), key=lambda pt: -len(by_patient[pt]))
        for pt in pts:
            f = min(range(k), key=lambda j: (fold_of_class[j, c], fold_size[j], j))
            members[f].extend(by_patient[pt])
            fold_of_class[f, c] += len(by_patient[pt])
            fold_size[f] += len(by_patient[pt])
    return [np.array(sorted(m), dtype=np.int64) for m in members]


# --- metrics ----------------------------------------------------------------------


def auc_binary(y_true: npt.NDArray[np.int64], score: npt.NDArray[np.float64]) -> float:
    """ROC AUC by the Mann-Whitney U statistic (ties count half); NaN for one class."""
    pos, neg = score[y_true == 1], score[y_true == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    s = score[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y_true == 1].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def auc(y: npt.NDArray[np.int64], probs: npt.NDArray[np.float64]) -> float:
    """Binary AUC of class 1, or macro one-vs-rest AUC for K > 2 (classes present)."""
    k = probs.shape[1]
    if k == 2:
        return auc_binary(y, probs[:, 1])
    vals = [auc_binary((y == c).astype(np.int64), probs[:, c]) for c in range(k)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def wilson(x: int, n: int) -> dict:
    """Proportion ``x / n`` with its Wilson score 95 % interval (Wilson, JASA 1927)."""
    if n == 0:
        return {"value": None, "ci95": [None, None], "x": x, "n": n}
    p = x / n
    z2 = _Z95 * _Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {"value": p, "ci95": [max(0.0, centre - half), min(1.0, centre + half)], "x": x, "n": n}


def _balanced_accuracy(y: npt.NDArray[np.int64], pred: npt.NDArray[np.int64], k: int) -> float:
    recalls = [float(np.mean(pred[y == c] == c)) for c in range(k) if np.any(y == c)]
    return float(np.mean(recalls))


def _round(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), 6)


def evaluate(
    y: npt.NDArray[np.int64],
    probs: npt.NDArray[np.float64],
    patients: Sequence[str],
    classes: Sequence[str],
    *,
    bootstrap: int,
    seed: int,
) -> dict:
    """Slide-level metrics with 95 % intervals.

    AUC (class 1 vs 0; macro one-vs-rest for K > 2) and balanced accuracy with
    patient-level bootstrap percentile intervals (patients resampled with replacement,
    resamples with one class skipped); per-class sensitivity (recall) and specificity
    one-vs-rest with Wilson intervals (for K = 2 also at top level, positive =
    ``classes[1]``); confusion matrix ``[true][predicted]``.
    """
    k = len(classes)
    pred = probs.argmax(axis=1)
    cm = np.zeros((k, k), dtype=np.int64)
    for t, pr in zip(y, pred, strict=True):
        cm[t, pr] += 1
    out: dict = {
        "n_slides": len(y),
        "n_patients": len(set(patients)),
        "auc": {"value": _round(auc(y, probs))},
        "balanced_accuracy": {"value": _round(_balanced_accuracy(y, pred, k))},
        "confusion_matrix": {"rows_true_cols_predicted": list(classes), "counts": cm.tolist()},
    }
    per_class = {}
    for c, name in enumerate(classes):
        tp, fn = int(cm[c, c]), int(cm[c].sum() - cm[c, c])
        fp = int(cm[:, c].sum() - cm[c, c])
        tn = int(cm.sum() - tp - fn - fp)
        per_class[name] = {"sensitivity": wilson(tp, tp + fn), "specificity": wilson(tn, tn + fp)}
    out["per_class"] = per_class
    if k == 2:
        out["positive_class"] = classes[1]
        out["sensitivity"] = per_class[classes[1]]["sensitivity"]
        out["specificity"] = per_class[classes[1]]["specificity"]
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, pt in enumerate(patients):
        groups.setdefault(pt, []).append(i)
    idx_by_pt = [np.array(v) for v in groups.values()]
    aucs, baccs = [], []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(idx_by_pt), len(idx_by_pt))
        idx = np.concatenate([idx_by_pt[j] for j in pick])
        if len(np.unique(y[idx])) < 2:
            continue
        aucs.append(auc(y[idx], probs[idx]))
        baccs.append(_balanced_accuracy(y[idx], pred[idx], k))
    for key, vals in (("auc", aucs), ("balanced_accuracy", baccs)):
        v = [x for x in vals if not math.isnan(x)]
        ci = (
            [_round(float(np.percentile(v, 2.5))), _round(float(np.percentile(v, 97.5)))]
            if v
            else [None, None]
        )
        out[key].update(
            {"ci95": ci, "method": "patient-level bootstrap percentile", "resamples": len(v)}
        )
    return out


def roc_curve(
    y: npt.NDArray[np.int64], score: npt.NDArray[np.float64]
) -> tuple[list[float], list[float]]:
    """ROC points (FPR, TPR) from (0, 0) to (1, 1), one step per distinct score."""
    order = np.argsort(-score, kind="mergesort")
    ys, ss = y[order], score[order]
    p, n = max(int((y == 1).sum()), 1), max(int((y == 0).sum()), 1)
    fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
    for i in range(len(ys)):
        tp += int(ys[i] == 1)
        fp += int(ys[i] == 0)
        if i + 1 == len(ys) or ss[i + 1] != ss[i]:
            fpr.append(fp / n)
            tpr.append(tp / p)
    return fpr, tpr


# --- training ---------------------------------------------------------------------


def _class_weights(y: npt.NDArray[np.int64], k: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _new_head(d: int, k: int, opts: TrainOptions, seed: int) -> GatedAttentionMIL:
    torch.manual_seed(seed)
    return GatedAttentionMIL(d, opts.attention_dim, k, dropout=opts.dropout)


def _epoch(
    head: GatedAttentionMIL,
    optim: torch.optim.Optimizer,
    bags: BagSource,
    y: npt.NDArray[np.int64],
    train_idx: npt.NDArray[np.int64],
    weights: torch.Tensor,
    gen: torch.Generator,
) -> float:
    head.train()
    total = 0.0
    order = [int(train_idx[j]) for j in torch.randperm(len(train_idx), generator=gen).tolist()]
    for i, bag in zip(order, bags.iterate(order), strict=True):
        logits, _ = head(bag)
        loss = torch.nn.functional.cross_entropy(
            logits.unsqueeze(0), torch.tensor([int(y[i])]), weight=weights
        )
        optim.zero_grad()
        loss.backward()
        optim.step()
        total += float(loss.detach()) * float(weights[int(y[i])])
    denom = float(sum(float(weights[int(y[int(i)])]) for i in train_idx))
    return total / denom


@torch.no_grad()
def _predict(
    head: GatedAttentionMIL, bags: BagSource, idx: npt.NDArray[np.int64]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    head.eval()
    logits, atts = [], []
    for bag in bags.iterate([int(i) for i in idx]):
        lg, a = head(bag)
        logits.append(lg)
        atts.append(a)
    return torch.stack(logits), atts


def _weighted_loss(logits: torch.Tensor, y: npt.NDArray[np.int64], weights: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), weight=weights))


def _fit(
    bags: BagSource,
    y: npt.NDArray[np.int64],
    k: int,
    train_idx: npt.NDArray[np.int64],
    val_idx: npt.NDArray[np.int64] | None,
    opts: TrainOptions,
    seed: int,
    epochs: int,
) -> tuple[GatedAttentionMIL, dict]:
    """Train one head; with ``val_idx``, early stopping on the validation loss and the
    best state restored; without, exactly ``epochs`` epochs."""
    d = bags.dim
    head = _new_head(d, k, opts, seed)
    optim = torch.optim.Adam(head.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    weights = _class_weights(y[train_idx], k)
    gen = torch.Generator().manual_seed(seed)
    train_loss: list[float] = []
    val_loss: list[float] = []
    best, best_epoch, best_state = math.inf, 0, None
    for epoch in range(1, epochs + 1):
        train_loss.append(_epoch(head, optim, bags, y, train_idx, weights, gen))
        if val_idx is None:
            continue
        logits, _ = _predict(head, bags, val_idx)
        vl = _weighted_loss(logits, y[val_idx], weights)
        val_loss.append(vl)
        if vl < best:
            best, best_epoch = vl, epoch
            best_state = {n: t.detach().clone() for n, t in head.state_dict().items()}
        elif epoch - best_epoch >= opts.patience:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    curve: dict = {
        "train_loss": [_round(v) for v in train_loss],
        "val_loss": [_round(v) for v in val_loss],
        "best_epoch": best_epoch if val_idx is not None else epochs,
        "epochs_run": len(train_loss),
    }
    return head, curve


def train_mil(
    cohort_csv: str | os.PathLike[str],
    features_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opts: TrainOptions = TrainOptions(),
    report_dir: str | os.PathLike[str] | None = None,
    bag_opts: BagOptions = BagOptions(),
) -> TrainResult:
    """Validate, cross-validate, train the final head, and write the outputs.

    Writes ``out`` (``{"state_dict": GatedAttentionMIL state_dict, "slide_classes":
    [...], ...}``, loadable by ``histohelper export --mil-weights`` with
    ``--slide-classes`` in the same order and ``--attention-dim``), and in
    ``report_dir`` (default: ``out``'s folder) ``report.json``, ``roc.png`` and
    ``loss.png``. ``bag_opts`` chooses memory or streamed bags (same result).

    Raises:
        CohortError: bad cohort or features (see :func:`read_cohort`,
            :func:`locate_features`); nothing is written.
    """
    if opts.folds < 2:
        raise CohortError("--folds must be >= 2")
    cohort = read_cohort(cohort_csv, folds=opts.folds, classes=opts.classes)
    paths, model_hash = locate_features(features_dir, cohort.slides)
    bags = open_bags([paths[s] for s in cohort.slides], bag_opts)
    y, k = cohort.y, len(cohort.classes)
    out_path = Path(out)
    rdir = Path(report_dir) if report_dir is not None else out_path.parent
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one-bag steps are tiny; also one reduction order
    try:
        result = _cross_validate(cohort, bags, y, k, opts)
        report = result.report
        report["feature_model_hash"] = model_hash
        report["embedding_dim"] = bags.dim
        report["bags"] = {
            "mode": bags.mode,
            "total_bytes": bags.total_bytes,
            "n_patches": sum(bags.n_patches),
        }
        n_final = report["final"]["epochs"]
        final_idx = report.pop("_final_idx")
        head, curve = _fit(bags, y, k, np.asarray(final_idx), None, opts, opts.seed + 1000, n_final)
        report["final"]["train_loss"] = curve["train_loss"]
        if cohort.splits is not None:
            test_idx = np.array([i for i, s in enumerate(cohort.splits) if s == "test"])
            if len(test_idx):
                logits, _ = _predict(head, bags, test_idx)
                pr = torch.softmax(logits, 1).double().numpy()
                report["test"] = evaluate(
                    y[test_idx],
                    pr,
                    [cohort.patients[i] for i in test_idx],
                    cohort.classes,
                    bootstrap=opts.bootstrap,
                    seed=opts.seed,
                )
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)
    result.head = head
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rdir.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": {n: t.detach().clone() for n, t in head.state_dict().items()},
        "slide_classes": list(cohort.classes),
        "attention_dim": opts.attention_dim,
        "embedding_dim": bags.dim,
        "dropout": opts.dropout,
        "epochs": n_final,
        "seed": opts.seed,
        "feature_model_hash": model_hash,
        "cohort_sha256": cohort.sha256,
    }
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, out_path)
    if opts.plots:
        report["plots"] = _plots(rdir, report, result, cohort)
    (rdir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return result


def _cross_validate(
    cohort: Cohort,
    bags: BagSource,
    y: npt.NDArray[np.int64],
    k: int,
    opts: TrainOptions,
) -> TrainResult:
    n = len(cohort.slides)
    if cohort.splits is not None:
        train = np.array([i for i, s in enumerate(cohort.splits) if s == "train"])
        val = np.array([i for i, s in enumerate(cohort.splits) if s == "val"])
        plan = [(train, val)]
        scheme = "split column (train -> val)"
        final_idx = np.concatenate([train, val])
    else:
        folds = patient_folds(cohort.patients, y, opts.folds, opts.seed)
        plan = [(np.setdiff1d(np.arange(n), v), v) for v in folds]
        scheme = f"patient-level stratified {opts.folds}-fold"
        final_idx = np.arange(n)
    result = TrainResult(report={})
    oof = np.full((n, k), np.nan)
    fold_reports, best_epochs = [], []
    for f, (tr, va) in enumerate(plan):
        head, curve = _fit(bags, y, k, tr, va, opts, opts.seed + f, opts.max_epochs)
        logits, atts = _predict(head, bags, va)
        probs = torch.softmax(logits, 1).double().numpy()
        oof[va] = probs
        for i, a in zip(va, atts, strict=True):
            result.oof_probs[cohort.slides[int(i)]] = probs[list(va).index(i)]
            result.oof_attention[cohort.slides[int(i)]] = a.numpy()
        best_epochs.append(curve["best_epoch"])
        fold_reports.append(
            {
                "fold": f,
                "n_train": len(tr),
                **curve,
                "metrics": evaluate(
                    y[va],
                    probs,
                    [cohort.patients[int(i)] for i in va],
                    cohort.classes,
                    bootstrap=opts.bootstrap,
                    seed=opts.seed + f,
                ),
                "slides": [cohort.slides[int(i)] for i in va],
            }
        )
    done = ~np.isnan(oof[:, 0])
    pooled = evaluate(
        y[done],
        oof[done],
        [p for p, d in zip(cohort.patients, done, strict=True) if d],
        cohort.classes,
        bootstrap=opts.bootstrap,
        seed=opts.seed,
    )
    epochs = max(1, math.ceil(float(np.median(best_epochs))))
    result.report = {
        "schema": "histohelper.train_mil.report/1",
        "seed": opts.seed,
        "cohort_sha256": cohort.sha256,
        "classes": list(cohort.classes),
        "n_slides": n,
        "n_patients": len(set(cohort.patients)),
        "scheme": scheme,
        "options": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in asdict(opts).items()},
        "folds": fold_reports,
        "pooled_out_of_fold": pooled,
        "out_of_fold": {cohort.slides[i]: [_round(p) for p in oof[i]] for i in range(n) if done[i]},
        "final": {
            "epochs": epochs,
            "n_train": len(final_idx),
            "why": (
                "median of the folds' best epochs (lowest validation loss), rounded up: "
                f"{best_epochs}; the final head sees every training slide for that many "
                "epochs, with no held-out data left to stop on"
            ),
        },
        "_final_idx": final_idx.tolist(),
    }
    return result


# --- plots (OpenCV: matplotlib is not a dependency) -------------------------------

_COLOURS = [
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (127, 127, 127),
]  # BGR, tab10


def _line_plot(
    path: Path,
    title: str,
    series: list[tuple[str, list[float], list[float], tuple[int, int, int], int]],
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    xlabel: str,
    ylabel: str,
    diagonal: bool = False,
) -> None:
    import cv2

    w, h, m = 640, 480, 60
    img = np.full((h, w, 3), 255, np.uint8)

    def px(x: float, yv: float) -> tuple[int, int]:
        fx = (x - xlim[0]) / max(xlim[1] - xlim[0], 1e-12)
        fy = (yv - ylim[0]) / max(ylim[1] - ylim[0], 1e-12)
        return int(m + fx * (w - 2 * m)), int(h - m - fy * (h - 2 * m))

    cv2.rectangle(img, px(xlim[0], ylim[0]), px(xlim[1], ylim[1]), (0, 0, 0), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for t in np.linspace(0, 1, 6):
        xv, yv = xlim[0] + t * (xlim[1] - xlim[0]), ylim[0] + t * (ylim[1] - ylim[0])
        x0, y0 = px(xv, ylim[0])
        cv2.putText(img, f"{xv:.3g}", (x0 - 12, y0 + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x1, y1 = px(xlim[0], yv)
        cv2.putText(img, f"{yv:.3g}", (x1 - 45, y1 + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if diagonal:
        cv2.line(img, px(xlim[0], ylim[0]), px(xlim[1], ylim[1]), (200, 200, 200), 1, cv2.LINE_AA)
    cv2.putText(img, title, (m, 30), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (w // 2 - 40, h - 15), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (5, 45), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for j, (name, xs, ys, colour, thick) in enumerate(series):
        pts = np.array([px(a, b) for a, b in zip(xs, ys, strict=True)], np.int32)
        if len(pts) > 1:
            cv2.polylines(img, [pts], False, colour, thick, cv2.LINE_AA)
        ly = m + 12 + 16 * j
        cv2.line(img, (w - m - 150, ly), (w - m - 130, ly), colour, 2)
        cv2.putText(img, name, (w - m - 125, ly + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)


def _plots(rdir: Path, report: dict, result: TrainResult, cohort: Cohort) -> list[str]:
    try:
        import cv2  # noqa: F401
    except ImportError:
        log.warning("OpenCV is not installed: no plots written")
        return []
    written = []
    if len(cohort.classes) == 2:
        series = []
        index = {s: i for i, s in enumerate(cohort.slides)}
        y = cohort.y
        for f in report["folds"]:
            idx = np.array([index[s] for s in f["slides"]])
            sc = np.array([result.oof_probs[s][1] for s in f["slides"]])
            fpr, tpr = roc_curve(y[idx], sc)
            a = f["metrics"]["auc"]["value"]
            series.append((f"fold {f['fold']} AUC {a}", fpr, tpr, _COLOURS[f["fold"] % 8], 1))
        slides = list(result.oof_probs)
        idx = np.array([index[s] for s in slides])
        fpr, tpr = roc_curve(y[idx], np.array([result.oof_probs[s][1] for s in slides]))
        a = report["pooled_out_of_fold"]["auc"]["value"]
        series.append((f"pooled AUC {a}", fpr, tpr, (0, 0, 0), 2))
        _line_plot(
            rdir / "roc.png",
            f"ROC, positive = {cohort.classes[1]}",
            series,
            (0, 1),
            (0, 1),
            "false positive rate",
            "TPR",
            diagonal=True,
        )
        written.append("roc.png")
    series = []
    top = 0.0
    for f in report["folds"]:
        c = _COLOURS[f["fold"] % 8]
        for key, thick in (("train_loss", 1), ("val_loss", 2)):
            ys = [v for v in f[key] if v is not None]
            top = max([top, *ys])
            series.append(
                (f"fold {f['fold']} {key.split('_')[0]}", list(range(1, len(ys) + 1)), ys, c, thick)
            )
    xmax = max([len(f["train_loss"]) for f in report["folds"]] + [2])
    _line_plot(
        rdir / "loss.png",
        "weighted cross-entropy (thin: train, thick: val)",
        series,
        (1, xmax),
        (0, max(top, 1e-3) * 1.05),
        "epoch",
        "loss",
    )
    written.append("loss.png")
    return written
