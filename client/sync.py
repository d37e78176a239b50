"""Blocking client: :class:`SlideClient`."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import PurePath
from types import TracebackType
from typing import Any, Unpack

import grpc

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
    analyze_many_blocking,
)
from histohelper.client.dicomweb import DicomWebSlide, StoredDicom, store_requests
from histohelper.client.errors import error_from_rpc
from histohelper.client.events import Event, ModelInfo, Progress, Started, event_from_proto
from histohelper.client.explain import PatchExplanation, explain_request
from histohelper.client.models import ModelAdmin, ModelSpec, model_ref
from histohelper.client.options import AnalysisOptions, analyze_request
from histohelper.client.patches import PatchInputs, PatchPrediction, classify_stream
from histohelper.client.result import ResultCollector, SlideResult
from histohelper.client.stain import StainMethodName, StainReferenceName, stain_request
from histohelper.client.uploads import UploadedSlide, upload_requests
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc

#: Deadline of unary calls (e.g. GetModelInfo) when the client has no timeout, seconds.
DEFAULT_UNARY_TIMEOUT_S = 30.0

ProgressCallback = Callable[[Progress], Any]


class SlideClient:
    """Blocking client of ``histohelper.v1.SlideAnalysisService``.

    Use as a context manager, or call :meth:`close`. Every method raises a
    :class:`histohelper.errors.HistoHelperError` subclass for a failed call
    (``SlideNotFoundError``, ``ServerUnavailableError``, ``DeadlineExceededError`` ...),
    never a raw ``grpc.RpcError``.

    Args:
        target: ``host:port`` (one server, gRPC's ``pick_first``); or several servers
            with ``round_robin`` load balancing: a ``dns:///NAME:PORT`` target (every
            address the name resolves to, e.g. a Kubernetes headless Service), a list
            of ``IP:PORT`` addresses or a comma-separated string of them
            (see :func:`histohelper.client._channel.resolve_target`).
        tls: use TLS; ``None`` means TLS exactly when certificates or credentials are given.
        root_certificates, private_key, certificate_chain: PEM bytes for TLS (mutual TLS
            with the last two).
        credentials: ready-made channel credentials (overrides the PEM arguments).
        token: bearer token sent as ``authorization: Bearer <token>``.
        timeout: default deadline of each call in seconds; ``None`` means no deadline
            for analyses and ``DEFAULT_UNARY_TIMEOUT_S`` for unary calls.
        retry: retries on UNAVAILABLE with exponential backoff (``None`` disables).
        max_receive_message_bytes: largest accepted response message (default 64 MiB).
        options: extra ``(name, value)`` gRPC channel options.

    Raises:
        ValueError: a list of host names (give one DNS name instead), or TLS arguments
            that do not go together.
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
        self._connection: dict[str, Any] = {
            "tls": tls,
            "root_certificates": root_certificates,
            "private_key": private_key,
            "certificate_chain": certificate_chain,
            "credentials": credentials,
            "token": token,
            "timeout": timeout,
            "retry": retry,
            "max_receive_message_bytes": max_receive_message_bytes,
            "options": options,
        }
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
            grpc.secure_channel(self.target, creds, opts)
            if creds is not None
            else grpc.insecure_channel(self.target, opts)
        )
        self._stub = pb_grpc.SlideAnalysisServiceStub(self._channel)
        self._metadata = call_metadata(token, creds is not None)

    # --- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> SlideClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- calls ----------------------------------------------------------------------

    def stream(
        self,
        slide_path: str | PurePath | UploadedSlide | DicomWebSlide,
        options: AnalysisOptions | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        model: ModelSpec = None,
    ) -> Iterator[Event]:
        """Analyse a slide and yield typed events as they arrive (for live rendering).

        Order: one :class:`Started`, then :class:`PatchBatch` / :class:`Progress`
        interleaved, then :class:`Attention` chunks (if requested), then one
        :class:`Completed`. Closing the iterator early cancels the call. To render
        live, feed the events to a :class:`~histohelper.client.result.ResultCollector`
        and call ``collector.result(partial=True)`` whenever a frame is due.

        Args:
            slide_path: path relative to the server's slide root, "/"-separated, an
                :class:`UploadedSlide` from :meth:`upload`, or a DICOMweb series
                (``dicomweb://NAME/STUDY_UID/SERIES_UID`` or a :class:`DicomWebSlide`).
            options: analysis options (``None``: defaults).
            request_id: optional id echoed by the server and in its logs.
            timeout: deadline in seconds for the whole stream (``None``: client default).
            model: ``"NAME"``, ``"NAME:VERSION"`` or a :class:`ModelRef` of the server's
                repository (``None``: the server's default model and version).

        Raises:
            HistoHelperError: a subclass matching the server's error (e.g.
                ``SlideNotFoundError``, ``ModelNotFoundError``), or
                ``ServerUnavailableError`` after retries.
        """
        request = analyze_request(slide_path, options, request_id)
        request.model.CopyFrom(model_ref(model).to_proto())
        deadline = timeout if timeout is not None else self.timeout
        call = self._stub.AnalyzeSlide(request, timeout=deadline, metadata=self._metadata)
        try:
            for msg in call:
                yield event_from_proto(msg)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            call.cancel()  # no-op after the call has finished

    def analyze(
        self,
        slide_path: str | PurePath | UploadedSlide | DicomWebSlide,
        options: AnalysisOptions | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        model: ModelSpec = None,
    ) -> SlideResult:
        """Analyse a slide and return the assembled result.

        One ``AnalyzeSlide`` call: errors the server answers (``SERVER_BUSY``,
        ``PACS_UNAVAILABLE`` with its ``retry_after_s``, ...) are raised, not retried
        (the channel's gRPC retry policy retries only transport UNAVAILABLE). For the
        cohort's retry policy (backoff, at least ``retry_after_s``, a ``"retry"``
        progress event per retry), use :meth:`analyze_many`, also with one slide, as
        ``histohelper analyze`` does.

        Args:
            slide_path: path relative to the server's slide root, "/"-separated, an
                :class:`UploadedSlide` from :meth:`upload`, or a DICOMweb series
                (``dicomweb://NAME/STUDY_UID/SERIES_UID`` or a :class:`DicomWebSlide`).
            options: analysis options (``None``: defaults, with attention).
            on_progress: called with a :class:`Progress` once the grid is known
                (``patches_done=0``) and for each progress event.
            request_id: optional id echoed by the server.
            timeout: deadline in seconds (``None``: client default).
            model: the repository model (and version) to analyse with, as :meth:`stream`;
                ``result.model`` names the version that served.

        Returns:
            The :class:`SlideResult` (``outcome == "no_tissue"`` for a slide without tissue).

        Raises:
            HistoHelperError: as :meth:`stream`; ``InternalError`` when the stream ends
                early or breaks the protocol.
        """
        collector = ResultCollector(roi=options.roi if options is not None else None)
        events = self.stream(
            slide_path, options, request_id=request_id, timeout=timeout, model=model
        )
        for event in events:
            collector.add(event)
            if on_progress is not None:
                if isinstance(event, Started):
                    on_progress(Progress(0, event.grid.patch_count, 0.0))
                elif isinstance(event, Progress):
                    on_progress(event)
        return collector.result()

    def analyze_many(
        self,
        slides: Iterable[str | PurePath | UploadedSlide | CohortSlide],
        options: AnalysisOptions | None = None,
        **settings: Unpack[ManySettings],
    ) -> Iterator[SlideOutcome]:
        """Analyse many slides, ``jobs`` at a time, and yield each outcome as it finishes.

        A slide's failure is an outcome (``outcome.error``), never an exception; busy
        and unavailable servers are retried with backoff and jitter, on the next server
        when the client has several (semantics: :mod:`histohelper.client.cohort`). The
        analyses run on an asyncio client in a background thread with this client's
        target and settings.

        Args:
            slides: paths relative to the server's slide root, :class:`UploadedSlide`
                handles, or :class:`~histohelper.client.cohort.CohortSlide` items (own
                id, own options, or a local file to upload).
            options: options of every slide without its own (``None``: defaults).
            settings: ``jobs`` (analyses in flight, default 4), ``retries`` (per slide
                after its first attempt, default 4), ``on_progress`` (called on the
                background thread with each
                :class:`~histohelper.client.cohort.CohortProgress`), ``backoff``
                (:class:`~histohelper.client.cohort.Backoff`), ``seed`` (of the jitter),
                ``model`` (``"NAME[:VERSION]"`` or a ``ModelRef``: the repository model
                of every slide whose ``CohortSlide.model`` is ``None``; default the
                server's default model).

        Yields:
            One :class:`~histohelper.client.cohort.SlideOutcome` per slide (``index`` =
            input position; ``result`` or ``error``), in finishing order. Closing the
            iterator early cancels the analyses in flight.

        Raises:
            ValueError: ``jobs < 1``, ``retries < 0`` or a malformed ``model``.
        """
        from histohelper.client.aio import AsyncSlideClient

        target, connection = self.target, self._connection
        return analyze_many_blocking(
            lambda: AsyncSlideClient(target, **connection),
            slides,
            options,
            **settings,
        )

    def upload(
        self,
        source: str | os.PathLike[str] | bytes,
        *,
        suffix: str | None = None,
        timeout: float | None = None,
    ) -> UploadedSlide:
        """Upload a slide for servers that cannot see the caller's files (``UploadSlide``).

        Sends the SHA-256, size and suffix first, then 1 MiB chunks; the file's name is
        never sent. Pass the result to :meth:`analyze` or :meth:`stream`.

        Args:
            source: a slide file, or its bytes.
            suffix: e.g. ``".svs"``; default: the file's suffix (required for bytes).
            timeout: deadline in seconds (``None``: client default, else none).

        Returns:
            The :class:`UploadedSlide` (opaque id, size, SHA-256, expiry).

        Raises:
            SlideTooLargeError: over the server's upload cap.
            UploadQuotaError: the server's upload area is full; retry later.
            UploadChecksumError, UploadError: corrupted or malformed upload.
            PermissionDeniedError: the token lacks the ``upload`` role.
        """
        requests = upload_requests(source, suffix)
        deadline = timeout if timeout is not None else self.timeout
        try:
            reply = self._stub.UploadSlide(requests, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return UploadedSlide.from_proto(reply)

    def store_dicom(
        self,
        instances: Iterable[object],
        dicomweb_server: str,
        *,
        timeout: float | None = None,
    ) -> StoredDicom:
        """Store DICOM instances on a DICOMweb server the operator configured (``StoreDicom``).

        The server STOWs them with the operator's credentials; the caller names the
        server only (e.g. a result's ``dicom.dicomweb_server``, the PACS the slide came
        from). Instances are read and sent one at a time, in 1 MiB chunks.

        Args:
            instances: DICOM Part 10 bytes, paths of Part 10 files, or pydicom Datasets
                (e.g. :meth:`SlideResult.to_dicom`'s objects).
            dicomweb_server: NAME of a configured DICOMweb server.
            timeout: deadline in seconds (``None``: client default, else none).

        Returns:
            The :class:`~histohelper.client.dicomweb.StoredDicom` (SOP Instance UIDs
            stored, in the order sent).

        Raises:
            ValueError: a bad server name or an empty instance (before anything is sent).
            DicomWebNotConfiguredError: the server does not know ``dicomweb_server``.
            DicomInvalidError: bytes that are not a DICOM instance.
            PacsUnavailableError: the PACS cannot be reached; retry later.
            PacsPermissionDeniedError: the PACS refused the operator's credentials.
            PermissionDeniedError: the token lacks the ``store`` role.
        """
        requests = store_requests(dicomweb_server, instances)
        first = next(requests)  # checks the name before the call starts
        deadline = timeout if timeout is not None else self.timeout
        try:
            reply = self._stub.StoreDicom(
                itertools.chain([first], requests), timeout=deadline, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return StoredDicom.from_proto(reply)

    def get_model_info(self, *, timeout: float | None = None, model: ModelSpec = None) -> ModelInfo:
        """Return a model's summary and manifest (``model``: ``"NAME[:VERSION]"``;
        ``None``: the server's default), the server defaults and every version of the
        server's repository (``models``).

        Raises:
            HistoHelperError: a subclass matching the failure (``ModelNotFoundError``
                for an unknown model).
        """
        deadline = timeout if timeout is not None else (self.timeout or DEFAULT_UNARY_TIMEOUT_S)
        request = pb.GetModelInfoRequest(model=model_ref(model).to_proto())
        try:
            reply = self._stub.GetModelInfo(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return ModelInfo.from_proto(reply)

    def explain(
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
        """Explain patches of a slide: each patch's image and its layer4 Grad-CAM.

        Args:
            slide_path: path relative to the server's slide root, an
                :class:`UploadedSlide` from :meth:`upload`, or a DICOMweb series
                (``dicomweb://NAME/STUDY_UID/SERIES_UID`` or a :class:`DicomWebSlide`).
            top_k: how many patches, ranked by ``rank_by`` (ignored with ``patch_indices``;
                ranking runs the whole analysis on the server).
            rank_by: ``"attention"`` (MIL attention) or ``"probability"`` (of the class).
            patch_indices: explicit bag indices (e.g. from a :class:`SlideResult`'s
                ``patches.patch_index``), analysed with the same ``options``.
            class_name: patch class to explain; default the model's last patch class.
            options: tiling options; must match the analysis the indices came from.
            jpeg_quality: quality of the returned patch images, 1..100.
            timeout: deadline in seconds (``None``: client default).
            model: the repository model (``"NAME[:VERSION]"``; ``None``: the default).

        Returns:
            Explanations in rank order (indices: in the given order); each carries
            ``stain``, the stain normalisation applied to its image.

        Raises:
            HistoHelperError: a subclass matching the server's error (e.g.
                ``InvalidOptionsError`` for an unknown class or index).
        """
        request = explain_request(
            slide_path, top_k=top_k, rank_by=rank_by, patch_indices=patch_indices,
            class_name=class_name, options=options, jpeg_quality=jpeg_quality,
        )  # fmt: skip
        request.model.CopyFrom(model_ref(model).to_proto())
        deadline = timeout if timeout is not None else self.timeout
        call = self._stub.ExplainPatches(request, timeout=deadline, metadata=self._metadata)
        try:
            return [PatchExplanation.from_response(m) for m in call]
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    def classify(
        self,
        images: PatchInputs,
        *,
        batch_size: int = 32,
        max_in_flight: int = 2,
        return_embeddings: bool = False,
        timeout: float | None = None,
        model: ModelSpec = None,
        stain_normalization: StainMethodName | None = None,
        stain_reference: StainReferenceName | None = None,
    ) -> Iterator[PatchPrediction]:
        """Classify client-supplied patch images (``ClassifyPatches``), lazily and in order.

        Images are packed into requests of ``batch_size`` and at most ``max_in_flight``
        requests are unanswered at a time, so ``images`` may be a generator over a
        folder of any size. The server resizes each image to the model's patch size.

        Args:
            images: ``(id, data)`` pairs: PNG/JPEG/TIFF file bytes of any size, or RGB
                uint8 ``[h, w, 3]`` arrays.
            batch_size: images per request, in [1, 1024].
            max_in_flight: requests sent ahead of the answers (bounds memory).
            return_embeddings: include each image's embedding.
            timeout: deadline in seconds for the whole stream (``None``: client default).
            model: the repository model (``"NAME[:VERSION]"``; ``None``: the default).
            stain_normalization, stain_reference: as
                :class:`~histohelper.client.options.AnalysisOptions`; fitted by the server
                on each request's ``batch_size`` images together.

        Yields:
            One :class:`~histohelper.client.patches.PatchPrediction` per image, in
            order; an undecodable image carries ``error`` instead of probabilities.

        Raises:
            ValueError: an unknown stain method or reference name.
            HistoHelperError: a subclass matching the server's error.
        """
        return classify_stream(
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

    def admin(self, *, timeout: float | None = None) -> ModelAdmin:
        """``ModelAdminService`` over this client's channel and token (load, unload,
        set default, rescan; the caller needs the ``admin`` role).

        Args:
            timeout: deadline of each admin call in seconds (default: the client's,
                else 10 x ``DEFAULT_UNARY_TIMEOUT_S``: a load warms a model up).
        """
        deadline = (
            timeout if timeout is not None else (self.timeout or 10 * DEFAULT_UNARY_TIMEOUT_S)
        )
        return ModelAdmin(self._channel, self._metadata, deadline)
