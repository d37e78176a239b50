"""Client side of ``ClassifyPatches``: typed predictions and a bounded request stream.

``ClassifyPatches`` is a bidirectional stream: each request carries a batch of
:class:`~histohelper.v1.slide_analysis_pb2.PatchImage`, each response answers one
request, in order. :func:`classify_stream` packs the caller's images into requests
lazily and keeps at most ``max_in_flight`` requests unanswered, so memory stays
bounded however many images the iterable yields (the gRPC runtime would otherwise
drain the whole request iterator ahead of the server).

Imports grpc, numpy and the generated code only; no OpenCV (images travel encoded, or
as raw RGB arrays that the server resizes).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt

from histohelper.client.errors import error_from_rpc
from histohelper.client.stain import AppliedStain
from histohelper.errors import InternalError
from histohelper.v1 import slide_analysis_pb2 as pb

#: One image to classify: a caller-chosen id and either the bytes of a PNG, JPEG or TIFF
#: file (any size) or raw RGB pixels, uint8 ``[height, width, 3]``.
PatchInput = tuple[str, bytes | npt.NDArray[np.uint8]]
#: Any iterable of :data:`PatchInput` (a generator keeps memory bounded).
PatchInputs = Iterable[PatchInput]

#: Soft cap on the image bytes packed into one request (the server's default message
#: limit is 16 MiB, gRPC's own default 4 MiB). A larger single image travels alone.
DEFAULT_MAX_REQUEST_BYTES = 3 * 1024 * 1024

#: The server refuses requests with more images than this (INVALID_ARGUMENT).
MAX_IMAGES_PER_REQUEST = 1024


@dataclass(frozen=True, slots=True)
class PatchPrediction:
    """The server's answer for one image.

    Attributes:
        id: the caller's id, echoed.
        logits: float32 ``[num_classes]`` (empty when ``error`` is set).
        probabilities: float32 ``[num_classes]``, softmax over the model's patch classes
            in ``ModelSummary.patch_classes`` order (empty when ``error`` is set).
        embedding: float32 ``[embedding_dim]``, or ``None`` unless requested.
        error: why the server could not decode the image; ``""`` when classified.
        stain: the stain normalisation the server applied to the request this image
            came in (``ClassifyPatchesResponse.stain``: fitted on that request's images
            together; ``method`` ``"none"`` with a ``warning`` when a requested fit
            failed, e.g. on an all-white patch); ``None`` when the server said nothing.
    """

    id: str
    logits: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32]
    embedding: npt.NDArray[np.float32] | None
    error: str
    stain: AppliedStain | None = None

    @property
    def ok(self) -> bool:
        """True when the image was classified."""
        return not self.error

    @classmethod
    def from_proto(
        cls, msg: pb.PatchPrediction, stain: AppliedStain | None = None
    ) -> PatchPrediction:
        return cls(
            id=msg.id,
            logits=np.asarray(msg.logits, dtype=np.float32),
            probabilities=np.asarray(msg.probabilities, dtype=np.float32),
            embedding=np.asarray(msg.embedding, dtype=np.float32) if msg.embedding else None,
            error=msg.error,
            stain=stain,
        )


def patch_image(image_id: str, data: bytes | npt.NDArray[np.uint8]) -> pb.PatchImage:
    """Wire form of one image.

    Args:
        image_id: caller's id, echoed in the prediction.
        data: encoded PNG/JPEG/TIFF bytes, or RGB uint8 ``[height, width, 3]``.

    Raises:
        TypeError: ``data`` is neither bytes nor a uint8 ``[h, w, 3]`` array.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        return pb.PatchImage(id=image_id, encoded=bytes(data))
    arr = np.asarray(data)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(
            f"patch {image_id!r}: expected encoded bytes or uint8 [h, w, 3], "
            f"got {arr.dtype} {arr.shape}"
        )
    h, w = arr.shape[:2]
    raw = pb.RawImage(width_px=w, height_px=h, rgb=np.ascontiguousarray(arr).tobytes())
    return pb.PatchImage(id=image_id, raw=raw)


def _size(data: bytes | npt.NDArray[np.uint8]) -> int:
    return len(data) if isinstance(data, bytes | bytearray | memoryview) else int(data.nbytes)


