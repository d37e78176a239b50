"""The files of a cohort run (``histohelper analyze`` with many slides): inputs, the run
manifest, each slide's folder, the cohort table, the progress bar.

What the command does is documented in :mod:`histohelper.client.cohort` (the analyses
themselves run there, in :func:`~histohelper.client.cohort.analyze_many`).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histohelper import __version__
from histohelper.client._channel import resolve_target
from histohelper.client.cohort import CohortProgress, CohortSlide, SlideOutcome, analyze_many
from histohelper.client.dicomweb import DicomWebSlide, display_name, is_dicomweb_uri
from histohelper.client.features import ModelIdentity, slide_stem
from histohelper.client.models import ModelRef
from histohelper.client.options import AnalysisOptions
from histohelper.client.roi import RegionOfInterest
from histohelper.cohort_csv import CohortError, read_cohort_csv
from histohelper.errors import InvalidOptionsError, SlidePathError

if TYPE_CHECKING:
    from histohelper.client.aio import AsyncSlideClient
    from histohelper.client.result import SlideResult

MANIFEST_NAME = "run_manifest.json"
TABLE_NAME = "cohort.csv"
MANIFEST_FORMAT = "histohelper-cohort-run/1"

#: Slide files a FOLDER argument contributes (case-insensitive).
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
)  # fmt: skip

#: Manifest CSV option columns -> (AnalysisOptions field, cell parser). The request
#: flags' names (``mpp``, ``patch_size`` ...) and the option fields' names both work.
OPTION_COLUMNS: dict[str, tuple[str, Callable[[str], Any]]] = {
    **{c: ("target_mpp", float) for c in ("mpp", "target_mpp")},
    **{c: ("target_magnification", float) for c in ("magnification", "target_magnification")},
    **{c: ("target_level", int) for c in ("level", "target_level")},
    **{c: ("patch_size_px", int) for c in ("patch_size", "patch_size_px")},
    **{c: ("stride_px", int) for c in ("stride", "stride_px")},
    **{c: ("min_tissue_fraction", float) for c in ("min_tissue", "min_tissue_fraction")},
    "edge_mode": ("edge_mode", str),
    "batch_size": ("batch_size", int),
    "mpp_override": ("mpp_override", float),
    "mc_dropout_passes": ("mc_dropout_passes", int),
    "stain_normalization": ("stain_normalization", str),
    "stain_reference": ("stain_reference", str),
}
_RESOLUTION = ("target_mpp", "target_magnification", "target_level")
#: Manifest columns naming a slide's region of interest: GeoJSON files (QuPath exports,
#: level-0 px) relative to the manifest's folder; they replace the command line's --roi
#: and --roi-exclude for that slide.
ROI_COLUMNS = ("roi", "roi_exclude")
#: Options that do not change a result (a re-run with another value skips the slide).
_RESULT_NEUTRAL = ("batch_size",)

TABLE_HEAD = ("id", "slide", "model", "model_version", "status", "error", "predicted_class")
#: Columns after the ``prob_<slide class>`` ones.
TABLE_TAIL = (
    "mc_std", "mc_entropy_nats", "patch_count", "tissue_fraction", "effective_mpp",
    "mpp_source", "qc_warnings", "total_s", "patches_per_s", "wall_s", "attempts",
    "request_id", "cached", "report",
)  # fmt: skip
#: The cohort table's columns, ``prob_<class>`` for each slide class in the middle.
TABLE_COLUMNS = (*TABLE_HEAD, "prob_<class>...", *TABLE_TAIL)

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED_IDS = {MANIFEST_NAME, TABLE_NAME, "index.html"}


#: Keyword arguments of :func:`~histohelper.client.exports.save_all` that say how the
#: files are drawn (overlay class, opacity, colour map ...); part of a slide's identity.
RenderSettings = Mapping[str, Any]


# --- inputs -------------------------------------------------------------------------


def is_manifest(arg: str) -> bool:
    """Whether a SLIDE argument names a manifest CSV (``*.csv``, an existing local file)."""
    return arg.lower().endswith(".csv") and Path(arg).is_file()


def local_folder(arg: str, slide_root: Path, upload: bool) -> Path | None:
    """The local folder a SLIDE argument names, or ``None`` when it is not one: with
    ``upload`` a local path, else a path under ``slide_root`` (the local view of the
    server's slide root)."""
    path = Path(arg) if upload else slide_root / arg
    return path if path.is_dir() else None


def find_slide_files(folder: Path) -> list[Path]:
    """Slide files under ``folder`` (recursive, :data:`SLIDE_SUFFIXES`, hidden files and
    folders skipped), sorted by path."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).parts
        if any(part.startswith(".") for part in rel):
            continue
        if path.suffix.lower() in SLIDE_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found)


def slides_from_arguments(
    args: Sequence[str], *, slide_root: Path, upload: bool
) -> list[CohortSlide]:
    """Cohort items from SLIDE and FOLDER arguments, in argument order (folders expanded).

    Raises:
        CohortError: a folder outside ``slide_root``, or one without slide files.
    """
    items: list[CohortSlide] = []
    root = slide_root.resolve()
    for arg in args:
        if is_dicomweb_uri(arg):  # a PACS series: checked now, never uploaded
            items.append(CohortSlide(_dicomweb_arg(arg)))
            continue
        folder = local_folder(arg, slide_root, upload)
        if folder is None:
            items.append(CohortSlide(arg, upload=upload))
            continue
        files = find_slide_files(folder)
        if not files:
            raise CohortError(f"{arg}: no slide files ({' '.join(SLIDE_SUFFIXES)}) in the folder")
        if not upload and not folder.resolve().is_relative_to(root):
            raise CohortError(
                f"{arg}: the folder is not under the slide root {slide_root} "
                "(set --slide-root, or --upload to send local files)"
            )
        for f in files:
            if upload:
                items.append(CohortSlide(str(f), upload=True))
                continue
            # The path as found under the root, links kept: the server decides (a link
            # leaving its slide root fails that slide alone, SLIDE_PATH_DENIED).
            items.append(CohortSlide(f.relative_to(slide_root).as_posix()))
    return items


def slides_from_manifest(
    path: str | os.PathLike[str], base: AnalysisOptions, *, upload: bool
) -> list[CohortSlide]:
    """Cohort items from a manifest CSV (``slide``, optional ``id`` and option columns).

    Each option cell replaces the command line's value for that slide; a resolution cell
    (mpp, magnification or level) replaces the command line's resolution; ``roi`` and
    ``roi_exclude`` cells (:data:`ROI_COLUMNS`) name GeoJSON files and replace the
    command line's whole region of interest.

    Raises:
        CohortError: an unknown column (the message lists the allowed ones), a bad
            option value or combination (with its line), and what
            :func:`histohelper.cohort_csv.read_cohort_csv` refuses.
        OSError: the file cannot be read.
    """
    _, rows = read_cohort_csv(path, ("slide", "id", *OPTION_COLUMNS, *ROI_COLUMNS))
    items = []
    for row in rows:
        changes: dict[str, Any] = {}
        for column, (name, parse) in OPTION_COLUMNS.items():
            cell = row.get(column)
            if cell is None:
                continue
            try:
                value = parse(cell)
            except ValueError:
                kind = "an integer" if parse is int else "a number"
                raise CohortError(f"line {row.line}: {column} = {cell!r} is not {kind}") from None
            if name in changes and changes[name] != value:
                raise CohortError(f"line {row.line}: {name} given twice with different values")
            changes[name] = value
        if any(row.get(c) for c in ROI_COLUMNS):
            changes["roi"] = _manifest_roi(row, Path(path).parent)
        if any(name in changes for name in _RESOLUTION):
            changes = {**dict.fromkeys(_RESOLUTION), **changes}
        try:
            options = dataclasses.replace(base, **changes) if changes else None
        except InvalidOptionsError as exc:
            raise CohortError(f"line {row.line}: {exc}") from None
        if is_dicomweb_uri(row.slide):
            try:
                ref = _dicomweb_arg(row.slide)
            except CohortError as exc:
                raise CohortError(f"line {row.line}: {exc}") from None
            items.append(CohortSlide(ref, row.get("id"), options))
        else:
            items.append(CohortSlide(row.slide, row.get("id"), options, upload))
    return items


def _dicomweb_arg(arg: str) -> str:
    """A ``dicomweb://`` SLIDE argument or manifest cell, checked.

    Raises:
        CohortError: a malformed URI (the message names the part, never a UID).
    """
    try:
        DicomWebSlide.parse(arg)
    except SlidePathError as exc:
        raise CohortError(exc.message) from None
    return arg


def _manifest_roi(row: Any, folder: Path) -> RegionOfInterest:
    """The region of interest of a manifest row's ``roi`` / ``roi_exclude`` cells.

    Raises:
        CohortError: a file that cannot be read (with the row's line).
    """
    files = {c: folder / str(row.get(c)) if row.get(c) else None for c in ROI_COLUMNS}
    try:
        return RegionOfInterest.from_files(files["roi"], files["roi_exclude"])
    except OSError as exc:
        raise CohortError(
            f"line {row.line}: cannot read the region of interest: {exc.strerror or exc}"
        ) from None


def with_models(items: Sequence[CohortSlide], models: Sequence[str]) -> list[CohortSlide]:
    """Every item analysed by each of ``models`` (``NAME[:VERSION]`` of the server's
    repository), after :func:`assign_ids`.

    With one model each item keeps its id and gets that model; with several, each item
    becomes one per model, in that order (side by side in the cohort table), with id
    ``<id>--<name>[-<version>]``; none: the items as they are (the server's default).

    Raises:
        CohortError: a model given twice.
    """
    if len(set(models)) != len(models):
        raise CohortError("a --model is given twice")
    if len(models) == 1:
        return [dataclasses.replace(i, model=models[0]) for i in items]
    if not models:
        return list(items)
    return [
        dataclasses.replace(i, model=m, id=f"{i.id}--{m.replace(':', '-')}")
        for i in items
        for m in models
    ]


def assign_ids(items: Sequence[CohortSlide]) -> list[CohortSlide]:
    """Give every item an id: its own, else its file stem, with ``-<8 hex>`` of the
    reference's SHA-256 where several items of the run share a stem.

    Raises:
        CohortError: an own id that is not ``[A-Za-z0-9][A-Za-z0-9._-]*`` (at most 128
            characters), is a reserved file name, or repeats.
    """
    own = [i.id for i in items if i.id is not None]
    for given in own:
        if not _ID_RE.fullmatch(given) or given in _RESERVED_IDS:
            raise CohortError(
                f"slide id {given!r} is not usable as a folder name "
                "([A-Za-z0-9][A-Za-z0-9._-]*, at most 128 characters)"
            )
    repeated = sorted({i for i in own if own.count(i) > 1})
    if repeated:
        raise CohortError(f"slide id(s) listed twice: {', '.join(repeated)}")
    stems = [slide_stem(str(i.slide), 80) if i.id is None else None for i in items]
    taken = [*own, *(s for s in stems if s is not None)]
    out = []
    for item, stem in zip(items, stems, strict=True):
        if stem is None:
            out.append(item)
            continue
        if taken.count(stem) > 1 or stem in _RESERVED_IDS:
            stem = f"{stem}-{hashlib.sha256(str(item.slide).encode()).hexdigest()[:8]}"
        out.append(dataclasses.replace(item, id=stem))
    return out


# --- identity and manifest ------------------------------------------------------------


def options_identity(options: AnalysisOptions, render: RenderSettings) -> dict[str, Any]:
    """What must match for a finished slide to be skipped: the request options (except
    :data:`_RESULT_NEUTRAL`) and the render settings, as JSON-ready values."""
    values = {k: v for k, v in dataclasses.asdict(options).items() if k not in _RESULT_NEUTRAL}
    if options.roi is not None:  # by digest: the files' text need not be in the manifest
        values["roi"] = options.roi.sha256()
    values["render"] = dict(render)
    return json.loads(json.dumps(values, sort_keys=True))


class RunManifest:
    """``run_manifest.json``: one entry per slide id ever run into this folder.

    Entry keys: ``slide`` (reference), ``upload`` (bool), ``status`` (``done`` |
    ``no_tissue`` | ``failed``), ``error``, ``model`` (the ``--model`` asked for),
    ``model_name``/``model_version``/``model_hash``/``model_hash_source`` (the version
    that served the slide, from its result: :func:`served_model`),
    ``options`` (:func:`options_identity`), ``attempts``, ``request_id``,
    ``started_at``/``finished_at`` (UTC ISO 8601), ``wall_s``, ``server_total_s``,
    ``patches_per_s`` and ``row`` (the slide's cohort-table row). Rewritten atomically.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / MANIFEST_NAME
        self.doc: dict[str, Any] = {"format": MANIFEST_FORMAT, "slides": {}}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                loaded = None  # unreadable: start afresh (every slide is redone)
            if isinstance(loaded, dict) and isinstance(loaded.get("slides"), dict):
                self.doc = loaded

    @property
    def slides(self) -> dict[str, dict[str, Any]]:
        """Entries by slide id."""
        slides: dict[str, dict[str, Any]] = self.doc["slides"]
        return slides

    def finished(
        self, item: CohortSlide, model: ModelIdentity, identity: dict[str, Any], out_dir: Path
    ) -> dict[str, Any] | None:
        """The entry of ``item`` when it can be skipped (see the module docstring)."""
        entry = self.slides.get(str(item.id))
        if not isinstance(entry, dict):
            return None
        same = (
            entry.get("status") in ("done", "no_tissue")
            and entry.get("slide") == str(item.slide)
            and bool(entry.get("upload")) == item.upload
            and entry.get("model_hash") == model.hash
            and entry.get("model", "") == (item.model or "")
            and entry.get("model_name", model.name) == model.name
            and entry.get("model_version", model.version) == model.version
            and entry.get("options") == identity
            and isinstance(entry.get("row"), dict)
        )
        return entry if same and (out_dir / str(item.id)).is_dir() else None

    def save(self, model: ModelIdentity, models: Sequence[ModelIdentity] = ()) -> None:
        """Write the manifest atomically (temp file, then ``os.replace``); ``model`` is
        the run's first model as resolved at its start; ``models`` lists those and every
        other version that served a done slide of the manifest."""
        self.doc["histohelper_version"] = __version__
        self.doc["model"] = _model_doc(model)
        docs: list[dict[str, Any]] = [_model_doc(m) for m in models]
        for entry in self.slides.values():  # the versions that served, if others
            if not isinstance(entry, dict) or entry.get("status") not in ("done", "no_tissue"):
                continue
            served = {k: entry.get(f"model_{k}") for k in ("name", "version", "hash")}
            served["hash_source"] = entry.get("model_hash_source")
            if served not in docs:
                docs.append(served)
        if docs:
            self.doc["models"] = docs
        _atomic_write_text(self.path, json.dumps(self.doc, indent=1, sort_keys=True) + "\n")


def _model_doc(model: ModelIdentity) -> dict[str, str]:
    return {
        "name": model.name,
        "version": model.version,
        "hash": model.hash,
        "hash_source": model.hash_source,
    }


_umask: list[int] = []


def process_umask(refresh: bool = False) -> int:
    """The process's umask, read once per run (``refresh``, which :func:`run_cohort`
    asks for on its thread before it starts others): from ``/proc/self/status`` (Linux,
    no change to the process), else by setting and restoring it. Files and folders
    made with ``tempfile`` (0600/0700) are chmodded to ``0o666``/``0o777`` less it, as
    files written with ``open`` are."""
    if _umask and not refresh:
        return _umask[0]
    mask = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                mask = int(line.split()[1], 8)
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    _umask[:] = [mask]
    return mask


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- per-slide files and the table ----------------------------------------------------


def write_analysis_files(result: SlideResult, out_dir: Path, render: RenderSettings) -> None:
    """The files of one analysed slide, exactly as ``histohelper analyze SLIDE`` writes
    them: :func:`~histohelper.client.exports.save_all` with ``render`` (less its
    :data:`DICOM_KEY`, which :func:`run_cohort` acts on)."""
    from histohelper.client.exports import save_all

    save_all(result, out_dir, **{k: v for k, v in render.items() if k != DICOM_KEY})


#: ``render`` key of a cohort's DICOM outputs: ``{"out": DIR or None, "stow": bool}``
#: (``analyze --dicom-out DIR --stow``); part of each slide's identity, so a re-run that
#: adds them redoes the slides.
DICOM_KEY = "dicom"


async def write_slide_dicom(
    client: AsyncSlideClient, result: SlideResult, settings: Mapping[str, Any], slide_id: str
) -> str:
    """A cohort slide's DICOM result objects: written to ``settings["out"]/<id>/`` and/or
    stored on the PACS the slide came from (``settings["stow"]``).

    Returns:
        ``""``, or why it failed (not read from DICOM, read from files but ``stow``, a
        PACS or store error, an unwritable folder): the slide then fails.
    """
    from histohelper.client.dicom_results import result_objects, write_dicom
    from histohelper.errors import HistoHelperError

    if result.patch_count == 0:
        return ""
    try:
        if settings.get("stow") and result.dicom is not None and not result.dicom.dicomweb_server:
            raise ValueError("read from DICOM files, not from a PACS: nothing to --stow to")
        objects = await asyncio.to_thread(result_objects, result)
        if settings.get("out"):
            dest = Path(settings["out"]) / slide_id
            await asyncio.to_thread(write_dicom, result, dest, objects=objects)
        if settings.get("stow"):
            assert result.dicom is not None  # result_objects checked it
            await client.store_dicom(objects, result.dicom.dicomweb_server)
    except (ValueError, OSError) as exc:
        return f"DICOM: {exc}"
    except HistoHelperError as exc:
        return f"DICOM: {exc.message} [{exc.reason}]"
    return ""


def write_slide_folder(
    result: SlideResult, out_dir: Path, slide_id: str, render: RenderSettings
) -> Path:
    """Write one slide's files into ``out_dir/.tmp-<id>-XXXX`` and rename that folder to
    ``out_dir/<id>`` (a previous folder of that id is moved aside first, then removed):
    the final name never holds a half-written folder.

    Raises:
        OSError: the files cannot be written (the temporary folder is removed).
    """
    dest = out_dir / slide_id
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{slide_id}-", dir=out_dir))
    try:
        os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp makes 0700
        write_analysis_files(result, tmp, render)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{slide_id}-", dir=out_dir))
            os.replace(dest, old / slide_id)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def remove_stale_temporaries(out_dir: Path) -> None:
    """Remove ``.tmp-*`` / ``.old-*`` folders an interrupted run left in ``out_dir``."""
    for path in out_dir.iterdir():
        if path.is_dir() and path.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(path, ignore_errors=True)


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def result_row(
    item: CohortSlide, outcome: SlideOutcome, status: str, out_dir: Path
) -> dict[str, str]:
    """The cohort-table row of an analysed or failed slide (values as CSV text)."""
    row = dict.fromkeys(
        ("id", "slide", "model", "model_version", "status", "error", *TABLE_TAIL), ""
    )
    row.update(
        id=str(item.id),
        slide=str(item.slide),
        model=(item.model or "").partition(":")[0],
        model_version=(item.model or "").partition(":")[2],
        status=status,
        error=outcome.reason,
        attempts=str(outcome.attempts),
        wall_s=f"{outcome.wall_s:.3f}",
    )
    r = outcome.result
    if r is None:
        return row
    row.update(model=r.model.name, model_version=r.model.version)
    if r.prediction is not None:
        p = r.prediction
        row["predicted_class"] = p.predicted_class
        for name, prob in zip(p.class_names, p.probabilities, strict=True):
            row[f"prob_{name}"] = _fmt(prob)
        u = p.uncertainty
        if u is not None and p.predicted_class in p.class_names:
            row["mc_std"] = _fmt(u.std[p.class_names.index(p.predicted_class)])
            row["mc_entropy_nats"] = _fmt(u.entropy_nats)
    report = out_dir / str(item.id) / "report.html"
    row.update(
        patch_count=str(r.patch_count),
        tissue_fraction=_fmt(r.qc.tissue_fraction),
        effective_mpp=_fmt(r.grid.effective_mpp),
        mpp_source=r.grid.mpp_source,
        qc_warnings="; ".join(r.qc.warnings),
        total_s=f"{r.timings.total_s:.3f}",
        patches_per_s=f"{r.timings.patches_per_s:.1f}",
        request_id=r.request_id,
        cached=str(r.cached).lower(),
        report=f"{item.id}/report.html" if report.is_file() else "",
    )
    return row


def write_table(out_dir: Path, rows: Sequence[dict[str, str]], classes: Sequence[str]) -> Path:
    """Write ``cohort.csv`` atomically: :data:`TABLE_COLUMNS`, one row per slide."""
    prob_columns = [f"prob_{c}" for c in classes]
    for row in rows:  # classes of rows from an earlier run's model, if they differ
        prob_columns += [k for k in row if k.startswith("prob_") and k not in prob_columns]
    columns = [*TABLE_HEAD, *prob_columns, *TABLE_TAIL]
    dest = out_dir / TABLE_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{TABLE_NAME}.", suffix=".tmp", dir=out_dir)
    try:
        os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def write_index(out_dir: Path, rows: list[dict[str, str]]) -> Path:
    """``index.html`` by :func:`histohelper.client.report.write_cohort_index`; a
    DICOMweb slide is shown by its safe id (:func:`~.dicomweb.display_name`), never by
    its UIDs."""
    from histohelper.client.report import write_cohort_index

    shown = [{**r, "slide": display_name(r["slide"])} if "slide" in r else r for r in rows]
    return Path(write_cohort_index(out_dir, shown))


# --- the run --------------------------------------------------------------------------


@dataclass
class CohortRunResult:
    """What :func:`run_cohort` returns: the table rows in input order and the failures."""

    rows: list[dict[str, str]]
    failed: list[dict[str, str]]
    table: Path
    index_html: Path


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def retry_line(event: CohortProgress, attempts: int) -> str:
    """``retrying (attempt k/n) after X s: REASON (request id R)`` for a ``"retry"``
    event; names no slide (the reason and request id come from the server)."""
    error = event.error
    reason = getattr(error, "reason", None) or type(error).__name__
    request_id = getattr(error, "metadata", {}).get("request_id")
    tail = f" (request id {request_id})" if request_id else ""
    return (
        f"retrying (attempt {event.attempt + 1}/{attempts}) after {event.delay_s:.1f} s: "
        f"{reason}{tail}"
    )


class _Bar:
    """The tqdm bar: slides done/total with ETA, plus patches/s and slides/h."""

    def __init__(self, total: int, initial: int, quiet: bool, attempts: int = 1) -> None:
        from tqdm import tqdm

        self.attempts = attempts

        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="slide",
            desc="cohort",
            disable=True if quiet else None,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.t0 = time.perf_counter()
        self.patches: dict[int, int] = {}
        self.analysed = 0

    def on_progress(self, event: CohortProgress) -> None:
        if event.kind == "patches":
            self.patches[event.index] = event.patches_done
            self._postfix()
        elif event.kind == "retry":  # one line, no slide name (even when --quiet)
            self.bar.write(retry_line(event, self.attempts), file=sys.stderr)

    def slide_done(self) -> None:
        self.analysed += 1
        self._postfix()
        self.bar.update(1)

    def _postfix(self) -> None:
        elapsed = time.perf_counter() - self.t0
        if elapsed > 0:
            self.bar.set_postfix_str(
                f"{sum(self.patches.values()) / elapsed:.1f} patches/s, "
                f"{self.analysed * 3600.0 / elapsed:.0f} slides/h",
                refresh=False,
            )

    def close(self) -> None:
        self.bar.close()


async def run_cohort(
    client: AsyncSlideClient,
    items: Sequence[CohortSlide],
    out_dir: Path,
    *,
    base_options: AnalysisOptions,
    render: RenderSettings | None = None,
    jobs: int = 4,
    retries: int = 4,
    quiet: bool = False,
) -> CohortRunResult:
    """Run a cohort into ``out_dir`` (layout and resume rules: :mod:`.cohort`).

    Args:
        client: an open asyncio client.
        items: the slides, each with an ``id`` (:func:`assign_ids`).
        out_dir: the output folder (created).
        base_options: options of items without their own.
        render: how the per-slide files are drawn (``save_all`` keyword arguments).
        jobs: analyses in flight; with one server (no ``round_robin``) at most its
            ``max_concurrent_analyses`` (GetModelInfo).
        retries: retries per slide after the first attempt.
        quiet: no progress bar.

    Returns:
        The table rows in input order and the failed ones.

    Raises:
        HistoHelperError: the model info cannot be fetched (nothing is analysed then).
        OSError: ``out_dir``, the manifest or the table cannot be written.
    """
    render = dict(render or {})
    process_umask(refresh=True)  # read once, before any thread
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    asked = list(dict.fromkeys(item.model for item in items)) or [None]
    infos = {spec: await client.get_model_info(model=spec) for spec in asked}
    identities = {spec: ModelIdentity.from_info(i) for spec, i in infos.items()}
    info = infos[asked[0]]
    if not resolve_target(client.target)[1] and info.max_concurrent_analyses > 0:
        jobs = min(jobs, info.max_concurrent_analyses)  # one server: its slots, no refusals
    # Each asked model is pinned to the version it resolves to now (NAME:VERSION in
    # every request of the run): a hot swap mid-run cannot mix versions.
    pinned = {spec: pinned_model(spec, identities[spec]) for spec in asked}
    manifest = RunManifest(out_dir)
    rows: list[dict[str, str] | None] = [None] * len(items)
    todo: list[int] = []
    for i, item in enumerate(items):
        opts = item.options or base_options
        identity = options_identity(opts, render)
        entry = manifest.finished(item, identities[item.model], identity, out_dir)
        if entry is None:
            todo.append(i)
        else:
            rows[i] = {**entry["row"], "status": "skipped", "error": "", "attempts": "0"}
    bar = _Bar(len(items), len(items) - len(todo), quiet, attempts=retries + 1)
    try:
        run_items = [dataclasses.replace(items[i], model=pinned[items[i].model]) for i in todo]
        async for outcome in analyze_many(
            client,
            run_items,
            base_options,
            jobs=jobs,
            retries=retries,
            on_progress=bar.on_progress,
        ):
            item = items[todo[outcome.index]]
            finishing = asyncio.ensure_future(
                asyncio.to_thread(
                    _finish_slide, item, outcome, out_dir, render, manifest, identities
                )
            )
            try:
                row = await asyncio.shield(finishing)
            except asyncio.CancelledError:  # stopped while its files were written:
                # the thread finishes them and marks the manifest; list it too
                with contextlib.suppress(Exception):
                    rows[todo[outcome.index]] = await finishing
                raise
            if render.get(DICOM_KEY) and row["status"] == "done" and outcome.result is not None:
                error = await write_slide_dicom(
                    client, outcome.result, render[DICOM_KEY], str(item.id)
                )
                if error:  # the slide fails: a re-run redoes it
                    row.update(status="failed", error=error)
                    manifest.slides[str(item.id)].update(status="failed", error=error, row=row)
                    with contextlib.suppress(OSError):
                        manifest.save(next(iter(identities.values())), list(identities.values()))
            rows[todo[outcome.index]] = row
            bar.slide_done()
    except BaseException:  # interrupted (SIGINT, SIGTERM: cancelled) or failed
        bar.close()
        done = [r for r in rows if r is not None]
        with contextlib.suppress(OSError):  # keep what finished, then stop as asked
            _write_summaries(out_dir, done, infos.values())
            print(
                f"histohelper analyze: stopped: {TABLE_NAME} and index.html list the "
                f"{len(done)} slide(s) finished so far of {len(items)} (run the same "
                "command again to resume)",
                file=sys.stderr,
            )
        raise
    bar.close()
    done = [r for r in rows if r is not None]
    table, index_html = _write_summaries(out_dir, done, infos.values())
    return CohortRunResult(done, [r for r in done if r["status"] == "failed"], table, index_html)


def _write_summaries(
    out_dir: Path, done: list[dict[str, str]], infos: Iterable[Any]
) -> tuple[Path, Path]:
    """Write ``cohort.csv`` and ``index.html`` for the rows ``done``."""
    classes = dict.fromkeys(c for i in infos for c in model_slide_classes(i))
    return write_table(out_dir, done, tuple(classes)), write_index(out_dir, done)


def pinned_model(spec: str | None, resolved: ModelIdentity) -> str | None:
    """``NAME:VERSION`` of the version ``spec`` (a ``--model``, ``None``: the server's
    default) resolved to at the start of the run; ``spec`` itself when the server's
    names are not of that form."""
    pin = f"{resolved.name}:{resolved.version}"
    try:
        ModelRef.parse(pin)
    except ValueError:
        return spec
    return pin if resolved.name and resolved.version else spec


def served_model(result: SlideResult | None, resolved: ModelIdentity) -> ModelIdentity:
    """The model version that actually served ``result`` (its ``AnalysisStarted``
    summary; the artifact hash from the result, else ``resolved``'s when the same
    version served, else empty): what a slide's manifest entry records. ``resolved``
    (the run's start-of-run identity) for a slide without a result."""
    if result is None:
        return resolved
    m = result.model
    if m.artifact_sha256:
        digest, source = m.artifact_sha256, "server:artifact_sha256"
    elif (m.name, m.version) == (resolved.name, resolved.version):
        digest, source = resolved.hash, resolved.hash_source
    else:
        digest, source = "", "unknown"
    return ModelIdentity(m.name, m.version, m.precision, m.engine, digest, source, m.embedding_dim)


def model_slide_classes(info: Any) -> tuple[str, ...]:
    """The served model's slide classes (the table's ``prob_<class>`` columns)."""
    return tuple(info.model.slide_classes)


def _finish_slide(
    item: CohortSlide,
    outcome: SlideOutcome,
    out_dir: Path,
    render: RenderSettings,
    manifest: RunManifest,
    identities: Mapping[str | None, ModelIdentity],
) -> dict[str, str]:
    """Write a finished slide's folder, its manifest entry and its table row
    (``identities``: each ``--model`` of the run's GetModelInfo identity)."""
    result = outcome.result
    model = served_model(result, identities[item.model])
    status = "failed"
    if result is not None:
        try:
            # report.html's title: a DICOMweb series by its safe id (UIDs stay out)
            files = {**render, "slide_name": display_name(item.slide)}
            write_slide_folder(result, out_dir, str(item.id), files)
            status = "no_tissue" if result.outcome == "no_tissue" else "done"
        except OSError as exc:  # an unwritable slide fails alone
            outcome = dataclasses.replace(outcome, result=None, error=exc)
    row = result_row(item, outcome, status, out_dir)
    now = time.time()
    manifest.slides[str(item.id)] = {
        "slide": str(item.slide),
        "upload": item.upload,
        "status": status,
        "error": outcome.reason,
        "model": item.model or "",
        "model_name": model.name,
        "model_version": model.version,
        "model_hash": model.hash,
        "model_hash_source": model.hash_source,
        "options": options_identity(outcome.options, render),
        "attempts": outcome.attempts,
        "request_id": row["request_id"],
        "started_at": _utc(now - outcome.wall_s),
        "finished_at": _utc(now),
        "wall_s": round(outcome.wall_s, 3),
        "server_total_s": float(row["total_s"]) if row["total_s"] else None,
        "patches_per_s": float(row["patches_per_s"]) if row["patches_per_s"] else None,
        "row": row,
    }
    with contextlib.suppress(OSError):  # a manifest write failure must not lose the run
        manifest.save(next(iter(identities.values())), list(identities.values()))
    return row
