"""asyncio client (``grpc.aio``): :class:`AsyncSlideClient`, same method names as
:class:`~histohelper.client.sync.SlideClient`."""

from __future__ import annotations

import inspect
import itertools
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import PurePath
from types import TracebackType
from typing import Any, Unpack

import grpc
import grpc.aio

from histohelper.client._channel import (
    DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
    RetryPolicy,
    call_metadata,
    channel_credentials,
    channel_options,
    resolve_target,
)
from histohelper.client.cohort import (
    CohortSlide,
    ManySettings,
    SlideOutcome,
)
from histohelper.client.cohort import analyze_many as cohort_analyze_many
from histohelper.client.dicomweb import DicomWebSlide, StoredDicom, store_requests
from histohelper.client.errors import error_from_rpc
from histohelper.client.events import Event, ModelInfo, Progress, Started, event_from_proto
from histohelper.client.explain import PatchExplanation, explain_request
from histohelper.client.models import ModelSpec, model_ref
from histohelper.client.options import AnalysisOptions, analyze_request
from histohelper.client.patches import (
    PatchInput,
    PatchInputs,
    PatchPrediction,
    aclassify_stream,
)
from histohelper.client.result import ResultCollector, SlideResult
from histohelper.client.stain import StainMethodName, StainReferenceName, stain_request
from histohelper.client.sync import DEFAULT_UNARY_TIMEOUT_S
from histohelper.client.uploads import UploadedSlide, upload_requests
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

AsyncProgressCallback = Callable[[Progress], Awaitable[Any] | Any]


