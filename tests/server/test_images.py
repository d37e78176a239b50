"""Client patch images: only PNG/JPEG/TIFF, size checked from the header before any
decoding, decoder failures per image (never a failed call)."""

from __future__ import annotations

import struct
import zlib

import cv2
import grpc
import numpy as np
import pytest

from histohelper.errors import InvalidImageError
from histohelper.server.images import MAX_IMAGE_PX, decode_image, header_size
from histohelper.v1 import slide_analysis_pb2 as pb
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR announcing width x height, and an empty IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def _jpeg(width: int, height: int, value: int = 128) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((height, width, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def _truncated_jpeg_bomb() -> bytes:
    """A real JPEG header patched to announce 32,767 x 32,767 px, cut after 700 bytes."""
    data = bytearray(_jpeg(64, 64))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 32767, 32767)
    return bytes(data[:700])


def _tiff(pixels: np.ndarray, **kwargs: object) -> bytes:
    import io

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels, **kwargs)
    return buf.getvalue()


def _tiff_tile_bomb() -> bytes:
    """A 1 x 1 px 16-bit RGBA TIFF declaring one 11,584 px square tile (~1 GiB)."""
    return _tiff(
        np.zeros((1, 1, 4), np.uint16),
        tile=(11584, 11584),
        compression="zlib",
        photometric="rgb",
        extrasamples=[2],
    )


# name -> (bytes, what refuses it). Every hostile size is refused from the header,
# before any pixel is decoded: the refusal names the header check, not the decoder.
BOMBS = {
    "tiff-tile-11584": (_tiff_tile_bomb(), "TIFF tiles or strips of"),
    "ppm-width-2^20": (b"P6\n1048577 1\n255\n" + bytes(30), "not a PNG, JPEG or TIFF"),
    "bmp": (cv2.imencode(".bmp", np.zeros((4, 4, 3), np.uint8))[1].tobytes(), "not a PNG"),
    "png-header-8193x8192": (_png_header_only(8193, 8192), "is larger than 67108864 px"),
    "jpeg-32767-truncated": (_truncated_jpeg_bomb(), "is larger than 67108864 px"),
    "png-bad-data": (_png_header_only(64, 64), "not a decodable PNG"),
    "empty-ish": (b"\xff\xd8\xff", "header cannot be read"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_hostile_images_are_refused_by_the_right_check(name: str) -> None:
    data, refused_by = BOMBS[name]
    with pytest.raises(InvalidImageError) as info:
        decode_image(data)
    assert refused_by in str(info.value)


def test_accepted_images_decode_to_rgb() -> None:
    rgb = decode_image(_jpeg(300, 200, value=200))
    assert rgb.shape == (200, 300, 3) and rgb.dtype == np.uint8
    grey16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    png16 = cv2.imencode(".png", grey16)[1].tobytes()
    out = decode_image(png16)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    tiff = cv2.imencode(".tiff", np.zeros((10, 12, 3), np.uint8))[1].tobytes()
    assert decode_image(tiff).shape == (10, 12, 3)
    tiled = _tiff(np.full((300, 500, 3), 7, np.uint8), tile=(256, 256), photometric="rgb")
    assert decode_image(tiled).shape == (300, 500, 3)
    assert header_size(_png_header_only(8192, 8192)) == (8192, 8192)
    assert 8192 * 8192 <= MAX_IMAGE_PX < 8193 * 8192


def test_classify_patches_answers_bombs_per_image(analysis_server) -> None:
    """Hostile images get an error each; the good ones around them are classified."""
    good = _jpeg(224, 224)
    images = [pb.PatchImage(id="good-0", encoded=good)]
    images += [pb.PatchImage(id=name, encoded=data) for name, (data, _) in BOMBS.items()]
    images.append(pb.PatchImage(id="good-1", encoded=good))
    with grpc.insecure_channel(analysis_server.target) as channel:
        stub = pb_grpc.SlideAnalysisServiceStub(channel)
        (reply,) = list(
            stub.ClassifyPatches(iter([pb.ClassifyPatchesRequest(images=images)]), timeout=60)
        )
    got = {p.id: p for p in reply.predictions}
    assert [p.id for p in reply.predictions] == [im.id for im in images]
    for name in BOMBS:
        assert got[name].error and not got[name].probabilities, name
    assert (
        got["good-0"].probabilities and got["good-0"].probabilities == got["good-1"].probabilities
    )
