"""Slide references resolve only inside the slide root, without revealing the outside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from histohelper.errors import SlideNotFoundError, SlidePathDeniedError, SlidePathError
from histohelper.server.sandbox import resolve_slide_path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "cohort").mkdir(parents=True)
    (root / "cohort" / "a.svs").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.svs").write_bytes(b"y")
    os.symlink(outside / "secret.svs", root / "escape.svs")
    os.symlink(outside, root / "escape_dir")
    os.symlink(root / "cohort" / "a.svs", root / "inside_link.svs")
    os.symlink(root / "loop_b", root / "loop")
    os.symlink(root / "loop", root / "loop_b")
    return root


def test_relative_path_resolves(root: Path) -> None:
    assert resolve_slide_path(root, "cohort/a.svs") == (root / "cohort" / "a.svs").resolve()


def test_symlink_inside_root_is_allowed(root: Path) -> None:
    assert resolve_slide_path(root, "inside_link.svs").name == "a.svs"


@pytest.mark.parametrize(
    "reference",
    [
        "",
        "/etc/passwd",
        "../outside/secret.svs",
        "cohort/../../outside/secret.svs",
        "a\x00b",
        "C:/x.svs",
        "\\\\server\\share\\x.svs",
        "cohort/..\\..\\x",
        "a" * 256,
        "\u00e9" * 130,
        "/".join(["b" * 203] * 20),  # 4,079 chars: with the root, over PATH_MAX
        "loop/x.svs",
    ],
    ids=[
        "empty",
        "absolute",
        "dotdot",
        "nested-dotdot",
        "nul",
        "drive",
        "unc",
        "backslash-dotdot",
        "component-256-bytes",
        "component-260-utf8-bytes",
        "path-over-path-max",
        "symlink-loop",
    ],
)
def test_malformed_references_are_invalid(root: Path, reference: str) -> None:
    with pytest.raises(SlidePathError) as info:
        resolve_slide_path(root, reference)
    assert str(root) not in str(info.value)
    assert not reference or reference[:20] not in str(info.value)


@pytest.mark.parametrize(
    "reference", ["escape.svs", "escape_dir/secret.svs", "escape_dir/none.svs"]
)
def test_symlinks_out_of_root_are_denied_whether_or_not_target_exists(
    root: Path, reference: str
) -> None:
    with pytest.raises(SlidePathDeniedError) as info:
        resolve_slide_path(root, reference)
    assert "secret" not in str(info.value) and str(root) not in str(info.value)


@pytest.mark.parametrize("reference", ["missing.svs", "cohort"], ids=["missing", "directory"])
def test_missing_or_directory_is_not_found(root: Path, reference: str) -> None:
    with pytest.raises(SlideNotFoundError):
        resolve_slide_path(root, reference)


def test_empty_and_overlong_references_say_which(root: Path) -> None:
    from histohelper.server.sandbox import MAX_REFERENCE_CHARS

    with pytest.raises(SlidePathError, match="non-empty"):
        resolve_slide_path(root, "")
    with pytest.raises(SlidePathError, match=f"longer than {MAX_REFERENCE_CHARS} characters"):
        resolve_slide_path(root, "a/" * MAX_REFERENCE_CHARS)
