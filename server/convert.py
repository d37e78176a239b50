"""Proto <-> domain conversion, in one place: wire messages in, domain objects out, and
back. Pure functions (no I/O, no gRPC calls); the servicer calls them at the edge.

Frames: every ``*_l0`` value is level-0 pixels of the slide; ``effective_mpp`` is
um/px; grid indices are bag indices into the tiling plan's grid arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.errors import InternalError, InvalidOptionsError
from histohelper.server.explain import Explanation, Selection, encode_jpeg
from histohelper.server.pipeline import (
    AttentionDone,
    Completed,
    Event,
    PatchesDone,
    Progress,
    Started,
)
from histohelper.server.runtime import ModelRuntime
from histohelper.server.runtime.manifest import Manifest
from histohelper.server.runtime.types import check_mc_request
from histohelper.server.tiling import Resolution, TilingOptions, TilingPlan
from histohelper.server.tiling.options import check_request_geometry
from histohelper.server.tiling.roi import RegionLimits, RegionOfInterest, parse_region
from histohelper.server.tiling.slide import SlideMetadata
from histohelper.server.tiling.stain import (
    NO_STAIN,
    PUBLISHED,
    AppliedStain,
    StainChoice,
    StainFitError,
    StainStats,
    get_stain_method,
    reference_file_targets,
)
from histohelper.v1 import slide_analysis_pb2 as pb

if TYPE_CHECKING:
    from histohelper.server.classify import PatchPrediction

#: Largest batch size a request may ask for.
MAX_BATCH_SIZE = 512
_EDGE_MODES = {pb.EDGE_MODE_UNSPECIFIED: "pad", pb.EDGE_MODE_PAD: "pad", pb.EDGE_MODE_DROP: "drop"}
_EDGE_TO_PB = {"pad": pb.EDGE_MODE_PAD, "drop": pb.EDGE_MODE_DROP}
_RANK_BY = {
    pb.RANK_BY_UNSPECIFIED: "attention",
    pb.RANK_BY_ATTENTION: "attention",
    pb.RANK_BY_PROBABILITY: "probability",
}
#: Patches explained when an ExplainPatchesRequest names no selection.
DEFAULT_TOP_K = 8
_STAIN_METHODS = {
    pb.STAIN_METHOD_NONE: "none",
    pb.STAIN_METHOD_MACENKO: "macenko",
    pb.STAIN_METHOD_REINHARD: "reinhard",
}
_STAIN_METHOD_TO_PB = {v: k for k, v in _STAIN_METHODS.items()}
_STAIN_REFERENCES = {
    pb.STAIN_REFERENCE_PUBLISHED: "published",
    pb.STAIN_REFERENCE_MODEL: "model",
    pb.STAIN_REFERENCE_SERVER: "server",
}
_STAIN_REFERENCE_TO_PB = {v: k for k, v in _STAIN_REFERENCES.items()}


# --- wire -> domain ---------------------------------------------------------------------


def tiling_options(
    opts: pb.AnalysisOptions,
    runtime: ModelRuntime,
    default_batch_size: int,
    mask_min_um_per_px: float = 0.0,
    roi_limits: RegionLimits | None = None,
    fluorescence: str = "refuse",
) -> tuple[TilingOptions, int]:
    """Tiling options (every default filled from the model's manifest, the mask's
    resolution bound from the server's ``--mask-min-um-per-px``, the region of interest
    parsed within ``roi_limits``) and batch size.

    Raises:
        InvalidOptionsError: an option out of range or unknown (a patch side or stride
            below :func:`~.tiling.options.check_request_geometry`'s bounds included), or
            a region of interest refused (:func:`region_of_interest`).
    """
    manifest = runtime.manifest
    which = opts.target_resolution.WhichOneof("value")
    if which is None:
        target = Resolution(manifest.target_mpp, "mpp")
    else:
        target = Resolution(float(getattr(opts.target_resolution, which)), which)
    batch_size = opts.batch_size or default_batch_size
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise InvalidOptionsError(f"batch_size must be in [1, {MAX_BATCH_SIZE}]")
    if opts.edge_mode not in _EDGE_MODES:
        raise InvalidOptionsError("unknown edge_mode")
    if opts.patch_size_px or opts.stride_px:  # what the request asked for
        check_request_geometry(opts.patch_size_px or manifest.patch_size_px, opts.stride_px or None)
    kwargs: dict[str, object] = {
        "patch_size_px": opts.patch_size_px or manifest.patch_size_px,
        "target": target,
        "stride_px": opts.stride_px or None,
        "edge_mode": _EDGE_MODES[opts.edge_mode],
        "mask_min_um_per_px": mask_min_um_per_px,
        "roi": region_of_interest(opts.roi, roi_limits),
        "fluorescence": fluorescence,  # the server's --fluorescence (TilingOptions)
    }
    if opts.HasField("min_tissue_fraction"):
        kwargs["min_tissue_fraction"] = float(opts.min_tissue_fraction)
    if opts.HasField("mpp_override"):
        kwargs["mpp_override"] = float(opts.mpp_override)
    try:
        return TilingOptions(**kwargs), batch_size  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise InvalidOptionsError(f"invalid analysis options: {exc}") from None


def server_stain_targets(reference_image: Path | None) -> dict[str, StainStats]:
    """The operator's stain targets (``serve --stain-reference``), one per method,
    fitted once per process; empty when no reference image is configured.

    Raises:
        InvalidOptionsError: the image cannot be read or has too little stained tissue
            (the server checks it at start-up, so calls do not meet this).
    """
    if reference_image is None:
        return {}
    try:
        return reference_file_targets(str(reference_image))
    except StainFitError as exc:
        raise InvalidOptionsError(
            f"the server's stain reference image is unusable: {exc}"
        ) from None


def _model_target(manifest: Manifest, method: str) -> StainStats | None:
    declared = manifest.stain_normalization
    if declared is None or method not in declared.targets:
        return None
    return StainStats.from_dict(declared.targets[method].model_dump())


def stain_choice(
    msg: pb.StainNormalization, manifest: Manifest, server_targets: dict[str, StainStats]
) -> StainChoice:
    """The stain normalisation one call applies (rules in the proto's comments).

    Method unspecified: the manifest's declaration with its reference (source
    ``"model"``), else none (``"default"``); a reference named without a method picks
    that reference for the declared method. Method given (source ``"request"``):
    reference published, model (the export's reference image, from the manifest) or
    server (``serve --stain-reference``); unspecified: the server's when configured,
    else the model's when the manifest has one for this method, else published.

    Args:
        msg: the request's ``stain_normalization``.
        manifest: the served model's manifest.
        server_targets: :func:`server_stain_targets` (method -> target).

    Raises:
        InvalidOptionsError: an unknown or unsupported method (Vahadane), a reference
            that does not exist here (MODEL without a manifest target, SERVER without
            ``--stain-reference``), or a reference without a method to apply it to
            (none asked for, or none declared).
    """
    declared = manifest.stain_normalization
    if msg.method == pb.STAIN_METHOD_UNSPECIFIED:
        if declared is None or declared.method == "none":
            if msg.reference != pb.STAIN_REFERENCE_UNSPECIFIED:
                raise InvalidOptionsError(
                    "a stain reference needs a stain method: the model declares none"
                )
            return NO_STAIN
        method: str = declared.method
        source = "model"
        reference = (
            declared.reference
            if msg.reference == pb.STAIN_REFERENCE_UNSPECIFIED
            else _STAIN_REFERENCES.get(msg.reference, "")
        )
    elif msg.method == pb.STAIN_METHOD_VAHADANE:
        raise InvalidOptionsError(
            "Vahadane stain normalisation is not offered by this server (use macenko or reinhard)"
        )
    elif msg.method not in _STAIN_METHODS:
        raise InvalidOptionsError("unknown stain_normalization.method")
    else:
        method, source = _STAIN_METHODS[msg.method], "request"
        if method == "none":
            if msg.reference != pb.STAIN_REFERENCE_UNSPECIFIED:
                raise InvalidOptionsError(
                    "stain_normalization.method none applies no stain reference: leave the "
                    "reference unset, or name a method (macenko, reinhard)"
                )
            return StainChoice("none", "", "request")
        if msg.reference == pb.STAIN_REFERENCE_UNSPECIFIED:
            if method in server_targets:
                reference = "server"
            elif _model_target(manifest, method) is not None:
                reference = "model"
            else:
                reference = "published"
        else:
            reference = _STAIN_REFERENCES.get(msg.reference, "")
    get_stain_method(method)  # registered
    target = {
        "published": PUBLISHED.get(method),
        "model": _model_target(manifest, method),
        "server": server_targets.get(method),
    }.get(reference)
    if target is None:
        raise InvalidOptionsError(
            {
                "model": f"STAIN_REFERENCE_MODEL: the model's manifest records no {method} "
                "stain reference (export --stain-reference)",
                "server": "STAIN_REFERENCE_SERVER: this server has no stain reference image "
                "(serve --stain-reference)",
            }.get(reference, "unknown stain_normalization.reference")
        )
    return StainChoice(method, reference, source, target)


def region_of_interest(
    msg: pb.RegionOfInterest, limits: RegionLimits | None = None
) -> RegionOfInterest | None:
    """The request's region of interest (level-0 px), or None when it has none.

    Raises:
        InvalidOptionsError: malformed GeoJSON, invalid polygons, too many vertices or
            bytes for ``limits``, an undecodable mask (:func:`.tiling.roi.parse_region`).
    """
    return parse_region(
        msg.include_geojson, msg.exclude_geojson, msg.mask_png, msg.mask_downsample, limits
    )


def mc_dropout_passes(opts: pb.AnalysisOptions, runtime: ModelRuntime) -> int:
    """The request's Monte-Carlo dropout passes (0: off), checked against the model.

    Raises:
        InvalidOptionsError: more than ``MAX_MC_DROPOUT_PASSES`` (256), or passes for a
            model whose slide head has no dropout.
    """
    return check_mc_request(runtime.manifest, int(opts.mc_dropout_passes))


def explain_selection(
    request: pb.ExplainPatchesRequest, patch_classes: Sequence[str]
) -> tuple[Selection, int, int]:
    """Which patches, which class (index into ``patch_classes``) and the JPEG quality.

    Raises:
        InvalidOptionsError: unknown class or rank, quality outside [1, 100].
    """
    classes = list(patch_classes)
    class_name = request.class_name or classes[-1]
    if class_name not in classes:
        raise InvalidOptionsError(f"unknown patch class; the model's classes are {classes}")
    quality = request.jpeg_quality or 90
    if not 1 <= quality <= 100:
        raise InvalidOptionsError("jpeg_quality must be in [1, 100]")
    which = request.WhichOneof("selection")
    if which == "patches":
        selection = Selection("indices", indices=tuple(request.patches.patch_index))
    else:
        if request.top_k.rank_by not in _RANK_BY:
            raise InvalidOptionsError("unknown top_k.rank_by")
        k = request.top_k.k if which == "top_k" else DEFAULT_TOP_K
        selection = Selection("top_k", k=k, rank_by=_RANK_BY[request.top_k.rank_by])  # type: ignore[arg-type]
    return selection, classes.index(class_name), quality


# --- domain -> wire ---------------------------------------------------------------------


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """PNG bytes of an RGB [h, w, 3] or grey [h, w] uint8 image (OpenCV)."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise InternalError("could not encode an image as PNG")
    return buf.tobytes()


def model_summary(runtime: ModelRuntime) -> pb.ModelSummary:
    """The served model as the API describes it."""
    m = runtime.manifest
    return pb.ModelSummary(
        name=m.model_name,
        version=m.model_version,
        patch_classes=list(m.patch_classes),
        slide_classes=list(m.slide_classes),
        untrained=m.untrained,
        untrained_parts=list(m.untrained_parts),
        precision=runtime.precision,
        device=runtime.device,
        patch_size_px=m.patch_size_px,
        target_mpp=m.target_mpp,
        embedding_dim=m.embedding_dim,
        engine=runtime.engine,
    )


def quality_control(plan: TilingPlan, failed: int = 0) -> pb.QualityControl:
    """Tissue fraction, patch counts and QC warnings of a plan."""
    return pb.QualityControl(
        tissue_fraction=float(plan.mask.tissue_fraction),
        patch_count=len(plan.grid),
        failed_patch_count=failed,
        warnings=list(plan.warnings),
        roi_excluded_patch_count=plan.roi_excluded_patch_count,
        ink=[
            pb.InkFigure(
                color=f.color,
                slide_fraction=f.slide_fraction,
                inked_patch_count=f.inked_patch_count,
            )
            for f in plan.ink
        ],
        faint_tissue=plan.faint_tissue,
    )


def _slide_info(plan: TilingPlan) -> pb.SlideInfo:
    md = plan.metadata
    levels = [
        pb.PyramidLevel(width_px=w, height_px=h, downsample_x=dx, downsample_y=dy)
        for (w, h), (dx, dy) in zip(md.level_dimensions, md.level_downsamples, strict=True)
    ]
    slide = pb.SlideInfo(
        vendor=md.vendor or "", width_l0=md.width_l0, height_l0=md.height_l0, levels=levels
    )
    if md.mpp_x is not None:
        slide.mpp_x = md.mpp_x
    if md.mpp_y is not None:
        slide.mpp_y = md.mpp_y
    if md.objective_power is not None:
        slide.objective_power = md.objective_power
    return slide


def _grid_geometry(plan: TilingPlan, tiling: TilingOptions) -> pb.GridGeometry:
    grid = plan.grid
    origin_x = float(grid.x_l0[0] - grid.col[0] * grid.stride_x_l0) if len(grid) else 0.0
    origin_y = float(grid.y_l0[0] - grid.row[0] * grid.stride_y_l0) if len(grid) else 0.0
    return pb.GridGeometry(
        n_rows=grid.n_rows,
        n_cols=grid.n_cols,
        origin_x_l0=origin_x,
        origin_y_l0=origin_y,
        stride_x_l0=grid.stride_x_l0,
        stride_y_l0=grid.stride_y_l0,
        patch_width_l0=grid.footprint_x_l0,
        patch_height_l0=grid.footprint_y_l0,
        level=grid.level,
        level_downsample_x=grid.level_downsample_x,
        level_downsample_y=grid.level_downsample_y,
        read_width_px=grid.read_width_px,
        read_height_px=grid.read_height_px,
        patch_size_px=grid.patch_size_px,
        stride_px=tiling.stride_px or tiling.patch_size_px,
        effective_mpp=plan.effective_mpp,
        mpp_source=plan.mpp_source,
        edge_mode=_EDGE_TO_PB[tiling.edge_mode],
        min_tissue_fraction=tiling.min_tissue_fraction,
        patch_count=len(grid),
    )


def applied_stain(applied: AppliedStain) -> pb.AppliedStainNormalization:
    """What a call's stain normalisation applied, as the API reports it."""
    return pb.AppliedStainNormalization(
        method=_STAIN_METHOD_TO_PB.get(applied.method, pb.STAIN_METHOD_NONE),
        reference=_STAIN_REFERENCE_TO_PB.get(applied.reference, pb.STAIN_REFERENCE_UNSPECIFIED),
        source=applied.source,
        fitted_stain_matrix=list(applied.fitted.stain_matrix),
        fitted_max_concentrations=list(applied.fitted.max_concentrations),
        fitted_means=list(applied.fitted.means),
        fitted_stds=list(applied.fitted.stds),
        warning=applied.warning,
    )


def started(ev: Started, tiling: TilingOptions, runtime: ModelRuntime) -> pb.AnalyzeSlideResponse:
    """The AnalysisStarted event: slide, grid, model, QC, thumbnail and tissue mask."""
    plan = ev.plan
    thumb = plan.thumbnail
    thumbnail = pb.Thumbnail(
        png=encode_png(thumb),
        width_px=thumb.shape[1],
        height_px=thumb.shape[0],
        scale_x=plan.thumbnail_scale_x,
        scale_y=plan.thumbnail_scale_y,
    )
    return pb.AnalyzeSlideResponse(
        started=pb.AnalysisStarted(
            request_id=ev.request_id,
            slide=_slide_info(plan),
            grid=_grid_geometry(plan, tiling),
            model=model_summary(runtime),
            qc=quality_control(plan),
            thumbnail=thumbnail,
            tissue_mask_png=encode_png(plan.mask.mask.astype(np.uint8) * 255),
            tiling_s=ev.tiling_s,
            stain=applied_stain(ev.stain),
            dicom=dicom_source(plan.metadata),
        )
    )


def dicom_source(md: SlideMetadata) -> pb.DicomSource | None:
    """AnalysisStarted.dicom for a slide read from a DICOM series, else None."""
    d = md.dicom
    if d is None:
        return None
    return pb.DicomSource(
        study_instance_uid=d.study_instance_uid,
        series_instance_uid=d.series_instance_uid,
        frame_of_reference_uid=d.frame_of_reference_uid,
        source_image_json=d.source_image_json,
        dicomweb_server=d.dicomweb_server,
    )


def patches(ev: PatchesDone, plan: TilingPlan) -> pb.AnalyzeSlideResponse:
    """One batch of patch results, with each patch's exact level-0 box."""
    g, idx = plan.grid, ev.indices
    msg = pb.PatchResults(
        patch_index=idx.tolist(),
        row=g.row[idx].tolist(),
        col=g.col[idx].tolist(),
        x_l0=g.x_l0[idx].tolist(),
        y_l0=g.y_l0[idx].tolist(),
        width_l0=g.width_l0[idx].tolist(),
        height_l0=g.height_l0[idx].tolist(),
        tissue_fraction=g.tissue_fraction[idx].tolist(),
        is_edge=g.is_edge[idx].tolist(),
        num_classes=ev.probabilities.shape[1],
        probabilities=ev.probabilities.ravel().tolist(),
        failed_patch_index=ev.failed.tolist(),
    )
    if ev.cams is not None and ev.logits is not None:
        msg.cam_size = ev.cams.shape[-1]
        msg.cams.extend(ev.cams.ravel().tolist())
        msg.logits.extend(ev.logits.ravel().tolist())
    if ev.embeddings is not None:
        msg.embedding_dim = ev.embeddings.shape[1]
        msg.embeddings.extend(ev.embeddings.ravel().tolist())
    return pb.AnalyzeSlideResponse(patches=msg)


def completed(ev: Completed, slide_classes: Sequence[str]) -> pb.AnalyzeSlideResponse:
    """The AnalysisCompleted event: outcome, QC, timings and the slide prediction."""
    msg = pb.AnalysisCompleted(
        request_id=ev.request_id,
        outcome=pb.ANALYSIS_OUTCOME_COMPLETED
        if ev.outcome == "completed"
        else pb.ANALYSIS_OUTCOME_NO_TISSUE,
        qc=quality_control(ev.plan, ev.failed_count),
        timings=pb.Timings(**{k: float(v) for k, v in ev.timings.items()}),
    )
    if ev.slide is not None:
        classes = list(slide_classes)
        msg.prediction.CopyFrom(
            pb.SlidePrediction(
                class_names=classes,
                logits=ev.slide.logits.tolist(),
                probabilities=ev.slide.probabilities.tolist(),
                predicted_class=classes[int(np.argmax(ev.slide.probabilities))],
            )
        )
        if ev.uncertainty is not None:
            mc = ev.uncertainty
            msg.prediction.mc_dropout_passes = mc.passes
            msg.prediction.mc_mean_probabilities.extend(mc.mean.tolist())
            msg.prediction.mc_std_probabilities.extend(mc.std.tolist())
            msg.prediction.predictive_entropy_nats = mc.entropy_nats
    return pb.AnalyzeSlideResponse(completed=msg)


def analysis_event(
    ev: Event, tiling: TilingOptions, plan: TilingPlan | None, runtime: ModelRuntime
) -> pb.AnalyzeSlideResponse:
    """Any analysis event as its AnalyzeSlideResponse (``plan``: from Started)."""
    if isinstance(ev, Started):
        return started(ev, tiling, runtime)
    assert plan is not None, "Started precedes every other event"
    if isinstance(ev, PatchesDone):
        return patches(ev, plan)
    if isinstance(ev, Progress):
        return pb.AnalyzeSlideResponse(
            progress=pb.AnalysisProgress(
                patches_done=ev.done, patches_total=ev.total, elapsed_s=ev.elapsed_s
            )
        )
    if isinstance(ev, AttentionDone):
        return pb.AnalyzeSlideResponse(
            attention=pb.AttentionChunk(
                patch_index=ev.indices.tolist(), attention=ev.attention.tolist()
            )
        )
    return completed(ev, runtime.manifest.slide_classes)


def explanation(
    ex: Explanation, plan: TilingPlan, classes: Sequence[str], quality: int
) -> pb.ExplainPatchesResponse:
    """One explained patch: its box, JPEG image, probabilities and Grad-CAM map."""
    g, i = plan.grid, ex.index
    msg = pb.PatchExplanation(
        patch_index=i,
        row=int(g.row[i]),
        col=int(g.col[i]),
        x_l0=float(g.x_l0[i]),
        y_l0=float(g.y_l0[i]),
        width_l0=float(g.width_l0[i]),
        height_l0=float(g.height_l0[i]),
        image_jpeg=encode_jpeg(ex.image, quality),
        class_name=classes[ex.class_index],
        probabilities=ex.probabilities.tolist(),
        cam_size=ex.grad_cam.shape[-1],
        grad_cam=ex.grad_cam.ravel().tolist(),
        rank=ex.rank,
        score=ex.score,
        class_probability=float(ex.probabilities[ex.class_index]),
    )
    if ex.attention is not None:
        msg.attention = ex.attention
    return pb.ExplainPatchesResponse(explanation=msg)


def classify_response(
    predictions: Sequence[PatchPrediction], stain: AppliedStain | None = None
) -> pb.ClassifyPatchesResponse:
    """One ClassifyPatchesResponse: per image its logits, probabilities and embedding
    (when computed), or its error message; and the stain normalisation applied."""
    out = []
    for p in predictions:
        msg = pb.PatchPrediction(id=p.id)
        if p.error is not None:
            msg.error = p.error
        else:
            if p.logits is not None:
                msg.logits.extend(p.logits.tolist())
            if p.probabilities is not None:
                msg.probabilities.extend(p.probabilities.tolist())
            if p.embedding is not None:
                msg.embedding.extend(p.embedding.tolist())
        out.append(msg)
    response = pb.ClassifyPatchesResponse(predictions=out)
    if stain is not None:
        response.stain.CopyFrom(applied_stain(stain))
    return response
