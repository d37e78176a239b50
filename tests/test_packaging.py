"""Packaging facts that CI and the Dockerfile rely on, and the built distributions:
``python -m build`` makes the sdist and, from it, the wheel; the wheel installs as the
thin client in a fresh venv and talks to a real server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from server_fixtures import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> import package in the wheel (pyproject's package-dir).
PACKAGE_DIRS = {
    "histohelper": "histohelper",
    "server": "histohelper/server",
    "client": "histohelper/client",
    "model_export": "histohelper/model_export",
}


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


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sdist and wheel built by ``python -m build`` (the wheel is built from the
    unpacked sdist, so a file the sdist lacks breaks the wheel too). ~10 s; the isolated
    build environment fetches setuptools from the package index."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (sdist,) = out.glob("histohelper-*.tar.gz")
    (wheel,) = out.glob("histohelper-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def _sources(folder: str, pattern: str) -> set[str]:
    return {
        p.relative_to(ROOT / folder).as_posix()
        for p in (ROOT / folder).rglob(pattern)
        if "__pycache__" not in p.parts
    }


def test_sdist_carries_contract_readme_and_every_module(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
    protos = {f"proto/{p}" for p in _sources("proto", "*.proto")}
    assert protos and protos <= names, protos - names
    required = {"README.md", "pyproject.toml", "constraints.txt", "MANIFEST.in"}
    required |= {p.name for p in ROOT.glob("LICEN[CS]E*")}
    assert required <= names, required - names
    for folder in PACKAGE_DIRS:
        modules = {f"{folder}/{p}" for p in _sources(folder, "*.py")}
        assert modules <= names, modules - names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_wheel_maps_folders_into_one_namespace_with_types(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = whl.read(entry_points).decode()
        (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line
            for line in whl.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    for folder, package in PACKAGE_DIRS.items():
        modules = {f"{package}/{p}" for p in _sources(folder, "*.py")}
        assert modules <= names, modules - names
    for typed in ("histohelper/py.typed", "histohelper/v1/py.typed"):
        assert typed in names
    assert {
        p.replace(".py", ".pyi")
        for p in names
        if p.startswith("histohelper/v1/") and p.endswith("_pb2.py")
    } <= names
    # Nothing outside the one namespace: `import server` would collide once installed.
    assert {n.split("/")[0] for n in names} == {
        "histohelper",
        dists["wheel"].name.split("-py3")[0] + ".dist-info",
    }
    assert re.search(r"^histohelper = histohelper\.cli:main$", scripts, re.M)
    thin = [r for r in requires if "extra ==" not in r]
    assert thin and not any(re.search(r"torch|openslide", r) for r in thin), thin


@pytest.mark.slow
def test_wheel_installs_as_thin_client_and_talks_to_a_server(
    dists: dict[str, Path], analysis_server: ServerProcess, tmp_path: Path
) -> None:
    """The wheel without extras in a fresh venv (dependencies from the package index
    or pip's cache, pinned by constraints.txt): no torch, and its ``histohelper``
    answers ``--help``, ``info`` and ``analyze`` against a real server run from the dev
    environment (the session's ``analysis_server``)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, cli = venv / "bin" / "python", venv / "bin" / "histohelper"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(ROOT / "constraints.txt"),
            str(dists["wheel"]),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    heavy = "('torch', 'torchvision', 'openslide')"
    probe = f"import importlib.util as u; print([m for m in {heavy} if u.find_spec(m)])"
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env)
    assert found.stdout.strip() == "[]", found.stdout + found.stderr

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(cli), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
        )

    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    assert "analyze" in helped.stdout and "info" in helped.stdout

    info = run("info", "--server", analysis_server.target)
    analysed = run(
        "analyze", "real/tiny-16px.svs", "--server", analysis_server.target, "--out", "out"
    )
    assert info.returncode == 0, info.stdout + info.stderr
    assert "untrained" in info.stdout.lower(), info.stdout
    assert analysed.returncode == 0, analysed.stdout + analysed.stderr
    assert (tmp_path / "out" / "summary.json").is_file()
    # Commands of the heavy extras are listed and name their extra when run (exit 2).
    for args, extra in (
        (("serve", "--model", "m.pt"), "server"),
        (("export", "out.pt"), "export"),
        (("tile", "slide.svs", "--out", "o"), "server"),
    ):
        refused = run(*args)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"install the {extra!r} extra" in refused.stderr, refused.stderr
