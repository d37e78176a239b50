"""Slide bags for multiple-instance learning: one HDF5 file of patch features per slide.

``histohelper features COHORT --server ADDR --out DIR`` runs one ``AnalyzeSlide`` with
embeddings per cohort slide (several in flight on the asyncio client) and writes each
slide's bag in the layout CLAM and TRIDENT users know:

- dataset ``features``: float32 ``[N, D]`` patch embeddings (D = 512 for ResNet18), in the
  server's bag order (ascending ``patch_index``, row-major grid);
- dataset ``coords``: int64 ``[N, 2]``, level-0 ``(x, y)`` of each patch's top-left
  corner, the server's exact boxes rounded to the nearest pixel (attributes
  ``frame = "level0_px"``, ``patch_level = 0``, ``patch_size`` in level-0 px);
- file attributes: ``slide``, ``label`` (if any), ``patient`` (if any),
  ``patch_size_l0`` (level-0 px of a patch footprint, float), ``patch_size_px``,
  ``effective_mpp`` (um/px), ``mpp_source``, ``model_name``, ``model_version``,
  ``model_precision``, ``model_engine``, ``model_hash``, ``model_hash_source``,
  ``options_json`` (the tiling options that shape the bag), ``request_id``,
  ``histohelper_version``, ``format`` (:data:`FORMAT`).

``model_hash`` is the SHA-256 of the serving version's artifact file as the server
reports it (``ModelSummary.artifact_sha256``; ``model_hash_source =
"server:artifact_sha256"``); from older servers, the manifest's ``artifact_sha256`` when
the served manifest carries one (``"manifest:artifact_sha256"``), else the hex SHA-256
of the manifest JSON exactly as ``GetModelInfo`` returns it (``"sha256(manifest_json)"``):
any re-export (even of the same weights) counts as another model.

h5py is an optional extra (``pip install 'histohelper[features]'``) and is imported
inside the functions that need it only.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from histohelper import __version__
from histohelper.client.cohort import analyze_many
from histohelper.client.options import AnalysisOptions
from histohelper.cohort_csv import CohortError as CohortError  # re-exported
from histohelper.cohort_csv import read_cohort_csv

if TYPE_CHECKING:
    from histohelper.client.aio import AsyncSlideClient
    from histohelper.client.events import ModelInfo
    from histohelper.client.result import SlideResult

FORMAT = "histohelper-features/1"
COHORT_COLUMNS = ("slide", "label", "patient", "split")
INDEX_FILE = "features_index.csv"
INDEX_COLUMNS = ("slide", "file", "n_patches", "status", "reason")
# Options that shape the bag; batch size and the returned extras do not.
_BAG_OPTIONS = (
    "target_mpp",
    "target_magnification",
    "target_level",
    "patch_size_px",
    "stride_px",
    "min_tissue_fraction",
    "edge_mode",
    "mpp_override",
)

Status = Literal["written", "skipped", "no_tissue", "failed"]


@dataclass(frozen=True, slots=True)
class CohortRow:
    """One slide of a cohort: path relative to the server's slide root, optional fields."""

    slide: str
    label: str | None = None
    patient: str | None = None
    split: str | None = None


@dataclass(frozen=True, slots=True)
class SlideOutcome:
    """What happened to one slide: file name in the output folder (``""`` when none)."""

    slide: str
    file: str
    n_patches: int
    status: Status
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """The served model as recorded in each file (see the module docstring)."""

    name: str
    version: str
    precision: str
    engine: str
    hash: str
    hash_source: str
    embedding_dim: int

    @classmethod
    def from_info(cls, info: ModelInfo) -> ModelIdentity:
        """Identity from ``GetModelInfo``; the hash rule is in the module docstring."""
        try:
            manifest = info.manifest
        except json.JSONDecodeError:
            manifest = {}
        declared = manifest.get("artifact_sha256") if isinstance(manifest, dict) else None
        if info.model.artifact_sha256:  # servers with a model repository hash the file
            digest, source = info.model.artifact_sha256, "server:artifact_sha256"
        elif isinstance(declared, str) and declared:
            digest, source = declared, "manifest:artifact_sha256"
        else:
            digest = hashlib.sha256(info.manifest_json.encode()).hexdigest()
            source = "sha256(manifest_json)"
        m = info.model
        return cls(m.name, m.version, m.precision, m.engine, digest, source, m.embedding_dim)


