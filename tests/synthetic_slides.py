"""Synthetic whole-slide images written with tifffile, for tests and benchmarks.

Conventions (so OpenSlide reads them as ``generic-tiff`` pyramids): tiled 256 px,
reduced levels written with ``subfiletype=1`` (without it OpenSlide sees one level),
resolution tags in centimetres (``resolution=(1e4 / mpp, 1e4 / mpp)``), from which
OpenSlide reports ``openslide.mpp-x/y``.

Every generator is deterministic (seeded) and returns the path it wrote. Import as
``import synthetic_slides`` (pytest's ``pythonpath`` includes ``tests``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import tifffile

TILE = 256
GLASS_RGB = (242, 242, 240)
#: An eosin-like pink and a hematoxylin-like purple (RGB).
PINK = (226, 140, 186)
PURPLE = (120, 60, 150)


def smooth_noise(h: int, w: int, seed: int, scale: float = 16.0) -> npt.NDArray[np.float32]:
    """Low-frequency noise in [0, 1], ``[h, w]`` float32 (upsampled random field)."""
    rng = np.random.default_rng(seed)
    gh, gw = max(2, int(h / scale) + 2), max(2, int(w / scale) + 2)
    field = rng.random((gh, gw), dtype=np.float32)
    return cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def tissue_rgb(h: int, w: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """H&E-like texture ``[h, w, 3]`` uint8: pink stroma mixed with purple, smooth."""
    t = smooth_noise(h, w, seed)[..., None]
    pink = np.array(PINK, np.float32)
    purple = np.array(PURPLE, np.float32)
    img = pink * (1 - t) + purple * t
    return img.clip(0, 255).astype(np.uint8)


def glass_rgb(h: int, w: int, seed: int = 0, noise: float = 3.0) -> npt.NDArray[np.uint8]:
    """Empty glass ``[h, w, 3]`` uint8 with Gaussian noise of ``noise`` grey levels."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = GLASS_RGB
    img += rng.normal(0, noise, (h, w, 3)).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def slide_with_tissue(
    h: int,
    w: int,
    boxes: Sequence[tuple[int, int, int, int]],
    seed: int = 0,
    background: Callable[[int, int, int], npt.NDArray[np.uint8]] | None = None,
) -> npt.NDArray[np.uint8]:
    """Glass with rectangular tissue at ``boxes`` (x, y, w, h in px): ``[h, w, 3]`` uint8."""
    img = (background or glass_rgb)(h, w, seed)
    tissue = tissue_rgb(h, w, seed + 1)
    for x, y, bw, bh in boxes:
        img[y : y + bh, x : x + bw] = tissue[y : y + bh, x : x + bw]
    return img


