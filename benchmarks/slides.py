"""Synthetic benchmark slides mosaicked from real tissue (CMU-1-Small-Region.svs).

A square pyramidal TIFF at 0.5 um/px: the canvas is cut into 1,000 px blocks; about
80 % of them hold a piece of real H&E tissue (a 700..900 px crop of CMU-1-Small-Region
that is at least 60 % tissue, rotated/flipped), the rest and the gaps are glass. Tiled 256 px,
JPEG (quality 90), reduced levels at 4/16/64 written with ``subfiletype=1``,
resolution tags in centimetres, so OpenSlide reads it as a ``generic-tiff`` pyramid
reporting ``mpp = 0.5``. The same seed gives the same layout for every size, so a
20,000 px slide has ~4x the tissue patches of a 10,000 px one.

Slides are written once into a cache directory outside the repository (default
``~/.cache/histohelper-bench``; ``HISTOHELPER_BENCH_CACHE`` overrides) and reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import tifffile

BLOCK_PX = 1000
PIECE_SIDES = (700, 800, 900)
TISSUE_BLOCK_P = 0.8
TILE_PX = 256
MPP = 0.5
DOWNSAMPLES = (4, 16, 64)
GLASS_RGB = (242, 242, 240)
LAYOUT_VERSION = 2  # bump when the layout changes (invalidates cached slides)


def cache_dir() -> Path:
    """The benchmark cache: ``$HISTOHELPER_BENCH_CACHE`` or ``~/.cache/histohelper-bench``."""
    env = os.environ.get("HISTOHELPER_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "histohelper-bench"


def _read_source(source: Path) -> npt.NDArray[np.uint8]:
    import openslide

    with openslide.OpenSlide(str(source)) as slide:
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    return np.ascontiguousarray(rgba[..., :3])


def _glass(h: int, w: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """Glass with mild noise, built from a tiled 509 px noise patch (cheap at 20k px)."""
    patch = np.clip(
        np.asarray(GLASS_RGB, np.float32) + rng.normal(0, 3, (509, 509, 3)), 0, 255
    ).astype(np.uint8)
    reps = (-(-h // 509), -(-w // 509), 1)
    return np.ascontiguousarray(np.tile(patch, reps)[:h, :w])


def _tissue_windows(
    tissue: npt.NDArray[np.uint8], side: int, rng: np.random.Generator, n: int = 64
) -> list[tuple[int, int]]:
    """Top-left corners of ``side`` px windows of ``tissue`` that are >= 60 % tissue
    (HSV saturation > 20), by rejection sampling; falls back to any window."""
    sat = cv2.cvtColor(tissue, cv2.COLOR_RGB2HSV)[..., 1] > 20
    integral = cv2.integral(sat.astype(np.uint8))
    th, tw = sat.shape
    found: list[tuple[int, int]] = []
    for _ in range(20 * n):
        y = int(rng.integers(0, th - side + 1))
        x = int(rng.integers(0, tw - side + 1))
        frac = (
            integral[y + side, x + side]
            - integral[y, x + side]
            - integral[y + side, x]
            + integral[y, x]
        ) / side**2
        if frac >= 0.6:
            found.append((y, x))
            if len(found) == n:
                break
    return found or [(0, 0)]


def mosaic(size_px: int, source: Path, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Level-0 RGB ``[size_px, size_px, 3]`` uint8: glass with pieces of real tissue."""
    tissue = _read_source(source)
    rng = np.random.default_rng(seed)
    canvas = _glass(size_px, size_px, rng)
    windows = {side: _tissue_windows(tissue, side, rng) for side in PIECE_SIDES}
    n_blocks = -(-size_px // BLOCK_PX)
    for by in range(n_blocks):
        for bx in range(n_blocks):
            # Draws depend only on the block, so layouts nest across sizes.
            brng = np.random.default_rng([seed, by, bx])
            if brng.random() > TISSUE_BLOCK_P:
                continue
            side = PIECE_SIDES[int(brng.integers(0, len(PIECE_SIDES)))]
            cands = windows[side]
            y0, x0 = cands[int(brng.integers(0, len(cands)))]
            piece = np.rot90(tissue[y0 : y0 + side, x0 : x0 + side], int(brng.integers(0, 4)))
            if brng.random() < 0.5:
                piece = piece[:, ::-1]
            oy = by * BLOCK_PX + int(brng.integers(0, BLOCK_PX - side + 1))
            ox = bx * BLOCK_PX + int(brng.integers(0, BLOCK_PX - side + 1))
            h = min(side, size_px - oy)
            w = min(side, size_px - ox)
            if h > 0 and w > 0:
                canvas[oy : oy + h, ox : ox + w] = piece[:h, :w]
    return canvas


def write_slide(path: Path, level0: npt.NDArray[np.uint8]) -> Path:
    """Write ``level0`` and its 4/16/64 reductions as a tiled JPEG pyramid at 0.5 um/px."""
    tmp = path.with_suffix(".tmp")
    h0, w0 = level0.shape[:2]
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, ds in enumerate((1, *DOWNSAMPLES)):
            img = (
                level0
                if ds == 1
                else cv2.resize(level0, (w0 // ds, h0 // ds), interpolation=cv2.INTER_AREA)
            )
            lvl_mpp = MPP * w0 / img.shape[1]
            tw.write(
                img,
                photometric="rgb",
                tile=(TILE_PX, TILE_PX),
                compression="jpeg",
                compressionargs={"level": 90},
                subfiletype=1 if k else 0,
                resolution=(1e4 / lvl_mpp, 1e4 / lvl_mpp),
                resolutionunit="CENTIMETER",
                metadata=None,
                maxworkers=2,
            )
    tmp.replace(path)
    return path


def ensure_slide(size_px: int, source: Path, directory: Path | None = None) -> Path:
    """Path of the cached ``size_px`` mosaic slide, writing it first if absent."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"mosaic-v{LAYOUT_VERSION}-{size_px}px.tiff"
    if not path.exists():
        write_slide(path, mosaic(size_px, source))
    return path
