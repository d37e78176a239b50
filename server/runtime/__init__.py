"""Model runtime: loads a frozen artifact by its manifest alone.

No OpenSlide, cv2, gRPC or torchvision here: the server serves frozen artifacts only.

Importing this package is light (pydantic, numpy); torch, onnxruntime or openvino are imported
by :func:`load_runtime` for the backend asked for.

Public API:
    :class:`Manifest`, :func:`read_manifest` - the artifact's embedded JSON manifest.
    :func:`load_runtime` - load an artifact for serving, returns a :class:`ModelRuntime`.
    :class:`ModelRuntime` - the protocol the server codes against.
    :class:`PatchOutput`, :class:`SlideOutput` - outputs (float32 numpy arrays).
"""

from __future__ import annotations

import os
import sys
from typing import Literal

from .manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    ParityFigures,
    PrecisionVariant,
    WeightFile,
    parse_manifest,
    read_manifest,
)
from .types import ModelRuntime, PatchOutput, SlideOutput

#: Device nodes and driver files present wherever a CUDA (NVIDIA, also in containers
#: run with the NVIDIA toolkit; Jetson's integrated GPU: ``/dev/nvhost-ctrl-gpu``),
#: ROCm (AMD ``/dev/kfd``) or WSL2 (``/dev/dxg``) GPU can be used on Linux.
_GPU_NODES = (
    "/proc/driver/nvidia/version",
    "/dev/nvidiactl",
    "/dev/nvidia0",
    "/dev/nvhost-ctrl-gpu",
    "/dev/kfd",
    "/dev/dxg",
)


def accelerator_possible() -> bool:
    """Whether this machine could have a GPU torch can use, judged without importing torch.

    On Linux: True only when an NVIDIA, ROCm or WSL2 GPU device node or driver file
    exists (:data:`_GPU_NODES`). On macOS (Apple MPS) and every other system: True, so
    torch decides. Importing a CUDA build of torch just to ask loads CUDA libraries a CPU
    server of the int8 model never uses: measured on the bench artifact, ``histohelper
    serve`` was ready in 2.4 s at 1,061 MiB RSS with it and 1.2 s at 384 MiB without.
    """
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in _GPU_NODES)


def choose_backend(path: str | os.PathLike[str], device: str, precision: str) -> str:
    """Resolve ``backend="auto"`` for an artifact, from its manifest alone.

    The int8 ONNX model where the artifact has one that passed its parity gate, the
    device is the CPU (``"auto"`` without CUDA/MPS, or ``"cpu"``), the precision asked
    is ``"auto"`` or ``"int8"``, and the CPU has VNNI; served by OpenVINO when it is
    installed and the export gated it under OpenVINO too, else by ONNX Runtime.
    Measured on a 2-core AVX512-VNNI/BF16 EPYC (batch 64, 224 px, side by side; ``make
    bench``, see ``benchmarks/RESULTS.md``): OpenVINO int8 ~180 patches/s, ONNX Runtime
    int8 ~125, frozen TorchScript bf16 ~90, fp32 ~48; int8 probabilities within 0.01 of
    fp32 on CMU-1 patches. Everything else (GPUs, fp32, bf16, fp16, CPUs without VNNI)
    stays on TorchScript. With ``device="auto"``, torch is imported to look for CUDA or
    MPS only where :func:`accelerator_possible`.

    Returns:
        ``"openvino"``, ``"onnx"`` or ``"torchscript"``.
    """
    if precision not in ("auto", "int8"):
        return "torchscript"
    if device not in ("auto", "cpu"):
        return "torchscript"
    manifest = read_manifest(path)
    if manifest.onnx is None or not manifest.onnx.int8_passed():
        return "torchscript"
    from .onnx import cpu_has_vnni

    if not cpu_has_vnni():
        return "torchscript"
    if device == "auto" and accelerator_possible():
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            import torch

            if torch.cuda.is_available() or torch.backends.mps.is_available():
                return "torchscript"
    from .openvino import openvino_available

    if manifest.onnx.int8_passed("openvino") and openvino_available():
        return "openvino"
    return "onnx"


def load_runtime(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    precision: str = "auto",
    num_threads: int | None = None,
    backend: Literal["auto", "torchscript", "onnx", "openvino"] = "torchscript",
) -> ModelRuntime:
    """Load a model artifact for serving.

    Args:
        path: the TorchScript artifact (``.pt``) written by ``histohelper export``.
        device: ``"auto"`` (cuda -> mps -> cpu), ``"cpu"``, ``"cuda[:N]"``, ``"mps"``.
        precision: ``"auto"``: the fastest variant the device supports that passed the
            export's parity gate (bf16 on CPUs with AVX512-BF16/AMX, fp16 on CUDA/MPS,
            else fp32; int8 with the ONNX backend on CPUs with VNNI); or ``"fp32"``,
            ``"bf16"``, ``"fp16"``, ``"int8"`` (ONNX only) explicitly.
        num_threads: intra-op CPU threads; None keeps the library default.
        backend: ``"torchscript"`` (default; all outputs), ``"onnx"`` (ONNX Runtime on
            CPU for the patch path from the ``.onnx`` files beside the artifact, numpy
            for the MIL head; needs an export made with ``--onnx``; fp32 or int8),
            ``"openvino"`` (the same ONNX files run by OpenVINO on CPU; int8 only when
            the export gated it under OpenVINO), or ``"auto"`` (see
            :func:`choose_backend`: int8 where measured faster).

    Returns:
        A ready :class:`ModelRuntime`.

    Raises:
        ModelArtifactError: missing or invalid artifact, unsupported device or
            precision on this device.
    """
    if backend == "auto":
        backend = choose_backend(path, device, precision)  # type: ignore[assignment]
    if backend == "onnx":
        from .onnx import load_onnx

        return load_onnx(path, device=device, precision=precision, num_threads=num_threads)
    if backend == "openvino":
        from .openvino import load_openvino

        return load_openvino(path, device=device, precision=precision, num_threads=num_threads)
    if precision == "int8":
        from histohelper.errors import ModelArtifactError

        raise ModelArtifactError(
            "precision int8 is unknown to the TorchScript backend; int8 is served by the "
            "ONNX backends (--backend onnx or openvino)"
        )
    from .torchscript import load_torchscript

    return load_torchscript(path, device=device, precision=precision, num_threads=num_threads)


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "ModelRuntime",
    "ParityFigures",
    "PatchOutput",
    "PrecisionVariant",
    "SlideOutput",
    "WeightFile",
    "accelerator_possible",
    "choose_backend",
    "load_runtime",
    "parse_manifest",
    "read_manifest",
]
