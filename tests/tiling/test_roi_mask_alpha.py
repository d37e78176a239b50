"""A region-of-interest mask PNG with grey+alpha: the alpha channel is ignored.

The region mask rule (histohelper.regions.mask_inside, shared by the server's
decode_mask_png and the client's outline drawing) says a pixel is inside when its
grey or any colour channel is nonzero, alpha ignored. OpenCV expands grey+alpha to
four channels (grey repeated); a decoder that keeps two (Pillow's "LA") gave
``[h, w, 2]``, whose alpha was counted as a colour channel.
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from histohelper.regions import mask_inside
from histohelper.server.tiling.roi import decode_mask_png


def _grey_alpha_png(grey: np.ndarray, alpha: np.ndarray, bits: int) -> bytes:
    """A PNG of colour type 4 (grey+alpha) at 8 or 16 bits, written by hand."""
    h, w = grey.shape
    dtype = ">u2" if bits == 16 else "u1"
    pixels = np.stack([grey, alpha], axis=-1).astype(dtype)
    raw = b"".join(b"\0" + pixels[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, bits, 4, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _mask_and_alpha(top: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey: a nonzero box; alpha: opaque only outside it (so it disagrees everywhere)."""
    grey = np.zeros((12, 16), np.uint32)
    grey[3:9, 4:12] = 1
    alpha = np.where(grey > 0, 0, top).astype(np.uint32)
    return grey, alpha


@pytest.mark.parametrize("bits", [8, 16])
def test_grey_alpha_mask_png_is_its_grey_channel(bits: int) -> None:
    grey, alpha = _mask_and_alpha((1 << bits) - 1)
    data = _grey_alpha_png(grey, alpha, bits)
    expected = grey > 0
    assert np.array_equal(decode_mask_png(data, 4.0), expected)
    # The same file through both decoders gives the same inside pixels.
    opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert opencv.shape == (12, 16, 4)
    assert np.array_equal(mask_inside(opencv), expected)
    if bits == 8:
        pillow = np.asarray(Image.open(io.BytesIO(data)))
        assert pillow.shape == (12, 16, 2)
        assert np.array_equal(mask_inside(pillow), expected)  # was: alpha counted, all inside


def test_every_layout_ignores_alpha() -> None:
    grey, alpha = _mask_and_alpha(255)
    g, a = grey.astype(np.uint8), alpha.astype(np.uint8)
    expected = grey > 0
    for image in (
        g,
        g[..., None],
        np.dstack([g, a]),
        np.dstack([g, g, g]),
        np.dstack([g, g, g, a]),
    ):
        assert np.array_equal(mask_inside(image), expected), image.shape
