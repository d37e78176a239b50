"""The Dockerfile's header examples, run as the image would run them (no Docker engine in
CI): the image's ENV plus each example's ``-e`` flags, its ``-v`` mounts mapped to test
folders, ``histohelper serve`` as the ENTRYPOINT, and the HEALTHCHECK command itself.
Also: the build context that .dockerignore leaves holds what the Dockerfile copies."""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histohelper.client import SlideClient
from histohelper.server.certs import make_certificates

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _image_env() -> dict[str, str]:
    """The runtime stage's ``ENV`` (KEY=VALUE pairs; PATH left to the test's)."""
    block = re.search(r"^ENV (.*?)(?=^\S)", DOCKERFILE.split("AS runtime", 1)[1], re.M | re.S)
    assert block is not None
    pairs = shlex.split(block.group(1).replace("\\\n", " "))
    env = dict(p.split("=", 1) for p in pairs)
    env.pop("PATH")
    return env


def _header_runs() -> list[list[str]]:
    """The ``docker run`` commands of the header comment, as argv lists."""
    header = DOCKERFILE.split("\nARG ", 1)[0]
    lines = [ln[1:].strip() for ln in header.splitlines()]
    runs, current = [], ""
    for ln in lines:
        if ln.startswith("docker run") or current:
            current += " " + ln.rstrip("\\")
            if not ln.endswith("\\"):
                runs.append(shlex.split(current))
                current = ""
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_run(argv: list[str], mounts: dict[str, Path], workdir: Path) -> dict[str, str]:
    """The server environment of one ``docker run`` line (container paths mapped)."""
    env = _image_env()
    for flag, value in itertools.pairwise(argv):
        if flag == "-e":
            key, val = value.split("=", 1)
            env[key] = val
        if flag == "-v":
            assert value.split(":")[1] in mounts, value  # every mount is one we provide
    for key, val in env.items():
        for container, host in mounts.items():
            if val.startswith(container + "/") or val == container:
                env[key] = str(host) + val[len(container) :]
    # The container's fixed ports become free ones here; the health check follows.
    env.update(
        HISTOHELPER_PORT="0",
        HISTOHELPER_HEALTH_PORT=str(_free_port()),
        HISTOHELPER_READY_FILE=str(workdir / "ready.json"),
        HISTOHELPER_PRECISION="fp32",
    )
    return env


def _serve(env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "histohelper.cli", "serve"],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ready = workdir / "ready.json"
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{(workdir / 'server.log').read_text()}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["port"]


def _healthcheck(health_port: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK CMD, pointed at this health port."""
    cmd = json.loads(re.search(r"CMD (\[.*\])", DOCKERFILE).group(1))  # type: ignore[union-attr]
    cmd = [c.replace("127.0.0.1:50052", f"127.0.0.1:{health_port}") for c in cmd]
    assert cmd[0] == "python"
    return subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, timeout=60)


@pytest.fixture
def mounts(model_artifact: Path, slides_dir: Path, tmp_path: Path) -> dict[str, Path]:
    models = tmp_path / "artifacts"
    models.mkdir()
    (models / "model.pt").symlink_to(model_artifact)
    make_certificates(tmp_path / "tls")
    return {"/models": models, "/slides": slides_dir, "/tls": tmp_path / "tls"}


@pytest.mark.slow  # two server processes load the model: ~25 s idle, ~65 s on a busy CPU
def test_header_examples_start_a_server_that_answers(
    mounts: dict[str, Path], tmp_path: Path
) -> None:
    runs = _header_runs()
    assert len(runs) == 2, runs
    tls_run, plain_run = runs
    assert "HISTOHELPER_TLS_CERT=/tls/server.pem" in tls_run
    assert "HISTOHELPER_ALLOW_INSECURE=1" in plain_run
    for argv, tls in ((tls_run, True), (plain_run, False)):
        workdir = tmp_path / ("tls-run" if tls else "plain-run")
        workdir.mkdir()
        env = _as_run(argv, mounts, workdir)
        assert env["HISTOHELPER_HOST"] == "0.0.0.0"  # as in the image
        proc, port = _serve(env, workdir)
        try:
            health = _healthcheck(env["HISTOHELPER_HEALTH_PORT"])
            assert health.returncode == 0, health.stderr
            ca = (mounts["/tls"] / "ca.pem").read_bytes() if tls else None
            with SlideClient(f"localhost:{port}", root_certificates=ca, timeout=30) as client:
                assert client.get_model_info().model.patch_classes
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    # Neither TLS nor the opt-in: the image's environment alone refuses to start.
    workdir = tmp_path / "bare"
    workdir.mkdir()
    env = _as_run(["docker", "run", "histohelper"], mounts, workdir)
    res = subprocess.run(
        [sys.executable, "-m", "histohelper.cli", "serve"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "refusing to serve plaintext on 0.0.0.0" in res.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; ``!`` re-includes; a
    pattern ending in ``/`` or naming a folder covers everything below it."""
    ignored = False
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatch(p, pat) for p in prefixes) or (
            pat.startswith("**/") and any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        )
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    copied = re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(.+) \S+$", DOCKERFILE, re.M)
    sources = [s for line in copied for s in line.split()]
    assert "artifacts/model.pt" in sources and "proto" in sources
    for src in sources:
        assert not _ignored(src, patterns), src
        assert not _ignored(f"{src}/x.py", patterns) or src.endswith(".pt"), src
    for path in (".venv/lib/torch/x.so", ".git/objects/ab", "tls/server.key", "demo-output/a.png",
                 "artifacts/other.pt", "tests/data/x.svs", "client/__pycache__/a.pyc"):  # fmt: skip
        assert _ignored(path, patterns), path
