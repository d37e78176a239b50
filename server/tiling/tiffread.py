"""Fast path for tiled TIFF pyramids: decode a level's JPEG tiles with tifffile.

OpenSlide composites every region through cairo into premultiplied ARGB, which costs
more per patch than decoding the JPEG tile itself, even when every tile is cached
(figures in benchmarks/RESULTS.md).
For the formats where a level is exactly one tiled TIFF page (OpenSlide vendors
``generic-tiff`` and ``aperio``), this module reads the tile bytes with
:func:`os.pread`, decodes them with tifffile's own decoder for that page
(:meth:`tifffile.TiffPage.decode`: imagecodecs' libjpeg-turbo, JPEG tables and colour
space handled by tifffile), keeps decoded tiles in a bounded LRU shared by every
handle of the process, and pastes the region in RGB. Every other case (other vendors,
non-JPEG or non-8-bit-RGB pages, a page that does not match OpenSlide's level, any
doubt) keeps OpenSlide: :func:`level_reader_for` returns None.

Pixels match OpenSlide's decode of the same tiles (tested on CMU-1-Small-Region.svs
and on synthetic JPEG pyramids); outside the image the region is white, as OpenSlide's
transparent pixels composited on white are. So is a tile stored empty (byte count 0:
sparse TIFFs leave tiles outside the scanned area unwritten, and OpenSlide reads them
as transparent); it is never decoded.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import numpy as np
import numpy.typing as npt

from histohelper.errors import CorruptSlideError

logger = logging.getLogger(__name__)

#: OpenSlide vendors whose levels are plain tiled TIFF pages.
FAST_VENDORS = frozenset({"generic-tiff", "aperio"})
#: TIFF compression 7: JPEG ("new-style" with JPEGTables); the only one taken here.
_JPEG = 7


class TileCache:
    """Bounded LRU of decoded tiles, shared by every reader in the process.

    Args:
        capacity_bytes: most bytes of decoded tiles kept (>= 0; 0 keeps none).

    Thread-safe. Two threads missing the same tile at once both decode it; the result
    is identical, so that costs time, never correctness.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(0, int(capacity_bytes))
        self._tiles: OrderedDict[tuple[object, ...], npt.NDArray[np.uint8]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> npt.NDArray[np.uint8] | None:
        """The tile for ``key``, or None; a hit becomes the most recently used."""
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[object, ...], tile: npt.NDArray[np.uint8]) -> None:
        """Keep ``tile`` (read-only from now on), evicting least recently used tiles."""
        if tile.nbytes > self.capacity_bytes:
            return
        tile.flags.writeable = False
        with self._lock:
            old = self._tiles.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._tiles[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self.capacity_bytes:
                _, evicted = self._tiles.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of decoded tiles held now."""
        with self._lock:
            return self._bytes


class TiffLevelReader:
    """RGB regions of one pyramid level stored as one tiled JPEG TIFF page.

    Build with :func:`level_reader_for`. Not shared between threads (each
    :class:`~.slide.Slide` handle has its own); the tile cache is shared.
    """

    def __init__(
        self,
        fd: int,
        page: object,
        cache: TileCache,
        cache_key: tuple[object, ...],
    ) -> None:
        self._fd = fd
        self._page = page
        self._cache = cache
        self._key = cache_key
        self.width = int(page.imagewidth)  # type: ignore[attr-defined]
        self.height = int(page.imagelength)  # type: ignore[attr-defined]
        self.tile_w = int(page.tilewidth)  # type: ignore[attr-defined]
        self.tile_h = int(page.tilelength)  # type: ignore[attr-defined]
        self._tiles_x = -(-self.width // self.tile_w)
        self._offsets = page.dataoffsets  # type: ignore[attr-defined]
        self._counts = page.databytecounts  # type: ignore[attr-defined]
        self._jpegtables = page.jpegtables  # type: ignore[attr-defined]
        self._jpegheader = getattr(page, "jpegheader", None)
        self._blank: npt.NDArray[np.uint8] | None = None

    def _empty_tile(self) -> npt.NDArray[np.uint8]:
        """The white ``[tile_h, tile_w, 3]`` tile of an empty (0-byte) tile, read-only."""
        if self._blank is None:
            blank = np.full((self.tile_h, self.tile_w, 3), 255, dtype=np.uint8)
            blank.flags.writeable = False
            self._blank = blank
        return self._blank

    def _tile(self, tx: int, ty: int) -> npt.NDArray[np.uint8]:
        index = ty * self._tiles_x + tx
        key = (*self._key, index)
        tile = self._cache.get(key)
        if tile is not None:
            return tile
        count = int(self._counts[index])
        if count <= 0:  # not written (sparse TIFF): transparent, i.e. white here
            return self._empty_tile()
        data = os.pread(self._fd, count, int(self._offsets[index]))
        try:
            segment, _, _ = self._page.decode(  # type: ignore[attr-defined]
                data, index, jpegtables=self._jpegtables, jpegheader=self._jpegheader
            )
        except Exception as exc:  # imagecodecs raises its own codec error types
            raise CorruptSlideError(
                f"a region of the slide could not be decoded: {type(exc).__name__}"
            ) from None
        arr = np.asarray(segment)
        if arr.ndim != 4 or arr.shape[0] != 1 or arr.shape[3] != 3 or arr.dtype != np.uint8:
            raise CorruptSlideError("a region of the slide could not be decoded: tile shape")
        tile = np.ascontiguousarray(arr[0])
        self._cache.put(key, tile)
        return tile

    def read_rgb(self, x: int, y: int, width: int, height: int) -> npt.NDArray[np.uint8]:
        """Read a region of this level.

        Args:
            x: left edge in this level's px (may lie outside the image).
            y: top edge in this level's px.
            width: region width in px (> 0).
            height: region height in px (> 0).

        Returns:
            ``[height, width, 3]`` uint8 RGB; white where the region leaves the image.

        Raises:
            CorruptSlideError: a stored tile could not be read or decoded (an empty
                tile is white, not an error).
        """
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = self.tile_w, self.tile_h
        try:
            for ty in range(y0 // th, (y1 - 1) // th + 1):
                ty0 = ty * th
                sy0, sy1 = max(y0, ty0), min(y1, ty0 + th)
                for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                    tx0 = tx * tw
                    sx0, sx1 = max(x0, tx0), min(x1, tx0 + tw)
                    tile = self._tile(tx, ty)
                    out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                        sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                    ]
        except OSError as exc:
            raise CorruptSlideError(
                f"a region of the slide could not be read: {type(exc).__name__}"
            ) from None
        return out


def _eligible(page: object) -> bool:
    return bool(
        getattr(page, "is_tiled", False)
        and getattr(page, "compression", None) == _JPEG
        and getattr(page, "samplesperpixel", 0) == 3
        and getattr(page, "bitspersample", 0) == 8
        and int(getattr(page, "planarconfig", 1)) == 1
        and int(getattr(page, "photometric", 0)) in (2, 6)  # RGB, YCbCr
        and getattr(page, "imagedepth", 1) == 1
    )


class TiffPyramid:
    """The tiled TIFF behind a slide, opened once per :class:`~.slide.Slide` handle.

    Args:
        path: the slide file.
        vendor: OpenSlide's vendor name (only :data:`FAST_VENDORS` are taken).
        level_dimensions: OpenSlide's ``(width, height)`` per level.
        cache: the shared decoded-tile cache.

    A level is served here only when exactly one top-level TIFF page has the level's
    size and is tiled 8-bit RGB/YCbCr JPEG; :meth:`level` returns None otherwise.
    """

    def __init__(
        self,
        path: str,
        vendor: str,
        level_dimensions: tuple[tuple[int, int], ...],
        cache: TileCache,
    ) -> None:
        self._tiff: object = None
        self._fd = -1
        #: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of the file read, None if not
        #: opened.
        self.file_key: tuple[int, int, int, int, int] | None = None
        self._levels: dict[int, TiffLevelReader | None] = {}
        self._pages: dict[tuple[int, int], list[tuple[int, object]]] = {}
        if vendor not in FAST_VENDORS:
            return
        try:
            import tifffile

            tiff = tifffile.TiffFile(path)
        except Exception:  # any doubt: OpenSlide reads it
            return
        self._tiff = tiff
        self._fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self._fd)
        self.file_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        for i, page in enumerate(tiff.pages):
            size = (int(page.imagewidth), int(page.imagelength))  # type: ignore[union-attr]
            if size in level_dimensions:
                self._pages.setdefault(size, []).append((i, page))
        self._dims = level_dimensions
        self._cache = cache

    def level(self, level: int) -> TiffLevelReader | None:
        """The fast reader of ``level``, or None (read it through OpenSlide)."""
        if self._fd < 0:
            return None
        if level not in self._levels:
            found = self._pages.get(self._dims[level], [])
            reader = None
            if len(found) == 1 and _eligible(found[0][1]):
                index, page = found[0]
                assert self.file_key is not None  # set whenever the file is open
                reader = TiffLevelReader(self._fd, page, self._cache, (*self.file_key, index))
            self._levels[level] = reader
        return self._levels[level]

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._tiff is not None:
            try:
                self._tiff.close()  # type: ignore[attr-defined]
            finally:
                self._tiff = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._levels.clear()
