"""Pure grid maths (histohelper.geometry)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histohelper.geometry import (
    axis_cell_count,
    box_fractions,
    choose_level,
    integral_image,
    level_read_size,
)
from histohelper.server.tiling.plan import mask_integral

ODD = ((1.0, 1.0), (4.0003, 4.0011), (16.0036, 16.0102))


@pytest.mark.parametrize(
    ("target", "expected"),
    [(1.0, 0), (2.0, 0), (3.99, 1), (4.0, 1), (8.0, 1), (16.0, 2), (100.0, 2), (0.5, 0)],
    ids=["1", "2", "3.99-within-tol", "4", "8", "16", "100", "0.5"],
)
def test_choose_level_tolerates_vendor_rounding(target: float, expected: int) -> None:
    assert choose_level(ODD, target, target, tolerance=0.005) == expected


def test_choose_level_is_per_axis() -> None:
    # y downsample too coarse for the y target: fall back to the finer level.
    assert choose_level(((1.0, 1.0), (4.0, 4.5)), 4.0, 4.0) == 0


@pytest.mark.parametrize(
    ("size", "fp", "stride", "mode", "n"),
    [
        (1000, 224, 224, "pad", 5),
        (1000, 224, 224, "drop", 4),
        (896, 224, 224, "drop", 4),
        (896, 224, 224, "pad", 4),
        (100, 224, 224, "pad", 1),
        (100, 224, 224, "drop", 0),
        (1000, 224, 112, "pad", 8),
        (1000, 456.03, 456.03, "pad", 3),
        # Stride longer than the footprint: no cell may start at or past the edge.
        (1000, 224, 500, "pad", 2),
        (1000, 224, 600, "pad", 2),
        (16, 8, 100, "pad", 1),
        (2967, 224.449, 3006.01, "pad", 1),
        (1000, 224, 500, "drop", 2),
    ],
)
def test_axis_cell_count(size: float, fp: float, stride: float, mode: str, n: int) -> None:
    assert axis_cell_count(size, fp, stride, mode) == n  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    st.floats(1, 1e5),
    st.floats(0.0625, 8192),
    st.floats(0.0625, 8192),
    st.sampled_from(["pad", "drop"]),
)
def test_axis_cells_start_inside_and_cover(
    size: float, fp: float, stride: float, mode: str
) -> None:
    """Every cell starts inside the slide; "drop" cells end inside it; "pad" cells
    cover it as far as the stride allows (one more would start past the edge)."""
    n = axis_cell_count(size, fp, stride, mode)  # type: ignore[arg-type]
    slack = 1e-6 * size
    assert n >= (1 if mode == "pad" else 0)
    if n:
        assert (n - 1) * stride < size
    if mode == "drop":
        assert n == 0 or (n - 1) * stride + fp <= size + slack
        assert n * stride + fp > size - slack
    else:
        assert (n - 1) * stride + fp >= size - slack or n * stride >= size - slack


def test_level_read_size_never_rounds_downsample() -> None:
    assert level_read_size(224 * 4, 4.0003) == 224
    assert level_read_size(448, 1.0) == 448
    assert level_read_size(224 * 16, 16.0036) == 224


@settings(max_examples=60, deadline=None)
@given(
    st.integers(3, 20),
    st.integers(3, 20),
    st.floats(0.5, 7.0),
    st.floats(0.5, 7.0),
    st.floats(-5, 60),
    st.floats(-5, 60),
    st.floats(1, 40),
    st.floats(1, 40),
    st.integers(0, 10_000),
)
def test_box_fractions_match_brute_force(
    h: int, w: int, sx: float, sy: float, x: float, y: float, bw: float, bh: float, seed: int
) -> None:
    """Exact fractional coverage vs a fine supersampled reference."""
    mask = np.random.default_rng(seed).random((h, w)) > 0.5
    got = box_fractions(integral_image(mask), sx, sy, np.array([x]), np.array([y]), bw, bh)[0]
    n = 400
    xs = x + (np.arange(n) + 0.5) * bw / n
    ys = y + (np.arange(n) + 0.5) * bh / n
    jx = np.floor(xs / sx).astype(int)
    iy = np.floor(ys / sy).astype(int)
    vx = (jx >= 0) & (jx < w)
    vy = (iy >= 0) & (iy < h)
    sub = np.zeros((n, n))
    sub[np.ix_(vy, vx)] = mask[np.ix_(iy[vy], jx[vx])]
    assert got == pytest.approx(sub.mean(), abs=0.02)


def test_integral_image_of_a_bool_mask_equals_the_numeric_one() -> None:
    mask = np.random.default_rng(5).random((37, 53)) > 0.3
    table = integral_image(mask)
    assert table.dtype == np.float64 and table.shape == (38, 54)
    np.testing.assert_array_equal(table, integral_image(mask.astype(np.float32)))
    assert table[-1, -1] == mask.sum() and table[0].sum() == 0 and table[:, 0].sum() == 0


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (37, 53), (1250, 1250)])
def test_tiler_mask_integral_equals_the_numpy_reference(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    mask = rng.random(shape) < 0.4
    np.testing.assert_array_equal(mask_integral(mask), integral_image(mask))
    strided = rng.random((shape[0], 2 * shape[1])) < 0.6
    np.testing.assert_array_equal(mask_integral(strided[:, ::2]), integral_image(strided[:, ::2]))
