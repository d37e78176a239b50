"""OpenVINO engine for the ONNX export (CPU), behind the same :class:`~.onnx.OnnxModel`.

OpenVINO (Intel's inference runtime, https://docs.openvino.ai) reads the artifact's
``.onnx`` files directly and compiles them with oneDNN JIT kernels for this CPU. On the
2-core AVX512-VNNI EPYC of ``benchmarks/RESULTS.md`` it ran the int8 (QDQ) model at
~180 patches/s against ~125 for ONNX Runtime, batch 64, side by side, with the same
probabilities within 0.007 of eager fp32 on real patches.

Precision is explicit: OpenVINO would otherwise run fp32 layers in bf16 on CPUs with
AVX512-BF16 (its default ``INFERENCE_PRECISION_HINT``), which the export's parity gates
never saw. So ``"fp32"`` is the fp32 model at f32, and ``"int8"`` is the int8 model with
its unquantised layers (first convolution, heads) at f32, served only when the export
gated that very engine (``manifest.onnx.int8_parity_openvino``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from histohelper.errors import ModelArtifactError

from .onnx import OnnxModel, resolve_onnx


def openvino_available() -> bool:
    """True when the ``openvino`` package can be imported here."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def openvino_version() -> str:
    """The installed OpenVINO version, e.g. ``"2026.4.1"`` (raises ImportError)."""
    import openvino

    return str(openvino.__version__).split("-")[0]


class OpenVinoSession:
    """A compiled OpenVINO model with ONNX Runtime's ``run(names, feeds)`` call.

    Thread-safe: each calling thread gets its own infer request (requests hold their
    own buffers and may not be shared); outputs are copied out of the request.

    Args:
        compiled: an ``openvino.CompiledModel``.
    """

    def __init__(self, compiled: object) -> None:
        self._compiled = compiled
        self._local = threading.local()

    def run(
        self, names: Sequence[str], feeds: dict[str, npt.NDArray[np.uint8]]
    ) -> list[npt.NDArray[np.float32]]:
        """Infer once; returns copies of the outputs ``names``, in that order."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._compiled.create_infer_request()  # type: ignore[attr-defined]
            self._local.request = request
        results = request.infer(feeds)
        by_name = {key.get_any_name(): value for key, value in results.items()}
        return [np.array(by_name[n], copy=True) for n in names]


def compile_onnx(path: Path, *, num_threads: int | None) -> OpenVinoSession:
    """Compile one ``.onnx`` file for the CPU at f32 (int8 where the file is QDQ).

    Raises:
        ModelArtifactError: OpenVINO cannot read or compile the file.
    """
    import openvino as ov

    config: dict[str, object] = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        "NUM_STREAMS": 1,
    }
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise ModelArtifactError(
            f"model artifact's ONNX file cannot be compiled by OpenVINO: {exc}"
        ) from None
    return OpenVinoSession(compiled)


def load_openvino(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    precision: str = "auto",
    num_threads: int | None = None,
) -> OnnxModel:
    """Load the ONNX export beside a TorchScript artifact into OpenVINO (CPU).

    Args:
        path: the TorchScript artifact (``.pt``); its manifest names the ONNX files.
        device: ``"auto"`` or ``"cpu"``.
        precision: ``"auto"`` (int8 where the export gated it under OpenVINO and the
            CPU has VNNI, else fp32), ``"fp32"`` or ``"int8"``.
        num_threads: inference threads; None: OpenVINO's default (all cores).

    Returns:
        A ready :class:`~.onnx.OnnxModel` with ``engine == "openvino"``; CAMs come from
        the fp32 model, compiled on the first call that wants them.

    Raises:
        ModelArtifactError: OpenVINO not installed, no ONNX export, a missing or
            unreadable file, a device other than the CPU, or a precision not offered.
    """
    if not openvino_available():
        raise ModelArtifactError(
            "the openvino backend needs the openvino package (pip install openvino)"
        )
    files = resolve_onnx(path, device=device, precision=precision, engine="openvino")
    return files.serve(lambda p: compile_onnx(p, num_threads=num_threads), "openvino")
