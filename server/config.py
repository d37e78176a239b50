"""Server configuration: one frozen dataclass, built only in ``main()``.

Values come from CLI flags, then ``HISTOHELPER_*`` environment variables, then the
defaults below. Nothing is read at import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to run.

    Attributes:
        model_path: exported TorchScript artifact (``histohelper export``).
        slide_root: directory under which request slide paths are resolved (sandbox).
        host: interface to bind; loopback by default.
        port: TCP port; 0 picks a free one (written to ``ready_file``).
        device: "auto" (cuda -> mps -> cpu), "cpu", "cuda", "cuda:N" or "mps".
        precision: "auto", "fp32", "bf16" or "fp16" (auto: fastest variant that passed
            the export's parity gate on this device).
        batch_size: default patches per model batch.
        num_readers: slide-reader threads per analysis.
        max_concurrent_analyses: AnalyzeSlide calls in flight; one more gets
            RESOURCE_EXHAUSTED at once.
        max_patches_per_slide: larger grids are refused (RESOURCE_EXHAUSTED).
        max_message_bytes: gRPC send/receive limit per message, both directions.
        grace_s: on SIGTERM, seconds in-flight calls get to finish before cancellation.
        num_threads: torch intra-op threads (None: the runtime's choice).
        ready_file: if set, JSON ``{"host", "port"}`` is written there once serving.
        max_failed_fraction: share of patches that may fail to read before the slide
            fails with DATA_LOSS.
    """

    model_path: Path
    slide_root: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 32
    num_readers: int = 2
    max_concurrent_analyses: int = 2
    max_patches_per_slide: int = 1_000_000
    max_message_bytes: int = 16 * MIB
    grace_s: float = 10.0
    num_threads: int | None = None
    ready_file: Path | None = None
    max_failed_fraction: float = 0.05
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.num_readers < 1:
            raise ValueError("num_readers must be >= 1")
        if self.max_concurrent_analyses < 1:
            raise ValueError("max_concurrent_analyses must be >= 1")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ValueError("max_failed_fraction must be in [0, 1]")


def env_default(name: str, default: str | None = None) -> str | None:
    """Return ``HISTOHELPER_<NAME>`` from the environment, else ``default``."""
    return os.environ.get(f"HISTOHELPER_{name.upper()}", default)
