"""The assembled result of one slide analysis, and the collector that builds it from events.

Arrays are indexed by grid ``[row, col]`` (``row`` down, ``col`` right) and hold NaN
where the grid has no patch. Patch boxes are the exact level-0 boxes the server sent;
they are never recomputed from grid indices.

A result is data: pictures come from :mod:`histohelper.client.render` (``overlay``,
``thumbnail_heatmap``, ``cam_heatmap``) and files from :mod:`histohelper.client.exports`
(``save_all``, ``save_csv``, ...), functions that take the result. This module imports
neither at module level.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from histohelper.client.events import (
    Attention,
    Completed,
    DicomSource,
    Event,
    GridGeometry,
    ModelSummary,
    Outcome,
    PatchBatch,
    QualityControl,
    SlideInfo,
    SlidePrediction,
    SlideUncertainty,
    Started,
    Thumbnail,
    Timings,
)
from histohelper.client.roi import RegionOfInterest
from histohelper.client.stain import AppliedStain
from histohelper.errors import InternalError

if TYPE_CHECKING:
    from os import PathLike

    StrPath = str | PathLike[str]


@dataclass(frozen=True, slots=True, eq=False)
class PatchTable:
    """One row per analysed patch, sorted by ``patch_index``; arrays parallel along axis 0.

    Attributes:
        patch_index: int32 ``[n]``, index in the bag (row-major grid order).
        row, col: int32 ``[n]``, grid position.
        x_l0, y_l0, width_l0, height_l0: float64 ``[n]``, exact level-0 box (from the server).
        tissue_fraction: float32 ``[n]`` in [0, 1].
        is_edge: bool ``[n]``, patch was padded past the slide's edge.
        probabilities: float32 ``[n, num_classes]``, classes as ``SlideResult.class_names``.
        attention: float32 ``[n]``, MIL attention weight (sums to 1); NaN when not requested.
        embeddings: float32 ``[n, embedding_dim]``, or ``None`` when not requested.
        cams: float32 ``[n, num_classes, s, s]`` class activation maps, or ``None``.
        logits: float32 ``[n, num_classes]`` patch logits (sent with ``cams``), or ``None``.
    """

    patch_index: npt.NDArray[np.int32]
    row: npt.NDArray[np.int32]
    col: npt.NDArray[np.int32]
    x_l0: npt.NDArray[np.float64]
    y_l0: npt.NDArray[np.float64]
    width_l0: npt.NDArray[np.float64]
    height_l0: npt.NDArray[np.float64]
    tissue_fraction: npt.NDArray[np.float32]
    is_edge: npt.NDArray[np.bool_]
    probabilities: npt.NDArray[np.float32]
    attention: npt.NDArray[np.float32]
    embeddings: npt.NDArray[np.float32] | None = None
    cams: npt.NDArray[np.float32] | None = None
    logits: npt.NDArray[np.float32] | None = None

    def __len__(self) -> int:
        return int(self.patch_index.shape[0])

    @classmethod
    def empty(cls, num_classes: int) -> PatchTable:
        """A table with no rows and ``num_classes`` probability columns."""
        return cls(
            patch_index=np.zeros(0, np.int32),
            row=np.zeros(0, np.int32),
            col=np.zeros(0, np.int32),
            x_l0=np.zeros(0, np.float64),
            y_l0=np.zeros(0, np.float64),
            width_l0=np.zeros(0, np.float64),
            height_l0=np.zeros(0, np.float64),
            tissue_fraction=np.zeros(0, np.float32),
            is_edge=np.zeros(0, np.bool_),
            probabilities=np.zeros((0, num_classes), np.float32),
            attention=np.zeros(0, np.float32),
        )


@dataclass(frozen=True, slots=True, eq=False)
class SlideResult:
    """Everything one ``AnalyzeSlide`` call returned, assembled.

    A slide without tissue is a result, not an error: ``outcome == "no_tissue"``, an
    empty patch table, all-NaN heatmaps and ``prediction is None``.

    Attributes:
        request_id: the server's (or caller's) request id.
        slide: slide metadata (level-0 sizes, mpp).
        grid: effective patch grid (``n_rows x n_cols``).
        model: the served model; ``model.untrained`` means predictions mean nothing;
            ``model.name`` and ``model.version`` name the server's repository version
            that produced every figure (:attr:`model_name`, :attr:`model_version`).
        thumbnail: the slide thumbnail with its level-0-per-thumbnail-px scales.
        tissue_mask_png: the server's tissue mask as PNG (0 background, 255 tissue).
        outcome: ``"completed"``, ``"no_tissue"``, or ``"running"`` for a partial result
            (:meth:`ResultCollector.result` with ``partial=True``).
        prediction: slide-level prediction with class names, or ``None``.
        qc: final QC figures (tissue fraction, patch counts, warnings).
        timings: server-side timings in seconds.
        patches: the patch table.
        heatmaps: float32 ``[num_classes, n_rows, n_cols]``, patch probability per grid
            cell, NaN where the grid has no (successfully analysed) patch.
        attention_map: float32 ``[n_rows, n_cols]``, MIL attention per grid cell, NaN
            where there is no patch or attention was not requested.
        has_attention: whether the server sent attention weights.
        wall_s: client wall time from the call to the last event, in seconds.
        cached: the server replayed this result from its result cache (same events and
            arrays as the analysis that stored it; ``timings`` describe this call).
        dicom: the slide's DICOM identity when it was read from DICOM (a DICOMweb series
            or DICOM WSI files), else ``None``; what :meth:`to_dicom` references.
        stain: the stain normalisation the server applied to the patches (method,
            reference, why, the slide's fitted statistics, a fit warning); ``None`` from
            servers that do not say.
        roi: the region of interest the request sent (``AnalysisOptions.roi`` as the
            client gave it: GeoJSON text and mask PNG, level-0 px), which overlays and
            ``report.html`` outline; ``None`` without one (or when the result was
            assembled from events alone).
    """

    request_id: str
    slide: SlideInfo
    grid: GridGeometry
    model: ModelSummary
    thumbnail: Thumbnail
    tissue_mask_png: bytes = field(repr=False)
    outcome: Outcome
    prediction: SlidePrediction | None
    qc: QualityControl
    timings: Timings
    patches: PatchTable = field(repr=False)
    heatmaps: npt.NDArray[np.float32] = field(repr=False)
    attention_map: npt.NDArray[np.float32] = field(repr=False)
    has_attention: bool
    wall_s: float | None = None
    cached: bool = False
    dicom: DicomSource | None = field(default=None, repr=False)
    stain: AppliedStain | None = None
    roi: RegionOfInterest | None = field(default=None, repr=False)

    # --- access ---------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """Name of the model (a folder of the server's repository) that served."""
        return self.model.name

    @property
    def model_version(self) -> str:
        """Version of that model that served."""
        return self.model.version

    @property
    def class_names(self) -> tuple[str, ...]:
        """Patch class names, in the order of the probability columns and heatmap planes."""
        return self.model.patch_classes

    @property
    def slide_uncertainty(self) -> SlideUncertainty | None:
        """Monte-Carlo dropout summary of the slide prediction (mean, std, entropy in
        nats, passes), or None when not requested or no prediction."""
        return None if self.prediction is None else self.prediction.uncertainty

    @property
    def patch_count(self) -> int:
        """Number of patches with results."""
        return len(self.patches)

    def class_index(self, class_name: str | int) -> int:
        """Index of a patch class given by name or index.

        Raises:
            KeyError: unknown class name or index out of range.
        """
        if isinstance(class_name, int):
            if not 0 <= class_name < len(self.class_names):
                raise KeyError(f"class index {class_name} out of range")
            return class_name
        try:
            return self.class_names.index(class_name)
        except ValueError:
            raise KeyError(
                f"unknown patch class {class_name!r}; classes: {list(self.class_names)}"
            ) from None

    def heatmap(self, class_name: str | int) -> npt.NDArray[np.float32]:
        """Probability of one patch class per grid cell.

        Returns:
            float32 ``[n_rows, n_cols]``, NaN where the grid has no patch (a view).
        """
        return self.heatmaps[self.class_index(class_name)]

    def default_class(self) -> str | None:
        """The class an overlay shows by default: the predicted slide class when it is a
        patch class, else the patch class with the highest mean probability."""
        if not self.class_names:
            return None
        if self.prediction is not None and self.prediction.predicted_class in self.class_names:
            return self.prediction.predicted_class
        if len(self.patches) == 0:
            return self.class_names[0]
        return self.class_names[int(np.argmax(self.patches.probabilities.mean(axis=0)))]

    def thumbnail_rgb(self) -> npt.NDArray[np.uint8]:
        """The decoded thumbnail, uint8 ``(thumbnail.height_px, thumbnail.width_px, 3)`` RGB."""
        return self.thumbnail.to_rgb()

    def tissue_mask(self) -> npt.NDArray[np.uint8]:
        """The decoded tissue mask, uint8 2-D (0 background, 255 tissue)."""
        from histohelper.client.render import decode_png_gray

        return decode_png_gray(self.tissue_mask_png)

    # --- documented shortcuts (the functions live in render.py and exports.py) --------

    def cam_heatmap(
        self, class_name: str | int, *, l0_per_px: float | None = None
    ) -> tuple[npt.NDArray[np.float32], float]:
        """Sub-patch-resolution probability map: :func:`histohelper.client.render.cam_heatmap`.

        Returns:
            (map, l0_per_px): float32 ``[ceil(height_l0 / l0_per_px),
            ceil(width_l0 / l0_per_px)]`` in [0, 1], NaN where no patch covers; the scale.

        Raises:
            KeyError: unknown class.
            ValueError: the result carries no CAMs (request ``return_cams``).
        """
        from histohelper.client.render import cam_heatmap

        return cam_heatmap(self, class_name, l0_per_px=l0_per_px)

    def save_geojson(self, path: StrPath) -> Path:
        """Write one QuPath tile feature per patch (level-0 px) as GeoJSON:
        :func:`histohelper.client.exports.save_geojson`. Returns the path."""
        from histohelper.client.exports import save_geojson

        return save_geojson(self, path)

    def to_dicom(self, **kwargs: Any) -> list[Any]:
        """DICOM result objects referencing the source slide (highdicom, the ``dicom``
        extra): :func:`histohelper.client.dicom_results.result_objects`.

        Args:
            kwargs: ``coordinates="3D"`` (slide coordinates, mm; default) or ``"2D"``
                (level-0 px).

        Returns:
            ``[MicroscopyBulkSimpleAnnotations, ParametricMap per patch class ...,
            Comprehensive3DSR]`` (highdicom objects, pydicom Datasets; the report only
            with a slide prediction).

        Raises:
            ValueError: the slide was not read from DICOM (``dicom is None``) or has no
                patches.
            ImportError: highdicom is not installed.
        """
        from histohelper.client.dicom_results import result_objects

        return result_objects(self, **kwargs)


class ResultCollector:
    """Builds a :class:`SlideResult` from the events of one stream, in order.

    Feed every event to :meth:`add`; after :class:`Completed`, call :meth:`result`.

    Raises (from :meth:`add` / :meth:`result`):
        InternalError: the stream breaks the protocol (no Started first, events after
            Completed, patch indices or grid positions out of range or repeated,
            attention for patches without results, or the stream ended early).
    """

    def __init__(self, roi: RegionOfInterest | None = None) -> None:
        """Args:
        roi: the region of interest the request sent, kept as ``SlideResult.roi``.
        """
        self._roi = roi
        self._t0 = time.perf_counter()
        self._started: Started | None = None
        self._batches: list[PatchBatch] = []
        self._attention: list[Attention] = []
        self._completed: Completed | None = None
        self._wall_s: float | None = None

    @property
    def started(self) -> Started | None:
        """The Started event, once seen."""
        return self._started

    @property
    def done(self) -> bool:
        """Whether the Completed event has been seen."""
        return self._completed is not None

    def add(self, event: Event) -> None:
        """Take one event."""
        if self._completed is not None:
            raise InternalError("the server sent an event after AnalysisCompleted")
        if isinstance(event, Started):
            if self._started is not None:
                raise InternalError("the server sent AnalysisStarted twice")
            self._started = event
            return
        if self._started is None:
            raise InternalError("the server's first event was not AnalysisStarted")
        if isinstance(event, PatchBatch):
            self._batches.append(event)
        elif isinstance(event, Attention):
            self._attention.append(event)
        elif isinstance(event, Completed):
            served = (event.model_name, event.model_version)
            named = (self._started.model.name, self._started.model.version)
            if event.model_version and served != named:
                raise InternalError("AnalysisStarted and AnalysisCompleted name other models")
            self._completed = event
            self._wall_s = time.perf_counter() - self._t0

    def result(self, *, partial: bool = False) -> SlideResult:
        """Assemble the result.

        Args:
            partial: allow a result before AnalysisCompleted (for live rendering): it has
                ``outcome == "running"``, no prediction, the QC of AnalysisStarted, zero
                timings, and NaN in the cells whose patches have not arrived yet.

        Returns:
            The :class:`SlideResult`.

        Raises:
            InternalError: no AnalysisStarted yet, the stream ended before
                AnalysisCompleted (unless ``partial``), or it broke the protocol.
        """
        started, completed = self._started, self._completed
        if started is None:
            raise InternalError("the stream ended before AnalysisStarted")
        if completed is None:
            if not partial:
                raise InternalError("the stream ended before AnalysisCompleted")
            completed = Completed(
                request_id=started.request_id,
                outcome="running",
                prediction=None,
                qc=started.qc,
                timings=Timings(started.tiling_s, 0.0, 0.0, 0.0, 0.0, 0.0),
            )
        grid = started.grid
        num_classes = len(started.model.patch_classes)
        table = self._table(started, num_classes)
        heatmaps = np.full((num_classes, grid.n_rows, grid.n_cols), np.nan, np.float32)
        attention_map = np.full((grid.n_rows, grid.n_cols), np.nan, np.float32)
        if len(table):
            heatmaps[:, table.row, table.col] = table.probabilities.T
            attention_map[table.row, table.col] = table.attention
        return SlideResult(
            request_id=completed.request_id or started.request_id,
            slide=started.slide,
            grid=grid,
            model=started.model,
            thumbnail=started.thumbnail,
            tissue_mask_png=started.tissue_mask_png,
            outcome=completed.outcome,
            prediction=completed.prediction,
            qc=completed.qc,
            timings=completed.timings,
            patches=table,
            heatmaps=heatmaps,
            attention_map=attention_map,
            has_attention=bool(self._attention),
            wall_s=self._wall_s,
            cached=completed.cached,
            dicom=started.dicom,
            stain=started.stain,
            roi=self._roi,
        )

    def _table(self, started: Started, num_classes: int) -> PatchTable:
        grid = started.grid
        batches = [b for b in self._batches if len(b)]
        if not batches:
            if self._attention and any(len(a.patch_index) for a in self._attention):
                raise InternalError("the server sent attention for patches without results")
            return PatchTable.empty(num_classes)

        def cat(name: str) -> Any:
            return np.concatenate([getattr(b, name) for b in batches])

        patch_index = cat("patch_index")
        order = np.argsort(patch_index, kind="stable")
        patch_index = patch_index[order]
        row, col = cat("row")[order], cat("col")[order]
        probabilities = np.concatenate([b.probabilities for b in batches])[order]
        if probabilities.shape[1] != num_classes:
            raise InternalError(
                f"patch results carry {probabilities.shape[1]} classes, model has {num_classes}"
            )
        if np.any(np.diff(patch_index) == 0):
            raise InternalError("the server sent a patch index twice")
        if patch_index[0] < 0 or (grid.patch_count and patch_index[-1] >= grid.patch_count):
            raise InternalError("the server sent a patch index outside the bag")
        if row.min() < 0 or col.min() < 0 or row.max() >= grid.n_rows or col.max() >= grid.n_cols:
            raise InternalError("the server sent a patch outside the grid")
        cells = row.astype(np.int64) * grid.n_cols + col
        if np.unique(cells).size != cells.size:
            raise InternalError("the server sent two patches for one grid cell")

        attention = np.full(patch_index.shape, np.nan, np.float32)
        if self._attention:
            a_idx = np.concatenate([a.patch_index for a in self._attention])
            a_val = np.concatenate([a.attention for a in self._attention])
            pos = np.searchsorted(patch_index, a_idx)
            pos_ok = np.clip(pos, 0, len(patch_index) - 1)
            if np.any(patch_index[pos_ok] != a_idx):
                raise InternalError("the server sent attention for patches without results")
            attention[pos_ok] = a_val

        embeddings = None
        if all(b.embeddings is not None for b in batches):
            embeddings = np.concatenate([b.embeddings for b in batches])[order]
        cams = logits = None
        if all(b.cams is not None and b.logits is not None for b in batches):
            cams = np.concatenate([b.cams for b in batches])[order]
            logits = np.concatenate([b.logits for b in batches])[order]
        return PatchTable(
            patch_index=patch_index,
            row=row,
            col=col,
            x_l0=cat("x_l0")[order],
            y_l0=cat("y_l0")[order],
            width_l0=cat("width_l0")[order],
            height_l0=cat("height_l0")[order],
            tissue_fraction=cat("tissue_fraction")[order],
            is_edge=cat("is_edge")[order],
            probabilities=probabilities,
            attention=attention,
            embeddings=embeddings,
            cams=cams,
            logits=logits,
        )
