"""The runtime interface: what the server calls, whatever engine runs the model.

:class:`ModelRuntime` is a small :class:`typing.Protocol` so TorchScript
(:mod:`.torchscript`), ONNX Runtime (:mod:`.onnx`) or a future ``torch.export``
package can serve the same manifest. Outputs are frozen dataclasses of float32
numpy arrays; nothing here imports torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from histohelper.errors import (
    AnalysisCancelledError,
    EmptyBagError,
    InvalidImageError,
    InvalidOptionsError,
)

from .manifest import Manifest


@dataclass(frozen=True)
class PatchOutput:
    """Patch-path outputs for a batch of B patches.

    Attributes:
        logits: float32 ``[B, C]`` patch-class logits (C = len(manifest.patch_classes)).
        probabilities: float32 ``[B, C]``, softmax of ``logits`` over classes.
        embeddings: float32 ``[B, D]`` global-average-pooled layer4 features (D = 512).
        cams: float32 ``[B, C, h, w]`` class activation maps (Zhou et al., CVPR 2016):
            layer4 features weighted by the fc weights, no bias, no ReLU; at
            ``h = w = manifest.cam_size``. ``mean_hw(cams) + fc.bias == logits``, and
            ``relu(cams) / (h * w)`` equals Grad-CAM (Selvaraju et al., ICCV 2017) at
            layer4 for this GAP + linear head. None unless asked for.
    """

    logits: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32]
    embeddings: npt.NDArray[np.float32]
    cams: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True)
class SlideOutput:
    """Slide-level outputs of gated attention MIL over a bag of N embeddings.

    Attributes:
        logits: float32 ``[K]`` slide-class logits (K = len(manifest.slide_classes)).
        probabilities: float32 ``[K]``, softmax of ``logits``.
        attention: float32 ``[N]``, non-negative, sums to 1, in bag order.
    """

    logits: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32]
    attention: npt.NDArray[np.float32]


#: Most Monte-Carlo dropout passes one request may ask for.
MAX_MC_DROPOUT_PASSES = 256
#: Seed of the dropout masks of every MC request, so one model gives one answer.
MC_DROPOUT_SEED = 0
#: MC passes run per engine call; ``stop`` is checked between such chunks.
MC_CHUNK_PASSES = 16


def mc_chunks(passes: int, seed: int) -> list[tuple[int, int]]:
    """Split ``passes`` into ``(passes, seed)`` chunks of at most
    :data:`MC_CHUNK_PASSES`; chunk ``c`` draws its masks from ``seed + 7919 * c`` (the
    first chunk from ``seed`` itself), so a result depends only on ``(passes, seed)``."""
    return [
        (min(MC_CHUNK_PASSES, passes - start), seed + 7919 * c)
        for c, start in enumerate(range(0, passes, MC_CHUNK_PASSES))
    ]


@dataclass(frozen=True)
class McDropoutOutput:
    """Monte-Carlo dropout summary of P stochastic passes of the slide head.

    Attributes:
        mean: float32 ``[K]`` mean over passes of the slide probabilities.
        std: float32 ``[K]`` their standard deviation over passes (population, ddof 0).
        entropy_nats: predictive entropy ``-sum_k mean_k ln mean_k`` in nats.
        passes: P.
    """

    mean: npt.NDArray[np.float32]
    std: npt.NDArray[np.float32]
    entropy_nats: float
    passes: int


def mc_summary(probabilities: npt.NDArray[np.float32]) -> McDropoutOutput:
    """Summarise per-pass slide probabilities ``[P, K]`` (float64 sums, float32 out)."""
    p = np.asarray(probabilities, dtype=np.float64)
    mean = p.mean(axis=0)
    entropy = float(-np.sum(mean * np.log(np.clip(mean, 1e-30, None))))
    return McDropoutOutput(
        mean=mean.astype(np.float32),
        std=p.std(axis=0).astype(np.float32),
        entropy_nats=entropy,
        passes=int(p.shape[0]),
    )


def run_mc_chunks(
    run: Callable[[int, int], npt.NDArray[np.float32]],
    passes: int,
    seed: int,
    stop: threading.Event | None,
) -> McDropoutOutput:
    """Run ``run(chunk_passes, chunk_seed) -> [chunk_passes, K]`` over :func:`mc_chunks`
    and summarise; ``stop`` is checked before each chunk.

    Raises:
        InvalidOptionsError: passes < 1.
        AnalysisCancelledError: ``stop`` was set.
    """
    if passes < 1:
        raise InvalidOptionsError(f"mc_dropout_passes must be >= 1, got {passes}")
    parts = []
    for n, s in mc_chunks(passes, seed):
        if stop is not None and stop.is_set():
            raise AnalysisCancelledError("Monte-Carlo dropout stopped")
        parts.append(run(n, s))
    return mc_summary(np.concatenate(parts, axis=0))


def check_mc_request(manifest: Manifest, passes: int) -> int:
    """Validate a Monte-Carlo dropout request against the model.

    Args:
        manifest: the served model's manifest.
        passes: requested passes; 0 means off.

    Returns:
        ``passes``.

    Raises:
        InvalidOptionsError: passes outside ``[0, MAX_MC_DROPOUT_PASSES]``, or passes > 0
            for a model whose MIL head has no dropout (``manifest.mil_dropout == 0``).
    """
    if not 0 <= passes <= MAX_MC_DROPOUT_PASSES:
        raise InvalidOptionsError(
            f"mc_dropout_passes must be in [0, {MAX_MC_DROPOUT_PASSES}], got {passes}"
        )
    if passes and manifest.mil_dropout <= 0.0:
        raise InvalidOptionsError(
            "mc_dropout_passes needs dropout in the slide head, and the model has no dropout "
            "(export a train-mil head trained with dropout > 0)"
        )
    return passes


@runtime_checkable
class ModelRuntime(Protocol):
    """A loaded model, ready to serve.

    Attributes:
        manifest: the artifact's manifest.
        device: ``"cpu"``, ``"cuda:0"``, ``"mps"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (of the patch path; the MIL
            aggregation always runs in fp32); ``"int8"`` with the ONNX engines;
            ``"int8+bf16"`` with OpenVINO (int8 convolutions, unquantised layers bf16).
        engine: what runs the patch path: ``"torchscript"``, ``"onnxruntime"`` or
            ``"openvino"``.
        concurrency: calls the runtime runs at once, each on its own share of the
            cores (OpenVINO streams); 1 where one call uses every core. The server's
            model worker runs this many calls in parallel, so a runtime with
            ``concurrency > 1`` must be safe to call from that many threads at once.
    """

    manifest: Manifest
    device: str
    precision: str
    engine: str
    concurrency: int

    def predict_patches(
        self, images: npt.NDArray[np.uint8], *, want_cams: bool = False
    ) -> PatchOutput:
        """Classify and embed a batch of patches.

        Args:
            images: uint8 ``[B, H, W, 3]`` RGB, ``H = W = manifest.patch_size_px``,
                read at ``manifest.target_mpp``; B >= 1.
            want_cams: also return class activation maps.

        Returns:
            :class:`PatchOutput`.

        Raises:
            InvalidImageError: wrong shape or dtype.
        """
        ...

    def aggregate(self, embeddings: npt.NDArray[np.float32]) -> SlideOutput:
        """Gated attention MIL over one bag.

        Args:
            embeddings: float32 ``[N, D]``; any N >= 1 (50,000+ is fine).

        Returns:
            :class:`SlideOutput`.

        Raises:
            EmptyBagError: N == 0.
            InvalidOptionsError: wrong shape, or non-finite values.
        """
        ...

    def aggregate_mc(
        self,
        embeddings: npt.NDArray[np.float32],
        passes: int,
        seed: int = MC_DROPOUT_SEED,
        *,
        stop: threading.Event | None = None,
    ) -> McDropoutOutput:
        """Monte-Carlo dropout (Gal & Ghahramani, ICML 2016) over one bag: ``passes``
        passes of the gated attention head with its dropout (``manifest.mil_dropout``)
        active, in chunks of :data:`MC_CHUNK_PASSES` seeded by :func:`mc_chunks`;
        ``stop`` is checked between chunks.

        The same engine, device and seed give the same result; engines draw different
        masks (torch's generator vs numpy's PCG64), so their figures agree only in
        distribution, not bit for bit.

        Args:
            embeddings: float32 ``[N, D]``, N >= 1.
            passes: P in ``[1, MAX_MC_DROPOUT_PASSES]``.
            seed: seed of the dropout masks.

        Returns:
            :class:`McDropoutOutput` (mean and std float32 ``[K]``, entropy in nats).

        Raises:
            EmptyBagError: N == 0.
            InvalidOptionsError: wrong shape, non-finite values, passes out of range, or
                a model with no dropout.
            AnalysisCancelledError: ``stop`` was set.
        """
        ...


def check_images(images: object, patch_size_px: int) -> npt.NDArray[np.uint8]:
    """Validate a patch batch for :meth:`ModelRuntime.predict_patches`.

    Args:
        images: candidate batch.
        patch_size_px: the manifest's patch size.

    Returns:
        The same array, C-contiguous.

    Raises:
        InvalidImageError: not a uint8 ``[B, S, S, 3]`` array with B >= 1.
    """
    if not isinstance(images, np.ndarray):
        raise InvalidImageError(f"patches must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise InvalidImageError(f"patches must be uint8 RGB, got dtype {images.dtype}")
    s = patch_size_px
    if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.shape[0] < 1:
        raise InvalidImageError(
            f"patches must have shape [B, {s}, {s}, 3] with B >= 1, got {list(images.shape)}"
        )
    return np.ascontiguousarray(images)


def check_bag(embeddings: object, embedding_dim: int) -> npt.NDArray[np.float32]:
    """Validate a bag for :meth:`ModelRuntime.aggregate`.

    Args:
        embeddings: candidate ``[N, D]`` array.
        embedding_dim: the manifest's D.

    Returns:
        The bag as C-contiguous float32.

    Raises:
        EmptyBagError: N == 0.
        InvalidOptionsError: not a 2-D ``[N, D]`` float array, or non-finite values.
    """
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[1] != embedding_dim:
        raise InvalidOptionsError(
            f"embeddings must have shape [N, {embedding_dim}], got {list(arr.shape)}"
        )
    if arr.shape[0] == 0:
        raise EmptyBagError("cannot aggregate an empty bag (no patch embeddings)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidOptionsError(f"embeddings must be floating point, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InvalidOptionsError("embeddings contain NaN or infinite values")
    return arr


def softmax(x: npt.NDArray[np.float32], axis: int = -1) -> npt.NDArray[np.float32]:
    """Numerically stable softmax in float32 (max subtracted)."""
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
