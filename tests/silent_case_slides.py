"""Small synthetic slides of the cases the tiler used to get silently wrong (issue 21).

Fluorescence and multiplex files (an Akoya-QPTIFF-like multi-page greyscale pyramid,
an OME-TIFF with several channels, bare greyscale channel pages), TIFFs whose pixel
size only the resolution tags or a vendor description declare, marker ink, faint
tissue and tissue at the slide edge. Written with tifffile as
``tests/synthetic_slides.py`` writes its slides; every generator is deterministic and
returns the path it wrote.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import synthetic_slides as ss
import tifffile

#: Channels of the multiplex slides, as an Akoya Vectra/PhenoImager run names them.
CHANNELS = ("DAPI", "FITC", "Cy3", "Cy5")
#: The QPTIFF's pixel size (um/px), in its description and its resolution tags.
QPTIFF_MPP = 0.4965


def qpi_description(name: str, image_type: str = "FullResolution", mpp: float | None = None) -> str:
    """A PerkinElmer/Akoya QPTIFF page description (the XML each page carries)."""
    profile = (
        f"<ScanProfile><root><ScanResolution><PixelSizeMicrons>{mpp}</PixelSizeMicrons>"
        "</ScanResolution></root></ScanProfile>"
        if mpp is not None
        else ""
    )
    return (
        '<?xml version="1.0" encoding="utf-16"?><PerkinElmer-QPI-ImageDescription>'
        "<DescriptionVersion>2</DescriptionVersion>"
        "<AcquisitionSoftware>PerkinElmer-QPI</AcquisitionSoftware>"
        f"<ImageType>{image_type}</ImageType><Name>{name}</Name>{profile}"
        "</PerkinElmer-QPI-ImageDescription>"
    )


def fluorescence_core(h: int, w: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """``[h, w]`` uint8: a bright round tissue core (nuclear stain) on a dark background."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 6, np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) * 2 // 5, 110, -1)
    noise = rng.integers(0, 12, (h, w), dtype=np.uint8)
    return np.asarray(img + noise * (ss.smooth_noise(h, w, seed) > 0.3), np.uint8)


