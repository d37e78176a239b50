"""Tissue masks, patch grids and patch reading for every slide OpenSlide reads.

No gRPC, no torch: this package imports numpy, OpenCV, OpenSlide (only in
:mod:`.slide`) and the HistoHelper core.

Typical use::

    from histohelper.server.tiling import TilingOptions, open_slide, plan_tiling, PatchReader

    with open_slide(path) as slide:
        plan = plan_tiling(slide, TilingOptions())
    for batch in PatchReader(path, plan.grid).iter_batches():
        model(batch.images)  # [B, 224, 224, 3] uint8 RGB

Frames: every coordinate is level-0 px unless its name says otherwise (``*_px`` at
the target resolution or a level, mask and thumbnail with explicit per-axis scales).
See ``docs/tiling.md`` for the mask method and its measured comparison.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Options are imported eagerly (stdlib + errors only) so CLIs can register the tiling
# flags where OpenSlide/OpenCV are absent; everything else loads on first use.
from .options import (
    EdgeMode,
    MaskMethod,
    Resolution,
    ResolutionUnit,
    TilingOptions,
    add_tiling_arguments,
    tiling_options_from_args,
)

if TYPE_CHECKING:
    from .mask import LowResImage, TissueMask, compute_tissue_mask, read_low_res, threshold_tissue
    from .plan import MppSource, PatchGrid, TilingPlan, build_grid, plan_tiling, resolve_mpp
    from .reader import PatchBatch, PatchReader, read_patch
    from .slide import Slide, SlideCache, SlideMetadata, composite_on_white, open_slide

_LAZY = {
    "LowResImage": "mask",
    "TissueMask": "mask",
    "compute_tissue_mask": "mask",
    "read_low_res": "mask",
    "threshold_tissue": "mask",
    "MppSource": "plan",
    "PatchGrid": "plan",
    "TilingPlan": "plan",
    "build_grid": "plan",
    "plan_tiling": "plan",
    "resolve_mpp": "plan",
    "PatchBatch": "reader",
    "PatchReader": "reader",
    "read_patch": "reader",
    "Slide": "slide",
    "SlideCache": "slide",
    "SlideMetadata": "slide",
    "composite_on_white": "slide",
    "open_slide": "slide",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "EdgeMode",
    "LowResImage",
    "MaskMethod",
    "MppSource",
    "PatchBatch",
    "PatchGrid",
    "PatchReader",
    "Resolution",
    "ResolutionUnit",
    "Slide",
    "SlideCache",
    "SlideMetadata",
    "TilingOptions",
    "TilingPlan",
    "TissueMask",
    "add_tiling_arguments",
    "build_grid",
    "composite_on_white",
    "compute_tissue_mask",
    "open_slide",
    "plan_tiling",
    "read_low_res",
    "read_patch",
    "resolve_mpp",
    "threshold_tissue",
    "tiling_options_from_args",
]
