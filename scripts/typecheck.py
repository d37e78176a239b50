"""Run mypy on the installed package layout: ``histohelper`` and its mapped subpackages.

The folders ``server/``, ``client/`` and ``model_export/`` are the subpackages
``histohelper.server``, ``histohelper.client`` and ``histohelper.model_export``
(``[tool.setuptools.package-dir]`` in pyproject.toml). The editable install maps them
with an import hook, which mypy does not run: ``mypy -p histohelper`` from the
repository finds ``histohelper/`` alone and checks the four core modules, none of the
subpackages. So this script lays out the package as a wheel installs it, as a tree of
symbolic links under ``build/typecheck/`` (read from the same table, so it cannot
drift), runs ``mypy -p histohelper`` there with the repository's ``[tool.mypy]``
configuration, and prints the findings with repository paths (``client/result.py``,
not ``histohelper/client/result.py``).

Usage: ``.venv/bin/python scripts/typecheck.py [-p histohelper.client ...] [mypy args]``;
without ``-p``/``-m`` it checks ``-p histohelper``. Exit status: mypy's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "histohelper"


def package_dirs(pyproject: Path = REPO / "pyproject.toml") -> dict[str, Path]:
    """``{package: folder}`` from ``[tool.setuptools.package-dir]``, folders absolute."""
    table = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    return {name: (REPO / folder).resolve() for name, folder in table.items()}


def build_layout(root: Path, dirs: dict[str, Path]) -> Path:
    """Make ``root/histohelper`` the installed package as symbolic links; return ``root``.

    The top package's folder contributes its entries (files, ``v1/``); each mapped
    subpackage becomes one link to its folder. Stale links are replaced.
    """
    top = root / PACKAGE
    top.mkdir(parents=True, exist_ok=True)
    for entry in top.iterdir():
        if entry.is_symlink():
            entry.unlink()
    sub = {name.split(".", 1)[1]: folder for name, folder in dirs.items() if "." in name}
    for entry in dirs[PACKAGE].iterdir():
        if entry.name not in sub and entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for name, folder in sub.items():
        if "." in name:
            raise SystemExit(f"nested package-dir mapping not supported: {PACKAGE}.{name}")
        (top / name).symlink_to(folder, target_is_directory=True)
    return root


def repo_path(line: str, dirs: dict[str, Path]) -> str:
    """A mypy output line with its layout path turned into a repository path."""
    for name, folder in sorted(dirs.items(), key=lambda kv: -len(kv[0])):
        prefix = name.replace(".", "/") + "/"
        if line.startswith(prefix):
            rel = os.path.relpath(folder, REPO)
            return f"{rel}/{line[len(prefix) :]}"
    return line


def main(argv: list[str]) -> int:
    dirs = package_dirs()
    root = build_layout(REPO / "build" / "typecheck", dirs)
    targets = (
        []
        if any(a in ("-p", "-m") or a.startswith("--package") for a in argv)
        else [
            "-p",
            PACKAGE,
        ]
    )
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file",
        str(REPO / "pyproject.toml"),
        "--cache-dir",
        str(REPO / ".mypy_cache"),
        *targets,
        *argv,
    ]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    for line in run.stdout.splitlines():
        print(repo_path(line, dirs))
    sys.stderr.write(run.stderr)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
