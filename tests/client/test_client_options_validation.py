"""AnalysisOptions refuses what the wire cannot carry, when it is built."""

from __future__ import annotations

import pytest

from histohelper.client.options import AnalysisOptions
from histohelper.errors import InvalidOptionsError


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patch_size_px": 2.5},
        {"stride_px": True},
        {"target_level": 1.5},
        {"target_level": -1},
        {"patch_size_px": 10**10},
        {"batch_size": 0},
        {"target_mpp": "0.5"},
        {"target_mpp": float("nan")},
        {"mpp_override": -1.0},
        {"min_tissue_fraction": float("nan")},
        {"target_mpp": 0.5, "target_level": 0},
    ],
    ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_bad_options_raise_invalid_options(kwargs: dict) -> None:
    with pytest.raises(InvalidOptionsError):
        AnalysisOptions(**kwargs)


def test_good_options_reach_the_wire() -> None:
    msg = AnalysisOptions(target_level=0, patch_size_px=256, stride_px=128).to_proto()
    assert msg.target_resolution.level == 0
    assert (msg.patch_size_px, msg.stride_px) == (256, 128)