class _Packer:
    """Groups images into request-sized lists (at most ``batch_size`` images and, unless
    one image alone exceeds it, ``max_request_bytes`` bytes of image data)."""

    def __init__(self, batch_size: int, max_request_bytes: int) -> None:
        self.batch_size = batch_size
        self.max_request_bytes = max_request_bytes
        self._batch: list[pb.PatchImage] = []
        self._nbytes = 0

    def add(self, image_id: str, data: bytes | npt.NDArray[np.uint8]) -> list[pb.PatchImage]:
        """Take one image; return the batch it closed (empty list: none closed)."""
        size = _size(data)
        closed: list[pb.PatchImage] = []
        if self._batch and (
            len(self._batch) >= self.batch_size or self._nbytes + size > self.max_request_bytes
        ):
            closed, self._batch, self._nbytes = self._batch, [], 0
        self._batch.append(patch_image(image_id, data))
        self._nbytes += size
        return closed

    def flush(self) -> list[pb.PatchImage]:
        """The last, partly filled batch (empty list: none)."""
        closed, self._batch, self._nbytes = self._batch, [], 0
        return closed


def _requests(
    images: Iterable[PatchInput], batch_size: int, max_request_bytes: int
) -> Iterator[list[pb.PatchImage]]:
    """Request-sized lists of ``images`` (see :class:`_Packer`)."""
    packer = _Packer(batch_size, max_request_bytes)
    for image_id, data in images:
        if batch := packer.add(image_id, data):
            yield batch
    if batch := packer.flush():
        yield batch


def _check_stream_args(batch_size: int, max_in_flight: int) -> None:
    if not 1 <= batch_size <= MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"batch_size must be in [1, {MAX_IMAGES_PER_REQUEST}]")
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be >= 1")


def _answers(reply: pb.ClassifyPatchesResponse, expected: int) -> list[PatchPrediction]:
    """The predictions of one reply, checked against the request's image count."""
    if len(reply.predictions) != expected:
        raise InternalError(
            f"ClassifyPatches answered {len(reply.predictions)} images for a request of {expected}"
        )
    stain = AppliedStain.from_proto(reply.stain) if reply.HasField("stain") else None
    return [PatchPrediction.from_proto(msg, stain) for msg in reply.predictions]


def classify_stream(
    call: Callable[..., Any],
    images: PatchInputs,
    *,
    batch_size: int = 32,
    max_in_flight: int = 2,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    return_embeddings: bool = False,
    timeout: float | None = None,
    metadata: Any = None,
    model: pb.ModelRef | None = None,
    stain: pb.StainNormalization | None = None,
) -> Iterator[PatchPrediction]:
    """Stream ``images`` through ``ClassifyPatches``; yield one prediction per image, in order.

    Args:
        call: the stub's ``ClassifyPatches`` multi-callable.
        images: ``(id, data)`` pairs, consumed lazily (see :data:`PatchInput`).
        batch_size: images per request, in [1, 1024].
        max_in_flight: requests sent but not yet answered, >= 1 (bounds memory).
        max_request_bytes: soft cap on image bytes per request.
        return_embeddings: ask for each image's embedding.
        timeout: deadline of the whole stream in seconds (``None``: none).
        metadata: call metadata (e.g. the bearer token).
        model: the repository model every request names (``None``: the default).
        stain: the stain normalisation every request asks for (``None``: the model's
            declared one, else none); the server fits it on each request's images
            together, so ``batch_size`` images share one fit.

    Yields:
        :class:`PatchPrediction` per image, in input order; undecodable images carry
        ``error`` and are not fatal. Closing the generator early cancels the call.

    Raises:
        ValueError: ``batch_size`` or ``max_in_flight`` out of range.
        HistoHelperError: the call failed (subclass mapped from the status).
        InternalError: the server answered a request with the wrong number of images.
        Exception: whatever iterating ``images`` raised, after the answers to the
            requests already sent.
    """
    _check_stream_args(batch_size, max_in_flight)
    slots = threading.Semaphore(max_in_flight)
    closed = threading.Event()
    sent: deque[int] = deque()  # images per request sent and not yet answered
    failure: list[BaseException] = []

    def requests() -> Iterator[pb.ClassifyPatchesRequest]:
        # Runs on gRPC's request-consuming thread.
        try:
            for batch in _requests(images, batch_size, max_request_bytes):
                slots.acquire()
                if closed.is_set():
                    return
                sent.append(len(batch))
                yield pb.ClassifyPatchesRequest(
                    images=batch,
                    return_embeddings=return_embeddings,
                    model=model,
                    stain_normalization=stain,
                )
        except Exception as exc:  # surfaced to the caller after the answers so far
            failure.append(exc)

    responses = call(requests(), timeout=timeout, metadata=metadata)
    try:
        for reply in responses:
            expected = sent.popleft() if sent else -1
            slots.release()
            yield from _answers(reply, expected)
    except grpc.RpcError as err:
        raise error_from_rpc(err) from err
    finally:
        closed.set()
        slots.release(max_in_flight)  # wake a request thread waiting for a slot
        responses.cancel()  # no-op after the call has finished
    if failure:
        raise failure[0]


