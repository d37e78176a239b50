"""ClassifyPatches in domain terms, free of gRPC calls: client images -> predictions.

Each request's images are checked from their headers first (format, size, the
per-image limit; :func:`~.images.patch_px`) and the pixels they would decode to are
charged to two :class:`~.images.PixelBudget` s, the request's and the stream's, before
any pixel is decoded. Then images are decoded a batch at a time, each resized to the
model's input, and the batches go through the read -> predict stage
(:func:`~.stage.predict_in_order`), so decoding the next batch overlaps the model
computing the previous one. A bad image gets its own error; the others still classify.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
import numpy.typing as npt

from histohelper.errors import InvalidImageError, InvalidOptionsError
from histohelper.server.images import PixelBudget, patch_pixels, patch_px
from histohelper.server.pipeline import resize_batch
from histohelper.server.stage import Predicted, predict_in_order
from histohelper.server.tiling.stain import (
    NO_STAIN,
    AppliedStain,
    StainChoice,
    fit_normalizer,
    sample_pixels,
    stained_pixels,
)
from histohelper.server.worker import ModelWorker
from histohelper.v1 import slide_analysis_pb2 as pb


@dataclass(frozen=True)
class PatchPrediction:
    """The model's answer for one client image.

    Attributes:
        id: the image's ``id`` as the client sent it.
        error: why the image was not classified (bad format, header, size, or bytes
            the decoder rejects), or None; the arrays below are None when set.
        logits: float32 [C] patch-class logits.
        probabilities: float32 [C] softmax over the patch classes.
        embedding: float32 [D] patch embedding, or None unless requested.
    """

    id: str
    error: str | None
    logits: npt.NDArray[np.float32] | None = None
    probabilities: npt.NDArray[np.float32] | None = None
    embedding: npt.NDArray[np.float32] | None = None


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


@dataclass(frozen=True)
class _Batch:
    """Decoded images of one model call: positions in the request, pixels
    uint8 [B, S, S, 3] at the model's input size."""

    positions: list[int]
    pixels: npt.NDArray[np.uint8]


