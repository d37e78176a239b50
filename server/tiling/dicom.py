"""DICOM whole-slide images (VL Whole Slide Microscopy, Supplement 145) read with wsidicom.

:class:`DicomSlide` gives the tiler, the patch reader and the tissue mask the same
reading interface as the OpenSlide adapter (:class:`~.slide.Slide`): metadata with
levels, per-axis downsamples and mpp, RGBA region reads in level-0 px and RGB reads
in level px. The pixels come from a :class:`wsidicom.WsiDicom`, opened by whoever
knows where the series lives (over DICOMweb: :mod:`histohelper.server.dicomweb`);
frames are fetched on demand through wsidicom's bounded frame cache (its default
size: a cache of 0 breaks reads in wsidicom 0.31).

One :class:`WsiDicom` may be shared by several :class:`DicomSlide` objects on
several threads (wsidicom's caches take locks); each :class:`DicomSlide` is used by
one thread at a time, like :class:`~.slide.Slide`.

Several focal planes or optical paths: the first brightfield optical path (by
identifier: numbers in numeric order, across every level-0 instance) and the focal
plane nearest the middle of the z-stack (:func:`nominal_focal_plane`) are read, with a
QC warning naming the plane's z (um). Fluorescence and monochrome series are refused,
and so are series holding several slides (pyramids, frames of reference or studies:
a patient mix-up must be impossible) and series wsidicom cannot open (e.g. no Pixel
Spacing), with the same words for local files and DICOMweb (:func:`refusal`). A level
split over several TILED_SPARSE instances of one plane and path, which wsidicom 0.31
does not join (it reads one of them), is joined here frame by frame
(:meth:`DicomSeries.stitch`).

Messages never contain UIDs or URLs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from histohelper.errors import (
    CorruptSlideError,
    HistoHelperError,
    RegionOutOfBoundsError,
    UnsupportedSlideError,
)

from .options import plausible_mpp
from .slide import DicomIdentity, Slide, SlideMetadata

if TYPE_CHECKING:
    from wsidicom import WsiDicom

logger = logging.getLogger(__name__)

#: VL Whole Slide Microscopy Image Storage.
VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: DICOM code values of IlluminationTypeCodeSequence (DCM CID 8123).
BRIGHTFIELD_CODES = frozenset({"111744", "111741"})  # brightfield, transmission
FLUORESCENCE_CODES = frozenset({"111743", "111742"})  # epifluorescence, reflection
#: Data elements left out of :func:`source_image_json`: pixel data and per-frame groups.
_LEFT_OUT_TAGS = (0x7FE00010, 0x52009230, 0x00282000)  # PixelData, PerFrame..., ICCProfile
_BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})

#: Maps a library or transport exception to the error the caller sees, or None when
#: it means "this region could not be read" (counted as a failed read).
ErrorTranslator = Callable[[BaseException], HistoHelperError | None]


def _no_translation(exc: BaseException) -> HistoHelperError | None:
    return None


def _illumination_codes(dataset: Any) -> list[str]:
    codes = []
    for path in getattr(dataset, "OpticalPathSequence", []) or []:
        for code in getattr(path, "IlluminationTypeCodeSequence", []) or []:
            codes.append(str(getattr(code, "CodeValue", "")))
    return codes


def nominal_focal_plane(planes: list[float]) -> float:
    """The focal plane analysed from a z-stack: the one nearest the stack's middle.

    DICOM's Z Offset in Slide Coordinate System (0040,074A) is in um from the glass
    surface, so z 0 says nothing about focus; a scanner takes its z-stack around the
    plane it focused on, whose outermost planes are the most defocused. Hence the
    plane nearest ``(min(z) + max(z)) / 2``; ties go to the plane nearest z 0, then to
    the lower z, so the choice depends only on the set of planes (not on instance
    order). wsidicom 0.31's ``default_z`` is not used: it compares with half the
    stack's *range* (``(max - min) / 2``), which picks the top plane of a stack
    centred on 0 (e.g. 4 of -4 ... 4).

    Args:
        planes: the level's focal planes (um), at least one.

    Returns:
        The chosen plane's z (um).
    """
    middle = (min(planes) + max(planes)) / 2
    return min(planes, key=lambda z: (abs(z - middle), abs(z), z))


#: SLIDE_UNSUPPORTED reason of a series with no VOLUME image, in the same words for local
#: files and DICOMweb series.
NO_PYRAMID = (
    "the DICOM series holds no VOLUME (pyramid) image, only label, overview or thumbnail "
    "images: there is nothing to analyse"
)


def refusal(exc: BaseException) -> UnsupportedSlideError:
    """The error for a series wsidicom refused to open, in words (never a class name),
    the same for local files and DICOMweb.

    Args:
        exc: what ``WsiDicom.open``/``open_web`` raised.

    Returns:
        An :class:`UnsupportedSlideError` (SLIDE_UNSUPPORTED).
    """
    name = type(exc).__name__
    if name == "WsiDicomNoResolutionError":
        return UnsupportedSlideError(
            "the DICOM series has no pixel spacing (Pixel Spacing is missing from its "
            "whole-slide image instances), without which it cannot be read as a whole-slide "
            "image: not analysed"
        )
    if name == "WsiDicomNotFoundError":
        return UnsupportedSlideError(NO_PYRAMID)
    return UnsupportedSlideError(
        "the DICOM series could not be opened as a whole-slide image: its metadata is "
        "not that of a readable VL Whole Slide Microscopy image"
    )


def _volume_datasets(wsi: WsiDicom) -> list[Any]:
    """The datasets of every VOLUME instance wsidicom was given, including those its
    pyramids silently leave out (an instance of another slide whose level index is
    taken, e.g. a smaller image of another frame of reference in the series). Read
    from wsidicom 0.31's sources (pinned); the pyramids' levels otherwise."""
    source = getattr(wsi, "_source", None)
    web = getattr(source, "_level_instances", None)  # WsiDicomWebSource
    if isinstance(web, list):
        return [instance.dataset for instance in web]
    files = getattr(source, "_levels", None)  # WsiDicomFileSource
    if isinstance(files, list):
        return [reader.dataset for reader in files]
    return [ds for p in wsi.pyramids for level in p.levels for ds in level.datasets]


def _several_slides(wsi: WsiDicom) -> str | None:
    """Why ``wsi`` holds more than one slide (pyramids, frames of reference, studies of
    its level instances), or None when it holds one."""
    pyramids = list(wsi.pyramids)
    datasets = _volume_datasets(wsi)
    counts = {
        "pyramids": len(pyramids),
        "frames of reference": len({str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}),
        "studies": len({str(ds.get("StudyInstanceUID", "")) for ds in datasets}),
    }
    several = {what: n for what, n in counts.items() if n > 1}
    if not several:
        return None
    detail = ", ".join(f"{n} {what}" for what, n in several.items())
    return (
        f"the DICOM series holds {max(several.values())} slides ({detail}): a series "
        "must hold one slide to be analysed (store each slide in its own series)"
    )


def _holding(level: Any, z: float | None, path: str | None) -> list[Any]:
    """The instances of ``level`` that hold focal plane ``z`` and optical path ``path``
    (None: the level's default), ordered by SOP Instance UID. More than one: the level
    is split over several TILED_SPARSE instances, which wsidicom 0.31 does not join
    (``Level.get_instance`` returns one of them)."""
    try:
        first = level.get_instance(z, path)
    except Exception:  # wsidicom: WsiDicomNotFoundError (the level lacks that plane)
        return []
    z = first.default_z if z is None else z
    path = first.default_path if path is None else path
    found = [
        instance
        for instance in level.instances.values()
        if z in instance.focal_planes and path in instance.optical_paths
    ]
    return sorted(found, key=lambda instance: str(instance.identifier))


def source_image_json(dataset: Any) -> str:
    """DICOM JSON (PS3.18 F.2) of an instance's attributes without bulk data.

    Pixel data, the per-frame functional groups, the ICC profile and every other
    binary (OB/OW/OF/OD/OL/OV/UN) top-level element are left out, so the text stays
    small (a few KiB) whatever the instance's size.

    Args:
        dataset: a pydicom ``Dataset`` (e.g. wsidicom's level-0 ``WsiDataset``).

    Returns:
        The JSON text.
    """
    import pydicom

    out = pydicom.Dataset()
    for element in dataset:
        if element.tag in _LEFT_OUT_TAGS or element.VR in _BULK_VRS:
            continue
        out.add(element)
    return json.dumps(out.to_json_dict(), sort_keys=True, separators=(",", ":"))


class DicomSeries:
    """One opened DICOM WSI series: what every :class:`DicomSlide` on it shares.

    Args:
        wsi: the opened series (wsidicom).
        translate: maps exceptions raised while reading frames to the caller's error
            (PACS unreachable, credentials refused); None means a failed read.
        server_name: the configured DICOMweb server it is read from ("" for files).

    Attributes:
        wsi: the :class:`wsidicom.WsiDicom`.
        metadata: :class:`~.slide.SlideMetadata` (vendor ``"dicom"``).
        z: focal plane read (um), or None for wsidicom's default.
        optical_path: optical path identifier read, or None for the default.
        study_instance_uid, series_instance_uid, frame_of_reference_uid: the series'
            identity (never logged).
        source_json: :func:`source_image_json` of the level-0 instance.
        fingerprint: SHA-256 hex of the instance UIDs and level-0 attributes: what
            identifies the pixels for the result cache.

        notes: QC warnings of whoever opened it (e.g. instances left out).

    Raises:
        UnsupportedSlideError: fluorescence or monochrome, no levels, several slides
            (pyramids, frames of reference, studies).
    """

    def __init__(
        self,
        wsi: WsiDicom,
        translate: ErrorTranslator = _no_translation,
        server_name: str = "",
        notes: tuple[str, ...] = (),
    ) -> None:
        self.wsi = wsi
        self.translate = translate
        self._levels = list(wsi.levels)
        if not self._levels:
            raise UnsupportedSlideError("the DICOM series has no whole-slide image levels")
        why = _several_slides(wsi)
        if why is not None:
            raise UnsupportedSlideError(why)
        base = self._levels[0]
        dataset = base.datasets[0]
        warnings: list[str] = list(notes)
        if int(getattr(dataset, "SamplesPerPixel", 3)) != 3:
            raise UnsupportedSlideError(
                "the DICOM series is monochrome (fluorescence?): only brightfield RGB "
                "whole-slide images are analysed"
            )
        codes = _illumination_codes(dataset)
        if codes and not set(codes) & BRIGHTFIELD_CODES and set(codes) & FLUORESCENCE_CODES:
            raise UnsupportedSlideError(
                "the DICOM series is fluorescence: only brightfield whole-slide images are analysed"
            )
        paths = list(base.optical_paths)
        self.optical_path: str | None = None
        if len(paths) > 1:
            self.optical_path = self._first_brightfield(base.datasets, paths)
            warnings.append(
                f"the series has {len(paths)} optical paths: the first brightfield one is analysed"
            )
        planes = list(base.focal_planes)
        self.z: float | None = None
        if len(planes) > 1:
            self.z = nominal_focal_plane(planes)
            warnings.append(
                f"the series has {len(planes)} focal planes (z {min(planes):g} to "
                f"{max(planes):g} um): the plane at z {self.z:g} um, nearest the middle of "
                "the stack, is analysed"
            )
        dims = tuple((int(lv.size.width), int(lv.size.height)) for lv in self._levels)
        w0, h0 = dims[0]
        ds = tuple((w0 / w, h0 / h) for w, h in dims)
        try:
            mpp_x, mpp_y = float(base.mpp.width), float(base.mpp.height)
        except Exception:  # wsidicom: WsiDicomNoResolutionError
            mpp_x = mpp_y = math.nan
        if not (plausible_mpp(mpp_x) and plausible_mpp(mpp_y)):
            if math.isfinite(mpp_x):
                warnings.append("implausible pixel spacing in the DICOM metadata ignored")
            mpp_x_opt: float | None = None
            mpp_y_opt: float | None = None
        else:
            mpp_x_opt, mpp_y_opt = mpp_x, mpp_y
        self.study_instance_uid = str(getattr(dataset, "StudyInstanceUID", ""))
        self.series_instance_uid = str(getattr(dataset, "SeriesInstanceUID", ""))
        self.frame_of_reference_uid = str(getattr(dataset, "FrameOfReferenceUID", ""))
        self.source_json = source_image_json(dataset)
        self.metadata = SlideMetadata(
            vendor="dicom",
            level_dimensions=dims,
            level_downsamples=ds,
            openslide_downsamples=tuple((dx + dy) / 2 for dx, dy in ds),
            mpp_x=mpp_x_opt,
            mpp_y=mpp_y_opt,
            objective_power=None,
            width_l0=w0,
            height_l0=h0,
            level_count=len(dims),
            warnings=tuple(warnings),
            dicom=DicomIdentity(
                self.study_instance_uid,
                self.series_instance_uid,
                self.frame_of_reference_uid,
                self.source_json,
                server_name,
            ),
        )
        digest = hashlib.sha256()
        for level in self._levels:
            for ds_ in level.datasets:
                digest.update(str(ds_.SOPInstanceUID).encode() + b"\0")
        digest.update(self.source_json.encode())
        self.fingerprint = digest.hexdigest()
        #: level index -> the instances its read plane and path are split over (only
        #: levels with more than one: :meth:`DicomSlide._read_level` stitches them).
        self.split: dict[int, list[Any]] = {}
        for index, level in enumerate(self._levels):
            parts = _holding(level, self.z, self.optical_path)
            if len(parts) > 1:
                if not all(hasattr(part.image_data, "_get_frame_index") for part in parts):
                    raise UnsupportedSlideError(
                        f"level {index} of the DICOM series is split over {len(parts)} "
                        "instances of one focal plane and optical path, which this reader "
                        "cannot join: refused rather than half read"
                    )
                self.split[index] = parts
        self._lock = threading.Lock()
        self._users = 0

    @staticmethod
    def _first_brightfield(datasets: Any, paths: list[str]) -> str:
        """The optical path read from a series with several: among the paths whose
        illumination says brightfield in any level-0 instance's OpticalPathSequence
        (or all of ``paths`` when none says so), the identifier that sorts first,
        numerically where it is a number. Identifiers decide, not instance order (which
        a PACS does not keep) nor wsidicom's listing order."""
        bright: set[str] = set()
        for dataset in datasets:
            for path in getattr(dataset, "OpticalPathSequence", []) or []:
                codes = {
                    str(getattr(c, "CodeValue", ""))
                    for c in getattr(path, "IlluminationTypeCodeSequence", []) or []
                }
                if codes & BRIGHTFIELD_CODES:
                    bright.add(str(path.OpticalPathIdentifier))

        def order(identifier: str) -> tuple[int, int, str]:
            return (0, int(identifier), "") if identifier.isdigit() else (1, 0, identifier)

        return min([p for p in paths if p in bright] or paths, key=order)

    def level(self, index: int) -> Any:
        """wsidicom's ``Level`` of pyramid index ``index`` (0 = full resolution)."""
        return self._levels[index]

    def plane(self, index: int) -> tuple[float, str]:
        """``(z, optical path)`` read from level ``index``."""
        instance = self._levels[index].get_instance(self.z, self.optical_path)
        z = instance.default_z if self.z is None else self.z
        path = instance.default_path if self.optical_path is None else self.optical_path
        return z, path

    def tile_holders(self, index: int, tiles: list[tuple[int, int]]) -> dict[Any, list[Any]]:
        """The frames ``tiles`` (tile column, row) of a split level ``index``, grouped by
        the instance holding each (the first by SOP Instance UID where several do);
        tiles no instance holds are left out (glass of a TILED_SPARSE level)."""
        from wsidicom.geometry import Point

        z, path = self.plane(index)
        held: dict[Any, list[Any]] = {}
        for tx, ty in tiles:
            point = Point(tx, ty)
            for part in self.split[index]:
                if part.image_data._get_frame_index(point, z, path) != -1:  # wsidicom 0.31
                    held.setdefault(part, []).append(point)
                    break
        return held

    def stitch(self, index: int, x0: int, y0: int, x1: int, y1: int) -> npt.NDArray[np.uint8]:
        """Level px ``[x0, x1) x [y0, y1)`` of a level split over several instances of
        its plane and path, joined frame by frame: each frame decoded (wsidicom's
        decoded frame cache) from the instance holding it, frames no instance holds
        in the blank colour, as wsidicom reads one TILED_SPARSE instance; so the pixels
        equal those of the same frames in one instance.

        Returns:
            ``[y1 - y0, x1 - x0, 3]`` uint8 RGB.
        """
        level = self._levels[index]
        tw, th = int(level.tile_size.width), int(level.tile_size.height)
        z, path = self.plane(index)
        first = self.split[index][0].image_data
        blank = first.blank_color
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        out[...] = blank if isinstance(blank, tuple) else (blank,) * 3
        tiles = [
            (tx, ty)
            for ty in range(y0 // th, (y1 - 1) // th + 1)
            for tx in range(x0 // tw, (x1 - 1) // tw + 1)
        ]
        for part, points in self.tile_holders(index, tiles).items():
            for point in points:
                tile = part.image_data.get_decoded_tile(point, z, path)
                pixels = np.asarray(tile if tile.mode == "RGB" else tile.convert("RGB"))
                tx0, ty0 = point.x * tw, point.y * th
                ax0, ay0 = max(x0, tx0), max(y0, ty0)
                ax1 = min(x1, tx0 + pixels.shape[1])
                ay1 = min(y1, ty0 + pixels.shape[0])
                out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = pixels[
                    ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0
                ]
        return out

    def close(self) -> None:
        """Close the series (its files or its client's session)."""
        self.wsi.close()


class DicomSlide(Slide):
    """A :class:`~.slide.Slide` over a :class:`DicomSeries` (same reading interface).

    Args:
        series: the opened series (shared; not closed by this object unless
            ``on_close`` is None).
        on_close: called once by :meth:`close` (e.g. to give the series back to a
            pool); default: close the series.
    """

    def __init__(
        self, series: DicomSeries, on_close: Callable[[DicomSeries], None] | None = None
    ) -> None:
        # Not Slide.__init__: nothing of OpenSlide is opened.
        self.series = series
        self.metadata = series.metadata
        self.failed_reads = 0
        self.identity = None
        self._on_close = on_close
        self._closed = False
        self._cache = None
        self._pyramid = None
        self._handle = None
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        """No file path: a DICOM series (``"<dicom>"``)."""
        return "<dicom>"

    def _validate(self) -> None:
        self.read_level_rgb(self.metadata.level_count - 1, 0, 0, 1, 1)

    def _read_level(
        self, level: int, x_lv: int, y_lv: int, width_px: int, height_px: int
    ) -> tuple[npt.NDArray[np.uint8], int, int]:
        """The part of level px ``[x_lv, x_lv + width_px) x [y_lv, y_lv + height_px)``
        inside the level as ``[h, w, 3]`` uint8 RGB, with its offset ``(ox, oy)`` in the
        requested box."""
        from wsidicom.geometry import Point, Region, Size

        if self._closed:
            raise CorruptSlideError("the slide handle is closed")
        self._check_region(level, width_px, height_px)
        lw, lh = self.metadata.level_dimensions[level]
        x0, y0 = max(0, x_lv), max(0, y_lv)
        x1, y1 = min(lw, x_lv + width_px), min(lh, y_lv + height_px)
        if x1 <= x0 or y1 <= y0:
            raise RegionOutOfBoundsError("region lies wholly outside the slide")
        series = self.series
        try:
            if level in series.split:
                inside = series.stitch(level, x0, y0, x1, y1)
            else:
                image = series.level(level).get_region(
                    Region(Point(x0, y0), Size(x1 - x0, y1 - y0)), series.z, series.optical_path
                )
                if image.mode != "RGB":
                    image = image.convert("RGB")
                inside = np.asarray(image, dtype=np.uint8)
        except Exception as exc:  # wsidicom, pydicom, PIL, requests: many types
            mapped = series.translate(exc)
            if mapped is not None:
                raise mapped from None
            self.failed_reads += 1
            raise CorruptSlideError(
                f"a region of the slide could not be decoded: {type(exc).__name__}"
            ) from None
        return inside, x0 - x_lv, y0 - y_lv

    def read_region_rgba(
        self, x_l0: int, y_l0: int, level: int, width_px: int, height_px: int
    ) -> npt.NDArray[np.uint8]:
        """As :meth:`Slide.read_region_rgba` (alpha 0 and white outside the level); the
        level position is ``x_l0 / openslide_downsample`` (OpenSlide's convention)."""
        self._check_level(level)
        ds = self.metadata.openslide_downsamples[level]
        inside, ox, oy = self._read_level(
            level, round(x_l0 / ds), round(y_l0 / ds), width_px, height_px
        )
        out = np.zeros((height_px, width_px, 4), dtype=np.uint8)
        out[..., :3] = 255
        h, w = inside.shape[:2]
        out[oy : oy + h, ox : ox + w, :3] = inside
        out[oy : oy + h, ox : ox + w, 3] = 255
        return out

    def read_level_rgb(
        self, level: int, x_lv: float, y_lv: float, width_px: int, height_px: int
    ) -> npt.NDArray[np.uint8]:
        """As :meth:`Slide.read_level_rgb` (level px, rounded; white outside)."""
        inside, ox, oy = self._read_level(level, round(x_lv), round(y_lv), width_px, height_px)
        h, w = inside.shape[:2]
        if (h, w) == (height_px, width_px):
            return inside if inside.flags.writeable else inside.copy()
        out = np.full((height_px, width_px, 3), 255, dtype=np.uint8)
        out[oy : oy + h, ox : ox + w] = inside
        return out

    def prefetch_patches(self, grid: Any, indices: npt.NDArray[np.int64]) -> None:
        """Fetch every frame the patches ``indices`` of ``grid`` touch in one request.

        Over DICOMweb each request costs a fixed time (about 12 ms against the
        loopback Orthanc on a loaded 2-core host, 1 frame or 64 alike:
        benchmarks/RESULTS.md), so the patch reader calls this once per batch before
        reading its patches one by one from wsidicom's decoded frame cache. Failures
        are ignored here: the patch reads that follow report them.

        Args:
            grid: the :class:`~.plan.PatchGrid` being read.
            indices: int64 grid indices of one batch.
        """
        from wsidicom.geometry import Point

        level = int(grid.level)
        if self._closed or not 0 <= level < self.metadata.level_count:
            return
        lw, lh = self.metadata.level_dimensions[level]
        tile = self.level_tile_size(level)
        if tile is None:
            return
        tw, th = tile
        rw, rh = int(grid.read_width_px), int(grid.read_height_px)
        tiles: set[tuple[int, int]] = set()
        for i in np.asarray(indices).tolist():
            x = round(float(grid.x_l0[i]) / grid.level_downsample_x)
            y = round(float(grid.y_l0[i]) / grid.level_downsample_y)
            x0, y0 = max(0, x), max(0, y)
            x1, y1 = min(lw, x + rw), min(lh, y + rh)
            if x1 <= x0 or y1 <= y0:
                continue
            for ty in range(y0 // th, (y1 - 1) // th + 1):
                for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                    tiles.add((tx, ty))
        if not tiles:
            return
        series = self.series
        ordered = sorted(tiles, key=lambda t: (t[1], t[0]))
        try:
            z, path = series.plane(level)
            if level in series.split:  # one request per instance holding some of them
                batches = list(series.tile_holders(level, ordered).items())
            else:
                instance = series.level(level).get_instance(series.z, series.optical_path)
                batches = [(instance, [Point(tx, ty) for tx, ty in ordered])]
            for instance, points in batches:
                for _ in instance.image_data.get_decoded_tiles(points, z, path):
                    pass
        except Exception as exc:
            mapped = series.translate(exc)
            if mapped is not None:
                raise mapped from None
            logger.debug("frame prefetch failed: %s", type(exc).__name__)

    def level_tile_size(self, level: int) -> tuple[int, int] | None:
        """The level's frame size ``(width, height)`` in px."""
        self._check_level(level)
        size = self.series.level(level).tile_size
        return int(size.width), int(size.height)

    def reads_directly(self, level: int) -> bool:
        """False: frames are decoded by wsidicom, not the tifffile fast path."""
        self._check_level(level)
        return False

    def close(self) -> None:
        """Give the series back (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close(self.series)
        else:
            self.series.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __repr__(self) -> str:  # never a UID
        md = self.metadata
        return f"<DicomSlide {md.width_l0}x{md.height_l0} levels={md.level_count}>"


def open_local_series(path: str) -> DicomSlide | None:
    """A local DICOM WSI series (a folder of ``.dcm`` instances) read with wsidicom, so
    that local files and DICOMweb series share one reader and both carry their DICOM
    identity (:attr:`SlideMetadata.dicom`).

    The instances are the regular files in ``path``'s folder (no symlinks, so nothing
    outside the folder is read) with ``path``'s Series Instance UID, Study Instance UID
    and Frame of Reference UID: the named file's slide. Instances of the same series
    from another study or frame of reference (another slide: a patient mix-up) are
    left out with a QC warning.

    Args:
        path: any instance file of the series.

    Returns:
        The opened slide, or None when ``path`` is not a VL Whole Slide Microscopy
        instance pydicom can read (the caller falls back to OpenSlide, which gives its
        own answer).

    Raises:
        UnsupportedSlideError: a whole-slide image instance wsidicom cannot open (same
            words as over DICOMweb: :func:`refusal`), or the errors of
            :class:`DicomSeries`. Such a file never falls back to OpenSlide, which
            mis-decodes wsidicomizer's levels.
    """
    from pathlib import Path

    import pydicom

    try:
        named = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # not DICOM: OpenSlide decides
        logger.debug("pydicom could not read a local .dcm file: %s", type(exc).__name__)
        return None
    if str(named.get("SOPClassUID", "")) != VL_WSI_SOP_CLASS:
        return None

    def slide_key(header: Any) -> tuple[str, str, str]:
        return tuple(  # type: ignore[return-value]
            str(header.get(k, ""))
            for k in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
        )

    key = slide_key(named)
    files = []
    others = 0
    for entry in sorted(Path(path).parent.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            continue
        try:
            header = pydicom.dcmread(entry, stop_before_pixels=True)
        except Exception:  # not DICOM: not part of the series
            continue
        if slide_key(header) == key:
            files.append(entry)
        elif str(header.get("SeriesInstanceUID", "")) == key[0]:
            others += 1
    notes: tuple[str, ...] = ()
    if others:
        notes = (
            f"the folder holds {others} other instance(s) of this series from another "
            "study or frame of reference (another slide): left out, only the named "
            "file's slide is analysed",
        )
    try:
        from wsidicom import WsiDicom

        wsi = WsiDicom.open(files)
    except Exception as exc:  # wsidicom refuses it: never OpenSlide's mis-decoding
        logger.debug("wsidicom could not open a local DICOM series: %s", type(exc).__name__)
        raise refusal(exc) from None
    try:
        series = DicomSeries(wsi, notes=notes)
    except HistoHelperError:
        wsi.close()
        raise
    except Exception as exc:
        wsi.close()
        raise refusal(exc) from None
    return DicomSlide(series)
