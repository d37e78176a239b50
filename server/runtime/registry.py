"""The model backends the runtime can serve an artifact with, by name.

One row of :data:`_BUILTIN` per backend: the name ``load_runtime(backend=...)`` and
``--backend`` take, where its loader lives (imported only when that backend loads,
so asking about backends never imports torch, onnxruntime or openvino), a cheap
availability check, and the manifest's int8 gate that lets it serve int8. A new
backend is its module plus one row here (or a :func:`register_backend` call), plus
its export gate in ``model_export`` when it serves int8.

``backend="auto"`` (:func:`choose_backend`) walks the rows that serve int8, in the
order given, and takes the first that is installed and gated; else TorchScript.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

from histohelper.errors import ModelArtifactError

from .cpu import accelerator_possible, cpu_has_vnni
from .manifest import Manifest, read_manifest
from .types import ModelRuntime

#: The backend that serves everything (all precisions, all devices).
DEFAULT_BACKEND = "torchscript"


def _installed(module: str) -> Callable[[], bool]:
    """An availability check: whether ``module`` can be imported (without importing it)."""

    def check() -> bool:
        return importlib.util.find_spec(module) is not None

    check.__doc__ = f"True when the ``{module}`` package can be imported here."
    return check


@dataclass(frozen=True)
class BackendSpec:
    """One model backend.

    Attributes:
        name: what ``load_runtime(backend=...)`` and ``--backend`` take.
        loader: the function that takes ``(path, *, device, precision,
            num_threads)`` and returns a :class:`ModelRuntime`; or its
            ``"module:function"`` name (relative to this package when it starts with a
            dot), imported only when this backend loads an artifact.
        available: cheap check that the backend's engine is installed (no import).
        int8_gate: key of ``manifest.onnx.int8_gates`` whose passed gate lets this
            backend serve int8 (None: never serves int8). The export writes that key
            (``model_export.export.INT8_GATES``).
        description: one line for ``--help`` and the docs.
    """

    name: str
    loader: str | Callable[..., ModelRuntime]
    available: Callable[[], bool]
    int8_gate: str | None = None
    description: str = ""

    def serves_int8(self, manifest: Manifest) -> bool:
        """Whether this backend may serve ``manifest``'s int8 model: it has one that
        passed this backend's gate at export."""
        return (
            self.int8_gate is not None
            and manifest.onnx is not None
            and manifest.onnx.int8_passed(self.int8_gate)
        )

    def load(
        self,
        path: str | os.PathLike[str],
        *,
        device: str,
        precision: str,
        num_threads: int | None,
    ) -> ModelRuntime:
        """Import the loader and load ``path`` (see :func:`load_runtime`)."""
        load = self.loader
        if isinstance(load, str):
            module, _, function = load.partition(":")
            load = getattr(importlib.import_module(module, __package__), function)
        runtime: ModelRuntime = load(
            path, device=device, precision=precision, num_threads=num_threads
        )
        return runtime


#: Built-in backends; among those serving int8, ``"auto"`` prefers the earlier row.
_BUILTIN = (
    BackendSpec(
        "openvino",
        ".openvino:load_openvino",
        _installed("openvino"),
        int8_gate="openvino",
        description="the ONNX files run by OpenVINO on the CPU (fp32; int8 where gated)",
    ),
    BackendSpec(
        "onnx",
        ".onnx:load_onnx",
        _installed("onnxruntime"),
        int8_gate="onnxruntime",
        description="ONNX Runtime on the CPU for the patch path, numpy MIL head (fp32, int8)",
    ),
    BackendSpec(
        "torchscript",
        ".torchscript:load_torchscript",
        _installed("torch"),
        description="frozen TorchScript on CPU, CUDA or MPS (fp32, bf16, fp16)",
    ),
)

_REGISTRY: dict[str, BackendSpec] = {spec.name: spec for spec in _BUILTIN}


def register_backend(spec: BackendSpec) -> None:
    """Add a backend (or replace one of the same name).

    Raises:
        ValueError: ``spec.name`` is ``"auto"`` (reserved) or empty.
    """
    if not spec.name or spec.name == "auto":
        raise ValueError(f"a backend cannot be named {spec.name!r}")
    _REGISTRY[spec.name] = spec


def backend_names() -> tuple[str, ...]:
    """The registered backend names, ``"auto"``'s int8 preference order."""
    return tuple(_REGISTRY)


def get_backend(name: str) -> BackendSpec:
    """The backend registered as ``name``.

    Raises:
        ModelArtifactError: no backend of that name.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(["auto", *_REGISTRY])
        raise ModelArtifactError(f"backend {name!r} is unknown (known: {known})") from None


def _accelerator_present(device: str) -> bool:
    """For ``device="auto"``: whether torch sees CUDA or MPS; torch is imported only
    where :func:`~.cpu.accelerator_possible` and installed."""
    if device != "auto" or not accelerator_possible():
        return False
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available() or torch.backends.mps.is_available())


def choose_backend(path: str | os.PathLike[str], device: str, precision: str) -> str:
    """Resolve ``backend="auto"`` for an artifact, from its manifest alone.

    The int8 ONNX model where the artifact has one that passed its parity gate, the
    device is the CPU (``"auto"`` without CUDA/MPS, or ``"cpu"``), the precision asked
    is ``"auto"`` or ``"int8"``, and the CPU has VNNI; served by the first registered
    backend that is installed and was gated for int8 at export (OpenVINO, then ONNX
    Runtime). Everything else (GPUs, fp32, bf16, fp16, CPUs without VNNI) stays on
    TorchScript. Throughput of each (``make bench``): ``benchmarks/RESULTS.md``. With
    ``device="auto"``, torch is imported to look for CUDA or MPS only where
    :func:`~.cpu.accelerator_possible`.

    Returns:
        A registered backend name (``"openvino"``, ``"onnx"`` or ``"torchscript"``).

    Raises:
        ModelArtifactError: the artifact is missing or its manifest invalid.
    """
    if precision not in ("auto", "int8") or device not in ("auto", "cpu"):
        return DEFAULT_BACKEND
    manifest = read_manifest(path)
    int8 = [spec for spec in _REGISTRY.values() if spec.serves_int8(manifest)]
    if not int8 or not cpu_has_vnni() or _accelerator_present(device):
        return DEFAULT_BACKEND
    for spec in int8:
        if spec.available():
            return spec.name
    return DEFAULT_BACKEND
