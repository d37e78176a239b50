"""PatchReader memory: reads resized straight to the output size, bounded batch bytes,
out of memory reported as a size problem (RESOURCE_EXHAUSTED), not a corrupt slide."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from histohelper.errors import SlideTooLargeError
from histohelper.server.tiling import PatchReader, TilingOptions, open_slide, plan_tiling


@pytest.mark.parametrize(
    ("patch_px", "output_px", "interp"),
    [(4096, 32, cv2.INTER_AREA), (224, 300, cv2.INTER_LINEAR)],
    ids=["4096-to-32-area", "224-to-300-linear"],
)
def test_patches_are_resized_once_from_the_read(
    real_slide: Path, patch_px: int, output_px: int, interp: int
) -> None:
    """Each patch equals one cv2.resize of its region read (no full-size step)."""
    with open_slide(real_slide) as slide:
        options = TilingOptions(patch_size_px=patch_px, min_tissue_fraction=0.0)
        grid = plan_tiling(slide, options).grid
        rw, rh = grid.read_width_px, grid.read_height_px
        assert len(grid) > 0 and grid.level == 0 and rw == rh != output_px
        want = np.stack(
            [
                cv2.resize(
                    slide.read_level_rgb(0, grid.x_l0[i], grid.y_l0[i], rw, rh),
                    (output_px, output_px),
                    interpolation=interp,
                )
                for i in range(len(grid))
            ]
        )
    reader = PatchReader(real_slide, grid, batch_size=4, output_size_px=output_px)
    got = np.zeros_like(want)
    for batch in reader.iter_batches():
        assert batch.images.shape[1:] == (output_px, output_px, 3)
        assert batch.images.dtype == np.uint8 and batch.failed.size == 0
        got[batch.indices] = batch.images
    np.testing.assert_array_equal(got, want)


def test_batches_are_cut_to_the_byte_budget(real_slide: Path) -> None:
    with open_slide(real_slide) as slide:
        grid = plan_tiling(slide, TilingOptions()).grid
    per_patch = 224 * 224 * 3
    reader = PatchReader(real_slide, grid, batch_size=16, max_batch_bytes=5 * per_patch + 7)
    sizes = [len(b) for b in reader.iter_batches()]
    assert sum(sizes) == len(grid) > 10 and max(sizes) == 5
    # One 8192 px patch is 192 MiB: the default 256 MiB budget holds one at a time.
    big = PatchReader(real_slide, grid, batch_size=64, first_batch_size=8, output_size_px=8192)
    assert (big.batch_size, big.first_batch_size, big.tail_batch_size) == (1, 1, 1)
    with pytest.raises(SlideTooLargeError, match="per batch"):
        PatchReader(real_slide, grid, max_batch_bytes=per_patch - 1)


@pytest.mark.parametrize(
    ("patch_px", "output_px", "headroom_mib"),
    [(4096, 4096, 40), (224, 4096, 72)],
    ids=["numpy-batch", "opencv-resize"],
)
def test_out_of_memory_in_a_reader_is_slide_too_large(
    real_slide: Path, patch_px: int, output_px: int, headroom_mib: int
) -> None:
    """A real allocation failure in a reader thread surfaces as SlideTooLargeError, not
    CorruptSlideError. The address space is capped ``headroom_mib`` above the
    process; the batch of one 4096 px patch takes 48 MiB: numpy's MemoryError when
    that does not fit, OpenCV's out-of-memory error when the batch fits but the
    224 -> 4096 px resize output (48 MiB more) does not."""
    script = textwrap.dedent(
        """
        import resource, sys
        from histohelper.server.tiling import PatchReader, TilingOptions, open_slide, plan_tiling
        path, patch_px, output_px, headroom = sys.argv[1], *map(int, sys.argv[2:])
        with open_slide(path) as slide:
            options = TilingOptions(patch_size_px=patch_px, min_tissue_fraction=0.0)
            grid = plan_tiling(slide, options).grid
        reader = PatchReader(path, grid, batch_size=1, num_workers=1, output_size_px=output_px)
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + headroom * 2**20, resource.RLIM_INFINITY))
        try:
            list(reader.iter_batches())
        except Exception as exc:
            print("raised", type(exc).__name__)
        """
    )
    args = [str(real_slide), str(patch_px), str(output_px), str(headroom_mib)]
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "raised SlideTooLargeError", out.stdout + out.stderr
    assert "ran out of memory" in out.stderr  # the worker's log line: this path was taken