async def aclassify_stream(
    call: Callable[..., Any],
    images: PatchInputs | AsyncIterable[PatchInput],
    *,
    batch_size: int = 32,
    max_in_flight: int = 2,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    return_embeddings: bool = False,
    timeout: float | None = None,
    metadata: Any = None,
    model: pb.ModelRef | None = None,
    stain: pb.StainNormalization | None = None,
) -> AsyncIterator[PatchPrediction]:
    """asyncio form of :func:`classify_stream` over a ``grpc.aio`` stub.

    Args:
        call: the ``grpc.aio`` stub's ``ClassifyPatches`` multi-callable.
        images: ``(id, data)`` pairs, a plain or an async iterable, consumed lazily.
        batch_size, max_in_flight, max_request_bytes, return_embeddings, timeout,
            metadata, model, stain: as :func:`classify_stream`.

    Yields:
        :class:`PatchPrediction` per image, in input order. Closing the generator
        early, or cancelling its task, cancels the call.

    Raises:
        As :func:`classify_stream`.
    """
    _check_stream_args(batch_size, max_in_flight)
    stream = call(timeout=timeout, metadata=metadata)
    sent: deque[int] = deque()  # images per request sent and not yet answered
    failure: list[Exception] = []

    async def answer() -> list[PatchPrediction]:
        reply = await stream.read()
        if reply is grpc.aio.EOF:
            raise InternalError("ClassifyPatches ended before answering every request")
        return _answers(reply, sent.popleft())

    try:
        async for batch in _abatches(images, batch_size, max_request_bytes, failure):
            while len(sent) >= max_in_flight:  # wait for a slot, yielding the answers
                for pred in await answer():
                    yield pred
            await stream.write(
                pb.ClassifyPatchesRequest(
                    images=batch,
                    return_embeddings=return_embeddings,
                    model=model,
                    stain_normalization=stain,
                )
            )
            sent.append(len(batch))
        await stream.done_writing()
        while sent:
            for pred in await answer():
                yield pred
    except grpc.RpcError as err:
        raise error_from_rpc(err) from err
    finally:
        stream.cancel()  # no-op after the call has finished
    if failure:
        raise failure[0]


async def _abatches(
    images: PatchInputs | AsyncIterable[PatchInput],
    batch_size: int,
    max_request_bytes: int,
    failure: list[Exception],
) -> AsyncIterator[list[pb.PatchImage]]:
    """Pack the caller's images, a plain or an async iterable, into requests.

    An exception from the caller's iterable (or a bad pair) is appended to ``failure``
    and ends the requests without the partly packed one: the caller raises it after
    the answers to the requests already sent.
    """

    async def pairs() -> AsyncIterator[PatchInput]:
        if isinstance(images, AsyncIterable):
            async for item in images:
                yield item
        else:
            for item in images:
                yield item

    packer = _Packer(batch_size, max_request_bytes)
    items = pairs()
    while True:
        try:
            image_id, data = await anext(items)
            batch = packer.add(image_id, data)
        except StopAsyncIteration:
            batch = packer.flush()
            if batch:
                yield batch
            return
        except Exception as exc:
            failure.append(exc)
            return
        if batch:
            yield batch
