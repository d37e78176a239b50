"""What this machine's processor and devices offer, judged cheaply.

The one home of the feature checks the backends, the export and the benchmarks ask:
:func:`cpu_has_vnni` and :func:`cpu_has_bf16` read ``/proc/cpuinfo``;
:func:`accelerator_possible` looks for GPU device nodes without importing torch;
:func:`cpu_has_native_bf16` asks torch's oneDNN build (and so imports torch).
"""

from __future__ import annotations

import os
import sys

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

#: ``/proc/cpuinfo`` flags of the fast int8 dot-product instructions.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
#: ``/proc/cpuinfo`` flags of native bf16 arithmetic.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo``; empty where that is unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_vnni() -> bool:
    """True when the CPU has AVX512-VNNI, AVX-VNNI or AMX-INT8 (the fast int8 paths).

    Read from ``/proc/cpuinfo``; False where that is not available.
    """
    return bool(_cpu_flags() & VNNI_FLAGS)


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16).

    Read from ``/proc/cpuinfo``; False where that is not available.
    """
    return bool(_cpu_flags() & BF16_FLAGS)


def cpu_has_native_bf16() -> bool:
    """True when torch's oneDNN has a native bf16 path here (AVX512-BF16 or AMX).

    Imports torch (the TorchScript backend's own view of the CPU).
    """
    import torch

    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def accelerator_possible() -> bool:
    """Whether this machine could have a GPU torch can use, judged without importing torch.

    On Linux: True only when an NVIDIA, ROCm or WSL2 GPU device node or driver file
    exists (:data:`_GPU_NODES`). On macOS (Apple MPS) and every other system: True, so
    torch decides. Importing a CUDA build of torch just to ask loads CUDA libraries a CPU
    server of the int8 model never uses (RSS and start-up figures:
    ``benchmarks/RESULTS.md``).
    """
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in _GPU_NODES)


__all__ = [
    "BF16_FLAGS",
    "VNNI_FLAGS",
    "accelerator_possible",
    "cpu_has_bf16",
    "cpu_has_native_bf16",
    "cpu_has_vnni",
]
