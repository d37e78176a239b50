"""The console script on an install that lacks an extra: commands listed, extra named."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Run histohelper with "pydantic" and "torch" unimportable, as on the thin install.
BLOCK = (
    "import sys, runpy\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('pydantic', 'torch', 'openslide'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Block())\n"
    "sys.argv = ['histohelper', *sys.argv[1:]]\n"
    "from histohelper.cli import main\n"
    "raise SystemExit(main())\n"
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("serve", "--model", "m.pt", "--help"), "server"),
        (("export", "out.pt"), "export"),
        (("tile", "slide.svs", "--out", "o"), "server"),
    ],
    ids=["serve", "export", "tile"],
)
def test_a_command_of_a_missing_extra_names_it(args: tuple[str, ...], extra: str) -> None:
    done = run(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"install the {extra!r} extra" in done.stderr
    assert "git+<repository URL>" in done.stderr


def test_help_lists_the_commands_of_missing_extras() -> None:
    done = run("--help")
    assert done.returncode == 0, done.stderr
    for command in ("serve", "export", "tile", "analyze", "info"):
        assert command in done.stdout
    assert "(needs the 'server' extra)" in done.stdout
