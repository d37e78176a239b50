"""The one adapter to OpenSlide: open, describe and read slides safely.

Every format OpenSlide 4 reads (Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN,
generic tiled TIFF, DICOM WSI, ...) opens through :class:`openslide.OpenSlide`;
plain images (stripped TIFF, PNG, JPEG) fall back to :class:`openslide.ImageSlide`.
Each open is validated by reading one small region, so pixel types OpenSlide cannot
decode are refused at once with :class:`UnsupportedSlideError`.

OpenSlide errors *latch*: after one failed read every later read on that handle
fails. :meth:`Slide.read_region_rgb` therefore closes and reopens its handle after
a failure (the poisoned handle is never reused) and raises
:class:`CorruptSlideError` for that one region.

Messages never contain the slide's path or file name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import numpy.typing as npt
import openslide
from PIL import Image

from histohelper.errors import (
    CorruptSlideError,
    RegionOutOfBoundsError,
    SlideNotFoundError,
    SlideTooLargeError,
    UnsupportedSlideError,
)

from .options import plausible_mpp
from .tiffmeta import TiffDeclarations, read_tiff_declarations
from .tiffread import TiffLevelReader, TiffPyramid, TileCache

logger = logging.getLogger(__name__)

#: Largest region one read_region_rgb call may return (px); 64 Mpx = 256 MiB RGBA.
MAX_REGION_PX = 64 * 1024 * 1024
#: Largest plain (non-pyramidal) image opened through ImageSlide (px). PIL decodes
#: such images whole on first read, so memory is ~4 bytes per px.
MAX_PLAIN_IMAGE_PX = 200_000_000
#: OpenSlide/libtiff messages that mean "this pixel format cannot be read at all".
_UNSUPPORTED_PATTERNS = re.compile(
    r"unsupported|not supported|can ?not handle|sorry|invalid level|bits ?per ?sample|"
    r"photometric|sample ?format|planar",
    re.IGNORECASE,
)


#: What identifies the bytes of a file: (st_dev, st_ino, st_size, st_mtime_ns,
#: st_ctime_ns).
FileIdentity = tuple[int, int, int, int, int]


def file_identity(path: str | os.PathLike[str]) -> FileIdentity | None:
    """``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` of ``path`` (symlinks
    followed), or None when it cannot be stat'ed (deleted, no permission).

    A file replaced under the same name (``os.replace``) gets another inode; one
    rewritten or truncated in place another size, mtime or ctime (the inode's change
    time, set by the kernel on every write: a rewrite that keeps the size and puts the
    mtime back, as ``rsync --inplace -t`` does, still changes it). Either way the
    identity changes, so a handle opened on the old bytes is never taken for the new
    ones.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class SlideMetadata:
    """What a slide says about itself (immutable).

    Attributes:
        vendor: OpenSlide's ``openslide.vendor`` (``"aperio"``, ``"generic-tiff"``,
            ``"dicom"``, ...) or ``"image"`` for plain images read by ImageSlide.
        level_dimensions: per level ``(width, height)`` in that level's px, level 0 first.
        level_downsamples: per level ``(downsample_x, downsample_y)``: level-0 px per
            level px computed per axis from the dimensions (exact floats, never
            rounded; OpenSlide's single averaged value is in ``openslide_downsamples``).
        openslide_downsamples: OpenSlide's own per-level downsample (one float).
        mpp_x: level-0 um/px along x from metadata, or None when absent/implausible.
        mpp_y: level-0 um/px along y, or None.
        objective_power: scanner objective magnification, or None.
        width_l0: level-0 width (px).
        height_l0: level-0 height (px).
        level_count: number of pyramid levels.
        is_plain_image: read through ImageSlide (no pyramid, no slide metadata).
        warnings: notes from opening (e.g. implausible metadata ignored).
        mpp_declared_by: where ``mpp_x``/``mpp_y`` came from: ``"openslide.mpp-x/y"``
            (OpenSlide's vendor parsing), or, where OpenSlide gives none, the TIFF
            declaration :mod:`.tiffmeta` read (``"tiff.XResolution/YResolution
            (centimeter)"``, ``"OME PhysicalSizeX/Y"``, ``"QPTIFF PixelSizeMicrons"``);
            empty when there is no mpp.
        fluorescence: why the slide holds fluorescence or multiplex channels rather
            than a brightfield RGB picture (QPTIFF / OME description, greyscale
            channel pages, DICOM illumination), e.g. ``"a QPTIFF multiplex
            immunofluorescence image (4 channels: DAPI, ...)"``; empty for brightfield.
        bits_per_sample: bits per sample of a TIFF's level-0 page (8 otherwise), e.g.
            16 for a 16-bit QPTIFF channel (OpenSlide renders its top 8 bits).
    """

    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[tuple[float, float], ...]
    openslide_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    objective_power: float | None
    width_l0: int
    height_l0: int
    level_count: int
    is_plain_image: bool = False
    warnings: tuple[str, ...] = ()
    mpp_declared_by: str = ""
    fluorescence: str = ""
    dicom: DicomIdentity | None = None
    bits_per_sample: int = 8


@dataclass(frozen=True)
class DicomIdentity:
    """The DICOM identity of a slide read from a DICOM WSI series (never logged).

    Attributes:
        study_instance_uid: Study Instance UID.
        series_instance_uid: Series Instance UID.
        frame_of_reference_uid: Frame of Reference UID ("" when absent).
        source_image_json: DICOM JSON of the level-0 instance without bulk data and
            per-frame functional groups.
        dicomweb_server: the configured DICOMweb server name ("" for local files).
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    source_image_json: str
    dicomweb_server: str = ""


@runtime_checkable
class SlideSource(Protocol):
    """A slide that is not a file path (e.g. a DICOMweb series): opened with
    :meth:`open`, fingerprinted for the result cache with :meth:`fingerprint`.

    Attributes:
        suffix: what stands for a file suffix in the result cache's key.
    """

    suffix: str

    def open(self) -> Slide:
        """An open slide (close it, or use ``with``)."""
        ...

    def fingerprint(self) -> str:
        """A string identifying the slide's pixels (for the result cache)."""
        ...


def _float_prop(props: dict[str, str] | object, key: str) -> float | None:
    try:
        value = float(props[key])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


#: An absolute POSIX path or a Windows drive path inside a library message.
_PATH_IN_MESSAGE = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\][^\s'\"():,]+")


def _scrub(message: str, path: str) -> str:
    """Remove the slide's path, file name and stem, and any other absolute path (a
    multi-file slide's companion files), from a library message."""
    base = os.path.basename(path)
    stem = os.path.splitext(base)[0]
    # Anything under the slide's folder (companion files, names with spaces) up to the
    # next ": " separator of the library's message.
    for folder in sorted({os.path.dirname(path), os.path.dirname(os.path.abspath(path))}):
        if folder and folder != os.sep:
            message = re.sub(re.escape(folder) + r"[^:\n]*", "<path>", message)
    for token in sorted(
        {path, os.path.abspath(path), base, stem if len(stem) >= 4 else ""}, key=len, reverse=True
    ):
        if token:
            message = message.replace(token, "<slide>")
    return _PATH_IN_MESSAGE.sub("<path>", message)[:200]


#: DICOM IlluminationTypeCodeSequence code (DCM 111743): "Epifluorescence illumination".
_DICOM_EPIFLUORESCENCE = "111743"


def _fluorescence_from_properties(props: dict[str, str] | object) -> str:
    """Why OpenSlide's properties say fluorescence (DICOM WSI optical paths), or ""."""
    items: dict[str, str] = dict(props.items()) if hasattr(props, "items") else {}
    paths = {
        k.split("]", 1)[0]
        for k, v in items.items()
        if k.startswith("dicom.OpticalPathSequence[")
        and "IlluminationTypeCodeSequence" in k
        and (
            (k.endswith("CodeValue") and v == _DICOM_EPIFLUORESCENCE)
            or (k.endswith("CodeMeaning") and "fluorescence" in v.lower())
        )
    }
    if paths:
        return f"a DICOM WSI with {len(paths)} epifluorescence optical path(s)"
    if items.get("dicom.SamplesPerPixel") == "1" and items.get(
        "dicom.PhotometricInterpretation", ""
    ).startswith("MONOCHROME"):
        return "a DICOM WSI of monochrome (one sample per pixel) frames"
    return ""


def _metadata_from(
    handle: openslide.AbstractSlide,
    is_plain: bool,
    declared: TiffDeclarations | None = None,
) -> SlideMetadata:
    """The :class:`SlideMetadata` of an open handle; ``declared`` (the file's TIFF
    declarations) fills mpp where OpenSlide gives none and says fluorescence."""
    declared = declared or TiffDeclarations()
    props = handle.properties
    dims = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
    w0, h0 = dims[0]
    ds = tuple((w0 / w if w else 1.0, h0 / h if h else 1.0) for w, h in dims)
    warnings: list[str] = []
    mpp_x = _float_prop(props, openslide.PROPERTY_NAME_MPP_X)
    mpp_y = _float_prop(props, openslide.PROPERTY_NAME_MPP_Y)
    for name, value in (("mpp-x", mpp_x), ("mpp-y", mpp_y)):
        if value is not None and not plausible_mpp(value):
            warnings.append(f"implausible {name} {value!r} in slide metadata ignored")
    mpp_x = mpp_x if plausible_mpp(mpp_x) else None
    mpp_y = mpp_y if plausible_mpp(mpp_y) else None
    if mpp_x is None or mpp_y is None:  # one axis only: assume square pixels
        mpp_x = mpp_y = mpp_x if mpp_x is not None else mpp_y
    mpp_declared_by = "openslide.mpp-x/y" if mpp_x is not None else ""
    if mpp_x is None and plausible_mpp(declared.mpp_x) and plausible_mpp(declared.mpp_y):
        mpp_x, mpp_y, mpp_declared_by = declared.mpp_x, declared.mpp_y, declared.mpp_declared_by
    power = _float_prop(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if power is not None and not (0.5 <= power <= 200):
        warnings.append(f"implausible objective power {power!r} ignored")
        power = None
    vendor = "image" if is_plain else str(props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"))
    return SlideMetadata(
        vendor=vendor,
        level_dimensions=dims,
        level_downsamples=ds,
        openslide_downsamples=tuple(float(d) for d in handle.level_downsamples),
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        objective_power=power,
        width_l0=w0,
        height_l0=h0,
        level_count=len(dims),
        is_plain_image=is_plain,
        warnings=tuple(warnings),
        mpp_declared_by=mpp_declared_by,
        fluorescence=declared.fluorescence or _fluorescence_from_properties(props),
        bits_per_sample=declared.bits_per_sample,
    )


def composite_on_white(rgba: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Composite non-premultiplied RGBA on white.

    Transparent pixels (outside the scanned area, past the slide edge) become white,
    never black.

    Args:
        rgba: ``[h, w, 4]`` uint8, straight (non-premultiplied) alpha, as
            openslide-python returns.

    Returns:
        ``[h, w, 3]`` uint8 RGB (a new C-contiguous array).
    """
    if rgba.size == 0:
        return np.ascontiguousarray(rgba[..., :3])
    alpha = cv2.extractChannel(rgba, 3)
    if cv2.minMaxLoc(alpha)[0] == 255:  # opaque: a plain channel drop (cv2: ~15x numpy)
        return np.asarray(cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB), dtype=np.uint8)
    a = alpha.astype(np.uint16)[..., None]
    rgb = rgba[..., :3].astype(np.uint16)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class Slide:
    """One open slide handle: metadata plus safe RGB region reads.

    Not shared between threads by contract (give each reader thread its own via
    :func:`open_slide` or :meth:`SlideCache.acquire`). Use as a context manager.

    Attributes:
        metadata: :class:`SlideMetadata`.
        failed_reads: number of region reads that failed on this object (each one
            closed and reopened the OpenSlide handle).
        identity: the file's :func:`file_identity` when it was opened, or None when
            the file changed (or vanished) while it was being opened; a
            :class:`SlideCache` pools a handle only while the file still has it.
    """

    def __init__(self, path: str, cache: SlideCache | None = None) -> None:
        self._path = path
        self._cache = cache
        self._lock = threading.Lock()
        self.failed_reads = 0
        self._handle: openslide.AbstractSlide | None = None
        before = file_identity(path)
        self._handle = self._open_handle()
        # Stat'ed on both sides of the open: equal, the handle holds these bytes.
        self.identity = before if before == file_identity(path) else None
        dims = self._handle.level_dimensions
        declared = read_tiff_declarations(path, dims[0] if dims else None)
        self.metadata = _metadata_from(self._handle, self._is_plain, declared)
        self._pyramid: TiffPyramid | None = None  # opened on the first level read

    @property
    def path(self) -> str:
        """The file path (server-side; never put it into messages or results)."""
        return self._path

    def _open_handle(self) -> openslide.AbstractSlide:
        path = self._path
        try:
            handle: openslide.AbstractSlide = openslide.OpenSlide(path)
            self._is_plain = False
        except openslide.OpenSlideUnsupportedFormatError:
            handle = self._open_plain(path)
            self._is_plain = True
        except openslide.OpenSlideError as exc:
            raise UnsupportedSlideError(
                f"unsupported or unreadable slide: {_scrub(str(exc), path)}"
            ) from None
        except OSError as exc:
            raise UnsupportedSlideError(
                f"unsupported or unreadable slide: {type(exc).__name__}"
            ) from None
        if self._cache is not None and not self._is_plain:
            handle.set_cache(self._cache.openslide_cache)
        return handle

    @staticmethod
    def _open_plain(path: str) -> openslide.AbstractSlide:
        try:
            with Image.open(path) as probe:
                w, h = probe.size
                mode = probe.mode
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise SlideTooLargeError("the image is too large to open without a pyramid") from None
        except Exception:  # PIL raises many types for non-images
            raise UnsupportedSlideError(
                "unsupported or unreadable slide: not a format OpenSlide or PIL can read"
            ) from None
        if w * h > MAX_PLAIN_IMAGE_PX:
            raise SlideTooLargeError(
                f"plain image of {w} x {h} px has no pyramid and exceeds "
                f"{MAX_PLAIN_IMAGE_PX} px; convert it to a tiled pyramidal TIFF"
            )
        if mode not in ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr"):
            raise UnsupportedSlideError(
                f"unsupported pixel type {mode!r}: only 8-bit grey/RGB(A) images are read"
            )
        try:
            return openslide.ImageSlide(path)
        except Exception:
            raise UnsupportedSlideError("unsupported or unreadable slide") from None

    def _validate(self) -> None:
        """Read one small region from the coarsest level; refuse undecodable pixel types.

        A decode error that is not a pixel-type problem (a corrupt tile) does not
        refuse the slide: it is logged, the handle reopened, and later reads decide.
        """
        md = self.metadata
        level = md.level_count - 1
        lw, lh = md.level_dimensions[level]
        ds = md.openslide_downsamples[level]
        size = (min(16, lw), min(16, lh))
        x_l0 = int((lw - size[0]) // 2 * ds)
        y_l0 = int((lh - size[1]) // 2 * ds)
        try:
            assert self._handle is not None
            img = self._handle.read_region((x_l0, y_l0), level, size)
            np.asarray(img.convert("RGBA"))
        except openslide.OpenSlideError as exc:
            msg = _scrub(str(exc), self._path)
            self._reopen()
            if _UNSUPPORTED_PATTERNS.search(msg):
                self.close()
                raise UnsupportedSlideError(f"unsupported slide pixel data: {msg}") from None
            logger.warning("validation read failed (corrupt data?): %s", msg)
            self.failed_reads += 1
        except (ValueError, OSError, TypeError) as exc:  # PIL on exotic plain images
            self.close()
            raise UnsupportedSlideError(
                f"unsupported slide pixel data: {type(exc).__name__}"
            ) from None

    def _reopen(self) -> None:
        """Close the (possibly poisoned) handle and open a fresh one."""
        if self._handle is not None:
            with contextlib.suppress(Exception):  # closing must not fail the caller
                self._handle.close()
            self._handle = None
        self._handle = self._open_handle()
        if file_identity(self._path) != self.identity:  # reopened on other bytes
            self.identity = None

    def read_region_rgba(
        self, x_l0: int, y_l0: int, level: int, width_px: int, height_px: int
    ) -> npt.NDArray[np.uint8]:
        """Read a region as straight-alpha RGBA (alpha 0 = outside the scanned area).

        Args:
            x_l0: left edge in level-0 px (may lie outside the slide).
            y_l0: top edge in level-0 px.
            level: pyramid level to read.
            width_px: region width in ``level`` px.
            height_px: region height in ``level`` px.

        Returns:
            ``[height_px, width_px, 4]`` uint8.

        Raises:
            RegionOutOfBoundsError: bad level, empty size, or wholly outside the slide.
            SlideTooLargeError: more than :data:`MAX_REGION_PX` px requested.
            CorruptSlideError: OpenSlide failed to decode; the handle was reopened,
                so the next read starts clean.
        """
        md = self.metadata
        self._check_region(level, width_px, height_px)
        ds_x, ds_y = md.level_downsamples[level]
        if (
            x_l0 >= md.width_l0
            or y_l0 >= md.height_l0
            or x_l0 + width_px * ds_x <= 0
            or y_l0 + height_px * ds_y <= 0
        ):
            raise RegionOutOfBoundsError("region lies wholly outside the slide")
        with self._lock:
            if self._handle is None:
                raise CorruptSlideError("the slide handle is closed")
            try:
                img = self._handle.read_region(
                    (int(x_l0), int(y_l0)), level, (int(width_px), int(height_px))
                )
                if img.mode != "RGBA":
                    img = img.convert("RGBA")
                return np.asarray(img)
            except openslide.OpenSlideError as exc:
                self.failed_reads += 1
                msg = _scrub(str(exc), self._path)
                self._reopen()
                raise CorruptSlideError(
                    f"a region of the slide could not be decoded: {msg}"
                ) from None
            except (ValueError, OSError) as exc:  # PIL decode problems on plain images
                self.failed_reads += 1
                raise CorruptSlideError(
                    f"a region of the slide could not be decoded: {type(exc).__name__}"
                ) from None

    def _check_level(self, level: int) -> None:
        count = self.metadata.level_count
        if not (0 <= level < count):
            raise RegionOutOfBoundsError(f"level {level} not in [0, {count})")

    def _check_region(self, level: int, width_px: int, height_px: int) -> None:
        """Level, size and :data:`MAX_REGION_PX` checks shared by the region reads."""
        self._check_level(level)
        if width_px <= 0 or height_px <= 0:
            raise RegionOutOfBoundsError("region size must be positive")
        if width_px * height_px > MAX_REGION_PX:
            raise SlideTooLargeError(f"region of {width_px} x {height_px} px is too large")

    def _fast_level(self, level: int) -> TiffLevelReader | None:
        md = self.metadata
        if md.is_plain_image:
            return None
        if self._pyramid is None:
            tiles = self._cache.tile_cache if self._cache is not None else _PRIVATE_TILES
            self._pyramid = TiffPyramid(self._path, md.vendor, md.level_dimensions, tiles)
            if self._pyramid.file_key not in (None, self.identity):
                # The file changed since the handle was opened: these are other bytes.
                # Read through OpenSlide's handle, which still holds the old file.
                self._pyramid.close()
        return self._pyramid.level(level)

    def level_tile_size(self, level: int) -> tuple[int, int] | None:
        """The ``(width, height)`` in px of the tiles ``level`` is stored in, or None.

        From the tifffile fast path's page, else OpenSlide's
        ``openslide.level[N].tile-width/-height`` properties; None for untiled
        storage (strips, plain images) or when the format does not say. A region read
        decodes every tile it touches whole, so this sizes the cost of a read.

        Raises:
            RegionOutOfBoundsError: no such level.
        """
        self._check_level(level)
        fast = self._fast_level(level)
        if fast is not None:
            return fast.tile_w, fast.tile_h
        if self._handle is None:
            return None
        props = self._handle.properties
        try:
            tw = int(props[f"openslide.level[{level}].tile-width"])
            th = int(props[f"openslide.level[{level}].tile-height"])
        except (KeyError, ValueError):
            return None
        return (tw, th) if tw > 0 and th > 0 else None

    def reads_directly(self, level: int) -> bool:
        """Whether :meth:`read_level_rgb` decodes ``level``'s tiles with tifffile
        (tiled 8-bit RGB/YCbCr JPEG page of a generic-tiff or aperio slide) rather than
        through OpenSlide.

        Raises:
            RegionOutOfBoundsError: no such level.
        """
        self._check_level(level)
        return self._fast_level(level) is not None

    def read_level_rgb(
        self, level: int, x_lv: float, y_lv: float, width_px: int, height_px: int
    ) -> npt.NDArray[np.uint8]:
        """Read a region given in ``level`` px, composited on white.

        Tiled JPEG TIFF pyramids (vendors ``generic-tiff`` and ``aperio``) are decoded
        directly with tifffile (:mod:`.tiffread`, ~3x less CPU than OpenSlide's
        compositing); every other slide goes through OpenSlide at level-0 position
        ``round(x_lv * openslide_downsample)``.

        Args:
            level: pyramid level.
            x_lv: left edge in ``level`` px (rounded to the nearest px; may lie
                outside the slide).
            y_lv: top edge in ``level`` px.
            width_px: region width in ``level`` px.
            height_px: region height in ``level`` px.

        Returns:
            ``[height_px, width_px, 3]`` uint8 RGB.

        Raises:
            As :meth:`read_region_rgba`.
        """
        md = self.metadata
        self._check_level(level)
        fast = self._fast_level(level)
        if fast is None:
            ds = md.openslide_downsamples[level]
            return self.read_region_rgb(
                round(x_lv * ds), round(y_lv * ds), level, width_px, height_px
            )
        self._check_region(level, width_px, height_px)
        x, y = round(x_lv), round(y_lv)
        lw, lh = md.level_dimensions[level]
        if x >= lw or y >= lh or x + width_px <= 0 or y + height_px <= 0:
            raise RegionOutOfBoundsError("region lies wholly outside the slide")
        try:
            return fast.read_rgb(x, y, width_px, height_px)
        except CorruptSlideError:
            self.failed_reads += 1
            raise

    def read_region_rgb(
        self, x_l0: int, y_l0: int, level: int, width_px: int, height_px: int
    ) -> npt.NDArray[np.uint8]:
        """Read a region composited on white (transparent and out-of-slide -> white).

        Args and raises as :meth:`read_region_rgba`.

        Returns:
            ``[height_px, width_px, 3]`` uint8 RGB.
        """
        return composite_on_white(self.read_region_rgba(x_l0, y_l0, level, width_px, height_px))

    def close(self) -> None:
        """Close the handle (idempotent)."""
        if self._pyramid is not None:
            self._pyramid.close()
            self._pyramid = None
        with self._lock:
            if self._handle is not None:
                try:
                    self._handle.close()
                finally:
                    self._handle = None

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._handle is None

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:  # never the path
        md = self.metadata
        return f"<Slide {md.vendor} {md.width_l0}x{md.height_l0} levels={md.level_count}>"


def open_slide(
    path: str | os.PathLike[str] | SlideSource, *, cache: SlideCache | None = None
) -> Slide:
    """Open and validate a slide.

    Args:
        path: slide file (for DICOM, any file of the series), or a
            :class:`SlideSource` (opened by its own ``open``; ``cache`` unused).
        cache: shared tile cache and handle pool; when given, the handle uses its
            bounded :class:`openslide.OpenSlideCache` (the handle itself is not pooled:
            use :meth:`SlideCache.acquire` for that).

    Returns:
        An open :class:`Slide` (close it, or use ``with``).

    Raises:
        SlideNotFoundError: no such file.
        UnsupportedSlideError: not a slide or image OpenSlide/PIL can read, or a pixel
            type that cannot be decoded (checked by reading one small region).
        SlideTooLargeError: a plain image too large to open without a pyramid.
    """
    if isinstance(path, SlideSource):
        return path.open()
    p = os.fspath(path)
    if not Path(p).is_file():
        raise SlideNotFoundError("the slide was not found")
    if p.lower().endswith(".dcm"):  # a DICOM WSI series: wsidicom, like DICOMweb series
        from .dicom import open_local_series

        dicom = open_local_series(p)
        if dicom is not None:
            return dicom
    slide = Slide(p, cache)
    slide._validate()
    return slide


#: Tile cache of handles opened without a :class:`SlideCache` (32 MiB, process-wide).
_PRIVATE_TILES = TileCache(32 * 1024 * 1024)


class SlideCache:
    """Bounded shared tile caches plus a small LRU pool of idle slide handles.

    One instance per server process keeps memory on a plateau across many slides:
    decoded tiles live in one :class:`openslide.OpenSlideCache` of fixed capacity,
    and at most ``max_idle_handles`` idle handles stay open (least recently used
    closed first). A handle is lent to one user at a time.

    Idle handles are keyed by file identity (:func:`file_identity`: device, inode,
    size, mtime, ctime), checked on every acquire and release: a file replaced under
    the same name, rewritten, truncated or deleted never gets its old handle back, and every
    idle handle whose file changed is closed at the next acquire or release (or by
    :meth:`prune`), so deleted files do not stay open. The tifffile tile cache is keyed
    by the same identity (:class:`~.tiffread.TiffPyramid`), OpenSlide's per handle.

    Args:
        capacity_bytes: tile cache capacity in bytes (default 64 MiB: patches are read
            in grid (row-major) order, so reuse needs about two tile rows of the slide;
            why not more: benchmarks/RESULTS.md).
        max_idle_handles: idle handles kept open (default 8).

    Attributes:
        stale_closed: idle or returned handles closed because their file changed.

    Thread-safe.
    """

    def __init__(self, capacity_bytes: int = 64 * 1024 * 1024, max_idle_handles: int = 8) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self.max_idle_handles = int(max_idle_handles)
        self.openslide_cache = openslide.OpenSlideCache(self.capacity_bytes)
        #: Decoded tiles of the tifffile fast path (:mod:`.tiffread`), same capacity.
        self.tile_cache = TileCache(self.capacity_bytes)
        self._idle: OrderedDict[int, Slide] = OrderedDict()
        self._lock = threading.Lock()
        self._counter = 0
        self.stale_closed = 0

    @staticmethod
    def _key(path: str | os.PathLike[str]) -> str:
        return os.path.realpath(os.fspath(path))

    @staticmethod
    def _current(slide: Slide) -> bool:
        """Whether the slide's file still has the identity it was opened with."""
        return slide.identity is not None and file_identity(slide.path) == slide.identity

    def _take_stale(self) -> list[Slide]:
        """Remove the idle handles whose file changed; the caller closes them."""
        stale = [token for token, slide in self._idle.items() if not self._current(slide)]
        return [self._idle.pop(token) for token in stale]

    def _close_stale(self, slides: list[Slide]) -> None:
        for slide in slides:
            slide.close()
        if slides:
            with self._lock:
                self.stale_closed += len(slides)

    def acquire(self, path: str | os.PathLike[str]) -> Slide:
        """Borrow an idle handle on the file now at ``path``, or open (and validate) a
        new one. Idle handles whose file changed are closed first.

        Raises:
            As :func:`open_slide`.
        """
        key = self._key(path)
        identity = file_identity(key)
        found: Slide | None = None
        with self._lock:
            stale = self._take_stale()
            for token, slide in reversed(self._idle.items()):
                if identity is not None and (slide.path, slide.identity) == (key, identity):
                    found = self._idle.pop(token)
                    break
        self._close_stale(stale)
        return found if found is not None else open_slide(key, cache=self)

    def release(self, slide: Slide) -> None:
        """Return a borrowed handle. Closed handles are dropped; a handle whose file
        changed since it was opened is closed, never pooled; the LRU is trimmed."""
        if slide.closed:
            return
        if not self._current(slide):
            self._close_stale([slide])
            return
        evicted: list[Slide] = []
        with self._lock:
            stale = self._take_stale()
            self._counter += 1
            self._idle[self._counter] = slide
            while len(self._idle) > self.max_idle_handles:
                _, old = self._idle.popitem(last=False)
                evicted.append(old)
        self._close_stale(stale)
        for old in evicted:
            old.close()

    def prune(self) -> int:
        """Close every idle handle whose file changed or vanished; returns how many."""
        with self._lock:
            stale = self._take_stale()
        self._close_stale(stale)
        return len(stale)

    @property
    def idle_count(self) -> int:
        """Number of idle handles held open."""
        with self._lock:
            return len(self._idle)

    def clear(self) -> None:
        """Close every idle handle."""
        with self._lock:
            items = list(self._idle.values())
            self._idle.clear()
        for slide in items:
            slide.close()
