"""Analysis options as an immutable Python value, converted to the wire type at the edge."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from pathlib import PurePath
from typing import Literal

import numpy as np

from histohelper.client.dicomweb import DicomWebSlide, slide_ref
from histohelper.client.roi import RegionOfInterest
from histohelper.client.stain import StainMethodName, StainReferenceName, stain_request
from histohelper.client.uploads import UploadedSlide
from histohelper.errors import InvalidOptionsError
from histohelper.v1 import slide_analysis_pb2 as pb

EdgeModeName = Literal["pad", "drop"]

_INT32_MAX = 2**31 - 1
_EDGE_MODES = {"pad": pb.EDGE_MODE_PAD, "drop": pb.EDGE_MODE_DROP}


@dataclass(frozen=True, slots=True)
class AnalysisOptions:
    """Tiling and output options of one ``AnalyzeSlide`` call.

    ``None`` means "the server's default"; the server echoes the effective values in
    :class:`~histohelper.client.events.Started` (``grid``). At most one of
    ``target_mpp``, ``target_magnification`` and ``target_level`` may be set.

    Attributes:
        target_mpp: resolution of the patches in micrometres per pixel (e.g. 0.5).
        target_magnification: objective magnification of the patches (e.g. 20).
        target_level: a pyramid level index, read at face value.
        patch_size_px: patch side in pixels at the target resolution.
        stride_px: step between patches in pixels at the target resolution.
        min_tissue_fraction: keep a patch when at least this fraction is tissue, in [0, 1].
        edge_mode: ``"pad"`` (pad past the slide edge with white) or ``"drop"``.
        batch_size: patches per model batch on the server.
        return_embeddings: ask for each patch's embedding (float32, ``[n, embedding_dim]``).
        return_attention: ask for the MIL attention weight of each patch. Defaults to
            ``True`` here (the proto default is false) so that results carry an
            attention map.
        mpp_override: level-0 micrometres per pixel to use instead of the slide's metadata.
        return_cams: ask for each patch's class activation maps (for
            :meth:`SlideResult.cam_heatmap`, sub-patch resolution).
        mc_dropout_passes: Monte-Carlo dropout passes of the slide head (0: off; the
            server allows at most 256 and refuses any for a model without dropout);
            the result's :attr:`SlidePrediction.uncertainty` carries their summary.
        roi: a :class:`~histohelper.client.roi.RegionOfInterest` (QuPath GeoJSON or a
            mask, level-0 px): only patches whose tissue fraction inside it passes
            ``min_tissue_fraction`` are analysed; ``None``: the whole slide.
        stain_normalization: ``"none"``, ``"macenko"`` or ``"reinhard"``, fitted once
            per slide on its tissue and applied to every patch; ``None``: what the
            model's manifest declares it was trained with, else none. The result's
            :attr:`SlideResult.stain` says what was applied.
        stain_reference: the target: ``"published"`` (the default H&E reference),
            ``"model"`` (the export's reference image) or ``"server"`` (the operator's);
            ``None``: the server's when configured, else the model's, else published.

    Raises:
        InvalidOptionsError: on construction, for out-of-range or conflicting values.
    """

    target_mpp: float | None = None
    target_magnification: float | None = None
    target_level: int | None = None
    patch_size_px: int | None = None
    stride_px: int | None = None
    min_tissue_fraction: float | None = None
    edge_mode: EdgeModeName | None = None
    batch_size: int | None = None
    return_embeddings: bool = False
    return_attention: bool = True
    mpp_override: float | None = None
    return_cams: bool = False
    mc_dropout_passes: int = 0
    roi: RegionOfInterest | None = None
    stain_normalization: StainMethodName | None = None
    stain_reference: StainReferenceName | None = None

    def __post_init__(self) -> None:
        for name in ("target_mpp", "target_magnification", "mpp_override", "min_tissue_fraction"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
                raise InvalidOptionsError(f"{name} must be a number, got {value!r}")
        chosen = [
            name
            for name in ("target_mpp", "target_magnification", "target_level")
            if getattr(self, name) is not None
        ]
        if len(chosen) > 1:
            raise InvalidOptionsError(f"set at most one target resolution, got {chosen}")
        for name in ("target_mpp", "target_magnification", "mpp_override"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InvalidOptionsError(f"{name} must be a positive number, got {value!r}")
        for name in ("target_level", "patch_size_px", "stride_px", "batch_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise InvalidOptionsError(f"{name} must be an integer, got {value!r}")
            low = 0 if name == "target_level" else 1
            if not low <= value <= _INT32_MAX:
                raise InvalidOptionsError(
                    f"{name} must be an integer in [{low}, {_INT32_MAX}], got {value}"
                )

        mc = self.mc_dropout_passes
        if isinstance(mc, bool) or not isinstance(mc, int | np.integer) or not 0 <= mc < 2**32:
            raise InvalidOptionsError(f"mc_dropout_passes must be an integer >= 0, got {mc!r}")
        frac = self.min_tissue_fraction
        if frac is not None and not 0.0 <= frac <= 1.0:
            raise InvalidOptionsError(f"min_tissue_fraction must be in [0, 1], got {frac}")
        if self.edge_mode is not None and self.edge_mode not in _EDGE_MODES:
            raise InvalidOptionsError(
                f"edge_mode must be one of {sorted(_EDGE_MODES)}, got {self.edge_mode!r}"
            )
        if self.roi is not None and not isinstance(self.roi, RegionOfInterest):
            raise InvalidOptionsError("roi must be a histohelper.client.roi.RegionOfInterest")
        try:
            stain_request(self.stain_normalization, self.stain_reference)
        except ValueError as exc:
            raise InvalidOptionsError(str(exc)) from None

    def to_proto(self) -> pb.AnalysisOptions:
        """Return the wire message; unset values stay unset (server defaults)."""
        msg = pb.AnalysisOptions(
            patch_size_px=self.patch_size_px or 0,
            stride_px=self.stride_px or 0,
            batch_size=self.batch_size or 0,
            return_embeddings=self.return_embeddings,
            return_attention=self.return_attention,
            return_cams=self.return_cams,
            mc_dropout_passes=int(self.mc_dropout_passes),
        )
        if self.target_mpp is not None:
            msg.target_resolution.mpp = self.target_mpp
        elif self.target_magnification is not None:
            msg.target_resolution.magnification = self.target_magnification
        elif self.target_level is not None:
            msg.target_resolution.level = self.target_level
        if self.min_tissue_fraction is not None:
            msg.min_tissue_fraction = self.min_tissue_fraction
        if self.edge_mode is not None:
            msg.edge_mode = _EDGE_MODES[self.edge_mode]
        if self.mpp_override is not None:
            msg.mpp_override = self.mpp_override
        if self.roi is not None:
            msg.roi.CopyFrom(self.roi.to_proto())
        stain = stain_request(self.stain_normalization, self.stain_reference)
        if stain is not None:
            msg.stain_normalization.CopyFrom(stain)
        return msg


def analyze_request(
    slide_path: str | PurePath | UploadedSlide | DicomWebSlide,
    options: AnalysisOptions | None,
    request_id: str | None,
) -> pb.AnalyzeSlideRequest:
    """Build the wire request.

    Args:
        slide_path: slide path relative to the server's slide root, "/"-separated
            (a ``PurePath`` is converted with ``as_posix()``), an
            :class:`~histohelper.client.uploads.UploadedSlide` (sent as ``upload_id``),
            or a DICOMweb series: a :class:`~histohelper.client.dicomweb.DicomWebSlide`
            or a ``dicomweb://NAME/STUDY_UID/SERIES_UID`` string (sent as ``dicomweb``).
        options: analysis options; ``None`` takes :class:`AnalysisOptions` defaults.
        request_id: optional id echoed by the server (<= 64 chars of ``[A-Za-z0-9._-]``).

    Raises:
        SlidePathError: a malformed ``dicomweb://`` URI.
    """
    request = pb.AnalyzeSlideRequest(
        options=(options or AnalysisOptions()).to_proto(), request_id=request_id or ""
    )
    field, value = slide_ref(slide_path)
    if isinstance(value, pb.DicomWebSeries):
        request.dicomweb.CopyFrom(value)
    else:
        setattr(request, field, value)
    return request
