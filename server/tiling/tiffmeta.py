"""What a TIFF file declares about itself that OpenSlide does not pass on: the pixel
size and whether the pixels are fluorescence channels rather than a brightfield RGB.

Read with tifffile from the TIFF tags and the page descriptions, for
:mod:`.slide` (the slide's metadata):

* **pixel size** (level-0 um/px), first found of: the resolution tags of the level-0
  page (``XResolution``/``YResolution`` with ``ResolutionUnit`` 2 = inch, 3 =
  centimetre; TIFF 6.0 section 8), an OME-XML description's
  ``Image/Pixels@PhysicalSizeX/Y`` with ``PhysicalSizeXUnit``/``PhysicalSizeYUnit``
  (OME data model 2016-06; default unit um), an Akoya/PerkinElmer QPTIFF
  description's ``PixelSizeMicrons``. A resolution-tag value over
  :data:`MAX_TAG_MPP` um/px is a writer's default dpi (72 dpi = 352.8 um/px), never a
  scan, and is ignored.
* **fluorescence / multiplex**: a QPTIFF (``<PerkinElmer-QPI-ImageDescription>``)
  whose full-resolution pages are greyscale channels (Akoya Vectra / PhenoImager
  multiplex immunofluorescence; brightfield QPTIFFs have RGB pages); an OME-TIFF
  with two or more channels of one sample, or a channel whose ``IlluminationType``,
  ``AcquisitionMode`` or ``ContrastMethod`` says fluorescence; a TIFF with two or
  more greyscale (``SamplesPerPixel`` 1, photometric minisblack/miniswhite) pages of
  the level-0 size, or a level-0 page of 2 or more samples that is not RGB.

Nothing here raises: a file tifffile cannot parse declares nothing.
"""

from __future__ import annotations

