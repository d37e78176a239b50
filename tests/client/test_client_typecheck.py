"""mypy on the installed layout (``scripts/typecheck.py``, what ``make lint`` runs):
the client and the core modules have no findings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# histohelper/errors.py joins them once its error_table() annotation is fixed.
CHECKED = ("client/", "histohelper/__init__.py", "histohelper/cli.py",
           "histohelper/geometry.py", "histohelper/patch_csv.py")  # fmt: skip


def test_client_and_core_are_mypy_clean() -> None:
    argv = [sys.executable, str(REPO / "scripts" / "typecheck.py"), "-p", "histohelper.client"]
    for name in ("histohelper", "histohelper.cli", "histohelper.geometry", "histohelper.patch_csv"):
        argv += ["-m", name]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert "source files" in run.stdout, run.stdout + run.stderr  # mypy ran
    findings = [line for line in run.stdout.splitlines() if line.startswith(CHECKED)]
    assert not findings, "\n".join(findings)
