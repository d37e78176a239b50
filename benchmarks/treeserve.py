"""Run ``histohelper`` from another code tree (e.g. an old commit unpacked with
``git archive``) with this virtualenv's libraries.

The package layout maps top-level folders into one namespace (``server/`` ->
``histohelper.server`` and so on, setuptools ``package-dir``); the editable install's
import hook points at the working tree. This launcher puts a finder for the other
tree first on ``sys.meta_path``, so ``histohelper`` and its mapped subpackages come
from ``ROOT`` and nothing from the working tree is imported.

Usage: ``python benchmarks/treeserve.py ROOT serve --model ... [histohelper args]``;
the benchmarks start servers through :func:`start_server`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class TreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``histohelper`` and its package-dir subpackages under one code tree."""

    def __init__(self, root: Path) -> None:
        self.mapping = {
            "histohelper": root / "histohelper",
            "histohelper.server": root / "server",
            "histohelper.client": root / "client",
            "histohelper.model_export": root / "model_export",
        }

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        folder = self.mapping.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install(root: Path) -> None:
    """Import ``histohelper`` from ``root`` from now on in this process."""
    if any(name == "histohelper" or name.startswith("histohelper.") for name in sys.modules):
        raise RuntimeError("histohelper is already imported from another tree")
    sys.meta_path.insert(0, TreeFinder(root.resolve()))


def histohelper_command(tree: Path | None) -> list[str]:
    """argv prefix running ``histohelper`` from ``tree`` (None: the working tree)."""
    if tree is None or tree.resolve() == REPO:
        return [sys.executable, "-m", "histohelper.cli"]
    return [sys.executable, str(HERE / "treeserve.py"), str(tree.resolve())]


@dataclass
class ServerProcess:
    """A ``histohelper serve`` child process."""

    proc: subprocess.Popen[bytes]
    target: str
    log_path: Path

    def stop(self, timeout_s: float = 20.0) -> str:
        """SIGTERM, then SIGKILL after ``timeout_s``; says which ended it."""
        if self.proc.poll() is not None:
            return f"already exited ({self.proc.returncode})"
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
            return f"SIGTERM, exited in {time.monotonic() - t0:.1f} s"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"still running {timeout_s:.0f} s after SIGTERM: killed"


def serve_supports(tree: Path | None, flag: str) -> bool:
    """Whether ``histohelper serve`` of ``tree`` has ``flag``."""
    out = subprocess.run(
        [*histohelper_command(tree), "serve", "--help"], capture_output=True, text=True, check=True
    )
    return flag in out.stdout


def start_server(
    tree: Path | None, model: Path, slide_root: Path, workdir: Path, *extra: str
) -> ServerProcess:
    """Start ``histohelper serve`` of ``tree`` on a free loopback port; wait until ready.

    Raises:
        RuntimeError: the server exited or was not ready within 300 s (its log attached).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / "server.log"
    cmd = [
        *histohelper_command(tree), "serve",
        "--model", str(model), "--slide-root", str(slide_root),
        "--port", "0", "--ready-file", str(ready), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    port = None
    while port is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()[-4000:]}")
        try:
            port = json.loads(ready.read_text())["port"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    target = f"127.0.0.1:{port}"
    return ServerProcess(proc, target, log_path)


def main() -> int:
    root = Path(sys.argv[1])
    install(root)
    sys.argv = ["histohelper", *sys.argv[2:]]
    from histohelper.cli import main as cli_main

    return int(cli_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