class AsyncSlideClient:
    """asyncio client of ``histohelper.v1.SlideAnalysisService``.

    Create it inside a running event loop; use ``async with`` or ``await close()``.
    Arguments and errors as :class:`~histohelper.client.sync.SlideClient`.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen dataclass
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
        options: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        self.target, round_robin = resolve_target(target)
        self.timeout = timeout
        creds = channel_credentials(
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            credentials=credentials,
            token=token,
        )
        opts = channel_options(retry, max_receive_message_bytes, options, round_robin=round_robin)
        self._channel = (
            grpc.aio.secure_channel(self.target, creds, opts)
            if creds is not None
            else grpc.aio.insecure_channel(self.target, opts)
        )
        self._stub = pb_grpc.SlideAnalysisServiceStub(self._channel)
        self._metadata = call_metadata(token, creds is not None)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncSlideClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def stream(
        self,
        slide_path: str | PurePath | UploadedSlide | DicomWebSlide,
        options: AnalysisOptions | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        model: ModelSpec = None,
    ) -> AsyncIterator[Event]:
        """Analyse a slide and yield typed events (``async for``); see ``SlideClient.stream``
        (``model``: ``"NAME[:VERSION]"`` of the server's repository).

        Closing the iterator early, or cancelling the task, cancels the call.

        Raises:
            HistoHelperError: a subclass matching the server's error.
        """
        request = analyze_request(slide_path, options, request_id)
        request.model.CopyFrom(model_ref(model).to_proto())
        deadline = timeout if timeout is not None else self.timeout
        call = self._stub.AnalyzeSlide(request, timeout=deadline, metadata=self._metadata)
        try:
            async for msg in call:
                yield event_from_proto(msg)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            call.cancel()

    async def analyze(
        self,
        slide_path: str | PurePath | UploadedSlide | DicomWebSlide,
        options: AnalysisOptions | None = None,
        on_progress: AsyncProgressCallback | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        model: ModelSpec = None,
    ) -> SlideResult:
        """Analyse a slide and return the assembled result; see ``SlideClient.analyze``
        (one call, not retried: :meth:`analyze_many` retries).

        ``on_progress`` may be a plain function or a coroutine function.

        Raises:
            HistoHelperError: a subclass matching the server's error.
        """
        collector = ResultCollector(roi=options.roi if options is not None else None)
        events = self.stream(
            slide_path, options, request_id=request_id, timeout=timeout, model=model
        )
        async for event in events:
            collector.add(event)
            if on_progress is not None:
                progress = None
                if isinstance(event, Started):
                    progress = Progress(0, event.grid.patch_count, 0.0)
                elif isinstance(event, Progress):
                    progress = event
                if progress is not None:
                    ret = on_progress(progress)
                    if inspect.isawaitable(ret):
                        await ret
        return collector.result()

    def analyze_many(
        self,
        slides: Iterable[str | PurePath | UploadedSlide | CohortSlide],
        options: AnalysisOptions | None = None,
        **settings: Unpack[ManySettings],
    ) -> AsyncIterator[SlideOutcome]:
        """Analyse many slides, ``jobs`` at a time; ``async for`` each outcome as it finishes.

        As :meth:`SlideClient.analyze_many
        <histohelper.client.sync.SlideClient.analyze_many>` (semantics:
        :mod:`histohelper.client.cohort`); ``on_progress`` runs on the event loop and must
        not block. Closing the generator early cancels the analyses in flight.

        Yields:
            One :class:`~histohelper.client.cohort.SlideOutcome` per slide, in finishing
            order; a failed slide carries ``error`` instead of ``result``.

        Raises:
            ValueError: ``jobs < 1``, ``retries < 0`` or a malformed ``model``.
        """
        return cohort_analyze_many(
            self,
            slides,
            options,
            **settings,
        )

    async def upload(
        self,
        source: str | os.PathLike[str] | bytes,
        *,
        suffix: str | None = None,
        timeout: float | None = None,
    ) -> UploadedSlide:
        """Upload a slide (``UploadSlide``); see ``SlideClient.upload``.

        The file is hashed and read in the calling thread (blocking, 1 MiB at a time).

        Raises:
            HistoHelperError: a subclass matching the server's error.
        """
        requests = upload_requests(source, suffix)
        deadline = timeout if timeout is not None else self.timeout
        try:
            reply = await self._stub.UploadSlide(
                requests, timeout=deadline, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return UploadedSlide.from_proto(reply)

    async def store_dicom(
        self,
        instances: Iterable[object],
        dicomweb_server: str,
        *,
        timeout: float | None = None,
    ) -> StoredDicom:
        """Store DICOM instances on a configured DICOMweb server (``StoreDicom``); see
        ``SlideClient.store_dicom``. Instances are serialised in the calling thread.

        Raises:
            ValueError: a bad server name or an empty instance (before anything is sent).
            HistoHelperError: a subclass matching the server's error (``PACS_*``,
                ``DICOMWEB_NOT_CONFIGURED``, ``DICOM_INVALID`` ...).
        """
        requests = store_requests(dicomweb_server, instances)
        first = next(requests)  # checks the name before the call starts
        deadline = timeout if timeout is not None else self.timeout
        try:
            reply = await self._stub.StoreDicom(
                itertools.chain([first], requests), timeout=deadline, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return StoredDicom.from_proto(reply)

    async def get_model_info(
        self, *, timeout: float | None = None, model: ModelSpec = None
    ) -> ModelInfo:
        """Return a model's summary and manifest, the server defaults and the server's
        repository; as :meth:`SlideClient.get_model_info
        <histohelper.client.sync.SlideClient.get_model_info>`.

        Raises:
            HistoHelperError: a subclass matching the failure.
        """
        deadline = timeout if timeout is not None else (self.timeout or DEFAULT_UNARY_TIMEOUT_S)
        request = pb.GetModelInfoRequest(model=model_ref(model).to_proto())
        try:
            reply = await self._stub.GetModelInfo(
                request, timeout=deadline, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return ModelInfo.from_proto(reply)

    async def explain(
        self,
        slide_path: str | PurePath | UploadedSlide | DicomWebSlide,
        *,
        top_k: int = 8,
        rank_by: str = "attention",
        patch_indices: list[int] | None = None,
        class_name: str | None = None,
        options: AnalysisOptions | None = None,
        jpeg_quality: int = 90,
        timeout: float | None = None,
        model: ModelSpec = None,
    ) -> list[PatchExplanation]:
        """Explain patches of a slide; as :meth:`SlideClient.explain`.

        Returns:
            Explanations in rank order: patch JPEG and layer4 Grad-CAM [7, 7] each.

        Raises:
            HistoHelperError: a subclass matching the server's error.
        """
        request = explain_request(
            slide_path, top_k=top_k, rank_by=rank_by, patch_indices=patch_indices,
            class_name=class_name, options=options, jpeg_quality=jpeg_quality,
        )  # fmt: skip
        request.model.CopyFrom(model_ref(model).to_proto())
        deadline = timeout if timeout is not None else self.timeout
        call = self._stub.ExplainPatches(request, timeout=deadline, metadata=self._metadata)
        try:
            return [PatchExplanation.from_response(m) async for m in call]
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    def classify(
        self,
        images: PatchInputs | AsyncIterable[PatchInput],
        *,
        batch_size: int = 32,
        max_in_flight: int = 2,
        return_embeddings: bool = False,
        timeout: float | None = None,
        model: ModelSpec = None,
        stain_normalization: StainMethodName | None = None,
        stain_reference: StainReferenceName | None = None,
    ) -> AsyncIterator[PatchPrediction]:
        """Classify client-supplied patch images (``ClassifyPatches``); ``async for``.

        As :meth:`SlideClient.classify
        <histohelper.client.sync.SlideClient.classify>`; ``images`` may also be an
        async iterable. At most ``max_in_flight`` requests are unanswered at a time.

        Yields:
            One :class:`~histohelper.client.patches.PatchPrediction` per image, in
            order; an undecodable image carries ``error`` instead of probabilities.

        Raises:
            ValueError: ``batch_size`` or ``max_in_flight`` out of range.
            HistoHelperError: a subclass matching the server's error.
        """
        return aclassify_stream(
            self._stub.ClassifyPatches,
            images,
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            return_embeddings=return_embeddings,
            timeout=timeout if timeout is not None else self.timeout,
            metadata=self._metadata,
            model=model_ref(model).to_proto(),
            stain=stain_request(stain_normalization, stain_reference),
        )
