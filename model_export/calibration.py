"""Patches for checking exported precisions: from a real slide, or seeded synthetic.

Slide patches are read through the server's tiler (:mod:`histohelper.server.tiling`):
the same tissue mask, grid, pyramid level, reader and resize the server uses to
serve that slide, so the int8 ranges and the reduced-precision gates are calibrated
on the very pixels the model will be given.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from histohelper.errors import HistoHelperError, InvalidOptionsError
from histohelper.server.tiling import (
    PatchReader,
    Resolution,
    TilingOptions,
    open_slide,
    plan_tiling,
)

#: Default stride between calibration patches, as a fraction of the patch: half a
#: patch, which gives about four times the patches of the serving grid on a small
#: region (the pixels of each are still exactly what the server reads for that cell).
DEFAULT_OVERLAP = 0.5


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration patches and where they came from.

    Attributes:
        images: uint8 ``[B, S, S, 3]`` RGB.
        source: ``"synthetic(seed=N)"`` or ``"slide-sha256:<16 hex>"``, a fingerprint
            of the slide's first MiB and size, never its name (slide names may carry
            patient identifiers; this goes into the manifest that clients can read).
        grid_cells: kept cells of the slide's grid, of which ``images`` are an even
            subset (slide only; 0 for synthetic).
        x_l0: ``[B]`` float64 level-0 left edge of each patch's grid cell (slide
            only; empty for synthetic).
        y_l0: ``[B]`` float64 level-0 top edge, as above.
    """

    images: npt.NDArray[np.uint8]
    source: str
    grid_cells: int = 0
    x_l0: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    y_l0: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))


def synthetic_patches(n: int, size_px: int, seed: int) -> CalibrationSet:
    """Seeded synthetic patches: smooth random colour fields plus noise.

    Pure noise is unlike tissue; a low-frequency field (8 x 8 random colours,
    bilinearly upsampled) with per-pixel noise gives the network varied activations.

    Args:
        n: number of patches.
        size_px: S.
        seed: numpy ``default_rng`` seed.

    Returns:
        :class:`CalibrationSet` with ``images`` uint8 ``[n, S, S, 3]``.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 250, size=(n, 3, 8, 8)).astype(np.float32)
    # separable bilinear upsampling with numpy only
    pos = np.linspace(0, 7, size_px, dtype=np.float32)
    i0 = np.floor(pos).astype(int).clip(0, 6)
    f = pos - i0
    rows = (
        coarse[:, :, i0, :] * (1 - f)[None, None, :, None]
        + coarse[:, :, i0 + 1, :] * f[None, None, :, None]
    )
    full = rows[:, :, :, i0] * (1 - f) + rows[:, :, :, i0 + 1] * f
    full += rng.normal(0, 12, size=full.shape).astype(np.float32)
    images = np.clip(full, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return CalibrationSet(np.ascontiguousarray(images), f"synthetic(seed={seed})")


def calibration_tiling(
    size_px: int,
    target_mpp: float,
    *,
    min_tissue_fraction: float | None = None,
    overlap: float = DEFAULT_OVERLAP,
) -> TilingOptions:
    """The server's tiling options for calibration patches of a model.

    The server's defaults (tissue mask, minimum tissue fraction, edge handling) at the
    model's patch size and target resolution, with a stride of ``size_px * (1 -
    overlap)`` patch px.

    Args:
        size_px: S, the model's patch size (px at ``target_mpp``).
        target_mpp: the model's target resolution (um/px).
        min_tissue_fraction: 0..1; None: the server's default.
        overlap: fraction 0..0.9 by which neighbouring cells overlap.

    Raises:
        InvalidOptionsError: a value the tiler refuses.
    """
    stride_px = max(1, round(size_px * (1.0 - min(max(overlap, 0.0), 0.9))))
    extra = {} if min_tissue_fraction is None else {"min_tissue_fraction": min_tissue_fraction}
    return TilingOptions(
        patch_size_px=size_px,
        target=Resolution(target_mpp, "mpp"),
        stride_px=stride_px,
        **extra,  # type: ignore[arg-type]
    )


def slide_patches(
    path: str | os.PathLike[str],
    *,
    size_px: int,
    target_mpp: float,
    max_patches: int = 256,
    min_tissue_fraction: float | None = None,
    overlap: float = DEFAULT_OVERLAP,
) -> CalibrationSet:
    """Tissue patches of a slide, read exactly as the server reads them.

    The slide is tiled by the server's tiler with :func:`calibration_tiling` (its
    tissue mask and grid, level-0 frame); at most ``max_patches`` kept cells, spread
    evenly over the grid order, are read by the server's
    :class:`~histohelper.server.tiling.PatchReader` at ``output_size_px = size_px``
    (the model's input): the same level, compositing on white and resize.

    Args:
        path: slide file the server can open.
        size_px: S, patch size at ``target_mpp`` (the model's input).
        target_mpp: micrometres per pixel of the patches.
        max_patches: cap on patches returned.
        min_tissue_fraction: 0..1 share of a cell that must be tissue; None: the
            server's default.
        overlap: fraction 0..0.9 by which neighbouring cells overlap.

    Returns:
        :class:`CalibrationSet` with ``images`` uint8 ``[B, S, S, 3]`` in grid order
        and each patch's level-0 cell origin.

    Raises:
        InvalidOptionsError: unreadable slide, options the tiler refuses, or no tissue
            patch on the grid.
    """
    p = Path(path)
    options = calibration_tiling(
        size_px, target_mpp, min_tissue_fraction=min_tissue_fraction, overlap=overlap
    )
    try:
        with open_slide(p) as slide:
            grid = plan_tiling(slide, options).grid
        if len(grid) == 0:
            raise InvalidOptionsError(f"calibration slide {p.name} has no tissue patch on the grid")
        pick = np.unique(np.linspace(0, len(grid) - 1, min(max_patches, len(grid))).round())
        indices = pick.astype(np.int64)
        images = np.empty((len(indices), size_px, size_px, 3), dtype=np.uint8)
        position = {int(i): k for k, i in enumerate(indices)}
        reader = PatchReader(p, grid, output_size_px=size_px, max_failed_fraction=0.0)
        for batch in reader.iter_batches(indices.tolist()):
            for i, image in zip(batch.indices, batch.images, strict=True):
                images[position[int(i)]] = image
    except InvalidOptionsError:
        raise
    except HistoHelperError as exc:
        raise InvalidOptionsError(f"calibration slide {p.name} cannot be read: {exc}") from None
    return CalibrationSet(
        images,
        f"slide-sha256:{_fingerprint(p)}",
        len(grid),
        grid.x_l0[indices].copy(),
        grid.y_l0[indices].copy(),
    )


def _fingerprint(path: Path) -> str:
    """16 hex digits of sha256 over the file's size and first MiB (not its name)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]
