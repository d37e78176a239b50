"""The gRPC servicer: proto <-> domain at the edge, admission control, the error table.

Thin by design: requests become :class:`~histohelper.server.pipeline.AnalysisSpec`,
domain events become ``histohelper.v1`` messages, and every
:class:`~histohelper.errors.HistoHelperError` becomes its fixed status with an
ErrorInfo detail. Any other exception becomes INTERNAL carrying only the request id;
the traceback stays in the server log. Logs carry request ids, never slide paths.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import numpy.typing as npt

from histohelper.errors import (
    AnalysisCancelledError,
    DeadlineExceededError,
    HistoHelperError,
    InternalError,
    InvalidImageError,
    InvalidOptionsError,
    ServerBusyError,
    SlideNotFoundError,
)
from histohelper.server import audit
from histohelper.server.config import ServerConfig
from histohelper.server.explain import Explainer, Explanation, Selection, encode_jpeg
from histohelper.server.images import patch_pixels
from histohelper.server.limits import DefaultDeadline
from histohelper.server.pipeline import (
    AnalysisSpec,
    Analyzer,
    AttentionDone,
    Completed,
    Event,
    PatchesDone,
    Progress,
    Started,
    resize_batch,
)
from histohelper.server.runtime import ModelRuntime
from histohelper.server.sandbox import resolve_slide_path
from histohelper.server.status import to_grpc_status
from histohelper.server.tiling import Resolution, TilingOptions, TilingPlan
from histohelper.server.uploads import UploadStore, handle_upload
from histohelper.server.worker import ModelWorker
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_BATCH_SIZE = 512
MAX_IMAGES_PER_REQUEST = 1024
_EDGE_MODES = {pb.EDGE_MODE_UNSPECIFIED: "pad", pb.EDGE_MODE_PAD: "pad", pb.EDGE_MODE_DROP: "drop"}
_EDGE_TO_PB = {"pad": pb.EDGE_MODE_PAD, "drop": pb.EDGE_MODE_DROP}


def _encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """PNG bytes of an RGB [h, w, 3] or grey [h, w] uint8 image."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise InternalError("could not encode an image as PNG")
    return buf.tobytes()


def decode_patch_image(image: pb.PatchImage, size_px: int) -> npt.NDArray[np.uint8]:
    """Decode a client-supplied patch to RGB uint8 [size_px, size_px, 3].

    Encoded PNG, JPEG or TIFF (checked and decoded by :func:`.images.patch_pixels`)
    or raw RGB, of any size up to :data:`.images.MAX_IMAGE_PX`, resized (stretched)
    to the model's square input (INTER_AREA when shrinking, bilinear when enlarging).

    Raises:
        InvalidImageError: see :func:`.images.patch_pixels`.
    """
    rgb = patch_pixels(image)
    try:
        return resize_batch(rgb[None], size_px)[0]
    except (cv2.error, MemoryError):
        raise InvalidImageError("image could not be resized to the model's patch size") from None