class Classifier:
    """Classifies client-supplied patch images with the served model.

    Args:
        worker: the model's one owner.
        batch_size: most images per model call (>= 1).
        max_images_per_request: more images in one request raise InvalidOptionsError.
        request_max_px: decoded pixels one request may cost (from the headers).
        stream_max_px: decoded pixels one stream may cost in all its requests.
    """

    def __init__(
        self,
        worker: ModelWorker,
        *,
        batch_size: int,
        max_images_per_request: int,
        request_max_px: int,
        stream_max_px: int,
    ) -> None:
        if batch_size < 1 or max_images_per_request < 1:
            raise ValueError("batch_size and max_images_per_request must be >= 1")
        self.worker = worker
        self.batch_size = batch_size
        self.max_images_per_request = max_images_per_request
        self.request_max_px = request_max_px
        self.stream_max_px = stream_max_px

    def stream_budget(self) -> PixelBudget:
        """A fresh pixel budget for one ClassifyPatches stream (all its requests)."""
        return PixelBudget(self.stream_max_px, "stream")

    def classify(
        self,
        images: Sequence[pb.PatchImage],
        *,
        return_embeddings: bool,
        stream_budget: PixelBudget,
        stop: threading.Event,
        stain: StainChoice = NO_STAIN,
        on_stain: Callable[[AppliedStain], None] | None = None,
    ) -> list[PatchPrediction] | None:
        """Classify one request's images.

        Args:
            images: the request's images (encoded PNG/JPEG/TIFF or raw RGB, any size up
                to :data:`.images.MAX_IMAGE_PX`), resized to the model's input.
            return_embeddings: fill ``PatchPrediction.embedding``.
            stream_budget: the stream's budget (:meth:`stream_budget`), charged with
                this request's pixels.
            stop: when set, the work ends within one image or one model batch.
            stain: stain normalisation, fitted once on the stained pixels of all the
                request's decoded images together (:func:`~.tiling.stain.stained_pixels`),
                so the request's images are decoded before the first model batch.
            on_stain: told what the normalisation applied (also when none), before the
                predictions are returned.

        Returns:
            One prediction per image, in request order; None once ``stop`` is set.

        Raises:
            InvalidOptionsError: more than ``max_images_per_request`` images.
            PixelBudgetExceededError: the images' headers announce more pixels than the
                request's budget or what is left of the stream's (nothing decoded).
        """
        if len(images) > self.max_images_per_request:
            raise InvalidOptionsError(
                f"at most {self.max_images_per_request} images per ClassifyPatches request"
            )
        errors: dict[int, str] = {}
        sizes_px: dict[int, int] = {}
        for i, image in enumerate(images):
            if stop.is_set():
                return None
            try:
                sizes_px[i] = patch_px(image)
            except InvalidImageError as exc:
                errors[i] = exc.message
        total_px = sum(sizes_px.values())
        PixelBudget(self.request_max_px, "request").charge(total_px)
        stream_budget.charge(total_px)

        outputs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        batches = self._decoded_batches(images, list(sizes_px), errors, stop)
        if stain.method != "none":
            batches = self._normalized(list(batches), stain, on_stain)
        elif on_stain is not None:
            on_stain(AppliedStain("none", "", stain.source))
        stage = predict_in_order(
            self.worker,
            batches,
            lambda batch: batch.pixels,
            # One batch per model-worker thread in flight: an OpenVINO call runs on one
            # stream (its share of the cores), so one call at a time would idle the rest.
            depth=self.worker.concurrency,
            stop=stop,
        )
        for item in stage:
            assert isinstance(item, Predicted)
            out = item.output
            if out is None:  # no image of the batch decoded
                continue
            for j, i in enumerate(item.batch.positions):
                outputs[i] = (out.logits[j], out.probabilities[j], out.embeddings[j])
        if stop.is_set():
            return None
        return [
            self._prediction(image.id, errors.get(i), outputs.get(i), return_embeddings)
            for i, image in enumerate(images)
        ]

    @staticmethod
    def _normalized(
        batches: list[_Batch],
        stain: StainChoice,
        on_stain: Callable[[AppliedStain], None] | None,
    ) -> Iterator[_Batch]:
        """The decoded batches stain-normalised, the fit made on all of them together."""
        pixels = [sample_pixels(stained_pixels(b.pixels)) for b in batches if len(b.positions)]
        tissue = np.concatenate(pixels) if pixels else np.zeros((0, 3), np.uint8)
        normalizer, applied = fit_normalizer(stain, tissue)
        if on_stain is not None:
            on_stain(applied)
        for batch in batches:
            if normalizer is None or not batch.positions:
                yield batch
            else:
                yield replace(batch, pixels=normalizer(batch.pixels))

    def _decoded_batches(
        self,
        images: Sequence[pb.PatchImage],
        positions: list[int],
        errors: dict[int, str],
        stop: threading.Event,
    ) -> Iterator[_Batch]:
        """Decode the images at ``positions`` a batch at a time (failures go to
        ``errors``); at least one batch per model-worker thread, so every thread gets
        work even for a small request."""
        size = self.worker.runtime.manifest.patch_size_px
        per_thread = -(-len(positions) // self.worker.concurrency)
        step = max(1, min(self.batch_size, per_thread))
        for start in range(0, len(positions), step):
            ok: list[int] = []
            pixels: list[npt.NDArray[np.uint8]] = []
            for i in positions[start : start + step]:
                if stop.is_set():
                    return
                try:
                    pixels.append(decode_patch_image(images[i], size))
                    ok.append(i)
                except InvalidImageError as exc:
                    errors[i] = exc.message
            stacked = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
            yield _Batch(ok, stacked)

    @staticmethod
    def _prediction(
        image_id: str,
        error: str | None,
        output: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        return_embeddings: bool,
    ) -> PatchPrediction:
        if error is not None or output is None:
            return PatchPrediction(image_id, error or "the image was not classified")
        logits, probabilities, embedding = output
        return PatchPrediction(
            image_id, None, logits, probabilities, embedding if return_embeddings else None
        )
