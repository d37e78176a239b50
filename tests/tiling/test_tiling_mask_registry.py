"""The tissue-mask method registry: names -> segmentations, dispatched by the mask."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
import synthetic_slides as ss

from histohelper.errors import InvalidOptionsError
from histohelper.server.tiling import MaskMethod, TilingOptions
from histohelper.server.tiling import mask as mask_mod
from histohelper.server.tiling.mask import (
    LowResImage,
    MaskMethodSpec,
    compute_tissue_mask,
    get_mask_method,
    mask_methods,
    register_mask_method,
    threshold_tissue,
)


def _low(rgb: np.ndarray) -> LowResImage:
    h, w = rgb.shape[:2]
    return LowResImage(
        rgb=rgb,
        opaque=np.full((h, w), 255, np.uint8),
        scale_x=8.0,
        scale_y=8.0,
        level=0,
        sampled=False,
        failed_reads=0,
        total_reads=1,
    )


def test_registered_methods_are_the_options_methods() -> None:
    """``TilingOptions`` validates ``mask_method`` without OpenCV; its list and the
    registry must agree."""
    assert set(mask_methods()) == set(typing.get_args(MaskMethod))
    assert get_mask_method("saturation").label == "otsu-hsv-saturation"
    assert get_mask_method("gray").label == "otsu-grayscale"


def test_unknown_method_lists_the_known_ones() -> None:
    opts = TilingOptions()
    # Options refuse unknown names themselves; go around them to reach the registry.
    object.__setattr__(opts, "mask_method", "watershed")
    rgb = ss.slide_with_tissue(64, 64, [(8, 8, 40, 40)])
    with pytest.raises(InvalidOptionsError, match=r"'watershed' \(known: saturation, gray"):
        compute_tissue_mask(_low(rgb), opts, 0.5, 0.5, 512, 512)
    with pytest.raises(InvalidOptionsError, match="known: saturation, gray"):
        threshold_tissue(rgb, np.full((64, 64), 255, np.uint8), opts, 16.0)


def test_compute_tissue_mask_dispatches_through_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mask_mod, "_MASK_METHODS", dict(mask_mod._MASK_METHODS))
    seen: list[tuple[int, ...]] = []

    def everything(rgb, opaque, options, um2_per_px):  # type: ignore[no-untyped-def]
        seen.append(rgb.shape)
        full = np.ones(rgb.shape[:2], bool)
        return full, np.zeros_like(full), 0.0, 0.0

    register_mask_method(MaskMethodSpec("gray", "everything-is-tissue", everything))
    rgb = ss.slide_with_tissue(32, 48, [(0, 0, 4, 4)])
    m = compute_tissue_mask(_low(rgb), TilingOptions(mask_method="gray"), 0.5, 0.5, 384, 256)
    assert seen == [(32, 48, 3)]
    assert m.method == "everything-is-tissue" and m.tissue_fraction == 1.0 and m.mask.all()


@pytest.mark.parametrize("method", ["saturation", "gray"])
def test_threshold_tissue_is_the_registered_segmentation(method: str) -> None:
    rgb = ss.slide_with_tissue(120, 160, [(20, 30, 60, 50)], seed=3)
    opaque = np.full((120, 160), 255, np.uint8)
    opts = dataclasses.replace(TilingOptions(), mask_method=method)  # type: ignore[arg-type]
    got = threshold_tissue(rgb, opaque, opts, 4.0)
    want = get_mask_method(method).segment(rgb, opaque, opts, 4.0)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert got[0][40:70, 30:70].all() and not got[0][:15].any()
