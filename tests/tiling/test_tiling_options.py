"""TilingOptions validation and the shared CLI flags."""

from __future__ import annotations

import argparse

import pytest

from histohelper.errors import InvalidOptionsError
from histohelper.server.tiling import (
    Resolution,
    TilingOptions,
    add_tiling_arguments,
    tiling_options_from_args,
)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patch_size_px": 0},
        {"stride_px": 0},
        {"min_tissue_fraction": 1.5},
        {"edge_mode": "wrap"},
        {"mpp_override": -1.0},
        {"mpp_override": 1e-9},
        {"mpp_override": 6.786e306},
        {"mpp_override": float("nan")},
        {"mask_median_ksize": 4},
        {"mask_method": "magic"},
    ],
    ids=lambda k: next(iter(k)),
)
def test_invalid_options_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidOptionsError):
        TilingOptions(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "unit"),
    [
        (0, "mpp"),
        (float("nan"), "mpp"),
        (5e-324, "mpp"),
        (1e300, "mpp"),
        (1e-9, "magnification"),
        (2000, "magnification"),
        (1.5, "level"),
        (1, "furlong"),
    ],
)
def test_invalid_resolution_raises(value: float, unit: str) -> None:
    with pytest.raises(InvalidOptionsError):
        Resolution(value, unit)  # type: ignore[arg-type]


def test_defaults() -> None:
    o = TilingOptions()
    assert (o.patch_size_px, o.target, o.min_tissue_fraction, o.edge_mode) == (
        224,
        Resolution(0.5, "mpp"),
        0.5,
        "pad",
    )
    assert o.effective_stride_px == 224


def test_cli_flags_roundtrip() -> None:
    p = argparse.ArgumentParser()
    add_tiling_arguments(p)
    assert tiling_options_from_args(p.parse_args([])) == TilingOptions()
    o = tiling_options_from_args(
        p.parse_args(
            [
                "--patch-size",
                "256",
                "--target-magnification",
                "10",
                "--stride",
                "128",
                "--edge-mode",
                "drop",
                "--keep-ink",
                "--min-tissue",
                "0.25",
            ]
        )
    )
    assert o.patch_size_px == 256 and o.target == Resolution(10, "magnification")
    assert o.stride_px == 128 and o.edge_mode == "drop" and not o.remove_ink
    assert o.min_tissue_fraction == 0.25
    with pytest.raises(SystemExit):
        p.parse_args(["--target-mpp", "1", "--target-level", "1"])
