"""Typed events of an ``AnalyzeSlide`` stream, converted from the wire at the edge.

Every class here is a frozen dataclass of Python scalars and numpy arrays; nothing
downstream touches protobuf. Coordinates are level-0 pixels of the slide (x right,
y down) unless a name says otherwise (``_px`` at the stated resolution, ``_mpp`` in
micrometres per pixel, ``_s`` in seconds).
"""

from __future__ import annotations

import json
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from histohelper.client.stain import AppliedStain
from histohelper.errors import InternalError
from histohelper.v1 import slide_analysis_pb2 as pb

Outcome = Literal["completed", "no_tissue", "running"]  # "running": partial results only
EdgeModeName = Literal["unspecified", "pad", "drop"]

_EDGE_NAMES: dict[int, EdgeModeName] = {
    pb.EDGE_MODE_UNSPECIFIED: "unspecified",
    pb.EDGE_MODE_PAD: "pad",
    pb.EDGE_MODE_DROP: "drop",
}
_OUTCOMES: dict[int, Outcome] = {
    pb.ANALYSIS_OUTCOME_COMPLETED: "completed",
    pb.ANALYSIS_OUTCOME_NO_TISSUE: "no_tissue",
}


# --- metadata -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PyramidLevel:
    """One pyramid level: size in its own pixels, level-0 px per level px per axis."""

    width_px: int
    height_px: int
    downsample_x: float
    downsample_y: float


@dataclass(frozen=True, slots=True)
class SlideInfo:
    """Slide metadata (no file names, no patient data). Sizes in level-0 px, mpp in um/px."""

    vendor: str
    width_l0: int
    height_l0: int
    levels: tuple[PyramidLevel, ...]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None

    @classmethod
    def from_proto(cls, msg: pb.SlideInfo) -> SlideInfo:
        return cls(
            vendor=msg.vendor,
            width_l0=int(msg.width_l0),
            height_l0=int(msg.height_l0),
            levels=tuple(
                PyramidLevel(int(lv.width_px), int(lv.height_px), lv.downsample_x, lv.downsample_y)
                for lv in msg.levels
            ),
            mpp_x=msg.mpp_x if msg.HasField("mpp_x") else None,
            mpp_y=msg.mpp_y if msg.HasField("mpp_y") else None,
            objective_power=msg.objective_power if msg.HasField("objective_power") else None,
        )


@dataclass(frozen=True, slots=True)
class GridGeometry:
    """The effective patch grid. Patch (row, col) nominally covers the level-0 box
    ``[origin_x_l0 + col * stride_x_l0, + patch_width_l0) x [origin_y_l0 + row *
    stride_y_l0, + patch_height_l0)``; use the exact boxes in the patch table instead.
    """

    n_rows: int
    n_cols: int
    origin_x_l0: float
    origin_y_l0: float
    stride_x_l0: float
    stride_y_l0: float
    patch_width_l0: float
    patch_height_l0: float
    level: int
    level_downsample_x: float
    level_downsample_y: float
    read_width_px: int
    read_height_px: int
    patch_size_px: int
    stride_px: int
    effective_mpp: float
    mpp_source: str
    edge_mode: EdgeModeName
    min_tissue_fraction: float
    patch_count: int

    @classmethod
    def from_proto(cls, msg: pb.GridGeometry) -> GridGeometry:
        return cls(
            n_rows=msg.n_rows,
            n_cols=msg.n_cols,
            origin_x_l0=msg.origin_x_l0,
            origin_y_l0=msg.origin_y_l0,
            stride_x_l0=msg.stride_x_l0,
            stride_y_l0=msg.stride_y_l0,
            patch_width_l0=msg.patch_width_l0,
            patch_height_l0=msg.patch_height_l0,
            level=msg.level,
            level_downsample_x=msg.level_downsample_x,
            level_downsample_y=msg.level_downsample_y,
            read_width_px=msg.read_width_px,
            read_height_px=msg.read_height_px,
            patch_size_px=msg.patch_size_px,
            stride_px=msg.stride_px,
            effective_mpp=msg.effective_mpp,
            mpp_source=msg.mpp_source,
            edge_mode=_EDGE_NAMES.get(msg.edge_mode, "unspecified"),
            min_tissue_fraction=float(msg.min_tissue_fraction),
            patch_count=msg.patch_count,
        )


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """The served model: classes, provenance flag, precision, device and engine
    (``"torchscript"``, ``"onnxruntime"`` or ``"openvino"``; empty from older servers).

    ``untrained_parts`` names the parts left at the seeded random initialisation, as the
    manifest records them (``"patch"``: the patch classifier, ``"mil"``: the MIL slide
    head; labels in :data:`histohelper.model_parts.PART_LABELS`); empty when all are
    trained or an older server does not say.

    ``name`` and ``version`` are the server's repository names of the version that
    served (``serve --model-repository``; the manifest's with ``serve --model``);
    ``artifact_sha256`` is the SHA-256 of its artifact file (empty from older servers).
    """

    name: str
    version: str
    patch_classes: tuple[str, ...]
    slide_classes: tuple[str, ...]
    untrained: bool
    precision: str
    device: str
    patch_size_px: int
    target_mpp: float
    embedding_dim: int
    engine: str = ""
    untrained_parts: tuple[str, ...] = ()
    artifact_sha256: str = ""

    @classmethod
    def from_proto(cls, msg: pb.ModelSummary) -> ModelSummary:
        return cls(
            name=msg.name,
            version=msg.version,
            patch_classes=tuple(msg.patch_classes),
            slide_classes=tuple(msg.slide_classes),
            untrained=msg.untrained,
            precision=msg.precision,
            device=msg.device,
            patch_size_px=msg.patch_size_px,
            target_mpp=msg.target_mpp,
            embedding_dim=msg.embedding_dim,
            engine=msg.engine,
            untrained_parts=tuple(msg.untrained_parts),
            artifact_sha256=msg.artifact_sha256,
        )


