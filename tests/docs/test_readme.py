"""README examples are tests: every Python and shell block of README.md runs here
against a real server, or carries ``<!-- illustrative: REASON -->`` right before its
opening fence (see ``readme_blocks``).

Each block runs as written in a fresh working directory holding the files the README
names (``artifacts/model.pt``: the session's exported model; ``slide.svs`` and
``local/slide7.svs``: a synthetic slide; ``holdout/<class>/*.png``; ``cohort.csv``),
with ``histohelper`` on PATH from this venv. The server the examples call,
``127.0.0.1:50051``, is a real ``histohelper serve`` on a free port whose slide root,
written ``/data/slides``, holds ``cohort1/slide7.svs`` and ``cohort1/slide8.svs``;
those two texts (and ``--port 50051``) are the only substitutions. A block that only
starts a server (``histohelper serve ...``) is run until the server answers, then
stopped with SIGTERM.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import psutil
import pytest
import readme_blocks as rb
import synthetic_slides as ss
from server_fixtures import ServerProcess, spawn_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCKS, PROBLEMS = rb.extract(README.read_text())
RUN = [b for b in BLOCKS if b.run_by_test]
BLOCK_TIMEOUT_S = 600
SLOW = re.compile(r"^(histohelper export (?!--inspect)|make )")
#: Never run: it would change the venv the tests run in.
PIP_INSTALL = re.compile(r"\bpip3?\b.*\binstall\b|\bmake venv\b")
CLASSES = ("benign", "malignant")  # the session model's patch classes


def _is_slow(block: rb.Block) -> bool:
    return any(SLOW.match(c) for c in _commands(block))


def _commands(block: rb.Block) -> list[str]:
    if block.lang in rb.PYTHON:
        return []
    code = rb.console_commands(block.code) if block.lang in rb.CONSOLE else block.code
    return rb.shell_commands(code)


def _starts_a_server(block: rb.Block) -> bool:
    commands = _commands(block)
    return len(commands) == 1 and commands[0].startswith("histohelper serve ")


def test_readme_blocks_are_labelled_and_markers_have_reasons() -> None:
    assert BLOCKS, "no fenced blocks found in README.md"
    assert not PROBLEMS, "\n".join(f"README.md:{p.line}: {p.message}" for p in PROBLEMS)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files every example finds: ``slides/`` (the server's slide root) and
    ``files/`` (linked into each block's working directory)."""
    root = tmp_path_factory.mktemp("readme-world")
    (root / "slides" / "cohort1").mkdir(parents=True)
    for i, name in enumerate(("slide7", "slide8")):
        image = ss.slide_with_tissue(1024, 1536, [(200, 150, 1100, 700)], seed=i)
        ss.write_slide(root / "slides" / "cohort1" / f"{name}.svs", image, [(768, 512)])
    slide7 = root / "slides" / "cohort1" / "slide7.svs"
    files = root / "files"
    (files / "local").mkdir(parents=True)
    for target in (files / "slide.svs", files / "local" / "slide7.svs"):
        target.write_bytes(slide7.read_bytes())
    for c, name in enumerate(CLASSES):
        (files / "holdout" / name).mkdir(parents=True)
        for k in range(4):
            patch = ss.tissue_rgb(224, 224, seed=10 * c + k)
            cv2.imwrite(str(files / "holdout" / name / f"{k}.png"), patch[..., ::-1])
    with (files / "cohort.csv").open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["slide", "label", "patient"])
        rows.writerow(["cohort1/slide7.svs", "benign", "p7"])
        rows.writerow(["cohort1/slide8.svs", "malignant", "p8"])
    return root


@pytest.fixture(scope="module")
def server(
    world: Path, model_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    running = spawn_server(model_artifact, world / "slides", tmp_path_factory.mktemp("server"))
    yield running
    stop_server(running)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _workdir(tmp_path: Path, world: Path, model_artifact: Path) -> Path:
    for entry in (world / "files").iterdir():
        (tmp_path / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "model.pt").symlink_to(model_artifact)
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOHELPER_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _serve_until_ready(script: Path, port: int, cwd: Path) -> str:
    """Run a server-starting block, wait until its port answers, SIGTERM it.
    Returns its output; fails when it exits first or never answers."""
    log = cwd / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-eo", "pipefail", str(script)],
            cwd=cwd,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            ready = grpc.channel_ready_future(channel)
            while not ready.done():
                assert proc.poll() is None, f"server exited early:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"server never answered:\n{log.read_text()}"
                time.sleep(0.2)
    finally:
        # SIGTERM to the server, not to bash (bash would die of it): bash then exits
        # with the server's status.
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0, f"exit {code} after SIGTERM:\n{log.read_text()}"
    return log.read_text()


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if _is_slow(b) else []) for b in RUN],
)
def test_readme_block_runs(
    block: rb.Block, world: Path, server: ServerProcess, model_artifact: Path, tmp_path: Path
) -> None:
    installs = [c for c in _commands(block) if PIP_INSTALL.search(c)]
    assert not installs, f"README.md:{block.line} installs packages: mark it illustrative"
    cwd = _workdir(tmp_path, world, model_artifact)
    port = _free_port()
    values = {
        "server": server.target,
        "port": f"--port {port}",
        "slide_root": str(world / "slides"),
    }
    code = rb.substitute(block.code, values)
    if block.lang in rb.PYTHON:
        (cwd / "example.py").write_text(code)
        cmd = [sys.executable, "example.py"]
    else:
        script = rb.console_commands(code) if block.lang in rb.CONSOLE else code
        (cwd / "example.sh").write_text(script)
        if _starts_a_server(block):
            _serve_until_ready(cwd / "example.sh", port, cwd)
            return
        cmd = ["bash", "-eo", "pipefail", "example.sh"]
    done = subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    assert done.returncode == 0, (
        f"README.md:{block.line} exit {done.returncode}\n{code}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}"
    )
