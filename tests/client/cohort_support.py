"""Helpers of the cohort tests: small synthetic slides and the audit log as call counter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import synthetic_slides as syn


def write_small_slide(path: Path, seed: int, tissue: bool = True) -> Path:
    """About 700 x 600 px at 0.5 um/px with one tissue block (a few 224 px patches)."""
    boxes = [(100, 80, 520, 440)] if tissue else []
    img = syn.slide_with_tissue(600, 700, boxes, seed=seed)
    return syn.write_slide(path, img, [(175, 150)])


def write_corrupt_slide(path: Path) -> Path:
    """Tissue everywhere, JPEG tiles, every other tile of level 0 garbled (SLIDE_CORRUPT)."""
    img = syn.slide_with_tissue(1400, 1800, [(0, 0, 1800, 1400)], seed=2)
    syn.write_slide(path, img, [(450, 350)], compression="jpeg")
    for tile in range(0, 24, 2):
        syn.corrupt_tile(path, 0, tile)
    return path


def audit_records(path: Path, rpc: str = "AnalyzeSlide") -> list[dict[str, object]]:
    """The audit records of ``rpc`` in a server's JSON-lines audit log."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["rpc"] == rpc]


def start_repository_server(repository: Path, slide_root: Path, **overrides: Any) -> Any:
    """A real in-process server (loopback, port 0, fp32, CPU) over a model repository
    whose default model is ``tumour``; anonymous admin calls allowed; ``overrides``:
    other ServerConfig fields. Stop it with ``stop(grace=0, drain=0)``."""
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    return start_server(
        ServerConfig(
            model_repository=repository,
            slide_root=slide_root,
            port=0,
            precision="fp32",
            device="cpu",
            batch_size=8,
            default_model="tumour",
            allow_anonymous_admin=True,
            **overrides,
        )
    )