def read_cohort(path: str | os.PathLike[str]) -> list[CohortRow]:
    """Read a cohort CSV: column ``slide`` required; ``label``, ``patient``, ``split`` optional.

    Empty optional cells become ``None``. Rows are kept in file order (the checks are
    :func:`histohelper.cohort_csv.read_cohort_csv`'s).

    Raises:
        CohortError: no ``slide`` column, an unknown column (the message lists the
            allowed ones), an empty ``slide`` cell, a slide listed twice, or no rows.
        OSError: the file cannot be read.
    """
    _, rows = read_cohort_csv(path, COHORT_COLUMNS)
    return [
        CohortRow(
            slide=r.slide, label=r.get("label"), patient=r.get("patient"), split=r.get("split")
        )
        for r in rows
    ]


def feature_file_name(slide: str) -> str:
    """File name of a slide's bag: sanitised stem + 10 hex of SHA-256 of the full path + ``.h5``.

    Two slides with the same stem in different folders get different names; the name
    holds only ``[A-Za-z0-9._-]`` and is at most 60 + 15 characters long.
    """
    digest = hashlib.sha256(slide.encode()).hexdigest()[:10]
    return f"{slide_stem(slide, 60)}-{digest}.h5"


def slide_stem(slide: str, max_chars: int = 60) -> str:
    """A slide reference's file stem as a safe file name: folder and suffix dropped
    (``.ome.tif(f)`` whole), runs outside ``[A-Za-z0-9._-]`` replaced by ``_``, at most
    ``max_chars`` characters; ``"slide"`` when nothing is left. A
    ``dicomweb://NAME/STUDY_UID/SERIES_UID`` reference gives ``NAME-<12 hex>``
    (:meth:`~histohelper.client.dicomweb.DicomWebSlide.safe_id`): UIDs never name files.

    Raises:
        SlidePathError: a malformed ``dicomweb://`` URI.
    """
    from histohelper.client.dicomweb import as_dicomweb

    dicomweb = as_dicomweb(slide)
    if dicomweb is not None:
        return dicomweb.safe_id()[:max_chars]
    stem = Path(slide.replace("\\", "/")).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = stem.rsplit(".", 1)[0] if "." in stem[1:] else stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:max_chars] or "slide"


def options_json(options: AnalysisOptions) -> str:
    """Canonical JSON of the options that shape a bag (sorted keys; unset ones omitted)."""
    values = {k: getattr(options, k) for k in _BAG_OPTIONS if getattr(options, k) is not None}
    return json.dumps(values, sort_keys=True)