@dataclass(frozen=True, slots=True)
class InkFigure:
    """Marker ink of one colour: ``color`` ("green_blue", "black" or "red"),
    ``slide_fraction`` (share of the slide's area, in [0, 1]) and ``inked_patch_count``
    (kept patches more than 25 % covered by it)."""

    color: str
    slide_fraction: float
    inked_patch_count: int


@dataclass(frozen=True, slots=True)
class QualityControl:
    """QC figures: tissue fraction of the slide area in [0, 1], patch counts, warnings;
    ``roi_excluded_patch_count``: patches with enough tissue that the request's region of
    interest left out (0 without one); ``ink``: marker ink per colour
    (:class:`InkFigure`); ``faint_tissue``: the tissue was found only by the server's
    faint-tissue threshold (low contrast against the glass: check the mask)."""

    tissue_fraction: float
    patch_count: int
    failed_patch_count: int
    warnings: tuple[str, ...]
    roi_excluded_patch_count: int = 0
    ink: tuple[InkFigure, ...] = ()
    faint_tissue: bool = False

    @classmethod
    def from_proto(cls, msg: pb.QualityControl) -> QualityControl:
        return cls(
            tissue_fraction=msg.tissue_fraction,
            patch_count=msg.patch_count,
            failed_patch_count=msg.failed_patch_count,
            warnings=tuple(msg.warnings),
            roi_excluded_patch_count=msg.roi_excluded_patch_count,
            ink=tuple(InkFigure(f.color, f.slide_fraction, f.inked_patch_count) for f in msg.ink),
            faint_tissue=msg.faint_tissue,
        )


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """A small RGB image of the whole slide.

    Attributes:
        png: the PNG-encoded RGB image as sent by the server.
        width_px, height_px: its size in thumbnail pixels.
        scale_x, scale_y: level-0 pixels per thumbnail pixel, per axis (not rounded).
    """

    png: bytes = field(repr=False)
    width_px: int
    height_px: int
    scale_x: float
    scale_y: float

    @classmethod
    def from_proto(cls, msg: pb.Thumbnail) -> Thumbnail:
        return cls(msg.png, msg.width_px, msg.height_px, msg.scale_x, msg.scale_y)

    def to_rgb(self) -> npt.NDArray[np.uint8]:
        """Decode the PNG (OpenCV, imported lazily).

        Returns:
            uint8 array of shape ``(height_px, width_px, 3)``, RGB.
        """
        from histohelper.client.render import decode_png_rgb

        return decode_png_rgb(self.png)


