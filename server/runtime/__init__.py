"""Model runtime: loads a frozen artifact by its manifest alone.

No OpenSlide, cv2, gRPC or torchvision here: the server serves frozen artifacts only.

Importing this package is light (pydantic, numpy); torch or onnxruntime are imported
by :func:`load_runtime` for the backend asked for.

Public API:
    :class:`Manifest`, :func:`read_manifest` - the artifact's embedded JSON manifest.
    :func:`load_runtime` - load an artifact for serving, returns a :class:`ModelRuntime`.
    :class:`ModelRuntime` - the protocol the server codes against.
    :class:`PatchOutput`, :class:`SlideOutput` - outputs (float32 numpy arrays).
"""

from __future__ import annotations

import os
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


def load_runtime(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    precision: str = "auto",
    num_threads: int | None = None,
    backend: Literal["torchscript", "onnx"] = "torchscript",
) -> ModelRuntime:
    """Load a model artifact for serving.

    Args:
        path: the TorchScript artifact (``.pt``) written by ``histohelper export``.
        device: ``"auto"`` (cuda -> mps -> cpu), ``"cpu"``, ``"cuda[:N]"``, ``"mps"``.
        precision: ``"auto"``: the fastest variant the device supports that passed the
            export's parity gate (bf16 on CPUs with AVX512-BF16/AMX, fp16 on CUDA/MPS,
            else fp32); or ``"fp32"``, ``"bf16"``, ``"fp16"`` explicitly.
        num_threads: intra-op CPU threads; None keeps the library default.
        backend: ``"torchscript"`` (default; all outputs) or ``"onnx"`` (ONNX Runtime
            on CPU for the patch path from the ``.onnx`` beside the artifact, numpy for
            the MIL head; needs an export made with ``--onnx``; fp32 only).

    Returns:
        A ready :class:`ModelRuntime`.

    Raises:
        ModelArtifactError: missing or invalid artifact, unsupported device or
            precision on this device.
    """
    if backend == "onnx":
        from .onnx import load_onnx

        return load_onnx(path, device=device, precision=precision, num_threads=num_threads)
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
    "load_runtime",
    "parse_manifest",
    "read_manifest",
]
