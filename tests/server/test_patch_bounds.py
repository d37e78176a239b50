"""Lower bounds on a request's patch side and stride (tester B finding 10), over a
real loopback server: patch_size_px=1 or stride_px=1 used to be accepted and tile a
1024 x 1024 px slide into ~300,000 patches until the deadline.

Bounds (server/tiling/options.py): patch side >= 32 px, stride >= 16 px and >= 1/8 of
the patch side; below them INVALID_OPTIONS, naming the field and the bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import synthetic_slides as syn

from histohelper.client import AnalysisOptions, SlideClient
from histohelper.errors import InvalidOptionsError
from histohelper.server.tiling.options import (
    MIN_REQUEST_PATCH_SIZE_PX,
    MIN_REQUEST_STRIDE_PX,
)


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bounds")
    syn.write_slide(root / "small.tiff", syn.slide_with_tissue(256, 256, [(0, 0, 256, 256)]))
    return root


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"patch_size_px": 1}, "patch_size_px must be at least 32 px (got 1)"),
        ({"patch_size_px": 31}, "patch_size_px must be at least 32 px (got 31)"),
        ({"stride_px": 1}, "stride_px must be at least 28 px for 224 px patches (got 1"),
        ({"stride_px": 27}, "stride_px must be at least 28 px for 224 px patches (got 27"),
        (
            {"patch_size_px": 32, "stride_px": 15},
            "stride_px must be at least 16 px for 32 px patches (got 15",
        ),
        (
            {"patch_size_px": 1, "stride_px": 1},
            "patch_size_px must be at least 32 px (got 1)",
        ),
    ],
    ids=["patch1", "patch31", "stride1", "stride27_of_224", "stride15_of_32", "both1"],
)
def test_tiny_patches_and_strides_are_invalid_options(
    start_inprocess_server, slide_root: Path, options: dict[str, int], words: str
) -> None:
    server = start_inprocess_server(slide_root=slide_root)
    with SlideClient(server.target) as client:
        with pytest.raises(InvalidOptionsError) as info:
            client.analyze("small.tiff", AnalysisOptions(min_tissue_fraction=0.0, **options))
        assert words in info.value.message
        assert "small.tiff" not in info.value.message
        assert client.get_model_info().model.name  # the server keeps serving


def test_the_bounds_themselves_are_accepted(start_inprocess_server, slide_root: Path) -> None:
    server = start_inprocess_server(slide_root=slide_root)
    options = AnalysisOptions(
        patch_size_px=MIN_REQUEST_PATCH_SIZE_PX,
        stride_px=MIN_REQUEST_STRIDE_PX,
        min_tissue_fraction=0.0,
        target_mpp=2.0,  # 64 x 64 px at the target: 3 x 3 patches
    )
    with SlideClient(server.target) as client:
        result = client.analyze("small.tiff", options)
    assert result.grid.patch_size_px == 32 and result.grid.stride_px == 16
    assert result.patch_count == 9
