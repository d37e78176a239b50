"""Decode client-supplied patch images (``ClassifyPatches``) safely.

A request may carry up to 1,024 images from an untrusted caller, so every image is
checked before it is decoded:

- only PNG, JPEG and TIFF (what the API promises) are accepted, recognised by their
  magic bytes; OpenCV would otherwise also decode BMP, PPM, HDR, Sun raster, JPEG
  2000, WebP, ... with their own parsers;
- the pixel count is read from the header (Pillow's lazy ``Image.open``) and images
  above :data:`MAX_IMAGE_PX` are refused before any pixel is decoded: a truncated
  700-byte JPEG may announce 32,767 x 32,767 px (3 GB decoded);
- decoder errors (OpenCV's ``cv2.error``, ``MemoryError``) become
  :class:`~histohelper.errors.InvalidImageError` for that image alone;
- the pixels a request (or a stream) may decode together are bounded by a
  :class:`PixelBudget`, charged from the headers (:func:`patch_px`) before decoding.

Decoding and colour conversion: OpenCV ``imdecode`` (``IMREAD_COLOR``: 8 or 16 bit,
grey or colour, first page of a TIFF) to 8-bit RGB.
"""

from __future__ import annotations

import io
import threading
import warnings

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

from histohelper.errors import InvalidImageError, PixelBudgetExceededError
from histohelper.v1 import slide_analysis_pb2 as pb

#: Largest decoded image accepted (px): 8,192 x 8,192 (192 MiB as 8-bit RGB; up to
#: 512 MiB while a 16-bit RGBA PNG decodes).
MAX_IMAGE_PX = 8192 * 8192
#: Largest TIFF tile or strip buffer the decoder may allocate (bytes): a 1 x 1 px TIFF
#: can declare an 11,584 px square 16-bit RGBA tile, which libtiff allocates whole.
MAX_TIFF_BLOCK_BYTES = 256 * 1024 * 1024
#: Leading bytes of the accepted formats.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
)


def image_format(data: bytes) -> str:
    """``"PNG"``, ``"JPEG"``, ``"TIFF"`` or ``"BigTIFF"`` from the magic bytes.

    Raises:
        InvalidImageError: none of them.
    """
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    raise InvalidImageError("image bytes are not a PNG, JPEG or TIFF file")


def _tiff_block_bytes(im: Image.Image) -> int:
    """Bytes of the largest tile or strip a TIFF page declares (0 if not a TIFF)."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return 0
    width, height = im.size

    def first(tag: int, default: int) -> int:
        value = tags.get(tag, default)
        if isinstance(value, tuple):
            value = max(value) if value else default
        return int(value)

    samples = first(277, 1)  # SamplesPerPixel
    bits = first(258, 8)  # BitsPerSample
    if 322 in tags and 323 in tags:  # TileWidth, TileLength
        px = first(322, 1) * first(323, 1)
    else:
        px = width * min(first(278, height), max(height, 1))  # RowsPerStrip
    return px * max(samples, 1) * max(bits, 1) // 8


def header_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` in px from the image header, without decoding pixels.

    Raises:
        InvalidImageError: the header cannot be parsed, or a TIFF declares tiles or
            strips over :data:`MAX_TIFF_BLOCK_BYTES`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                block = _tiff_block_bytes(im)
    except Image.DecompressionBombError:
        raise InvalidImageError(
            f"image is larger than {MAX_IMAGE_PX} px; send patches, not slides"
        ) from None
    except Exception:  # Pillow raises many types for malformed headers
        raise InvalidImageError("image header cannot be read") from None
    if block > MAX_TIFF_BLOCK_BYTES:
        raise InvalidImageError(
            f"TIFF tiles or strips of {block} bytes exceed {MAX_TIFF_BLOCK_BYTES}"
        )
    return int(width), int(height)


def checked_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` in px of encoded PNG/JPEG/TIFF bytes, from the header, after
    every check :func:`decode_image` makes before decoding.

    Raises:
        InvalidImageError: another format, an unreadable header, no pixels, or more
            than :data:`MAX_IMAGE_PX` px.
    """
    image_format(data)
    width, height = header_size(data)
    if width <= 0 or height <= 0:
        raise InvalidImageError("image has no pixels")
    if width * height > MAX_IMAGE_PX:
        raise InvalidImageError(
            f"image of {width} x {height} px is larger than {MAX_IMAGE_PX} px; "
            "send patches, not slides"
        )
    return width, height


