"""The tifffile fast path for tiled JPEG TIFF pyramids: same pixels as OpenSlide,
taken only where it applies, bounded tile cache, corrupt tiles as clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as ss
import tifffile

from histohelper.errors import CorruptSlideError, RegionOutOfBoundsError
from histohelper.server.tiling import (
    PatchReader,
    SlideCache,
    TilingOptions,
    open_slide,
    plan_tiling,
)
from histohelper.server.tiling.reader import read_patch
from histohelper.server.tiling.tiffread import TileCache


@pytest.fixture(scope="module")
def jpeg_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1001 x 777 px JPEG (YCbCr) pyramid, 128 px tiles, levels 250 x 194 and 62 x 48:
    partial edge tiles and non-integer downsamples."""
    img = ss.slide_with_tissue(777, 1001, [(100, 120, 700, 500)], seed=11)
    levels = [img, ss.resize_to(img, (250, 194)), ss.resize_to(img, (62, 48))]
    path = tmp_path_factory.mktemp("tiffread") / "jpeg.tiff"
    with tifffile.TiffWriter(path) as tw:
        for k, lv in enumerate(levels):
            tw.write(
                lv,
                photometric="ycbcr",
                tile=(128, 128),
                compression="jpeg",
                subfiletype=1 if k else 0,
                resolution=(1e4 / (0.5 * 1001 / lv.shape[1]),) * 2,
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path


# regions (x, y, w, h) in level px: inside, across tile seams, past every edge
REGIONS = [
    (0, 0, 64, 64),
    (100, 90, 224, 224),
    (127, 127, 3, 3),
    (900, 700, 224, 224),
    (-50, -20, 100, 80),
    (990, 10, 40, 40),
    (5, 770, 30, 30),
]


def test_real_svs_same_pixels_as_openslide(real_slide: Path) -> None:
    with open_slide(real_slide) as slide:
        assert slide.metadata.vendor == "aperio" and slide.reads_directly(0)
        w, h = slide.metadata.level_dimensions[0]
        for x, y, rw, rh in [*REGIONS, (w - 100, h - 100, 224, 224), (1111, 1500, 480, 240)]:
            fast = slide.read_level_rgb(0, x, y, rw, rh)
            ref = slide.read_region_rgb(x, y, 0, rw, rh)  # OpenSlide, composited on white
            assert fast.shape == (rh, rw, 3) and fast.dtype == np.uint8
            np.testing.assert_array_equal(fast, ref)


def test_every_level_matches_the_decoded_page(jpeg_pyramid: Path) -> None:
    with open_slide(jpeg_pyramid) as slide:
        assert slide.metadata.vendor == "generic-tiff"
        for level in range(slide.metadata.level_count):
            assert slide.reads_directly(level)
            page = tifffile.imread(jpeg_pyramid, key=level)
            ph, pw = page.shape[:2]
            padded = np.full((ph + 600, pw + 600, 3), 255, np.uint8)
            padded[300 : 300 + ph, 300 : 300 + pw] = page
            for x, y, rw, rh in REGIONS:
                if x >= pw or y >= ph:
                    with pytest.raises(RegionOutOfBoundsError):
                        slide.read_level_rgb(level, x, y, rw, rh)
                    continue
                got = slide.read_level_rgb(level, x + 0.4, y - 0.4, rw, rh)  # rounds
                want = padded[300 + y : 300 + y + rh, 300 + x : 300 + x + rw]
                np.testing.assert_array_equal(got, want)
        # level 0 also equals OpenSlide's own read of the same tiles
        np.testing.assert_array_equal(
            slide.read_level_rgb(0, 60, 70, 300, 200), slide.read_region_rgb(60, 70, 0, 300, 200)
        )


def test_other_tiffs_stay_on_openslide(synth_dir: Path, rgba_slide: Path) -> None:
    """zlib tiles and RGBA pages are not JPEG RGB: OpenSlide reads them."""
    zlib = ss.write_slide(synth_dir / "zlib-fast.tiff", ss.tissue_rgb(300, 400), mpp=0.5)
    for path in (zlib, rgba_slide):
        with open_slide(path) as slide:
            assert not slide.reads_directly(0)
            got = slide.read_level_rgb(0, 10, 10, 64, 64)
            np.testing.assert_array_equal(got, slide.read_region_rgb(10, 10, 0, 64, 64))


def test_patch_reader_threads_give_the_serial_pixels(real_slide: Path) -> None:
    cache = SlideCache(capacity_bytes=2 * 1024 * 1024)  # small: evictions happen
    with open_slide(real_slide, cache=cache) as slide:
        grid = plan_tiling(slide, TilingOptions()).grid
        serial = np.stack([read_patch(slide, grid, i) for i in range(len(grid))])
    reader = PatchReader(real_slide, grid, batch_size=5, num_workers=3, cache=cache)
    got = np.zeros_like(serial)
    for batch in reader.iter_batches():
        got[batch.indices] = batch.images
    np.testing.assert_array_equal(got, serial)
    assert 0 < cache.tile_cache.nbytes <= 2 * 1024 * 1024


def test_tile_cache_is_bounded_lru() -> None:
    cache = TileCache(capacity_bytes=3 * 100)
    tiles = {k: np.full((10, 10), k, np.uint8) for k in range(4)}
    for k in range(3):
        cache.put((k,), tiles[k])
    assert cache.get((0,)) is not None  # 0 is now the most recent
    cache.put((3,), tiles[3])  # evicts 1, the least recently used
    assert cache.get((1,)) is None and cache.get((0,)) is not None
    assert cache.nbytes == 300
    with pytest.raises(ValueError):
        tiles[0][0, 0] = 1  # cached tiles are read-only
    TileCache(50).put(("big",), np.zeros(100, np.uint8))  # larger than capacity: skipped


def test_corrupt_jpeg_tile_is_a_clear_error(tmp_path: Path, jpeg_pyramid: Path) -> None:
    bad = tmp_path / "bad.tiff"
    bad.write_bytes(jpeg_pyramid.read_bytes())
    ss.corrupt_tile(bad, page=0, tile_index=0)
    with open_slide(bad) as slide:
        assert slide.reads_directly(0)
        with pytest.raises(CorruptSlideError, match="could not be decoded") as info:
            slide.read_level_rgb(0, 0, 0, 64, 64)
        assert "bad.tiff" not in str(info.value)
        assert slide.failed_reads == 1
        assert slide.read_level_rgb(0, 300, 300, 64, 64).shape == (64, 64, 3)  # still reads


@pytest.fixture(scope="module")
def sparse_jpeg_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2048 x 1536 px JPEG pyramid (level 512 x 384), tissue at (512, 512, 600, 400)
    (on tile seams, so patches half over tissue reach into empty tiles);
    every tile that does not touch it, but the first, is stored empty (0 bytes)."""
    path = tmp_path_factory.mktemp("sparse") / "sparse.tiff"
    return ss.write_sparse_slide(
        path, 2048, 1536, [(512, 512, 600, 400)], mpp=0.5, downsamples=(4,)
    )


@pytest.mark.parametrize(
    ("level", "region", "empty_tile"),
    [(0, (1000, 700, 300, 200), (5, 2)), (1, (100, 200, 200, 100), (0, 1))],
    ids=["level0-stored-then-empty-x", "level1-stored-then-empty-y"],
)
def test_empty_tiles_read_white_like_openslide(
    sparse_jpeg_slide: Path, level: int, region: tuple[int, int, int, int], empty_tile: tuple
) -> None:
    """A 0-byte tile is white, as OpenSlide's transparent pixels composited on white;
    the stored tile beside it is pixel-exact."""
    page = tifffile.TiffFile(sparse_jpeg_slide).pages[level]
    tiles_x = -(-page.imagewidth // page.tilewidth)
    assert page.databytecounts[empty_tile[1] * tiles_x + empty_tile[0]] == 0
    x, y, w, h = region
    with open_slide(sparse_jpeg_slide) as slide:
        assert slide.reads_directly(level)
        ds = slide.metadata.openslide_downsamples[level]
        got = slide.read_level_rgb(level, x, y, w, h)
        x_l0, y_l0 = round(x * ds), round(y * ds)
        alpha = slide.read_region_rgba(x_l0, y_l0, level, w, h)[..., 3]
        ref = slide.read_region_rgb(x_l0, y_l0, level, w, h)
    empty = alpha == 0
    assert empty.any() and (alpha[~empty] == 255).all() and (~empty).any()
    assert (got[empty] == 255).all()
    np.testing.assert_array_equal(got[~empty], ref[~empty])
    assert (got[~empty] < 250).any()  # the stored part is not white itself


@pytest.mark.parametrize("min_tissue", [0.5, 0.0], ids=["default", "every-cell"])
def test_sparse_slide_patches_all_read(sparse_jpeg_slide: Path, min_tissue: float) -> None:
    """Patches over empty tiles read (white where empty), none fails."""
    with open_slide(sparse_jpeg_slide) as slide:
        grid = plan_tiling(slide, TilingOptions(min_tissue_fraction=min_tissue)).grid
        assert slide.reads_directly(grid.level)
    reader = PatchReader(sparse_jpeg_slide, grid, batch_size=8, max_failed_fraction=0.0)
    seen: list[int] = []
    white = 0
    for batch in reader.iter_batches():
        assert batch.failed.size == 0
        seen += batch.indices.tolist()
        white += int((batch.images == 255).all(axis=(1, 2, 3)).sum())
    assert sorted(seen) == list(range(len(grid))) and len(grid) > 0
    assert reader.failed_indices == []
    if min_tissue == 0.0:
        assert white > 0  # cells wholly over empty tiles