class SlideAnalysisServicer(pb_grpc.SlideAnalysisServiceServicer):
    """Implements ``histohelper.v1.SlideAnalysisService``.

    Args:
        config: server configuration (slide root, limits, defaults).
        runtime: the loaded model (read for its manifest only; calls go via ``worker``).
        worker: the model's one owner.
        analyzer: the transport-free analysis pipeline.
        uploads: the upload area (UploadSlide, AnalyzeSlideRequest.upload_id); None
            refuses uploads (UNIMPLEMENTED) and upload ids (NOT_FOUND).
    """

    def __init__(
        self,
        config: ServerConfig,
        runtime: ModelRuntime,
        worker: ModelWorker,
        analyzer: Analyzer,
        *,
        uploads: UploadStore | None = None,
    ) -> None:
        self.config = config
        self.uploads = uploads
        self.runtime = runtime
        self.worker = worker
        self.analyzer = analyzer
        self.explainer = Explainer(analyzer)
        self._slots = threading.BoundedSemaphore(config.max_concurrent_analyses)
        self._active = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    # --- helpers --------------------------------------------------------------------

    @property
    def active_analyses(self) -> int:
        """AnalyzeSlide calls currently holding a slot."""
        with self._lock:
            return self._active

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no AnalyzeSlide call holds a slot; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def _model_summary(self) -> pb.ModelSummary:
        m = self.runtime.manifest
        return pb.ModelSummary(
            name=m.model_name,
            version=m.model_version,
            patch_classes=list(m.patch_classes),
            slide_classes=list(m.slide_classes),
            untrained=m.untrained,
            precision=self.runtime.precision,
            device=self.runtime.device,
            patch_size_px=m.patch_size_px,
            target_mpp=m.target_mpp,
            embedding_dim=m.embedding_dim,
            engine=self.runtime.engine,
        )

    def _abort(
        self, context: grpc.ServicerContext, error: HistoHelperError, request_id: str
    ) -> None:
        audit.note(reason=error.reason)
        context.abort_with_status(to_grpc_status(error, request_id))

    def _abort_internal(self, context: grpc.ServicerContext, request_id: str) -> None:
        """INTERNAL with the request id only; the caller has logged the traceback."""
        error = InternalError(f"internal server error (request id {request_id})")
        self._abort(context, error, request_id)

    def _admit(self, context: grpc.ServicerContext, request_id: str) -> bool:
        """Take an analysis slot, or abort with SERVER_BUSY at once (returns False)."""
        if not self._slots.acquire(blocking=False):
            log.info("refused: server busy", extra={"request_id": request_id})
            busy = ServerBusyError(
                f"the server is running {self.config.max_concurrent_analyses} analyses; retry later"
            )
            self._abort(context, busy, request_id)
            return False
        with self._idle:
            self._active += 1
        return True

    def _release(self) -> None:
        """Give back a slot taken by :meth:`_admit`."""
        self._slots.release()
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def _spec(self, request: pb.AnalyzeSlideRequest, request_id: str) -> AnalysisSpec:
        opts = request.options
        manifest = self.runtime.manifest
        which = opts.target_resolution.WhichOneof("value")
        if which is None:
            target = Resolution(manifest.target_mpp, "mpp")
        else:
            target = Resolution(float(getattr(opts.target_resolution, which)), which)
        batch_size = opts.batch_size or self.config.batch_size
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise InvalidOptionsError(f"batch_size must be in [1, {MAX_BATCH_SIZE}]")
        if opts.edge_mode not in _EDGE_MODES:
            raise InvalidOptionsError("unknown edge_mode")
        kwargs: dict[str, object] = {
            "patch_size_px": opts.patch_size_px or manifest.patch_size_px,
            "target": target,
            "stride_px": opts.stride_px or None,
            "edge_mode": _EDGE_MODES[opts.edge_mode],
        }
        if opts.HasField("min_tissue_fraction"):
            kwargs["min_tissue_fraction"] = float(opts.min_tissue_fraction)
        if opts.HasField("mpp_override"):
            kwargs["mpp_override"] = float(opts.mpp_override)
        try:
            tiling = TilingOptions(**kwargs)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise InvalidOptionsError(f"invalid analysis options: {exc}") from None
        if request.WhichOneof("source") == "upload_id":
            slide_path = self._resolve_upload(request.upload_id)
        else:
            slide_path = resolve_slide_path(self.config.slide_root, request.slide_path)
            audit.note(slide_fingerprint=audit.slide_fingerprint(slide_path))
        return AnalysisSpec(
            request_id=request_id,
            slide_path=slide_path,
            tiling=tiling,
            batch_size=batch_size,
            return_embeddings=opts.return_embeddings,
            return_attention=opts.return_attention,
            return_cams=opts.return_cams,
        )

    def _resolve_upload(self, upload_id: str) -> Path:
        if self.uploads is None:
            raise SlideNotFoundError("this server keeps no uploads")
        stored = self.uploads.resolve(upload_id, audit.current_caller())
        audit.note(slide_fingerprint=f"sha256:{stored.sha256_hex}")
        return stored.path

    # --- conversions ------------------------------------------------------------------

    def _qc(self, plan: TilingPlan, failed: int = 0) -> pb.QualityControl:
        return pb.QualityControl(
            tissue_fraction=float(plan.mask.tissue_fraction),
            patch_count=len(plan.grid),
            failed_patch_count=failed,
            warnings=list(plan.warnings),
        )

    def _started(self, ev: Started, spec: AnalysisSpec) -> pb.AnalyzeSlideResponse:
        plan, grid, md = ev.plan, ev.plan.grid, ev.plan.metadata
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
        tiling = spec.tiling
        stride_px = tiling.stride_px or tiling.patch_size_px
        origin_x = float(grid.x_l0[0] - grid.col[0] * grid.stride_x_l0) if len(grid) else 0.0
        origin_y = float(grid.y_l0[0] - grid.row[0] * grid.stride_y_l0) if len(grid) else 0.0
        geometry = pb.GridGeometry(
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
            stride_px=stride_px,
            effective_mpp=plan.effective_mpp,
            mpp_source=plan.mpp_source,
            edge_mode=_EDGE_TO_PB[tiling.edge_mode],
            min_tissue_fraction=tiling.min_tissue_fraction,
            patch_count=len(grid),
        )
        thumb = plan.thumbnail
        thumbnail = pb.Thumbnail(
            png=_encode_png(thumb),
            width_px=thumb.shape[1],
            height_px=thumb.shape[0],
            scale_x=plan.thumbnail_scale_x,
            scale_y=plan.thumbnail_scale_y,
        )
        mask_png = _encode_png(plan.mask.mask.astype(np.uint8) * 255)
        return pb.AnalyzeSlideResponse(
            started=pb.AnalysisStarted(
                request_id=ev.request_id,
                slide=slide,
                grid=geometry,
                model=self._model_summary(),
                qc=self._qc(plan),
                thumbnail=thumbnail,
                tissue_mask_png=mask_png,
                tiling_s=ev.tiling_s,
            )
        )

    @staticmethod
    def _patches(ev: PatchesDone, plan: TilingPlan) -> pb.AnalyzeSlideResponse:
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

    def _completed(self, ev: Completed) -> pb.AnalyzeSlideResponse:
        msg = pb.AnalysisCompleted(
            request_id=ev.request_id,
            outcome=pb.ANALYSIS_OUTCOME_COMPLETED
            if ev.outcome == "completed"
            else pb.ANALYSIS_OUTCOME_NO_TISSUE,
            qc=self._qc(ev.plan, ev.failed_count),
            timings=pb.Timings(**{k: float(v) for k, v in ev.timings.items()}),
        )
        if ev.slide is not None:
            classes = list(self.runtime.manifest.slide_classes)
            msg.prediction.CopyFrom(
                pb.SlidePrediction(
                    class_names=classes,
                    logits=ev.slide.logits.tolist(),
                    probabilities=ev.slide.probabilities.tolist(),
                    predicted_class=classes[int(np.argmax(ev.slide.probabilities))],
                )
            )
        return pb.AnalyzeSlideResponse(completed=msg)

    def _convert(self, ev: Event, spec: AnalysisSpec, plan: TilingPlan | None):
        if isinstance(ev, Started):
            return self._started(ev, spec)
        assert plan is not None
        if isinstance(ev, PatchesDone):
            return self._patches(ev, plan)
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
        return self._completed(ev)

    # --- RPCs -------------------------------------------------------------------------

    def AnalyzeSlide(  # noqa: N802
        self, request: pb.AnalyzeSlideRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AnalyzeSlideResponse]:
        t0 = time.perf_counter()
        request_id = request.request_id if _REQUEST_ID.match(request.request_id) else ""
        request_id = request_id or uuid.uuid4().hex[:16]
        extra = {"request_id": request_id}
        audit.note(request_id=request_id)
        # Validate before admission: a bad request gets its own error, not SERVER_BUSY,
        # and each retry of a busy request renews its upload's expiry.
        try:
            spec = self._spec(request, request_id)
        except HistoHelperError as exc:
            log.info("analysis refused: %s", exc.reason, extra=extra)
            self._abort(context, exc, request_id)
            return
        except Exception:
            log.exception("analysis request crashed", extra=extra)
            self._abort_internal(context, request_id)
            return
        if not self._admit(context, request_id):
            return
        stop = threading.Event()
        context.add_callback(stop.set)
        deadline = DefaultDeadline(context, self.config.default_deadline_s, stop.set)
        outcome = "error"
        try:
            log.info("analysis started", extra=extra)
            plan: TilingPlan | None = None
            for event in self.analyzer.run(spec, stop, t0):
                if isinstance(event, Started):
                    plan = event.plan
                if stop.is_set():
                    break
                if isinstance(event, Completed):
                    outcome = event.outcome
                yield self._convert(event, spec, plan)
            if deadline.expired and outcome == "error":
                raise DeadlineExceededError(
                    f"the analysis passed the server's default deadline of "
                    f"{self.config.default_deadline_s:g} s (set a deadline to allow more)"
                )
            if stop.is_set() and outcome == "error":
                outcome = "cancelled"
        except GeneratorExit:  # the client went away while we were yielding
            outcome = "cancelled"
            raise
        except HistoHelperError as exc:
            outcome = exc.reason
            log.info("analysis failed: %s", exc.reason, extra=extra)
            self._abort(context, exc, request_id)
        except Exception:
            outcome = "internal"
            log.exception("analysis crashed", extra=extra)
            self._abort_internal(context, request_id)
        finally:
            deadline.cancel()
            self._release()
            log.info(
                "analysis ended: %s in %.2fs",
                outcome,
                time.perf_counter() - t0,
                extra=extra,
            )

    def _explain_request(
        self, request: pb.ExplainPatchesRequest, request_id: str
    ) -> tuple[AnalysisSpec, Selection, int, int]:
        classes = list(self.runtime.manifest.patch_classes)
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
            ranks = {
                pb.RANK_BY_UNSPECIFIED: "attention",
                pb.RANK_BY_ATTENTION: "attention",
                pb.RANK_BY_PROBABILITY: "probability",
            }
            if request.top_k.rank_by not in ranks:
                raise InvalidOptionsError("unknown top_k.rank_by")
            rank_by = ranks[request.top_k.rank_by]
            k = request.top_k.k if which == "top_k" else 8
            selection = Selection("top_k", k=k, rank_by=rank_by)
        as_analysis = pb.AnalyzeSlideRequest(options=request.options)
        if request.WhichOneof("source") == "upload_id":
            as_analysis.upload_id = request.upload_id
        else:
            as_analysis.slide_path = request.slide_path
        spec = self._spec(as_analysis, request_id)
        return spec, selection, classes.index(class_name), quality

    @staticmethod
    def _explanation(
        ex: Explanation, plan: TilingPlan, classes: list[str], quality: int
    ) -> pb.ExplainPatchesResponse:
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

    def ExplainPatches(  # noqa: N802
        self, request: pb.ExplainPatchesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExplainPatchesResponse]:
        request_id = request.request_id if _REQUEST_ID.match(request.request_id) else ""
        request_id = request_id or uuid.uuid4().hex[:16]
        extra = {"request_id": request_id}
        audit.note(request_id=request_id)
        try:  # validate before admission, as AnalyzeSlide does
            spec, selection, class_index, quality = self._explain_request(request, request_id)
        except HistoHelperError as exc:
            log.info("explanation refused: %s", exc.reason, extra=extra)
            self._abort(context, exc, request_id)
            return
        except Exception:
            log.exception("explanation request crashed", extra=extra)
            self._abort_internal(context, request_id)
            return
        if not self._admit(context, request_id):
            return
        stop = threading.Event()
        context.add_callback(stop.set)
        deadline = DefaultDeadline(context, self.config.default_deadline_s, stop.set)
        try:
            log.info("explanation started", extra=extra)
            classes = list(self.runtime.manifest.patch_classes)
            try:
                plan, explanations = self.explainer.explain(spec, selection, class_index, stop)
            except AnalysisCancelledError:  # stopped while tiling
                if not deadline.expired:
                    raise
                explanations = iter(())
            for ex in explanations:
                if stop.is_set():
                    break
                yield self._explanation(ex, plan, classes, quality)
            if deadline.expired:
                raise DeadlineExceededError(
                    f"the explanation passed the server's default deadline of "
                    f"{self.config.default_deadline_s:g} s (set a deadline to allow more)"
                )
        except HistoHelperError as exc:
            log.info("explanation failed: %s", exc.reason, extra=extra)
            self._abort(context, exc, request_id)
        except Exception:
            log.exception("explanation crashed", extra=extra)
            self._abort_internal(context, request_id)
        finally:
            deadline.cancel()
            self._release()

    def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model=self._model_summary(),
            manifest_json=self.runtime.manifest.model_dump_json(),
            default_batch_size=self.config.batch_size,
            max_concurrent_analyses=self.config.max_concurrent_analyses,
        )

    def UploadSlide(  # noqa: N802
        self,
        request_iterator: Iterator[pb.UploadSlideRequest],
        context: grpc.ServicerContext,
    ) -> pb.UploadSlideResponse:
        if self.uploads is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server accepts no uploads")
        assert self.uploads is not None
        return handle_upload(
            self.uploads, request_iterator, context, self.config.default_deadline_s
        )

    def _classify(
        self, request: pb.ClassifyPatchesRequest, active: Callable[[], bool]
    ) -> pb.ClassifyPatchesResponse | None:
        """Decode and classify one request's images; None once ``active()`` is False."""
        if len(request.images) > self.config.max_images_per_request:
            raise InvalidOptionsError(
                f"at most {self.config.max_images_per_request} images per ClassifyPatches request"
            )
        size = self.runtime.manifest.patch_size_px
        predictions = [pb.PatchPrediction(id=image.id) for image in request.images]
        good: list[int] = []
        pixels: list[npt.NDArray[np.uint8]] = []
        for i, image in enumerate(request.images):
            if not active():
                return None
            try:
                pixels.append(decode_patch_image(image, size))
                good.append(i)
            except InvalidImageError as exc:
                predictions[i].error = exc.message
        # At least one batch per model-worker thread, all queued before the first is
        # awaited: an OpenVINO call runs on one stream (its share of the cores), so one
        # call at a time would leave the other streams idle.
        per_thread = -(-len(good) // self.worker.concurrency)
        step = max(1, min(self.config.batch_size, per_thread))
        starts = range(0, len(good), step)
        futures = [self.worker.predict_patches(np.stack(pixels[s : s + step])) for s in starts]
        for start, future in zip(starts, futures, strict=True):
            try:
                out = future.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            for j, i in enumerate(good[start : start + step]):
                p = predictions[i]
                p.logits.extend(out.logits[j].tolist())
                p.probabilities.extend(out.probabilities[j].tolist())
                if request.return_embeddings:
                    p.embedding.extend(out.embeddings[j].tolist())
        return pb.ClassifyPatchesResponse(predictions=predictions)

    def ClassifyPatches(  # noqa: N802
        self,
        request_iterator: Iterator[pb.ClassifyPatchesRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.ClassifyPatchesResponse]:
        request_id = uuid.uuid4().hex[:16]
        audit.note(request_id=request_id)
        stop = threading.Event()
        context.add_callback(stop.set)
        # No client deadline: past the server's default the stream ends (an idle one
        # at the client's next message; keepalive drops dead peers).
        deadline = DefaultDeadline(context, self.config.default_deadline_s, stop.set)

        def active() -> bool:
            return not stop.is_set() and context.is_active()

        try:
            for request in request_iterator:
                reply = self._classify(request, active) if active() else None
                if reply is None:
                    break
                yield reply
            if deadline.expired:
                raise DeadlineExceededError(
                    "the ClassifyPatches stream passed the server's default deadline of "
                    f"{self.config.default_deadline_s:g} s (set a deadline to allow more)"
                )
        except HistoHelperError as exc:
            self._abort(context, exc, request_id)
        except grpc.RpcError:  # the request stream broke: client cancelled or went away
            log.info("ClassifyPatches stream ended by the client", extra={"request_id": request_id})
        except Exception:
            log.exception("ClassifyPatches crashed", extra={"request_id": request_id})
            self._abort_internal(context, request_id)
        finally:
            deadline.cancel()
