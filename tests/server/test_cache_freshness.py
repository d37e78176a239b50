"""The result cache stays fresh and on (tester B findings 3 and 11), over a real
loopback server.

Finding 3: a slide rewritten in place with the same size and its mtime put back
(``rsync --inplace -t``; file systems with coarse mtimes) must not replay the old
file's result: the file identity includes the inode's change time.
Finding 11: a ``--cache-dir`` deleted under a running server is recreated (same mode)
at the next analysis, with one WARNING, and results are stored again.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import synthetic_slides as syn

from histohelper.client import SlideClient
from histohelper.server.cache import ENTRY_SUFFIX


def _write(path: Path, seed: int, boxes: list[tuple[int, int, int, int]]) -> Path:
    img = syn.slide_with_tissue(1024, 1280, boxes, seed=seed)
    return syn.write_slide(path, img, [(320, 256)], compression=None)  # size set by geometry


@pytest.fixture(scope="module")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.tiff and b.tiff: same size in bytes, different tissue."""
    root = tmp_path_factory.mktemp("fresh-slides")
    _write(root / "a.tiff", 1, [(100, 100, 700, 600)])
    _write(root / "b.tiff", 5, [(500, 300, 1100, 900)])
    assert (root / "a.tiff").stat().st_size == (root / "b.tiff").stat().st_size
    return root


def test_an_in_place_rewrite_with_the_same_size_and_mtime_is_not_replayed(
    start_inprocess_server, slide_root: Path, tmp_path: Path
) -> None:
    server = start_inprocess_server(slide_root=slide_root, cache_dir=tmp_path / "cache")
    moving = slide_root / "moving.tiff"
    shutil.copyfile(slide_root / "a.tiff", moving)
    with SlideClient(server.target) as client:
        before = client.analyze("moving.tiff")
        st = moving.stat()
        with moving.open("r+b") as fh:  # in place: same inode, same size
            fh.write((slide_root / "b.tiff").read_bytes())
        os.utime(moving, ns=(st.st_atime_ns, st.st_mtime_ns))  # rsync -t puts it back
        after_st = moving.stat()
        assert (after_st.st_ino, after_st.st_size, after_st.st_mtime_ns) == (
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
        )
        after = client.analyze("moving.tiff")
        b = client.analyze("b.tiff")
    assert (before.cached, after.cached) == (False, False)
    assert before.patches.x_l0.tobytes() != after.patches.x_l0.tobytes()
    assert b.cached  # the rewritten file's content is b's: its entry was stored
    assert after.patches.x_l0.tobytes() == b.patches.x_l0.tobytes()
    assert after.patches.probabilities.tobytes() == b.patches.probabilities.tobytes()


def test_a_deleted_cache_dir_is_recreated_with_its_mode_and_one_warning(
    start_inprocess_server, slide_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o750)
    os.chmod(cache_dir, 0o750)
    server = start_inprocess_server(slide_root=slide_root, cache_dir=cache_dir)
    with SlideClient(server.target) as client:
        assert not client.analyze("a.tiff").cached
        shutil.rmtree(cache_dir)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="histohelper"):
            results = [client.analyze(name) for name in ("a.tiff", "b.tiff", "a.tiff")]
    assert [r.cached for r in results] == [False, False, True]  # stored again
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o750
    assert len(list(cache_dir.glob(f"entries/*/*{ENTRY_SUFFIX}"))) == 2
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "recreated" in message and str(cache_dir) not in message