import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: Resolution tags giving more um/px than this are a default dpi, not a pixel size.
MAX_TAG_MPP = 10.0
#: Smallest um/px taken from any declaration (as :data:`~.options.PLAUSIBLE_MPP_RANGE`).
MIN_MPP = 0.01
#: Pages looked at for channel pages (multiplex panels have up to ~40 channels).
MAX_PAGES = 64
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: OME length units in um.
_OME_UNITS_UM = {
    "µm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}
_OME_FLUORESCENCE = re.compile(r"fluoresc|confocal|multiphoton|spim|tirf", re.IGNORECASE)


@dataclass(frozen=True)
class TiffDeclarations:
    """What the TIFF declares (all empty for a file that is not a TIFF).

    Attributes:
        mpp_x: level-0 um/px along x, or None when nothing declares it.
        mpp_y: level-0 um/px along y, or None.
        mpp_declared_by: which declaration gave it, e.g. ``"tiff.XResolution/
            YResolution (centimeter)"``, ``"OME PhysicalSizeX/Y"``, ``"QPTIFF
            PixelSizeMicrons"``; empty when none.
        fluorescence: why the pixels are fluorescence or multiplex channels, e.g.
            ``"a QPTIFF multiplex immunofluorescence image (4 channels: DAPI, FITC,
            Cy3, Cy5)"``; empty for brightfield.
        bits_per_sample: bits of one sample of the level-0 page (8 when unknown);
            OpenSlide renders 16-bit channels as their top 8 bits, so a dim channel's
            real range is compressed and :func:`~.mask.fluorescence_tissue` stretches it.
    """

    mpp_x: float | None = None
    mpp_y: float | None = None
    mpp_declared_by: str = ""
    fluorescence: str = ""
    bits_per_sample: int = 8


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _names(names: list[str]) -> str:
    shown = ", ".join(n for n in names[:6] if n)
    more = ", ..." if len(names) > 6 else ""
    return f" ({len(names)} channels: {shown}{more})" if shown else f" ({len(names)} channels)"


def _plausible(mpp: float | None, high: float = 100.0) -> bool:
    return mpp is not None and math.isfinite(mpp) and MIN_MPP <= mpp <= high


def _tag_mpp(page: object) -> tuple[float, float, str] | None:
    """um/px from a page's XResolution/YResolution and ResolutionUnit, or None."""
    tags = page.tags  # type: ignore[attr-defined]
    try:
        unit = int(tags["ResolutionUnit"].value)
        xr, yr = tags["XResolution"].value, tags["YResolution"].value
    except (KeyError, TypeError, ValueError):
        return None
    per_unit_um = {2: 25_400.0, 3: 10_000.0}.get(unit)
    if per_unit_um is None:  # 1 = no absolute unit
        return None
    try:
        x = per_unit_um * xr[1] / xr[0]
        y = per_unit_um * yr[1] / yr[0]
    except (ZeroDivisionError, TypeError, IndexError):
        return None
    if not (_plausible(x, MAX_TAG_MPP) and _plausible(y, MAX_TAG_MPP)):
        return None
    name = "inch" if unit == 2 else "centimeter"
    return x, y, f"tiff.XResolution/YResolution ({name})"


def _ome(description: str) -> tuple[tuple[float, float, str] | None, str]:
    """(pixel size, fluorescence reason) from an OME-XML description."""
    try:
        root = ET.fromstring(description)
    except ET.ParseError:
        return None, ""
    pixels = next((e for e in root.iter() if _local(e.tag) == "Pixels"), None)
    if pixels is None:
        return None, ""
    mpp = None
    try:
        x = float(pixels.attrib["PhysicalSizeX"])
        y = float(pixels.attrib.get("PhysicalSizeY", x))
        fx = _OME_UNITS_UM.get(pixels.attrib.get("PhysicalSizeXUnit", "µm"))
        fy = _OME_UNITS_UM.get(pixels.attrib.get("PhysicalSizeYUnit", "µm"))
        if fx is not None and fy is not None and _plausible(x * fx) and _plausible(y * fy):
            mpp = (x * fx, y * fy, "OME PhysicalSizeX/Y")
    except (KeyError, ValueError):
        pass
    channels = [e for e in pixels if _local(e.tag) == "Channel"]
    grey = [c for c in channels if c.attrib.get("SamplesPerPixel", "1") == "1"]
    names = [c.attrib.get("Name", "") for c in channels]
    marked = [
        c
        for c in channels
        for key in ("IlluminationType", "AcquisitionMode", "ContrastMethod")
        if _OME_FLUORESCENCE.search(c.attrib.get(key, ""))
    ]
    if len(grey) >= 2 or marked:
        return mpp, "an OME-TIFF fluorescence image" + _names(names)
    try:
        size_c = int(pixels.attrib.get("SizeC", "1"))
    except ValueError:
        size_c = 1
    if not channels and size_c >= 2 and size_c != 3:
        return mpp, f"an OME-TIFF image of {size_c} channels"
    return mpp, ""


def _qptiff(pages: list[object], level0: object) -> tuple[tuple[float, float, str] | None, str]:
    """(pixel size, fluorescence reason) from QPTIFF page descriptions."""
    mpp = None
    match = re.search(r"<PixelSizeMicrons>\s*([0-9.eE+-]+)\s*<", str(level0.description))  # type: ignore[attr-defined]
    if match:
        try:
            value = float(match.group(1))
        except ValueError:
            value = math.nan
        if _plausible(value):
            mpp = (value, value, "QPTIFF PixelSizeMicrons")
    size = level0.shape[:2]  # type: ignore[attr-defined]
    names = []
    for page in pages:
        desc = str(getattr(page, "description", ""))
        if (
            page.shape[:2] == size  # type: ignore[attr-defined]
            and getattr(page, "samplesperpixel", 3) == 1
            and "<ImageType>FullResolution</ImageType>" in desc
        ):
            found = re.search(r"<Name>([^<]{0,40})</Name>", desc)
            names.append(found.group(1) if found else "")
    if names:
        return mpp, "a QPTIFF multiplex immunofluorescence image" + _names(names)
    return mpp, ""


def _grey_channels(pages: list[object], level0: object) -> str:
    """Fluorescence reason from the samples and photometric of the level-0-sized pages."""
    spp = int(getattr(level0, "samplesperpixel", 3))
    photometric = int(getattr(level0, "photometric", 2))
    if spp >= 2 and not (spp in (3, 4) and photometric in (2, 6)):
        return f"a TIFF of {spp} samples per pixel that are not RGB (photometric {photometric})"
    size = level0.shape[:2]  # type: ignore[attr-defined]
    grey = [
        p
        for p in pages
        if p.shape[:2] == size  # type: ignore[attr-defined]
        and int(getattr(p, "samplesperpixel", 3)) == 1
        and int(getattr(p, "photometric", 2)) in (0, 1)
    ]
    if len(grey) >= 2:
        return f"a TIFF of {len(grey)} greyscale channel pages (SamplesPerPixel 1, minisblack)"
    return ""


def read_tiff_declarations(
    path: str | os.PathLike[str], level0_size: tuple[int, int] | None = None
) -> TiffDeclarations:
    """Pixel size and fluorescence as the TIFF at ``path`` declares them.

    Args:
        path: the slide file (any format: non-TIFF files declare nothing).
        level0_size: level-0 ``(width, height)`` px as OpenSlide reads it; the first
            top-level page of that size is level 0 (else the first page).

    Returns:
        :class:`TiffDeclarations`.
    """
    try:
        with open(path, "rb") as fh:
            if fh.read(4) not in _TIFF_MAGIC:
                return TiffDeclarations()
        import tifffile

        with tifffile.TiffFile(path) as tif:
            pages = [tif.pages[i] for i in range(min(len(tif.pages), MAX_PAGES))]
            return _declarations([p for p in pages if hasattr(p, "shape")], level0_size)
    except Exception as exc:  # any doubt: the TIFF declares nothing we can use
        logger.debug("TIFF declarations unreadable: %s", type(exc).__name__)
        return TiffDeclarations()


def _declarations(pages: list[object], level0_size: tuple[int, int] | None) -> TiffDeclarations:
    if not pages:
        return TiffDeclarations()
    level0 = pages[0]
    if level0_size is not None:
        w, h = level0_size
        level0 = next((p for p in pages if p.shape[:2] == (h, w)), pages[0])  # type: ignore[attr-defined]
    description = str(getattr(pages[0], "description", "") or "")
    vendor_mpp: tuple[float, float, str] | None = None
    reason = ""
    if "<PerkinElmer-QPI-ImageDescription" in description:
        vendor_mpp, reason = _qptiff(pages, level0)
    elif "<OME" in description[:2000]:
        vendor_mpp, reason = _ome(description)
    reason = reason or _grey_channels(pages, level0)
    bits = getattr(level0, "bitspersample", 8)
    bits = int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else 8
    mpp = _tag_mpp(level0) or vendor_mpp
    if mpp is None:
        return TiffDeclarations(fluorescence=reason, bits_per_sample=bits)
    return TiffDeclarations(mpp[0], mpp[1], mpp[2], reason, bits)
