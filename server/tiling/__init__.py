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

from .mask import LowResImage, TissueMask, compute_tissue_mask, read_low_res, threshold_tissue
from .options import (
    EdgeMode,
    MaskMethod,
    Resolution,
    ResolutionUnit,
    TilingOptions,
    add_tiling_arguments,
    tiling_options_from_args,
)
from .plan import MppSource, PatchGrid, TilingPlan, build_grid, plan_tiling, resolve_mpp
from .reader import PatchBatch, PatchReader, read_patch
from .slide import Slide, SlideCache, SlideMetadata, composite_on_white, open_slide

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
