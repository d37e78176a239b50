"""Library messages passed on to callers never carry a slide's path or name."""

from __future__ import annotations

import pytest

from histohelper.server.tiling.slide import _scrub

SLIDE = "/data/cohort1/TCGA-AB-1234.mrxs"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            f"Can't open {SLIDE}/Data0001.dat: No such file",
            "Can't open <path>: No such file",
        ),
        (
            "Short read of file /data/cohort1/Smith John 1961.jpg: 1 < 2",
            "Short read of file <path>: 1 < 2",
        ),
        ("Missing image file C:\\slides\\TCGA-AB-9999.jpg", "Missing image file <path>"),
        ("Bad header in TCGA-AB-1234.mrxs", "Bad header in <slide>"),
        ("Slide TCGA-AB-1234 has no levels", "Slide <slide> has no levels"),
        ("I/O error reading 8/16-bit data", "I/O error reading 8/16-bit data"),
    ],
)
def test_scrub_removes_paths_and_names(message: str, expected: str) -> None:
    assert _scrub(message, SLIDE) == expected
