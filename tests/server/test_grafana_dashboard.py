"""The Grafana dashboard (deploy/grafana/histohelper.json) names only exported metrics.

Metric names are parsed from each PromQL expression of the dashboard and compared with
the sample names in the exposition of a live server (after one call, so that every
labelled family has a series). test_metrics_prometheus.py also has a real Prometheus
parse and evaluate every expression.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from metrics_support import analyze_error, family_names, free_port, make_slide_root, scrape_text

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "histohelper.json"
#: PromQL words that are neither functions nor metric names.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
     "unless", "offset"}
)  # fmt: skip


def dashboard_expressions(path: Path) -> list[str]:
    """The PromQL ``expr`` of every target of every panel (rows' panels included)."""
    board: dict[str, Any] = json.loads(path.read_text())
    panels = list(board["panels"])
    for panel in list(panels):
        panels.extend(panel.get("panels", []))
    return [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords or labels)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery windows
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"(?<![A-Za-z0-9_:])[0-9][0-9.eE+-]*[a-z]*", " ", s)  # numbers, durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group() in _KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def test_metric_names_are_parsed_from_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(a_bucket{x=~"$i",y!="b c"}[5m])))'
        " / on (stage) group_left sum without (pool) (b_total offset 5m) > bool 0"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, model_artifact: Path, served_runtime):
    """Sample names in the exposition of a live server after one (failed) analysis."""
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    root = make_slide_root(tmp_path_factory.mktemp("dashboard-slides"))
    config = ServerConfig(
        model_path=model_artifact, slide_root=root, port=0, metrics_port=free_port()
    )
    running = start_server(config, runtime=served_runtime)
    try:
        analyze_error(running.target)
        return family_names(scrape_text(running.metrics_port))
    finally:
        running.stop(grace=0, drain=0)


def test_dashboard_names_only_metrics_the_server_exports(exported: set[str]) -> None:
    expressions = dashboard_expressions(DASHBOARD)
    assert expressions
    named = set().union(*(metric_names(e) for e in expressions))
    board = json.loads(DASHBOARD.read_text())
    for variable in board["templating"]["list"]:  # label_values(metric, label) queries
        named |= set(re.findall(r"histohelper_\w+", json.dumps(variable)))
    assert named <= exported, f"not exported: {sorted(named - exported)}"


def test_dashboard_shows_every_histohelper_metric(exported: set[str]) -> None:
    named = set().union(*(metric_names(e) for e in dashboard_expressions(DASHBOARD)))
    families = {
        re.sub(r"_(total|bucket|count|sum|created)$", "", n)
        for n in exported
        if n.startswith("histohelper_")
    }
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in named}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"
