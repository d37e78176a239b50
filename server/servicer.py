"""``histohelper.v1.SlideAnalysisService``: one thin handler per RPC.

Each handler is wire -> domain (:mod:`.convert`) -> domain call -> wire. Everything
else a call needs (audit, authentication, decoding, request id, validation before
admission, slots, stop event, deadlines, stall limit, the error table) is the call
path's (:mod:`.callpath`); :meth:`SlideAnalysisServicer.rpcs` is the table that puts
each RPC on it. Logs carry request ids, never slide paths.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histohelper.errors import (
    AnalysisCancelledError,
    DicomInvalidError,
    ModelNotFoundError,
    UploadError,
)
from histohelper.server import audit, convert
from histohelper.server.cache import AnalysisCache
from histohelper.server.callpath import Call, Rpc, SlotPool
from histohelper.server.config import ServerConfig
from histohelper.server.dicomweb import (
    DicomWebServers,
    DicomWebSource,
    InstanceCollector,
    parse_endpoints,
)
from histohelper.server.explain import Explainer
from histohelper.server.models import ServedModel
from histohelper.server.pipeline import AnalysisSpec, Analyzer, Started
from histohelper.server.repository import ModelRepository
from histohelper.server.runtime import ModelRuntime
from histohelper.server.sandbox import resolve_slide_path
from histohelper.server.tiling.stain import AppliedStain
from histohelper.server.uploads import MAX_CHUNK_BYTES, UploadStore, UploadWriter
from histohelper.server.worker import ModelWorker
from histohelper.v1 import slide_analysis_pb2 as pb

if TYPE_CHECKING:
    from histohelper.server.classify import Classifier
    from histohelper.server.images import PixelBudget


def _model_ref(request: Any) -> pb.ModelRef:
    """The ModelRef of a request (unset: the default model's default version)."""
    return request.model


log = logging.getLogger(__name__)

ROLE_ANALYZE = "analyze"
ROLE_UPLOAD = "upload"
ROLE_STORE = "store"


class SlideAnalysisServicer:
    """The analysis service's handlers (see :meth:`rpcs`).

    Each model-serving call runs on the model version its request names (the call
    path leases it from ``models``: ``call.model``, a
    :class:`~histohelper.server.models.ServedModel`); results name that version.

    Args:
        config: server configuration (slide root, limits, defaults).
        models: the model repository.
        uploads: the upload area (UploadSlide, AnalyzeSlideRequest.upload_id).
        analysis_slots: the slot pool of AnalyzeSlide and ExplainPatches.
    """

    def __init__(
        self,
        config: ServerConfig,
        models: ModelRepository[ServedModel],
        *,
        uploads: UploadStore,
        analysis_slots: SlotPool,
    ) -> None:
        self.config = config
        self.models = models
        self.uploads = uploads
        self.analysis_slots = analysis_slots
        #: The configured DICOMweb servers (``serve --dicomweb``).
        self.dicomweb = DicomWebServers(
            parse_endpoints(config.dicomweb, config.dicomweb_secrets_dir, config.dicomweb_timeout_s)
        )

    # The default model's default version's parts (tests and tools look at these).

    @property
    def default(self) -> ServedModel:
        """The default version's parts.

        Raises:
            ModelNotFoundError: the default version is not loaded.
        """
        loaded = self.models.default_loaded()
        if loaded is None:
            raise ModelNotFoundError("the default model version is not loaded")
        return loaded.parts

    @property
    def runtime(self) -> ModelRuntime:
        """The default version's runtime."""
        return self.default.runtime

    @property
    def worker(self) -> ModelWorker:
        """The default version's model worker."""
        return self.default.worker

    @property
    def analyzer(self) -> Analyzer:
        """The default version's analyzer."""
        return self.default.analyzer

    @property
    def explainer(self) -> Explainer:
        """The default version's explainer."""
        return self.default.explainer

    @property
    def classifier(self) -> Classifier:
        """The default version's classifier."""
        return self.default.classifier

    @property
    def cache(self) -> AnalysisCache | None:
        """The default version's view of the result cache (None: off)."""
        return self.default.cache

    @property
    def active_analyses(self) -> int:
        """AnalyzeSlide and ExplainPatches calls holding a slot."""
        return self.analysis_slots.in_use

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no analysis holds a slot; False on timeout."""
        return self.analysis_slots.wait_idle(timeout)

    def rpcs(self) -> dict[str, Rpc]:
        """Every RPC of the service, with the role and slot pool it needs."""
        return {
            "AnalyzeSlide": Rpc(
                self._analyze, prepare=self._analysis_spec, pool="analysis", model=_model_ref
            ),
            "ExplainPatches": Rpc(
                self._explain, prepare=self._explain_request, pool="analysis", model=_model_ref
            ),
            "ClassifyPatches": Rpc(self._classify, pool="classify"),
            "UploadSlide": Rpc(self._upload, role=ROLE_UPLOAD, pool="upload"),
            "GetModelInfo": Rpc(self._model_info, default_deadline=False, model=_model_ref),
            "StoreDicom": Rpc(self._store_dicom, role=ROLE_STORE, pool="upload"),
        }

    # --- validation (worker threads, before admission) -----------------------------------

    def _slide_path(
        self, source: str, slide_path: str, upload_id: str, cache: AnalysisCache | None = None
    ) -> Path:
        if source == "upload_id":
            stored = self.uploads.resolve(upload_id, audit.current_caller())
            audit.note(slide_fingerprint=f"sha256:{stored.sha256_hex}")
            if cache is not None:
                cache.remember_upload(stored.path, stored.sha256_hex)
            return stored.path
        path = resolve_slide_path(self.config.slide_root, slide_path)
        audit.note(slide_fingerprint=audit.slide_fingerprint(path))
        return path

    def _analysis_spec(self, request: pb.AnalyzeSlideRequest, call: Call) -> AnalysisSpec:
        served: ServedModel = call.model
        tiling, batch_size = convert.tiling_options(
            request.options,
            served.runtime,
            self.config.batch_size,
            self.config.mask_min_um_per_px,
            roi_limits=convert.RegionLimits(
                self.config.roi_max_vertices, self.config.roi_max_bytes
            ),
            fluorescence=self.config.fluorescence,
        )
        opts = request.options
        return AnalysisSpec(
            request_id=call.request_id,
            slide_path=self._dicomweb_source(request)
            or self._slide_path(
                request.WhichOneof("source") or "",
                request.slide_path,
                request.upload_id,
                served.cache,
            ),
            tiling=tiling,
            batch_size=batch_size,
            return_embeddings=opts.return_embeddings,
            return_attention=opts.return_attention,
            return_cams=opts.return_cams,
            mc_dropout_passes=convert.mc_dropout_passes(opts, served.runtime),
            stain=convert.stain_choice(
                opts.stain_normalization,
                served.runtime.manifest,
                convert.server_stain_targets(self.config.stain_reference),
            ),
        )

    def _explain_request(self, request: pb.ExplainPatchesRequest, call: Call):
        selection, class_index, quality = convert.explain_selection(
            request, call.model.runtime.manifest.patch_classes
        )
        as_analysis = pb.AnalyzeSlideRequest(options=request.options)
        if request.WhichOneof("source") == "upload_id":
            as_analysis.upload_id = request.upload_id
        elif request.WhichOneof("source") == "dicomweb":
            as_analysis.dicomweb.CopyFrom(request.dicomweb)
        else:
            as_analysis.slide_path = request.slide_path
        return self._analysis_spec(as_analysis, call), selection, class_index, quality

    # --- RPCs ---------------------------------------------------------------------------

    async def _analyze(self, spec: AnalysisSpec, call: Call) -> None:
        log.info("analysis started", extra=call.log_extra)
        served: ServedModel = call.model

        def messages() -> Iterator[pb.AnalyzeSlideResponse]:
            plan = None
            for event in served.analyzer.run(spec, call.stop, call.t0):
                if isinstance(event, Started):
                    plan = event.plan
                yield convert.analysis_event(event, spec.tiling, plan, served.runtime)

        stream = (
            messages()
            if served.cache is None
            else served.cache.messages(spec, messages, call.stop, call.t0)
        )
        async for message in call.iterate(stream):
            _name_model(message, served)
            await call.send(message)

    async def _explain(self, prepared, call: Call) -> None:
        spec, selection, class_index, quality = prepared
        served: ServedModel = call.model
        classes = list(served.runtime.manifest.patch_classes)

        def messages() -> Iterator[pb.ExplainPatchesResponse]:
            try:
                plan, applied, explanations = served.explainer.explain(
                    spec, selection, class_index, call.stop
                )
            except AnalysisCancelledError:  # stopped while tiling: the call path reports it
                return
            for ex in explanations:
                message = convert.explanation(ex, plan, classes, quality)
                message.model.CopyFrom(served.ref())
                message.stain.CopyFrom(convert.applied_stain(applied))
                yield message

        async for message in call.iterate(messages()):
            await call.send(message)

    async def _classify(
        self, requests: AsyncIterator[pb.ClassifyPatchesRequest], call: Call
    ) -> None:
        budget: PixelBudget | None = None
        # Each request may name a model; a stream holds each version it used until it ends.
        served_by: dict[tuple[str, str], ServedModel] = {}

        def answer(
            request: pb.ClassifyPatchesRequest, served: ServedModel, budget: PixelBudget
        ) -> pb.ClassifyPatchesResponse | None:
            applied: list[AppliedStain] = []
            predictions = served.classifier.classify(
                request.images,
                return_embeddings=request.return_embeddings,
                stream_budget=budget,
                stop=call.stop,
                stain=convert.stain_choice(
                    request.stain_normalization,
                    served.runtime.manifest,
                    convert.server_stain_targets(self.config.stain_reference),
                ),
                on_stain=applied.append,
            )
            if predictions is None:
                return None
            response = convert.classify_response(predictions, applied[0] if applied else None)
            response.model.CopyFrom(served.ref())
            return response

        async for request in requests:
            key = (request.model.name, request.model.version)
            if key not in served_by:
                served_by[key] = await call.use_model(request.model)
            if budget is None:
                budget = served_by[key].classifier.stream_budget()
            reply = await call.run(answer, request, served_by[key], budget)
            if reply is None:
                return
            await call.send(reply)

    async def _upload(
        self, requests: AsyncIterator[pb.UploadSlideRequest], call: Call
    ) -> pb.UploadSlideResponse:
        store = self.uploads
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise UploadError("the first UploadSlideRequest must carry metadata")
        md = first.metadata
        caller = audit.current_caller()

        def begin() -> UploadWriter:
            writer = store.begin(md.size_bytes, md.sha256_hex.lower(), md.suffix.lower(), caller)
            # Registered on the worker thread, so a call cancelled while this runs still
            # frees the partial file and its quota (a no-op once stored).
            call.on_end(writer.abort)
            return writer

        writer = await call.run(begin)
        async for msg in requests:
            if msg.WhichOneof("part") != "chunk":
                raise UploadError("only chunks may follow the metadata")
            if not 0 < len(msg.chunk) <= MAX_CHUNK_BYTES:
                raise UploadError(f"chunks must hold 1 to {MAX_CHUNK_BYTES} bytes")
            await call.run(writer.write, msg.chunk)
        stored = await call.run(writer.commit)
        audit.note(slide_fingerprint=f"sha256:{stored.sha256_hex}")
        log.info("upload stored", extra={**call.log_extra, "size_bytes": stored.size_bytes})
        return pb.UploadSlideResponse(
            upload_id=stored.upload_id,
            size_bytes=stored.size_bytes,
            sha256_hex=stored.sha256_hex,
            expires_in_s=store.ttl_s,
        )

    async def _store_dicom(
        self, requests: AsyncIterator[pb.StoreDicomRequest], call: Call
    ) -> pb.StoreDicomResponse:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("part") != "dicomweb_server":
            raise DicomInvalidError("the first StoreDicomRequest must name the DICOMweb server")
        name = first.dicomweb_server
        self.dicomweb.endpoint(name)  # DICOMWEB_NOT_CONFIGURED before any byte is taken
        collector = InstanceCollector()
        async for msg in requests:
            collector.add(msg.WhichOneof("part"), msg)
        datasets = await call.run(collector.datasets)
        await call.run(self.dicomweb.store, name, datasets)
        log.info("instances stored", extra={**call.log_extra, "instances": len(datasets)})
        return pb.StoreDicomResponse(
            dicomweb_server=name, sop_instance_uids=[str(d.SOPInstanceUID) for d in datasets]
        )

    def _dicomweb_source(self, request: Any) -> DicomWebSource | None:
        """The request's DICOMweb series (opened once to fingerprint it for the audit
        log and find the bad cases before admission), or None for other sources.

        Raises:
            DicomWebNotConfiguredError, SlideNotFoundError, UnsupportedSlideError,
            PacsUnavailableError, PacsPermissionDeniedError.
        """
        if request.WhichOneof("source") != "dicomweb":
            return None
        ref = request.dicomweb
        source = self.dicomweb.source(ref.server, ref.study_instance_uid, ref.series_instance_uid)
        audit.note(slide_fingerprint=source.fingerprint())
        return source

    async def _model_info(
        self, request: pb.GetModelInfoRequest, call: Call
    ) -> pb.GetModelInfoResponse:
        served: ServedModel = call.model
        return pb.GetModelInfoResponse(
            model=served.summary(),
            manifest_json=served.runtime.manifest.model_dump_json(),
            default_batch_size=self.config.batch_size,
            max_concurrent_analyses=self.config.max_concurrent_analyses,
            models=repository_listing(self.models),
        )


def _name_model(message: pb.AnalyzeSlideResponse, served: ServedModel) -> None:
    """Name the serving version in Started and Completed (replayed cache entries too)."""
    kind = message.WhichOneof("event")
    if kind == "started":
        message.started.model.CopyFrom(served.summary())
    elif kind == "completed":
        message.completed.model.CopyFrom(served.ref())


def repository_listing(models: ModelRepository[ServedModel]) -> list[pb.RepositoryModel]:
    """Every version of the repository as GetModelInfo and the admin RPCs list it."""
    out = []
    for state in models.listing():
        served = state.parts
        if isinstance(served, ServedModel):
            summary = served.summary()
            manifest = served.runtime.manifest.model_dump_json()
        else:
            summary, manifest = pb.ModelSummary(name=state.name, version=state.version), ""
        out.append(
            pb.RepositoryModel(
                model=summary,
                manifest_json=manifest,
                default_version=state.default_version,
                default_model=state.default_model,
                state=state.state,
                error=state.error,
            )
        )
    return out