def write_qptiff(
    path: str | os.PathLike[str],
    *,
    dtype: type = np.uint8,
    size: tuple[int, int] = (1536, 1024),
    dim: bool = False,
) -> Path:
    """A QPTIFF-like multiplex immunofluorescence pyramid (Akoya Vectra layout).

    Per level one tiled greyscale (minisblack) page per channel of :data:`CHANNELS`
    with a PerkinElmer-QPI description (ImageType FullResolution / ReducedResolution,
    Name, ScanProfile PixelSizeMicrons 0.4965) and resolution tags in centimetres
    (0.4965 um/px); a stripped RGB thumbnail page after level 0.

    Args:
        path: output file.
        dtype: ``np.uint8`` or ``np.uint16`` samples.
        size: level-0 ``(width, height)`` px.
        dim: 16-bit only: a typical real channel's range, tissue ~2000 and background
            below 50 (instead of the full 0..65535 range).
    """
    w, h = size
    base = fluorescence_core(h, w)
    scale = 257 if dtype == np.uint16 else 1
    if dim and dtype == np.uint16:
        base = np.where(base > 60, base.astype(np.uint16) * 18, base // 2).astype(np.uint16)
        scale = 1
    path = Path(path)
    with tifffile.TiffWriter(path) as tw:
        for k, ds in enumerate((1, 4)):
            level = base if ds == 1 else ss.resize_to(base, (w // ds, h // ds))
            res = 1e4 / (QPTIFF_MPP * ds)
            for c, name in enumerate(CHANNELS):
                tw.write(
                    (level.astype(np.uint32) * scale // (c + 1)).astype(dtype),
                    photometric="minisblack",
                    tile=(256, 256),
                    compression="zlib",
                    subfiletype=1 if k else 0,
                    description=qpi_description(
                        name, "ReducedResolution" if k else "FullResolution", QPTIFF_MPP
                    ),
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    metadata=None,
                )
            if k == 0:
                thumb = ss.resize_to(np.dstack([fluorescence_core(h, w)] * 3), (w // 8, h // 8))
                tw.write(
                    thumb,
                    photometric="rgb",
                    subfiletype=1,
                    description=qpi_description("", "Thumbnail"),
                    metadata=None,
                )
    return path


def write_ome_channels(
    path: str | os.PathLike[str], channels: Sequence[str] = ("DAPI", "FITC", "TRITC")
) -> Path:
    """An OME-TIFF of one image with ``len(channels)`` greyscale channels (CYX),
    PhysicalSizeX/Y 0.325 um, no resolution tags (as many OME writers leave them)."""
    h, w = 768, 1024
    base = fluorescence_core(h, w, seed=1)
    data = np.stack([base // (c + 1) for c in range(len(channels))])
    path = Path(path)
    tifffile.imwrite(
        path,
        data,
        photometric="minisblack",
        tile=(256, 256),
        compression="zlib",
        metadata={
            "axes": "CYX",
            "Channel": {"Name": list(channels)},
            "PhysicalSizeX": 0.325,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": 0.325,
            "PhysicalSizeYUnit": "µm",
        },
    )
    return path


def write_grey_channel_pages(path: str | os.PathLike[str], n_channels: int = 3) -> Path:
    """A tiled TIFF of ``n_channels`` same-size 8-bit minisblack pages, no description."""
    h, w = 768, 1024
    base = fluorescence_core(h, w, seed=2)
    path = Path(path)
    with tifffile.TiffWriter(path) as tw:
        for c in range(n_channels):
            tw.write(
                base // (c + 1),
                photometric="minisblack",
                tile=(256, 256),
                compression="zlib",
                resolution=(1e4 / 0.5, 1e4 / 0.5),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path


def brightfield_rgb(h: int = 900, w: int = 1200, seed: int = 20) -> npt.NDArray[np.uint8]:
    """``[h, w, 3]`` uint8 H&E-like tissue box on glass."""
    return ss.slide_with_tissue(h, w, [(w // 4, h // 4, w // 2, h // 2)], seed=seed)


def write_stripped_tiff(path: str | os.PathLike[str], mpp: float, unit: str) -> Path:
    """A plain (stripped, one-page) RGB TIFF whose resolution tags alone declare ``mpp``
    in ``unit`` (``"CENTIMETER"`` or ``"INCH"``): OpenSlide refuses untiled TIFFs, so it
    is read as a plain image."""
    per_unit = (1e4 if unit == "CENTIMETER" else 25_400.0) / mpp
    path = Path(path)
    tifffile.imwrite(
        path,
        brightfield_rgb(),
        photometric="rgb",
        resolution=(per_unit, per_unit),
        resolutionunit=unit,
        metadata=None,
    )
    return path


def write_ome_rgb(path: str | os.PathLike[str], size_x: float, unit: str) -> Path:
    """A brightfield (RGB, one channel of 3 samples) OME-TIFF whose only pixel size is
    OME's PhysicalSizeX/Y (``size_x`` in ``unit``); tiled, no resolution tags."""
    path = Path(path)
    tifffile.imwrite(
        path,
        brightfield_rgb(),
        photometric="rgb",
        tile=(256, 256),
        compression="zlib",
        metadata={
            "axes": "YXS",
            "PhysicalSizeX": size_x,
            "PhysicalSizeXUnit": unit,
            "PhysicalSizeY": size_x,
            "PhysicalSizeYUnit": unit,
        },
    )
    return path


def write_qptiff_brightfield(path: str | os.PathLike[str]) -> Path:
    """A brightfield QPTIFF (RGB pages) declaring its pixel size only in the
    description's ``PixelSizeMicrons`` (no resolution tags)."""
    img = brightfield_rgb()
    path = Path(path)
    with tifffile.TiffWriter(path) as tw:
        for k, ds in enumerate((1, 4)):
            level = img if ds == 1 else ss.resize_to(img, (img.shape[1] // ds, img.shape[0] // ds))
            tw.write(
                level,
                photometric="rgb",
                tile=(256, 256),
                compression="zlib",
                subfiletype=1 if k else 0,
                description=qpi_description(
                    "", "ReducedResolution" if k else "FullResolution", QPTIFF_MPP
                ),
                metadata=None,
            )
    return path


#: Black and red marker ink as scanned (RGB).
BLACK_INK = (28, 26, 30)
RED_INK = (200, 28, 40)


def write_inked_slide(path: str | os.PathLike[str]) -> Path:
    """3000 x 2000 px at 0.5 um/px: tissue over most of the slide, one thick black
    marker stroke and one red marker stroke across it."""
    img = ss.slide_with_tissue(2000, 3000, [(200, 200, 2600, 1600)], seed=21)
    ss.draw_pen(img, [(300, 600), (2700, 640)], BLACK_INK, 110)
    ss.draw_pen(img, [(300, 1300), (2700, 1340)], RED_INK, 110)
    return ss.write_slide(path, img, [(750, 500)], mpp=0.5)


def faint_tissue_rgb(h: int, w: int, box: tuple[int, int, int, int], seed: int = 0):
    """Glass (242, 242, 240) with tissue at ``box`` (x, y, w, h) so faint that it is
    about 228 grey (a 12 % blend of H&E texture into glass): saturation ~10, below the
    mask's floor of 20."""
    img = ss.glass_rgb(h, w, seed=seed, noise=3.0).astype(np.float32)
    x, y, bw, bh = box
    tissue = ss.tissue_rgb(bh, bw, seed=seed + 1).astype(np.float32)
    img[y : y + bh, x : x + bw] = 0.88 * img[y : y + bh, x : x + bw] + 0.12 * tissue
    return img.clip(0, 255).astype(np.uint8)


def write_faint_slide(path: str | os.PathLike[str]) -> Path:
    """2000 x 1500 px at 0.5 um/px of faint tissue (see :func:`faint_tissue_rgb`)."""
    img = faint_tissue_rgb(1500, 2000, (500, 400, 1000, 700), seed=22)
    return ss.write_slide(path, img, [(500, 375)], mpp=0.5)


def write_edge_slide(path: str | os.PathLike[str]) -> Path:
    """1000 x 500 px at 0.5 um/px; with 224 px patches at 0.5 um/px the grid has 5
    columns, the last one 104 px inside the slide. Tissue fills the right 90 px
    (x 910..1000): edge cells of column 4 are 90 / 104 = 87 % tissue inside the slide
    but 90 / 224 = 40 % (rows 0, 1) or 9 % (row 2, also past the bottom edge) of their
    whole footprint."""
    img = ss.slide_with_tissue(500, 1000, [(910, 0, 90, 500)], seed=23)
    return ss.write_slide(path, img, mpp=0.5)
