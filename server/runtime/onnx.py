"""ONNX Runtime implementation of :class:`~.types.ModelRuntime` (no torch needed).

The patch path runs the ``.onnx`` file that ``histohelper export --onnx`` writes beside
the TorchScript artifact (uint8 NHWC in; logits, embeddings, CAMs out). The MIL head
runs in numpy from the artifact's ``mil_head.npz`` extra file (float32 weights), read
with :mod:`zipfile` like the manifest. fp32 on the CPU execution provider only.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from histohelper.errors import ModelArtifactError

from .manifest import MIL_WEIGHTS_NAME, Manifest, read_artifact_member, read_manifest
from .types import PatchOutput, SlideOutput, check_bag, check_images, softmax

_MIL_KEYS = (
    "attention_V.0.weight",
    "attention_V.0.bias",
    "attention_U.0.weight",
    "attention_U.0.bias",
    "attention_weights.weight",
    "attention_weights.bias",
    "classifier.weight",
    "classifier.bias",
)


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    # 0.5 * (1 + tanh(x / 2)) is sigmoid without overflow in exp
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


class NumpyGatedAttention:
    """Gated attention MIL (Ilse et al., ICML 2018, eq. 9) in numpy float32.

    Same maths and weights as the artifact's ``aggregate``:
    ``a = softmax_n(w^T (tanh(V h + b_V) * sigmoid(U h + b_U)) + b_w)``,
    ``logits = W_c (a^T H) + b_c``.

    Args:
        weights: the eight ``mil_head.npz`` arrays (see ``_MIL_KEYS``).
    """

    def __init__(self, weights: dict[str, npt.NDArray[np.float32]]) -> None:
        missing = [k for k in _MIL_KEYS if k not in weights]
        if missing:
            raise ModelArtifactError(f"model artifact's MIL weights lack {missing}")
        self._w = {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in _MIL_KEYS}

    def __call__(
        self, h: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """``h [N, D]`` -> ``(logits [K], attention [N])``; N >= 1 (checked by caller)."""
        w = self._w
        gate = np.tanh(h @ w["attention_V.0.weight"].T + w["attention_V.0.bias"]) * _sigmoid(
            h @ w["attention_U.0.weight"].T + w["attention_U.0.bias"]
        )
        a_logit = (gate @ w["attention_weights.weight"].T)[:, 0] + w["attention_weights.bias"][0]
        attention = softmax(a_logit.astype(np.float32), axis=0)
        z = attention @ h
        logits = (w["classifier.weight"] @ z + w["classifier.bias"]).astype(np.float32)
        return logits, attention


class OnnxRuntimeModel:
    """ONNX Runtime patch path + numpy MIL head.

    Attributes:
        manifest: the artifact's manifest.
        device: always ``"cpu"``.
        precision: always ``"fp32"``.
    """

    def __init__(self, session: object, mil: NumpyGatedAttention, manifest: Manifest) -> None:
        self._session = session
        self._mil = mil
        self.manifest = manifest
        self.device = "cpu"
        self.precision = "fp32"

    def predict_patches(
        self, images: npt.NDArray[np.uint8], *, want_cams: bool = False
    ) -> PatchOutput:
        """See :meth:`ModelRuntime.predict_patches`.

        Raises:
            InvalidImageError: wrong shape or dtype.
        """
        arr = check_images(images, self.manifest.patch_size_px)
        names = ["logits", "embeddings", "cams"] if want_cams else ["logits", "embeddings"]
        outs = self._session.run(names, {"images": arr})  # type: ignore[attr-defined]
        logits = np.asarray(outs[0], dtype=np.float32)
        return PatchOutput(
            logits=logits,
            probabilities=softmax(logits, axis=1),
            embeddings=np.asarray(outs[1], dtype=np.float32),
            cams=np.asarray(outs[2], dtype=np.float32) if want_cams else None,
        )

    def aggregate(self, embeddings: npt.NDArray[np.float32]) -> SlideOutput:
        """See :meth:`ModelRuntime.aggregate`.

        Raises:
            EmptyBagError: N == 0.
            InvalidOptionsError: wrong shape or non-finite values.
        """
        bag = check_bag(embeddings, self.manifest.embedding_dim)
        logits, attention = self._mil(bag)
        return SlideOutput(
            logits=logits, probabilities=softmax(logits, axis=0), attention=attention
        )


def load_onnx(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    precision: str = "auto",
    num_threads: int | None = None,
) -> OnnxRuntimeModel:
    """Load the ONNX export beside a TorchScript artifact.

    Args:
        path: the TorchScript artifact (``.pt``); its manifest names the ONNX file.
        device: ``"auto"`` or ``"cpu"`` (the CPU execution provider only).
        precision: ``"auto"`` or ``"fp32"``.
        num_threads: ONNX Runtime intra-op threads; None: its default.

    Returns:
        A ready :class:`OnnxRuntimeModel`.

    Raises:
        ModelArtifactError: no ONNX export in the manifest, the file is missing or
            invalid, or a device/precision other than CPU fp32.
    """
    import onnxruntime as ort

    manifest = read_manifest(path)
    if device not in ("auto", "cpu"):
        raise ModelArtifactError(f"the ONNX backend runs on the CPU only, not {device!r}")
    if precision not in ("auto", "fp32"):
        raise ModelArtifactError(f"the ONNX backend runs fp32 only, not {precision!r}")
    if manifest.onnx is None:
        raise ModelArtifactError("model artifact was exported without ONNX (use --onnx)")
    onnx_path = Path(path).parent / manifest.onnx.file_name
    if not onnx_path.is_file():
        raise ModelArtifactError("model artifact's ONNX file is missing")
    with np.load(io.BytesIO(read_artifact_member(path, MIL_WEIGHTS_NAME))) as npz:
        mil = NumpyGatedAttention({k: npz[k] for k in npz.files})
    opts = ort.SessionOptions()
    if num_threads is not None:
        opts.intra_op_num_threads = num_threads
    try:
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelArtifactError(f"model artifact's ONNX file cannot be loaded: {exc}") from None
    return OnnxRuntimeModel(session, mil, manifest)
