"""Session-scoped synthetic slides for the tiling tests (generated once, in a tmp dir)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import synthetic_slides as ss

# Tissue boxes (x, y, w, h) shared by several slides.
BOX = (600, 500, 1400, 900)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic_slides")


@pytest.fixture(scope="session")
def odd_pyramid(synth_dir: Path) -> Path:
    """3001 x 2003 px at 0.25 um/px; levels 750 x 500 (4.0013 x 4.006) and
    187 x 125 (16.048 x 16.024): non-integer, per-axis-different downsamples."""
    img = ss.slide_with_tissue(2003, 3001, [BOX], seed=3)
    return ss.write_slide(synth_dir / "odd.tiff", img, [(750, 500), (187, 125)], mpp=0.25)


@pytest.fixture(scope="session")
def no_mpp_slide(synth_dir: Path) -> Path:
    img = ss.slide_with_tissue(1200, 1600, [(200, 200, 900, 700)], seed=4)
    return ss.write_slide(synth_dir / "nompp.tiff", img, [(400, 300)], mpp=None)


@pytest.fixture(scope="session")
def rgba_slide(synth_dir: Path) -> Path:
    """2000 x 1500 RGBA at 0.5 um/px: left 500 px column and a top band transparent."""
    img = ss.slide_with_tissue(1500, 2000, [(800, 400, 900, 800)], seed=5)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:, :500] = 0  # transparent, colour 0 (what dropping alpha would show as black)
    rgba[:200] = 0
    return ss.write_pyramid(
        synth_dir / "rgba.tiff", [rgba, ss.resize_to(rgba, (500, 375))], mpp=0.5
    )


@pytest.fixture(scope="session")
def black_background_slide(synth_dir: Path) -> Path:
    """Opaque near-black background (with JPEG-like noise) and one tissue block."""

    def black(h: int, w: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.integers(0, 12, (h, w, 3), dtype=np.uint8)

    img = ss.slide_with_tissue(1500, 2000, [(700, 400, 800, 700)], seed=6, background=black)
    return ss.write_slide(synth_dir / "black.tiff", img, [(500, 375)], mpp=0.5)


@pytest.fixture(scope="session")
def pen_slide(synth_dir: Path) -> Path:
    """Tissue at the right; blue, green and black marker strokes over the glass at
    the left (ink-only areas) and one blue stroke across the tissue."""
    img = ss.slide_with_tissue(2000, 3000, [(1700, 300, 1100, 1400)], seed=7)
    ss.draw_pen(img, [(100, 200), (1200, 250), (1300, 900)], (30, 60, 200), 120)
    ss.draw_pen(img, [(150, 1100), (1200, 1150)], (40, 160, 60), 120)
    ss.draw_pen(img, [(150, 1600), (1200, 1700)], (20, 20, 25), 120)
    ss.draw_pen(img, [(1800, 1000), (2700, 1050)], (30, 60, 200), 60)
    return ss.write_slide(synth_dir / "pen.tiff", img, [(750, 500)], mpp=0.5)


@pytest.fixture(scope="session")
def glass_slide(synth_dir: Path) -> Path:
    img = ss.glass_rgb(1500, 2000, seed=8, noise=4.0)
    return ss.write_slide(synth_dir / "glass.tiff", img, [(500, 375)], mpp=0.5)


@pytest.fixture(scope="session")
def faint_slide(synth_dir: Path) -> Path:
    """Glass with a very faint (barely tinted) region."""
    img = ss.glass_rgb(1500, 2000, seed=9, noise=3.0).astype(np.int16)
    img[400:1100, 500:1500] += np.array([-2, -6, -3], np.int16)
    return ss.write_slide(
        synth_dir / "faint.tiff", img.clip(0, 255).astype(np.uint8), [(500, 375)], mpp=0.5
    )


@pytest.fixture(scope="session")
def small_blob_slide(synth_dir: Path) -> Path:
    """A 60 x 60 px (30 x 30 um) blob: smaller than one 224 px patch at 0.5 um/px."""
    img = ss.slide_with_tissue(1500, 2000, [(900, 700, 60, 60)], seed=10)
    return ss.write_slide(synth_dir / "blob.tiff", img, [(500, 375)], mpp=0.5)


@pytest.fixture(scope="session")
def fine_base_slide(synth_dir: Path) -> Path:
    """0.25 um/px base with levels 1/4/16; tissue everywhere but a glass right half."""
    img = ss.slide_with_tissue(4000, 4000, [(0, 0, 2000, 4000)], seed=11)
    return ss.write_slide(synth_dir / "fine.tiff", img, [(1000, 1000), (250, 250)], mpp=0.25)


@pytest.fixture(scope="session")
def indivisible_slide(synth_dir: Path) -> Path:
    """One level, 3001 x 1999 px, tissue only in the bottom-right corner box."""
    img = ss.slide_with_tissue(1999, 3001, [(2400, 1400, 601, 599)], seed=12)
    return ss.write_slide(synth_dir / "indivisible.tiff", img, mpp=0.5)


@pytest.fixture(scope="session")
def sparse_one_level(synth_dir: Path) -> Path:
    """20,000 x 16,000 px, one level, mostly empty tiles: forces band-sampled masks
    when mask_max_read_px is small."""
    return ss.write_sparse_slide(
        synth_dir / "sparse.tiff", 20_000, 16_000, [(8000, 6000, 3000, 2000)], mpp=0.5
    )


@pytest.fixture(scope="session")
def corrupt_jpeg_slide(synth_dir: Path) -> Path:
    """Tissue everywhere, JPEG tiles, one tile (index 5 of level 0) corrupt."""
    img = ss.slide_with_tissue(1024, 2048, [(0, 0, 2048, 1024)], seed=13)
    path = ss.write_pyramid(synth_dir / "corrupt.tiff", [img], mpp=0.5, compression="jpeg")
    return ss.corrupt_tile(path, 0, 5)


@pytest.fixture(scope="session")
def small_slide(synth_dir: Path) -> Path:
    """100 x 80 px of tissue: smaller than one patch."""
    img = ss.tissue_rgb(80, 100, seed=14)
    return ss.write_slide(synth_dir / "small.tiff", img, mpp=0.5)


@pytest.fixture(scope="session")
def tall_narrow_slide(synth_dir: Path) -> Path:
    """16 x 4,194,304 px at 0.16 um/px, every tile but the first empty (5 KB on disk).

    Level 1 is 16 x 65,536 px (downsample 1 x 64), so the tissue mask reads 1 Mpx.
    At a 0.01 um/px target (downsample 1/16) a 1-px stride puts 16 rows in each
    level-0 px: about 6.7e7 grid rows, more than ``MAX_GRID_CELLS`` on one axis.
    """
    import tifffile

    height, width, tile_h = 4 * 2**20, 16, 16_384

    def tiles(h: int, th: int) -> Iterator[np.ndarray | None]:
        for i in range(-(-h // th)):
            yield np.full((th, width, 3), 240, np.uint8) if i == 0 else None

    path = synth_dir / "tall_narrow.tiff"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, (h, th, mpp_y) in enumerate(
            [(height, tile_h, 0.16), (height // 64, 1024, 0.16 * 64)]
        ):
            tw.write(
                tiles(h, th),
                shape=(h, width, 3),
                dtype=np.uint8,
                photometric="rgb",
                tile=(th, width),
                compression="zlib",
                subfiletype=1 if k else 0,
                resolution=(1e4 / 0.16, 1e4 / mpp_y),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path