def read_file_identity(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """``(model_hash, options_json)`` of a bag file, or ``None`` when it is not one of ours.

    Raises:
        OSError: the file cannot be opened as HDF5.
    """
    import h5py

    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            return None
        return str(f.attrs.get("model_hash", "")), str(f.attrs.get("options_json", ""))


def write_bag(
    path: str | os.PathLike[str],
    result: SlideResult,
    row: CohortRow,
    model: ModelIdentity,
    options: AnalysisOptions,
) -> int:
    """Write one slide's bag atomically (temp file in the same folder, then ``os.replace``).

    Args:
        path: destination ``.h5`` file.
        result: the analysis, with embeddings (``options.return_embeddings``).
        row: the cohort row (slide path, label, patient).
        model: the served model's identity.
        options: the options the slide was analysed with.

    Returns:
        N, the number of patches written.

    Raises:
        ValueError: the result carries no embeddings although it has patches.
        OSError: the file cannot be written (the temp file is removed).
    """
    import h5py

    p = result.patches
    if len(p) and p.embeddings is None:
        raise ValueError("the result carries no embeddings; request return_embeddings")
    dim = model.embedding_dim or result.model.embedding_dim
    features = (
        np.ascontiguousarray(p.embeddings, dtype=np.float32)
        if p.embeddings is not None
        else np.zeros((0, dim), np.float32)
    )
    coords = np.stack([np.rint(p.x_l0), np.rint(p.y_l0)], axis=1).astype(np.int64).reshape(-1, 2)
    g = result.grid
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            ds = f.create_dataset("coords", data=coords)
            ds.attrs["frame"] = "level0_px"
            ds.attrs["patch_level"] = 0
            ds.attrs["patch_size"] = round(g.patch_width_l0)
            ds.attrs["description"] = "top-left (x, y) of each patch in level-0 px"
            attrs: dict[str, Any] = {
                "format": FORMAT,
                "slide": row.slide,
                "patch_size_l0": float(g.patch_width_l0),
                "patch_size_px": int(g.patch_size_px),
                "effective_mpp": float(g.effective_mpp),
                "mpp_source": g.mpp_source,
                "outcome": result.outcome,
                "model_name": model.name,
                "model_version": model.version,
                "model_precision": model.precision,
                "model_engine": model.engine,
                "model_hash": model.hash,
                "model_hash_source": model.hash_source,
                "options_json": options_json(options),
                "request_id": result.request_id,
                "histohelper_version": __version__,
            }
            if row.label is not None:
                attrs["label"] = row.label
            if row.patient is not None:
                attrs["patient"] = row.patient
            f.attrs.update(attrs)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return int(features.shape[0])


def find_foreign_files(out_dir: Path, model_hash: str) -> list[str]:
    """Names of bag files in ``out_dir`` written from another model (sorted).

    Files that are not HDF5 or not of this format are ignored.
    """
    foreign = []
    for path in sorted(out_dir.glob("*.h5")):
        try:
            ident = read_file_identity(path)
        except OSError:
            continue
        if ident is not None and ident[0] != model_hash:
            foreign.append(path.name)
    return foreign


async def extract_features(
    client: AsyncSlideClient,
    rows: Sequence[CohortRow],
    out_dir: Path,
    model: ModelIdentity,
    options: AnalysisOptions,
    *,
    jobs: int = 2,
    overwrite: bool = False,
    on_done: Callable[[SlideOutcome], Any] | None = None,
    retries: int = 4,
) -> list[SlideOutcome]:
    """Analyse every slide with embeddings and write its bag; at most ``jobs`` in flight.

    A slide whose file holds the same model hash and options is skipped (unless
    ``overwrite``). The analyses run through :func:`histohelper.client.cohort.analyze_many`
    (``SERVER_BUSY`` and ``UNAVAILABLE`` retried up to ``retries`` times with backoff). A
    failing slide (server error, unreadable slide, write error) is recorded with its
    reason and never stops the others.

    Returns:
        One outcome per row, in cohort order.

    Raises:
        ValueError: ``jobs < 1``.
    """
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    request_options = AnalysisOptions(
        **{k: getattr(options, k) for k in _BAG_OPTIONS},
        batch_size=options.batch_size,
        return_embeddings=True,
        return_attention=False,
    )
    wanted = (model.hash, options_json(options))
    outcomes: dict[int, SlideOutcome] = {}

    def finish(i: int, outcome: SlideOutcome) -> None:
        outcomes[i] = outcome
        if on_done is not None:
            on_done(outcome)

    todo = []
    for i, row in enumerate(rows):
        path = out_dir / feature_file_name(row.slide)
        if not overwrite and path.exists():
            try:
                ident = await asyncio.to_thread(read_file_identity, path)
            except OSError:
                ident = None  # a broken file is recomputed
            if ident == wanted:
                n = await asyncio.to_thread(_count_patches, path)
                finish(i, SlideOutcome(row.slide, path.name, n, "skipped"))
                continue
        todo.append(i)
    # The analyses: the cohort runner's core (K in flight, SERVER_BUSY/UNAVAILABLE retried).
    async for done in analyze_many(
        client, [rows[i].slide for i in todo], request_options, jobs=jobs, retries=retries
    ):
        i = todo[done.index]
        row = rows[i]
        name = feature_file_name(row.slide)
        if done.result is None:
            finish(i, SlideOutcome(row.slide, "", 0, "failed", done.reason))
            continue
        try:
            n = await asyncio.to_thread(write_bag, out_dir / name, done.result, row, model, options)
        except Exception as exc:  # an unwritable bag fails its slide alone
            finish(i, SlideOutcome(row.slide, "", 0, "failed", f"{type(exc).__name__}: {exc}"))
            continue
        status: Status = "no_tissue" if done.result.outcome == "no_tissue" else "written"
        finish(i, SlideOutcome(row.slide, name, n, status))
    return [outcomes[i] for i in range(len(rows))]


def _count_patches(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["features"].shape[0])


def write_index(out_dir: Path, outcomes: Sequence[SlideOutcome]) -> Path:
    """Write ``features_index.csv`` (slide, file, n_patches, status, reason) atomically."""
    dest = out_dir / INDEX_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{INDEX_FILE}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(INDEX_COLUMNS)
            for o in outcomes:
                writer.writerow([o.slide, o.file, o.n_patches, o.status, o.reason])
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
