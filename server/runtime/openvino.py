"""OpenVINO engine for the ONNX export (CPU), behind the same :class:`~.onnx.OnnxModel`.

OpenVINO (Intel's inference runtime, https://docs.openvino.ai) reads the artifact's
``.onnx`` files directly and compiles them with oneDNN JIT kernels for this CPU; it
runs the int8 (QDQ) model faster than ONNX Runtime on VNNI CPUs (side-by-side figures
in benchmarks/RESULTS.md).

Precision is explicit: OpenVINO would otherwise run fp32 layers in bf16 on CPUs with
AVX512-BF16 (its default ``INFERENCE_PRECISION_HINT``), which the export's parity gates
never saw. So ``"fp32"`` is the fp32 model at f32, and ``"int8"`` is the int8 model with
its unquantised layers (first convolution, heads) at f32, served only when the export
gated that very engine (``manifest.onnx.int8_gates["openvino"]``), or with those layers
in bf16 (reported as ``"int8+bf16"``) where the export gated that combination as well
(``manifest.onnx.int8_gates["openvino-bf16"]``) and the CPU computes bf16 natively.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from histohelper.errors import ModelArtifactError

from .cpu import cpu_has_bf16
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

    The model is compiled for throughput (``PERFORMANCE_HINT THROUGHPUT``): OpenVINO
    splits the inference threads into ``streams`` of its choosing (2 streams of one
    thread each on 2 cores) and keeps one infer request per stream here. Each
    :meth:`run` takes an idle request (waiting for one if all are busy) and runs the
    whole batch on it, so up to ``streams`` calls from different threads run at once,
    each on its own cores. The server's model worker makes that many calls in
    parallel (:attr:`~.onnx.OnnxModel.concurrency`). Streams never wait on one
    another: a slide-reader thread that takes a core delays one batch, not every
    layer of every batch. Measured end to end on 2 cores, 3,001 patches, alternated:
    169-179 patches/s against 157-167 with each batch cut across both streams and
    one call at a time, and 141-147 with one two-thread stream.

    Thread-safe: a request (its buffers) serves one call at a time, and outputs are
    copied out of it before it is handed back.

    Args:
        compiled: an ``openvino.CompiledModel`` with one input.
        streams: infer requests to keep (OpenVINO's optimal number of requests).
    """

    def __init__(self, compiled: object, streams: int = 1) -> None:
        self._compiled = compiled
        self.streams = max(1, int(streams))
        self._idle: queue.SimpleQueue[object] = queue.SimpleQueue()
        for _ in range(self.streams):
            self._idle.put(compiled.create_infer_request())  # type: ignore[attr-defined]

    def run(
        self, names: Sequence[str], feeds: dict[str, npt.NDArray[np.uint8]]
    ) -> list[npt.NDArray[np.float32]]:
        """Infer once on an idle request; returns copies of the outputs ``names``, in
        that order."""
        request = self._idle.get()
        try:
            results = request.infer(feeds)  # type: ignore[attr-defined]
            by_name = {key.get_any_name(): value for key, value in results.items()}
            return [np.array(by_name[n], copy=True) for n in names]
        finally:
            self._idle.put(request)


def compile_onnx(
    path: Path, *, num_threads: int | None, rest_precision: str = "f32"
) -> OpenVinoSession:
    """Compile one ``.onnx`` file for the CPU (int8 where the file is QDQ).

    Args:
        path: the ``.onnx`` file.
        num_threads: inference threads; None: OpenVINO's default (all cores).
        rest_precision: OpenVINO's ``INFERENCE_PRECISION_HINT``, the precision of
            every layer the file does not quantise: ``"f32"`` or ``"bf16"`` (needs
            AVX512-BF16 or AMX; only where the export gated it).

    Raises:
        ModelArtifactError: OpenVINO cannot read or compile the file.
    """
    import openvino as ov

    config: dict[str, object] = {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "INFERENCE_PRECISION_HINT": rest_precision,
    }
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise ModelArtifactError(
            f"model artifact's ONNX file cannot be compiled by OpenVINO: {exc}"
        ) from None
    return OpenVinoSession(compiled, streams)


def load_openvino(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    precision: str = "auto",
    num_threads: int | None = None,
    rest_precision: str = "auto",
) -> OnnxModel:
    """Load the ONNX export beside a TorchScript artifact into OpenVINO (CPU).

    Args:
        path: the TorchScript artifact (``.pt``); its manifest names the ONNX files.
        device: ``"auto"`` or ``"cpu"``.
        precision: ``"auto"`` (int8 where the export gated it under OpenVINO and the
            CPU has VNNI, else fp32), ``"fp32"`` or ``"int8"``. int8 runs its
            unquantised layers (first convolution, heads) in bf16 where the export
            gated that too (``manifest.onnx.int8_gates["openvino-bf16"]``) and this CPU
            has AVX512-BF16 or AMX, and reports the precision ``"int8+bf16"``; else at
            f32.
        num_threads: inference threads; None: OpenVINO's default (all cores).
        rest_precision: for int8, the unquantised layers' precision: ``"auto"`` (as
            above), ``"f32"``, or ``"bf16"`` (only where gated and supported).

    Returns:
        A ready :class:`~.onnx.OnnxModel` with ``engine == "openvino"``; CAMs come from
        the fp32 model at f32, compiled on the first call that wants them.

    Raises:
        ModelArtifactError: OpenVINO not installed, no ONNX export, a missing or
            unreadable file, a device other than the CPU, or a precision not offered
            (including bf16 for the unquantised layers without its gate or on a CPU
            without bf16).
    """
    if rest_precision not in ("auto", "f32", "bf16"):
        raise ModelArtifactError(
            f"rest_precision must be auto, f32 or bf16, not {rest_precision!r}"
        )
    if not openvino_available():
        raise ModelArtifactError(
            "the openvino backend needs the openvino package (pip install openvino)"
        )
    files = resolve_onnx(path, device=device, precision=precision, engine="openvino")
    onnx = files.manifest.onnx
    bf16_offered = (
        files.precision == "int8"
        and onnx is not None
        and onnx.int8_passed("openvino-bf16")
        and cpu_has_bf16()
    )
    if rest_precision == "bf16" and not bf16_offered:
        raise ModelArtifactError(
            "int8 with bf16 unquantised layers needs an int8 export gated that way under "
            "OpenVINO and a CPU with AVX512-BF16 or AMX"
        )
    bf16 = bf16_offered and rest_precision != "f32"
    rest = "bf16" if bf16 else "f32"
    return files.serve(
        lambda p: compile_onnx(p, num_threads=num_threads, rest_precision=rest),
        "openvino",
        open_cam_session=lambda p: compile_onnx(p, num_threads=num_threads),
        label="int8+bf16" if bf16 else None,
    )
