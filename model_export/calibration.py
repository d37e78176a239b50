"""Patches for checking exported precisions: from a real slide, or seeded synthetic.

The slide path reads OpenSlide directly with a simple fixed grid (no tissue masking
beyond a per-patch white test): the serving tiler is deliberately not reused, so the
export step has no dependency on the server.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from histohelper.errors import InvalidOptionsError

#: A pixel is "white" (background) when all of R, G, B exceed this value.
WHITE_LEVEL = 220
#: Keep a patch when at least this fraction of its pixels is not white.
MIN_TISSUE_FRACTION = 0.25


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration patches and where they came from.

    Attributes:
        images: uint8 ``[B, S, S, 3]`` RGB.
        source: ``"synthetic(seed=N)"`` or ``"slide-sha256:<16 hex>"``, a fingerprint
            of the slide's first MiB and size, never its name (slide names may carry
            patient identifiers; this goes into the manifest that clients can read).
        grid_cells: grid cells visited (slide only; 0 for synthetic).
    """

    images: npt.NDArray[np.uint8]
    source: str
    grid_cells: int = 0


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


def slide_patches(
    path: str | os.PathLike[str],
    *,
    size_px: int,
    target_mpp: float,
    max_patches: int = 256,
    min_tissue_fraction: float = MIN_TISSUE_FRACTION,
    overlap: float = 0.5,
) -> CalibrationSet:
    """Patches on a fixed grid over a slide, background dropped.

    A cell is ``size_px`` at ``target_mpp``, i.e. ``size_l0 = size_px * target_mpp /
    mpp`` level-0 pixels; the grid step is ``size_l0 * (1 - overlap)`` (default half a
    patch, which roughly quadruples the patches a small region gives). Each cell is
    read from the level-0 image with OpenSlide (composited on white), resized to
    ``size_px`` when the slide's mpp differs from ``target_mpp`` (PIL bilinear), and
    kept when at least ``min_tissue_fraction`` of its pixels are not white (any
    channel <= :data:`WHITE_LEVEL`). At most ``max_patches`` cells are kept, spread
    evenly over the kept ones.

    Args:
        path: slide file readable by OpenSlide.
        size_px: S, patch size at ``target_mpp``.
        target_mpp: micrometres per pixel of the patches.
        max_patches: cap on patches returned.
        min_tissue_fraction: 0..1.
        overlap: fraction 0..0.9 by which neighbouring cells overlap.

    Returns:
        :class:`CalibrationSet` with ``images`` uint8 ``[B, S, S, 3]``.

    Raises:
        InvalidOptionsError: unreadable slide or no tissue patch on the grid.
    """
    import openslide
    from PIL import Image

    p = Path(path)
    try:
        slide = openslide.OpenSlide(str(p))
    except (openslide.OpenSlideError, OSError) as exc:
        raise InvalidOptionsError(f"calibration slide {p.name} cannot be opened: {exc}") from None
    try:
        mpp_raw = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        mpp_l0 = float(mpp_raw) if mpp_raw else target_mpp
        size_l0 = max(1, round(size_px * target_mpp / mpp_l0))
        step_l0 = max(1, round(size_l0 * (1.0 - min(max(overlap, 0.0), 0.9))))
        w_l0, h_l0 = slide.dimensions
        kept: list[npt.NDArray[np.uint8]] = []
        positions = [
            (x_l0, y_l0)
            for y_l0 in range(0, h_l0 - size_l0 + 1, step_l0)
            for x_l0 in range(0, w_l0 - size_l0 + 1, step_l0)
        ]
        # A gigapixel slide has far more cells than needed: visit an even subset.
        max_cells = 16 * max_patches
        if len(positions) > max_cells:
            pick = np.linspace(0, len(positions) - 1, max_cells).round().astype(int)
            positions = [positions[i] for i in pick]
        cells = 0
        for x_l0, y_l0 in positions:
            cells += 1
            region = slide.read_region((x_l0, y_l0), 0, (size_l0, size_l0))
            white = Image.new("RGBA", region.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, region).convert("RGB")
            if size_l0 != size_px:
                rgb = rgb.resize((size_px, size_px), Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)
            tissue = (arr <= WHITE_LEVEL).any(axis=2).mean()
            if tissue >= min_tissue_fraction:
                kept.append(arr)
    finally:
        slide.close()
    if not kept:
        raise InvalidOptionsError(f"calibration slide {p.name} has no tissue patch on the grid")
    if len(kept) > max_patches:
        idx = np.linspace(0, len(kept) - 1, max_patches).round().astype(int)
        kept = [kept[i] for i in idx]
    return CalibrationSet(np.stack(kept), f"slide-sha256:{_fingerprint(p)}", cells)


def _fingerprint(path: Path) -> str:
    """16 hex digits of sha256 over the file's size and first MiB (not its name)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]
