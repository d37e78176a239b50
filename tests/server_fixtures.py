"""Server fixtures (a pytest plugin loaded by conftest.py).

``analysis_server``: a real ``histohelper serve`` process on 127.0.0.1 (port 0) with
the shared slides as slide root, serving the session's exported artifact in fp32.
``start_inprocess_server``: a factory for real in-process servers with a custom
configuration (limits, slide roots), stopped at the end of the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

READY_TIMEOUT_S = 120.0


@dataclass
class ServerProcess:
    """A server running in a child process."""

    process: subprocess.Popen[bytes]
    target: str
    port: int
    slide_root: Path
    model: Path
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def spawn_server(model: Path, slide_root: Path, workdir: Path, *extra: str) -> ServerProcess:
    """Start ``histohelper serve`` on a free loopback port and wait until it is ready."""
    ready = workdir / "ready.json"
    log_path = workdir / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "histohelper.cli",
        "serve",
        "--model",
        str(model),
        "--slide-root",
        str(slide_root),
        "--port",
        "0",
        "--ready-file",
        str(ready),
        "--precision",
        "fp32",
        *extra,
    ]
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server not ready:\n{log_path.read_text()}")
        time.sleep(0.05)
    port = json.loads(ready.read_text())["port"]
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    return ServerProcess(proc, target, port, slide_root, model, log_path)


def stop_server(server: ServerProcess, timeout: float = 30.0) -> int:
    """SIGTERM the server and wait for it; returns its exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def analysis_server(
    model_artifact: Path, slides_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A real server process; slide paths are relative to ``../shared/slides``
    (e.g. ``"real/CMU-1-Small-Region.svs"``)."""
    server = spawn_server(model_artifact, slides_dir, tmp_path_factory.mktemp("server"))
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def served_runtime(model_artifact: Path):
    """The session's artifact loaded in-process in fp32 (shared by in-process servers)."""
    from histohelper.server.runtime import load_runtime

    return load_runtime(model_artifact, device="cpu", precision="fp32")


def inprocess_server(
    model_artifact: Path, served_runtime, slide_root: Path, **overrides: object
) -> Any:
    """A real in-process server on 127.0.0.1:0 (fp32, grace 2 s) with ``overrides`` of
    :class:`ServerConfig`; the caller stops it (``stop(grace=0, drain=0)``)."""
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    values: dict[str, object] = {
        "model_path": model_artifact,
        "slide_root": slide_root,
        "port": 0,
        "precision": "fp32",
        "grace_s": 2.0,
    }
    values.update(overrides)
    return start_server(ServerConfig(**values), runtime=served_runtime)  # type: ignore[arg-type]


@pytest.fixture
def start_inprocess_server(
    model_artifact: Path, served_runtime, slides_dir: Path
) -> Iterator[Callable[..., object]]:
    """Factory: ``start(**config_overrides) -> RunningServer`` on 127.0.0.1:0."""
    started = []

    def start(**overrides: object):
        root = Path(overrides.pop("slide_root", slides_dir))  # type: ignore[arg-type]
        running = inprocess_server(model_artifact, served_runtime, root, **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(grace=0, drain=0)


os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