def decode_image(data: bytes) -> npt.NDArray[np.uint8]:
    """Decode PNG/JPEG/TIFF bytes to RGB uint8 ``[h, w, 3]``.

    Raises:
        InvalidImageError: another format, an unreadable header, more than
            :data:`MAX_IMAGE_PX` px, or bytes the decoder rejects.
    """
    checked_size(data)
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if bgr is None or bgr.size == 0:
            raise InvalidImageError("image bytes are not a decodable PNG, JPEG or TIFF")
        return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    except (cv2.error, MemoryError, ValueError):
        raise InvalidImageError("image bytes are not a decodable PNG, JPEG or TIFF") from None


def patch_px(image: pb.PatchImage) -> int:
    """Pixels one ``PatchImage`` decodes to (width x height), read from its header or
    raw size without decoding, after the checks :func:`patch_pixels` makes first.

    Raises:
        InvalidImageError: as :func:`patch_pixels`, except a decoder failure (those
            only show when decoding).
    """
    which = image.WhichOneof("data")
    if which == "raw":
        raw = image.raw
        w, h = raw.width_px, raw.height_px
        if w <= 0 or h <= 0 or len(raw.rgb) != w * h * 3:
            raise InvalidImageError("raw image size does not match width x height x 3")
        return int(w) * int(h)
    if which == "encoded":
        if not image.encoded:
            raise InvalidImageError("image bytes are empty")
        width, height = checked_size(image.encoded)
        return width * height
    raise InvalidImageError("patch image has no data")


class PixelBudget:
    """A running count of decoded pixels against a limit (one ClassifyPatches request,
    or one stream). Charged from image headers before decoding, so a request of
    64 black 8192 x 8192 px PNGs (12.5 MB on the wire, 4.3 Gpx decoded, 68 s of CPU)
    is refused before its first decode.

    Args:
        limit_px: most pixels to decode (>= 0).
        what: what the budget covers, for the message ("request", "stream").

    Thread-safe.
    """

    def __init__(self, limit_px: int, what: str) -> None:
        if limit_px < 0:
            raise ValueError("limit_px must be >= 0")
        self.limit_px = int(limit_px)
        self.what = what
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_px(self) -> int:
        """Pixels charged so far."""
        with self._lock:
            return self._used

    def charge(self, px: int) -> None:
        """Count ``px`` more pixels; nothing is counted when they do not fit.

        Raises:
            PixelBudgetExceededError: the pixels charged so far plus ``px`` exceed
                ``limit_px``.
        """
        with self._lock:
            if self._used + px > self.limit_px:
                raise PixelBudgetExceededError(
                    f"the images would decode to more than the {self.limit_px} px "
                    f"allowed per ClassifyPatches {self.what}; send fewer or smaller images",
                    limit_px=str(self.limit_px),
                    budget=self.what,
                )
            self._used += px


def patch_pixels(image: pb.PatchImage) -> npt.NDArray[np.uint8]:
    """RGB uint8 ``[h, w, 3]`` of one ``PatchImage`` (encoded bytes or raw RGB).

    Raises:
        InvalidImageError: as :func:`decode_image`; raw pixels whose length does not
            match width x height x 3; no data.
    """
    patch_px(image)  # every check that needs no decoding
    if image.WhichOneof("data") == "raw":
        raw = image.raw
        return np.frombuffer(raw.rgb, dtype=np.uint8).reshape(raw.height_px, raw.width_px, 3)
    return decode_image(image.encoded)
