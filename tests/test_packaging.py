"""Packaging facts that CI and the Dockerfile rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: it is in the dev extra")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_like_ci() -> None:
    """Same constraints file, pinned torch, non-root user, gRPC health check."""
    text = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt" in text
    assert re.search(r"^USER 10001$", text, re.M)
    assert "HEALTHCHECK" in text and "grpc_health" in text


def test_constraints_pin_torch_pair_while_package_declares_ranges() -> None:
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.14.1" in constraints and "torchvision==0.29.1" in constraints
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    server = " ".join(project["optional-dependencies"]["server"])
    assert "torch>=" in server and "==" not in server
    base = " ".join(project["dependencies"])
    assert "torch" not in base and "openslide" not in base


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme


@pytest.mark.parametrize(
    "args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"]
)
def test_ruff_clean(args: list[str]) -> None:
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
