"""The client's modules import in any order: results are data, exports and rendering
are functions that take a result, so ``result`` needs neither ``exports`` nor ``explain``."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import histohelper.client

CLIENT_DIR = Path(histohelper.client.__file__).parent
MODULES = sorted(
    f"histohelper.client.{p.stem}" for p in CLIENT_DIR.glob("*.py") if p.stem != "__init__"
)
# The modules of the former result <-> exports <-> explain loop, with rendering.
LOOP = [f"histohelper.client.{m}" for m in ("result", "exports", "explain", "render")]


def _import_in_order(order: list[str]) -> None:
    code = f"import importlib\nfor name in {order!r}:\n    importlib.import_module(name)\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, f"importing in the order {order} failed:\n{run.stderr}"


@pytest.mark.parametrize("first", MODULES, ids=[m.rsplit(".", 1)[1] for m in MODULES])
def test_each_client_module_imports_first(first: str) -> None:
    """Each module imported first in a fresh interpreter, then all the others."""
    _import_in_order([first, *(m for m in MODULES if m != first)])


@pytest.mark.parametrize(
    "order",
    list(itertools.permutations(LOOP)),
    ids=["-".join(m.rsplit(".", 1)[1] for m in o) for o in itertools.permutations(LOOP)],
)
def test_result_exports_explain_render_import_in_every_order(order: tuple[str, ...]) -> None:
    _import_in_order(list(order))


def _module_level_imports(tree: ast.Module) -> set[str]:
    """Modules imported outside function bodies (``if TYPE_CHECKING`` blocks included)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_result_imports_neither_exports_nor_explain_at_module_level() -> None:
    tree = ast.parse((CLIENT_DIR / "result.py").read_text())
    imported = _module_level_imports(tree)
    assert "histohelper.client.result" in MODULES
    for forbidden in ("histohelper.client.exports", "histohelper.client.explain"):
        assert forbidden not in imported, f"result.py imports {forbidden} at module level"
    assert "histohelper.client.render" not in imported  # cv2 stays out of `import client`


# The only places result.py reaches for rendering or exports: thin shortcuts kept
# because the README documents them, and the decoding of the mask the result carries.
DOCUMENTED_SHORTCUTS = {
    "histohelper.client.render": {"cam_heatmap", "tissue_mask"},
    "histohelper.client.exports": {"save_geojson"},
    "histohelper.client.explain": set(),
}


def test_result_reaches_exports_and_rendering_only_in_documented_shortcuts() -> None:
    tree = ast.parse((CLIENT_DIR / "result.py").read_text())
    seen: dict[str, set[str]] = {module: set() for module in DOCUMENTED_SHORTCUTS}
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and node.module in seen:
                seen[node.module].add(func.name)
    assert seen == DOCUMENTED_SHORTCUTS
