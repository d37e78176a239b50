"""ONNX implementation of :class:`~.types.ModelRuntime` (no torch needed).

:class:`OnnxModel` serves the ONNX export with an ONNX engine: ONNX Runtime here
(:func:`load_onnx`), OpenVINO in :mod:`.openvino`.

The patch path runs the ``.onnx`` file that ``histohelper export --onnx`` writes beside
the TorchScript artifact (uint8 NHWC in; logits, embeddings, CAMs out). The MIL head
runs in numpy from the artifact's ``mil_head.npz`` extra file (float32 weights), read
with :mod:`zipfile` like the manifest. CPU execution provider only, fp32 or int8: the
int8 model (``export --onnx-int8``: static QDQ, per-channel int8 convolutions, first
convolution and heads fp32) is served when it passed the export's reduced-precision
gate; ``"auto"`` picks it on CPUs with VNNI, where it was measured faster than fp32
ONNX (benchmarks/RESULTS.md). CAMs always come from the
fp32 model (loaded on the first call that wants them), so explanations stay exact.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from histohelper.errors import ModelArtifactError

from .cpu import cpu_has_vnni
from .manifest import MIL_WEIGHTS_NAME, Manifest, read_artifact_member, read_manifest
from .types import (
    MC_DROPOUT_SEED,
    McDropoutOutput,
    PatchOutput,
    SlideOutput,
    check_bag,
    check_images,
    check_mc_request,
    run_mc_chunks,
    softmax,
)

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

    def mc_probabilities(
        self, h: npt.NDArray[np.float32], passes: int, seed: int, dropout: float
    ) -> npt.NDArray[np.float32]:
        """Monte-Carlo dropout: ``passes`` passes with inverted dropout (probability
        ``dropout``) on the embeddings ``[N, D]`` and on the gated hidden layer ``[N, L]``,
        as the artifact's ``aggregate_mc``; masks from ``numpy.random.default_rng(seed)``
        (PCG64), so they differ from torch's masks: the figures agree with the
        TorchScript engine in distribution, not bit for bit.

        Returns:
            float32 ``[P, K]`` slide probabilities, one row per pass.
        """
        w = self._w
        rng = np.random.default_rng(seed)
        keep = np.float32(1.0 - dropout)
        out = np.empty((passes, w["classifier.bias"].shape[0]), np.float32)
        for i in range(passes):
            hd = (h * (rng.random(h.shape, dtype=np.float32) < keep) / keep).astype(np.float32)
            gate = np.tanh(hd @ w["attention_V.0.weight"].T + w["attention_V.0.bias"]) * _sigmoid(
                hd @ w["attention_U.0.weight"].T + w["attention_U.0.bias"]
            )
            gate = gate * (rng.random(gate.shape, dtype=np.float32) < keep) / keep
            a_logit = (gate @ w["attention_weights.weight"].T)[:, 0]
            a_logit = a_logit + w["attention_weights.bias"][0]
            attention = softmax(a_logit.astype(np.float32), axis=0)
            logits = (w["classifier.weight"] @ (attention @ hd) + w["classifier.bias"]).astype(
                np.float32
            )
            out[i] = softmax(logits, axis=0)
        return out


class OnnxModel:
    """The ONNX patch path run by an ONNX engine, plus the numpy MIL head.

    The engine is ONNX Runtime (:func:`load_onnx`) or OpenVINO
    (:func:`.openvino.load_openvino`); both run the same ``.onnx`` files.

    Attributes:
        manifest: the artifact's manifest.
        device: always ``"cpu"``.
        precision: ``"fp32"``, ``"int8"``, or ``"int8+bf16"`` (OpenVINO: int8
            convolutions, the unquantised layers in bf16).
        engine: ``"onnxruntime"`` or ``"openvino"``.
        concurrency: calls run at once (the session's ``streams`` where it has them,
            OpenVINO; else 1).
    """

    def __init__(
        self,
        session: object,
        mil: NumpyGatedAttention,
        manifest: Manifest,
        precision: str = "fp32",
        cam_session_factory: object = None,
        engine: str = "onnxruntime",
    ) -> None:
        self._session = session
        self._mil = mil
        self.manifest = manifest
        self.device = "cpu"
        self.precision = precision
        self.engine = engine
        self.concurrency = int(getattr(session, "streams", 1))
        self._cam_factory = cam_session_factory
        self._cam_session: object = None if cam_session_factory is not None else session
        self._cam_lock = threading.Lock()

    def _cams_session(self) -> object:
        with self._cam_lock:
            if self._cam_session is None:
                self._cam_session = self._cam_factory()  # type: ignore[operator]
        return self._cam_session

    def predict_patches(
        self, images: npt.NDArray[np.uint8], *, want_cams: bool = False
    ) -> PatchOutput:
        """See :meth:`ModelRuntime.predict_patches`.

        Raises:
            InvalidImageError: wrong shape or dtype.
        """
        arr = check_images(images, self.manifest.patch_size_px)
        session = self._cams_session() if want_cams else self._session
        names = ["logits", "embeddings", "cams"] if want_cams else ["logits", "embeddings"]
        outs = session.run(names, {"images": arr})  # type: ignore[attr-defined]
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

    def aggregate_mc(
        self,
        embeddings: npt.NDArray[np.float32],
        passes: int,
        seed: int = MC_DROPOUT_SEED,
        *,
        stop: threading.Event | None = None,
    ) -> McDropoutOutput:
        """See :meth:`ModelRuntime.aggregate_mc` (numpy masks: see
        :meth:`NumpyGatedAttention.mc_probabilities`).

        Raises:
            EmptyBagError: N == 0.
            InvalidOptionsError: wrong shape, non-finite values, passes out of range, or
                a model with no dropout.
        """
        check_mc_request(self.manifest, passes)
        bag = check_bag(embeddings, self.manifest.embedding_dim)
        p = self.manifest.mil_dropout
        return run_mc_chunks(
            lambda n, s: self._mil.mc_probabilities(bag, n, s, p), int(passes), int(seed), stop
        )


def onnx_precisions(manifest: Manifest, engine: str = "onnxruntime") -> tuple[str, ...]:
    """ONNX precisions this artifact offers here under ``engine``, preferred first
    (int8 only with VNNI and a passed gate for that engine; fp32 whenever an ONNX
    export exists)."""
    if manifest.onnx is None:
        return ()
    if manifest.onnx.int8_passed(engine) and cpu_has_vnni():
        return ("int8", "fp32")
    return ("fp32",)


@dataclass(frozen=True)
class OnnxFiles:
    """What an ONNX engine needs to serve an artifact (see :func:`resolve_onnx`).

    Attributes:
        manifest: the artifact's manifest.
        precision: ``"fp32"`` or ``"int8"`` (resolved from ``"auto"``).
        model_path: the ``.onnx`` file that serves the patch path.
        fp32_path: the fp32 ``.onnx`` file (CAMs always come from it).
        mil: the numpy MIL head.
    """

    manifest: Manifest
    precision: str
    model_path: Path
    fp32_path: Path
    mil: NumpyGatedAttention

    def serve(
        self,
        open_session: Callable[[Path], object],
        engine: str,
        *,
        open_cam_session: Callable[[Path], object] | None = None,
        label: str | None = None,
    ) -> OnnxModel:
        """An :class:`OnnxModel` over these files: ``open_session(model_path)`` now,
        and for int8 ``open_cam_session(fp32_path)`` (default ``open_session``) on the
        first call that wants CAMs. ``label`` overrides the reported precision (e.g.
        ``"int8+bf16"``)."""
        main = open_session(self.model_path)
        cams = open_cam_session or open_session
        factory = (lambda: cams(self.fp32_path)) if self.precision == "int8" else None
        precision = label or self.precision
        return OnnxModel(main, self.mil, self.manifest, precision, factory, engine)


def resolve_onnx(
    path: str | os.PathLike[str], *, device: str, precision: str, engine: str
) -> OnnxFiles:
    """Check an artifact's ONNX export for ``engine`` and find its files.

    Args:
        path: the TorchScript artifact (``.pt``); its manifest names the ONNX files.
        device: ``"auto"`` or ``"cpu"``.
        precision: ``"auto"``, ``"fp32"`` or ``"int8"``.
        engine: ``"onnxruntime"`` or ``"openvino"`` (whose int8 gate must have passed).

    Raises:
        ModelArtifactError: no ONNX export, a missing file, a device other than the
            CPU, or a precision not offered.
    """
    manifest = read_manifest(path)
    if device not in ("auto", "cpu"):
        raise ModelArtifactError(f"the ONNX backends run on the CPU only, not {device!r}")
    if precision not in ("auto", "fp32", "int8"):
        raise ModelArtifactError(f"the ONNX backends run fp32 or int8, not {precision!r}")
    if manifest.onnx is None:
        raise ModelArtifactError("model artifact was exported without ONNX (use --onnx)")
    if precision == "auto":
        precision = onnx_precisions(manifest, engine)[0]
    if precision == "int8" and not manifest.onnx.int8_passed(engine):
        raise ModelArtifactError(
            f"the model artifact offers no int8 ONNX model that passed its parity gate "
            f"under {engine} (export with --onnx --onnx-int8"
            + (", with openvino installed)" if engine == "openvino" else ")")
        )
    directory = Path(path).parent
    fp32_path = directory / manifest.onnx.file_name
    model_path = fp32_path
    if precision == "int8":
        model_path = directory / str(manifest.onnx.int8_file_name)
    if not model_path.is_file():
        raise ModelArtifactError("model artifact's ONNX file is missing")
    with np.load(io.BytesIO(read_artifact_member(path, MIL_WEIGHTS_NAME))) as npz:
        mil = NumpyGatedAttention({k: npz[k] for k in npz.files})
    return OnnxFiles(manifest, precision, model_path, fp32_path, mil)


def load_onnx(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    precision: str = "auto",
    num_threads: int | None = None,
) -> OnnxModel:
    """Load the ONNX export beside a TorchScript artifact into ONNX Runtime.

    Args:
        path: the TorchScript artifact (``.pt``); its manifest names the ONNX files.
        device: ``"auto"`` or ``"cpu"`` (the CPU execution provider only).
        precision: ``"auto"`` (int8 where :func:`onnx_precisions` offers it, else
            fp32), ``"fp32"`` or ``"int8"``.
        num_threads: ONNX Runtime intra-op threads; None: its default.

    Returns:
        A ready :class:`OnnxModel`.

    Raises:
        ModelArtifactError: no ONNX export in the manifest, the file is missing or
            invalid, a device other than the CPU, or a precision not offered.
    """
    import onnxruntime as ort

    files = resolve_onnx(path, device=device, precision=precision, engine="onnxruntime")
    opts = ort.SessionOptions()
    if num_threads is not None:
        opts.intra_op_num_threads = num_threads
    # Idle ORT threads would spin on the cores the slide readers need: measured end to
    # end on 2 cores, 705 patches, alternated: 95-98 patches/s spinning, 99-101 without.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def session(p: Path) -> object:
        try:
            return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelArtifactError(
                f"model artifact's ONNX file cannot be loaded: {exc}"
            ) from None

    return files.serve(session, "onnxruntime")
