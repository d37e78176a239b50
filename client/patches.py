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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from histohelper.client.errors import error_from_rpc
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
    """

    id: str
    logits: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32]
    embedding: npt.NDArray[np.float32] | None
    error: str

    @property
    def ok(self) -> bool:
        """True when the image was classified."""
        return not self.error

    @classmethod
    def from_proto(cls, msg: pb.PatchPrediction) -> PatchPrediction:
        return cls(
            id=msg.id,
            logits=np.asarray(msg.logits, dtype=np.float32),
            probabilities=np.asarray(msg.probabilities, dtype=np.float32),
            embedding=np.asarray(msg.embedding, dtype=np.float32) if msg.embedding else None,
            error=msg.error,
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


def _requests(
    images: Iterable[PatchInput], batch_size: int, max_request_bytes: int
) -> Iterator[list[pb.PatchImage]]:
    """Group images into request-sized lists (at most ``batch_size`` images and, unless
    one image alone exceeds it, ``max_request_bytes`` bytes of image data)."""
    batch: list[pb.PatchImage] = []
    nbytes = 0
    for image_id, data in images:
        size = _size(data)
        if batch and (len(batch) >= batch_size or nbytes + size > max_request_bytes):
            yield batch
            batch, nbytes = [], 0
        batch.append(patch_image(image_id, data))
        nbytes += size
    if batch:
        yield batch


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
    if not 1 <= batch_size <= MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"batch_size must be in [1, {MAX_IMAGES_PER_REQUEST}]")
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be >= 1")
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
                yield pb.ClassifyPatchesRequest(images=batch, return_embeddings=return_embeddings)
        except Exception as exc:  # surfaced to the caller after the answers so far
            failure.append(exc)

    responses = call(requests(), timeout=timeout, metadata=metadata)
    try:
        for reply in responses:
            expected = sent.popleft() if sent else -1
            slots.release()
            if len(reply.predictions) != expected:
                raise InternalError(
                    f"ClassifyPatches answered {len(reply.predictions)} images "
                    f"for a request of {expected}"
                )
            for msg in reply.predictions:
                yield PatchPrediction.from_proto(msg)
    except grpc.RpcError as err:
        raise error_from_rpc(err) from err
    finally:
        closed.set()
        slots.release(max_in_flight)  # wake a request thread waiting for a slot
        responses.cancel()  # no-op after the call has finished
    if failure:
        raise failure[0]