@dataclass(frozen=True, slots=True)
class SlideUncertainty:
    """Monte-Carlo dropout summary of the slide prediction (Gal & Ghahramani, 2016).

    Attributes:
        mean: per class, the mean slide probability over the passes (class order of
            :attr:`SlidePrediction.class_names`).
        std: per class, the standard deviation over the passes (ddof 0).
        entropy_nats: predictive entropy of ``mean`` in nats (0 to ln K).
        passes: number of dropout passes.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    entropy_nats: float
    passes: int


@dataclass(frozen=True, slots=True)
class SlidePrediction:
    """The slide-level prediction; ``probabilities[i]`` belongs to ``class_names[i]``.

    ``logits``, ``probabilities`` and ``predicted_class`` are the deterministic pass;
    ``uncertainty`` is the Monte-Carlo dropout summary when it was asked for, else None.
    """

    class_names: tuple[str, ...]
    logits: tuple[float, ...]
    probabilities: tuple[float, ...]
    predicted_class: str
    uncertainty: SlideUncertainty | None = None

    @classmethod
    def from_proto(cls, msg: pb.SlidePrediction) -> SlidePrediction:
        unc = None
        if msg.mc_dropout_passes:
            k = len(msg.class_names)
            if len(msg.mc_mean_probabilities) != k or len(msg.mc_std_probabilities) != k:
                raise InternalError("SlidePrediction's MC dropout fields do not match its classes")
            unc = SlideUncertainty(
                mean=tuple(float(v) for v in msg.mc_mean_probabilities),
                std=tuple(float(v) for v in msg.mc_std_probabilities),
                entropy_nats=float(msg.predictive_entropy_nats),
                passes=int(msg.mc_dropout_passes),
            )
        return cls(
            class_names=tuple(msg.class_names),
            logits=tuple(float(v) for v in msg.logits),
            probabilities=tuple(float(v) for v in msg.probabilities),
            predicted_class=msg.predicted_class,
            uncertainty=unc,
        )

    def uncertainty_text(self) -> str:
        """``"MC dropout (8 passes): p=0.71±0.05, entropy 0.60 nats"`` for the predicted
        class, or ``""`` without uncertainty."""
        u = self.uncertainty
        if u is None or self.predicted_class not in self.class_names:
            return ""
        i = self.class_names.index(self.predicted_class)
        return (
            f"MC dropout ({u.passes} passes): p={u.mean[i]:.3f}±{u.std[i]:.3f}, "
            f"entropy {u.entropy_nats:.3f} nats"
        )

    @property
    def probability(self) -> float:
        """Probability of :attr:`predicted_class` (NaN when it is not among the classes)."""
        try:
            return self.probabilities[self.class_names.index(self.predicted_class)]
        except ValueError:
            return float("nan")

    def as_dict(self) -> dict[str, float]:
        """``{class name: probability}``."""
        return dict(zip(self.class_names, self.probabilities, strict=True))


@dataclass(frozen=True, slots=True)
class Timings:
    """Server-side timings in seconds, and throughput in patches per second."""

    tiling_s: float
    first_result_s: float
    inference_s: float
    aggregate_s: float
    total_s: float
    patches_per_s: float

    @classmethod
    def from_proto(cls, msg: pb.Timings) -> Timings:
        return cls(
            msg.tiling_s,
            msg.first_result_s,
            msg.inference_s,
            msg.aggregate_s,
            msg.total_s,
            msg.patches_per_s,
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Answer of ``GetModelInfo``: the model summary, its full manifest, server defaults,
    and every version of the server's repository (``models``, items of
    :class:`histohelper.client.models.RepositoryModel`)."""

    model: ModelSummary
    manifest_json: str = field(repr=False)
    default_batch_size: int
    max_concurrent_analyses: int
    models: tuple[Any, ...] = ()

    @classmethod
    def from_proto(cls, msg: pb.GetModelInfoResponse) -> ModelInfo:
        from histohelper.client.models import RepositoryModel  # imports this module

        return cls(
            model=ModelSummary.from_proto(msg.model),
            manifest_json=msg.manifest_json,
            default_batch_size=msg.default_batch_size,
            max_concurrent_analyses=msg.max_concurrent_analyses,
            models=tuple(RepositoryModel.from_proto(m) for m in msg.models),
        )

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest parsed from JSON (an empty dict when the server sent none)."""
        return json.loads(self.manifest_json) if self.manifest_json else {}


# --- stream events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DicomSource:
    """The DICOM identity of a slide read from DICOM (a DICOMweb series or local DICOM
    WSI files), for result objects that reference it
    (:mod:`histohelper.client.dicom_results`).

    Attributes:
        study_instance_uid, series_instance_uid, frame_of_reference_uid: DICOM UIDs.
        source_image_json: DICOM JSON (PS3.18 F.2) of the level-0 (highest resolution)
            instance, without bulk data and per-frame functional groups.
        dicomweb_server: the configured DICOMweb server it was read from; ``""`` for files.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    source_image_json: str = field(repr=False)
    dicomweb_server: str = ""

    @classmethod
    def from_proto(cls, msg: pb.DicomSource) -> DicomSource:
        return cls(
            study_instance_uid=msg.study_instance_uid,
            series_instance_uid=msg.series_instance_uid,
            frame_of_reference_uid=msg.frame_of_reference_uid,
            source_image_json=msg.source_image_json,
            dicomweb_server=msg.dicomweb_server,
        )


