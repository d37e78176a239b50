"""Model runtime: loads a frozen artifact by its manifest alone.

No OpenSlide, cv2, gRPC or torchvision here: the server serves frozen artifacts only.

Importing this package is light (pydantic, numpy); torch, onnxruntime or openvino are imported
by :func:`load_runtime` for the backend asked for.

Public API:
    :class:`Manifest`, :func:`read_manifest` - the artifact's embedded JSON manifest.
    :func:`load_runtime` - load an artifact for serving, returns a :class:`ModelRuntime`.
    :func:`backend_names`, :func:`register_backend` - the backend registry (:mod:`.registry`).
    :class:`ModelRuntime` - the protocol the server codes against.
    :class:`PatchOutput`, :class:`SlideOutput` - outputs (float32 numpy arrays).
"""

from __future__ import annotations

import os

from histohelper.errors import ModelArtifactError

from .cpu import accelerator_possible
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
from .registry import (
    DEFAULT_BACKEND,
    BackendSpec,
    backend_names,
    choose_backend,
    get_backend,
    register_backend,
)
from .types import ModelRuntime, PatchOutput, SlideOutput


def load_runtime(
    path: str | os.PathLike[str],
    *,
    device: str = "auto",
    precision: str = "auto",
    num_threads: int | None = None,
    backend: str = DEFAULT_BACKEND,
) -> ModelRuntime:
    """Load a model artifact for serving.

    Args:
        path: the TorchScript artifact (``.pt``) written by ``histohelper export``.
        device: ``"auto"`` (cuda -> mps -> cpu), ``"cpu"``, ``"cuda[:N]"``, ``"mps"``.
        precision: ``"auto"``: the fastest variant the device supports that passed the
            export's parity gate (bf16 on CPUs with AVX512-BF16/AMX, fp16 on CUDA/MPS,
            else fp32; int8 with the ONNX backends on CPUs with VNNI); or ``"fp32"``,
            ``"bf16"``, ``"fp16"``, ``"int8"`` (ONNX backends only) explicitly.
        num_threads: intra-op CPU threads; None keeps the library default.
        backend: a name of :func:`backend_names` (:mod:`.registry`):
            ``"torchscript"`` (default; all outputs), ``"onnx"`` (ONNX Runtime on
            CPU for the patch path from the ``.onnx`` files beside the artifact, numpy
            for the MIL head; needs an export made with ``--onnx``; fp32 or int8),
            ``"openvino"`` (the same ONNX files run by OpenVINO on CPU; int8 only when
            the export gated it under OpenVINO), or ``"auto"`` (see
            :func:`choose_backend`: int8 where measured faster).

    Returns:
        A ready :class:`ModelRuntime`.

    Raises:
        ModelArtifactError: missing or invalid artifact, unknown backend, unsupported
            device or precision on this device or backend.
    """
    if backend == "auto":
        backend = choose_backend(path, device, precision)
    spec = get_backend(backend)
    if precision == "int8" and spec.int8_gate is None:
        int8 = [name for name in backend_names() if get_backend(name).int8_gate is not None]
        raise ModelArtifactError(
            f"precision int8 is unknown to the {spec.name} backend; int8 is served by "
            f"the ONNX backends (--backend {' or '.join(int8)})"
        )
    return spec.load(path, device=device, precision=precision, num_threads=num_threads)


__all__ = [
    "DEFAULT_BACKEND",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "BackendSpec",
    "Manifest",
    "ModelRuntime",
    "ParityFigures",
    "PatchOutput",
    "PrecisionVariant",
    "SlideOutput",
    "WeightFile",
    "accelerator_possible",
    "backend_names",
    "choose_backend",
    "get_backend",
    "load_runtime",
    "parse_manifest",
    "read_manifest",
    "register_backend",
]
