"""Default upload areas of dead servers are purged at start, live ones kept
(issue 16, finding 4: after ``kill -9`` a full slide copy stayed in the temp folder)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from histohelper.server.uploads import LOCK_NAME, UploadStore

# A store in a child process: it writes a stand-in slide copy into its area, prints the
# area's path and waits; closing its stdin closes the store.
_CHILD = textwrap.dedent(
    """
    import sys
    from histohelper.server.uploads import UploadStore
    store = UploadStore(None, max_bytes=1 << 20, quota_bytes=1 << 20, ttl_s=60,
                        sweep_interval_s=0)
    (store.root / "copy.svs.part").write_bytes(b"x" * 4096)
    print(store.root, flush=True)
    sys.stdin.read()
    store.close()
    """
)


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temporary folder for this test's stores and children."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _child_store(children: list[subprocess.Popen[str]]) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    children.append(proc)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def _new_store() -> UploadStore:
    return UploadStore(None, max_bytes=1 << 20, quota_bytes=1 << 20, ttl_s=60, sweep_interval_s=0)


def test_a_killed_servers_area_is_purged_a_live_ones_kept(
    temp_root: Path, children: list[subprocess.Popen[str]]
) -> None:
    dead, dead_root = _child_store(children)
    live, live_root = _child_store(children)
    assert dead_root.parent == temp_root and (dead_root / "copy.svs.part").is_file()
    assert (dead_root / LOCK_NAME).read_text().strip() == str(dead.pid)
    assert dead_root.name.startswith(f"histohelper-uploads-{os.getuid()}-")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert dead_root.is_dir()  # nothing of the dead server removed it

    store = _new_store()
    try:
        assert not dead_root.exists()
        assert (live_root / "copy.svs.part").is_file()  # the live server's area is kept
        assert store.root.is_dir() and store.root != live_root
    finally:
        store.close()
    assert not store.root.exists()

    assert live.stdin is not None
    live.stdin.close()
    assert live.wait() == 0
    assert not live_root.exists()


def test_areas_not_judged_are_left_alone(temp_root: Path) -> None:
    """Another user's area, one without a lock file (being set up, or from an older
    version) and a non-default folder are never touched."""
    other_user = temp_root / f"histohelper-uploads-{os.getuid() + 1}-abc"
    unlocked = temp_root / f"histohelper-uploads-{os.getuid()}-nolock"
    legacy = temp_root / "histohelper-uploads-x1y2z3"
    for folder in (other_user, unlocked, legacy):
        folder.mkdir()
        (folder / "copy.svs.part").write_bytes(b"x")
    (other_user / LOCK_NAME).write_text("1\n")
    store = _new_store()
    try:
        for folder in (other_user, unlocked, legacy):
            assert (folder / "copy.svs.part").is_file()
    finally:
        store.close()


def test_a_live_store_in_this_process_is_kept(temp_root: Path) -> None:
    first = _new_store()
    second = _new_store()
    try:
        assert first.root.is_dir() and second.root.is_dir()
    finally:
        second.close()
        first.close()