@dataclass(frozen=True, slots=True)
class Started:
    """First event: slide metadata, effective grid, model, QC, thumbnail, tissue mask;
    ``dicom`` for slides read from DICOM, else ``None``; ``stain``: the stain
    normalisation applied (``None`` from servers that do not say)."""

    request_id: str
    slide: SlideInfo
    grid: GridGeometry
    model: ModelSummary
    qc: QualityControl
    thumbnail: Thumbnail
    tissue_mask_png: bytes = field(repr=False)
    tiling_s: float
    dicom: DicomSource | None = None
    stain: AppliedStain | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Patches done out of the bag's total, and seconds since the analysis began."""

    patches_done: int
    patches_total: int
    elapsed_s: float


@dataclass(frozen=True, slots=True, eq=False)
class PatchBatch:
    """Results of one batch of ``n`` patches; all arrays are parallel along axis 0.

    Attributes:
        patch_index: int32 ``[n]``, index in the bag (row-major grid order).
        row, col: int32 ``[n]``, grid position.
        x_l0, y_l0, width_l0, height_l0: float64 ``[n]``, exact level-0 box of each patch.
        tissue_fraction: float32 ``[n]`` in [0, 1].
        is_edge: bool ``[n]``, patch extends past the slide and was padded with white.
        probabilities: float32 ``[n, num_classes]``, softmax over the model's patch classes.
        embeddings: float32 ``[n, embedding_dim]``, or ``None`` when not requested.
        failed_patch_index: int32 ``[k]``, bag indices whose pixels could not be read.
        cams: float32 ``[n, num_classes, s, s]`` class activation maps (layer4 features
            weighted by the fc weights, no bias), or ``None`` when not requested.
        logits: float32 ``[n, num_classes]`` patch logits, sent with ``cams``.
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
    embeddings: npt.NDArray[np.float32] | None
    failed_patch_index: npt.NDArray[np.int32]
    cams: npt.NDArray[np.float32] | None = None
    logits: npt.NDArray[np.float32] | None = None

    def __len__(self) -> int:
        return int(self.patch_index.shape[0])

    @classmethod
    def from_proto(cls, msg: pb.PatchResults) -> PatchBatch:
        n = len(msg.patch_index)
        cols: dict[str, Sized] = {
            "row": msg.row,
            "col": msg.col,
            "x_l0": msg.x_l0,
            "y_l0": msg.y_l0,
            "width_l0": msg.width_l0,
            "height_l0": msg.height_l0,
            "tissue_fraction": msg.tissue_fraction,
            "is_edge": msg.is_edge,
        }
        for name, values in cols.items():
            if len(values) != n:
                raise InternalError(f"PatchResults.{name} has {len(values)} values, expected {n}")
        num_classes = msg.num_classes
        if len(msg.probabilities) != n * num_classes:
            raise InternalError(
                f"PatchResults.probabilities has {len(msg.probabilities)} values, "
                f"expected {n} x {num_classes}"
            )
        embeddings = None
        if len(msg.embeddings):
            dim = msg.embedding_dim
            if dim <= 0 or len(msg.embeddings) != n * dim:
                raise InternalError("PatchResults.embeddings does not match n x embedding_dim")
            embeddings = np.asarray(msg.embeddings, dtype=np.float32).reshape(n, dim)
        cams = logits = None
        if len(msg.cams):
            s = msg.cam_size
            if s <= 0 or len(msg.cams) != n * num_classes * s * s:
                raise InternalError("PatchResults.cams does not match n x classes x size^2")
            if len(msg.logits) != n * num_classes:
                raise InternalError("PatchResults.logits does not match n x num_classes")
            cams = np.asarray(msg.cams, dtype=np.float32).reshape(n, num_classes, s, s)
            logits = np.asarray(msg.logits, dtype=np.float32).reshape(n, num_classes)
        return cls(
            patch_index=np.asarray(msg.patch_index, dtype=np.int32),
            row=np.asarray(msg.row, dtype=np.int32),
            col=np.asarray(msg.col, dtype=np.int32),
            x_l0=np.asarray(msg.x_l0, dtype=np.float64),
            y_l0=np.asarray(msg.y_l0, dtype=np.float64),
            width_l0=np.asarray(msg.width_l0, dtype=np.float64),
            height_l0=np.asarray(msg.height_l0, dtype=np.float64),
            tissue_fraction=np.asarray(msg.tissue_fraction, dtype=np.float32),
            is_edge=np.asarray(msg.is_edge, dtype=np.bool_),
            probabilities=np.asarray(msg.probabilities, dtype=np.float32).reshape(n, num_classes),
            embeddings=embeddings,
            failed_patch_index=np.asarray(msg.failed_patch_index, dtype=np.int32),
            cams=cams,
            logits=logits,
        )


@dataclass(frozen=True, slots=True, eq=False)
class Attention:
    """MIL attention weights (float32 ``[n]``) of bag indices ``patch_index`` (int32 ``[n]``).

    Over the whole bag the weights sum to 1.
    """

    patch_index: npt.NDArray[np.int32]
    attention: npt.NDArray[np.float32]

    @classmethod
    def from_proto(cls, msg: pb.AttentionChunk) -> Attention:
        if len(msg.patch_index) != len(msg.attention):
            raise InternalError("AttentionChunk.patch_index and attention differ in length")
        return cls(
            patch_index=np.asarray(msg.patch_index, dtype=np.int32),
            attention=np.asarray(msg.attention, dtype=np.float32),
        )


@dataclass(frozen=True, slots=True)
class Completed:
    """Last event. ``prediction`` is ``None`` unless ``outcome == "completed"``;
    ``cached``: the server replayed the stream from its result cache (the timings then
    describe this call: lookup as ``tiling_s``, no inference). ``model_name`` and
    ``model_version``: the repository version that produced the results (empty from
    older servers)."""

    request_id: str
    outcome: Outcome
    prediction: SlidePrediction | None
    qc: QualityControl
    timings: Timings
    cached: bool = False
    model_name: str = ""
    model_version: str = ""

    @classmethod
    def from_proto(cls, msg: pb.AnalysisCompleted) -> Completed:
        outcome = _OUTCOMES.get(msg.outcome)
        if outcome is None:
            raise InternalError(f"unknown analysis outcome {msg.outcome}")
        prediction = (
            SlidePrediction.from_proto(msg.prediction)
            if outcome == "completed" and msg.HasField("prediction")
            else None
        )
        return cls(
            request_id=msg.request_id,
            outcome=outcome,
            prediction=prediction,
            qc=QualityControl.from_proto(msg.qc),
            timings=Timings.from_proto(msg.timings),
            cached=msg.cached,
            model_name=msg.model.name,
            model_version=msg.model.version,
        )


Event = Started | Progress | PatchBatch | Attention | Completed


def event_from_proto(msg: pb.AnalyzeSlideResponse) -> Event:
    """Convert one stream message to its typed event.

    Raises:
        InternalError: the message carries no event or malformed parallel arrays.
    """
    kind = msg.WhichOneof("event")
    if kind == "started":
        s = msg.started
        return Started(
            request_id=s.request_id,
            slide=SlideInfo.from_proto(s.slide),
            grid=GridGeometry.from_proto(s.grid),
            model=ModelSummary.from_proto(s.model),
            qc=QualityControl.from_proto(s.qc),
            thumbnail=Thumbnail.from_proto(s.thumbnail),
            tissue_mask_png=s.tissue_mask_png,
            tiling_s=s.tiling_s,
            dicom=DicomSource.from_proto(s.dicom) if s.HasField("dicom") else None,
            stain=AppliedStain.from_proto(s.stain) if s.HasField("stain") else None,
        )
    if kind == "progress":
        p = msg.progress
        return Progress(p.patches_done, p.patches_total, p.elapsed_s)
    if kind == "patches":
        return PatchBatch.from_proto(msg.patches)
    if kind == "attention":
        return Attention.from_proto(msg.attention)
    if kind == "completed":
        return Completed.from_proto(msg.completed)
    raise InternalError("the server sent an AnalyzeSlideResponse without an event")