def resize_to(img: npt.NDArray[np.uint8], size_wh: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """Downscale with INTER_AREA to ``(width, height)``."""
    return cv2.resize(img, size_wh, interpolation=cv2.INTER_AREA)


def write_pyramid(
    path: str | os.PathLike[str],
    levels: Sequence[npt.NDArray[np.uint8]],
    *,
    mpp: float | None = 0.5,
    compression: str | None = "zlib",
    tile: int = TILE,
) -> Path:
    """Write a tiled pyramidal TIFF OpenSlide reads as ``generic-tiff``.

    Args:
        path: output file.
        levels: level images, level 0 first; ``[h, w, 3]`` RGB or ``[h, w, 4]`` RGBA
            (unassociated alpha) uint8.
        mpp: level-0 um/px written as resolution tags (None: no tags).
        compression: tifffile compression ("zlib", "jpeg", None).
        tile: tile side (px, multiple of 16).

    Returns:
        The path written.
    """
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        w0 = levels[0].shape[1]
        for k, img in enumerate(levels):
            extra = {}
            if img.ndim == 3 and img.shape[2] == 4:
                extra["extrasamples"] = ["unassalpha"]
            if mpp is not None:
                lvl_mpp = mpp * w0 / img.shape[1]
                extra["resolution"] = (1e4 / lvl_mpp, 1e4 / lvl_mpp)
                extra["resolutionunit"] = "CENTIMETER"
            tw.write(
                img,
                photometric="rgb",
                tile=(tile, tile),
                compression=compression,
                subfiletype=1 if k else 0,
                metadata=None,
                **extra,
            )
    return path


def write_slide(
    path: str | os.PathLike[str],
    level0: npt.NDArray[np.uint8],
    level_sizes: Sequence[tuple[int, int]] = (),
    **kwargs: object,
) -> Path:
    """Write ``level0`` plus reduced levels of the given ``(width, height)`` sizes.

    Reduced levels are INTER_AREA resizes of level 0 to exactly those sizes, so a
    pyramid with non-integer downsamples (e.g. 10001 -> 2500 px: 4.0004) is easy.
    Extra keyword arguments go to :func:`write_pyramid`.
    """
    levels = [level0] + [resize_to(level0, s) for s in level_sizes]
    return write_pyramid(path, levels, **kwargs)  # type: ignore[arg-type]


def write_sparse_slide(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    boxes: Sequence[tuple[int, int, int, int]],
    *,
    mpp: float | None = 0.25,
    downsamples: Sequence[int] = (),
    compression: str = "jpeg",
    tile: int = TILE,
) -> Path:
    """A huge, mostly empty slide: only tiles touching ``boxes`` hold data.

    Tiles away from tissue are written *empty* (byte count 0); OpenSlide returns
    them transparent, as scanners do outside the scanned area. The first tile is
    always written (glass) because tifffile needs one array to learn the dtype.

    Args:
        path: output file (BigTIFF).
        width: level-0 width (px).
        height: level-0 height (px).
        boxes: tissue rectangles ``(x, y, w, h)`` in level-0 px.
        mpp: level-0 um/px.
        downsamples: integer downsamples of reduced levels (e.g. ``(4, 16, 64)``).
        compression: tifffile compression for written tiles.
        tile: tile side (px).

    Returns:
        The path written.
    """
    path = Path(path)

    def tiles(ds: int) -> Iterator[npt.NDArray[np.uint8] | None]:
        w, h = -(-width // ds), -(-height // ds)
        scaled = [(x / ds, y / ds, bw / ds, bh / ds) for x, y, bw, bh in boxes]
        for ty in range(0, h, tile):
            for tx in range(0, w, tile):
                hit = [
                    b
                    for b in scaled
                    if b[0] < tx + tile
                    and tx < b[0] + b[2]
                    and b[1] < ty + tile
                    and ty < b[1] + b[3]
                ]
                if not hit and (tx, ty) != (0, 0):
                    yield None
                    continue
                t = glass_rgb(tile, tile, seed=(tx * 7 + ty) % 1000)
                tis = tissue_rgb(tile, tile, seed=(tx * 13 + ty * 3) % 1000)
                yy, xx = np.mgrid[ty : ty + tile, tx : tx + tile]
                inside = np.zeros((tile, tile), bool)
                for bx, by, bw, bh in hit:
                    inside |= (xx >= bx) & (xx < bx + bw) & (yy >= by) & (yy < by + bh)
                t[inside] = tis[inside]
                yield t

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, ds in enumerate((1, *downsamples)):
            w, h = -(-width // ds), -(-height // ds)
            extra = {}
            if mpp is not None:
                extra = {
                    "resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                    "resolutionunit": "CENTIMETER",
                }
            tw.write(
                tiles(ds),
                shape=(h, w, 3),
                dtype=np.uint8,
                photometric="rgb",
                tile=(tile, tile),
                compression=compression,
                subfiletype=1 if k else 0,
                metadata=None,
                **extra,
            )
    return path


def draw_pen(
    img: npt.NDArray[np.uint8],
    points: Sequence[tuple[int, int]],
    color: tuple[int, int, int],
    thickness: int,
) -> npt.NDArray[np.uint8]:
    """Draw a marker stroke (polyline) on ``img`` in place and return it."""
    pts = np.asarray(points, np.int32).reshape(-1, 1, 2)
    cv2.polylines(img, [pts], False, color, thickness, lineType=cv2.LINE_AA)
    return img


def corrupt_tile(path: str | os.PathLike[str], page: int = 0, tile_index: int = 0) -> Path:
    """Overwrite the middle of one tile's compressed bytes with garbage, in place.

    Args:
        path: a tiled TIFF written by this module (JPEG tiles decode-fail best).
        page: IFD index.
        tile_index: tile number in that IFD.
    """
    path = Path(path)
    with tifffile.TiffFile(path) as tf:
        p = tf.pages[page]
        offset = p.dataoffsets[tile_index]
        count = p.databytecounts[tile_index]
    with open(path, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff\xc4\x00\x01" * max(1, min(64, count // 8)))
    return path
