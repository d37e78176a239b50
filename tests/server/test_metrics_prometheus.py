"""The server's metrics through a real Prometheus server (Debian package ``prometheus``).

The test starts ``prometheus`` as a plain process on a free loopback port with a
generated configuration (scrape interval 1 s, the HistoHelper server's metrics port as
its one target, a temporary TSDB), runs analyses against a real in-process HistoHelper
server, and polls PromQL queries over Prometheus's HTTP API (``/api/v1/query``) until
they return what was done, within a bounded time. It also runs every expression of the
Grafana dashboard (deploy/grafana/histohelper.json) through Prometheus's parser.
Skipped only where the ``prometheus`` binary is absent (``.ci/run`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from metrics_support import analyze, analyze_error, free_port, make_slide_root
from test_grafana_dashboard import DASHBOARD, dashboard_expressions

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
N_ANALYSES = 3
#: Longest wait for Prometheus to start, or to scrape what was done (seconds).
WAIT_S = 60.0
#: What Grafana puts in place of the dashboard's variables.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".+"}

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).is_file(),
    reason="the prometheus binary is absent (Debian package 'prometheus'; .ci/run installs it)",
)


class Prometheus:
    """A Prometheus server process on 127.0.0.1 (see :func:`prometheus_for`)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as reply:
            body = reply.read().decode()
        return json.loads(body) if path.startswith("/api/") else body

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of ``promql`` now (``/api/v1/query``)."""
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_for(self, what: str, done: Callable[[], bool]) -> None:
        """Poll ``done()`` until true, at most :data:`WAIT_S` seconds."""
        deadline = time.monotonic() + WAIT_S
        while not done():
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not seen by Prometheus within {WAIT_S:g} s")
            time.sleep(0.2)  # the poll interval of a bounded wait, not a synchronisation

    def ready(self) -> bool:
        try:
            self.get("/-/ready")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True


def write_config(path: Path, metrics_port: int) -> Path:
    """A Prometheus configuration scraping ``127.0.0.1:metrics_port`` every second."""
    path.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: histohelper\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    return path


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """Factory: a started Prometheus scraping the given metrics port, stopped after."""
    started: list[Prometheus] = []

    def start(metrics_port: int) -> Prometheus:
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={write_config(tmp_path / 'prometheus.yml', metrics_port)}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Prometheus(proc, port, log)
        started.append(server)
        server.wait_for("readiness", server.ready)
        return server

    yield start
    for server in started:
        server.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=20)
        server.proc.kill()  # a no-op once it has exited
        server.proc.wait()


def value(result: list[dict[str, Any]]) -> float:
    """The value of a one-sample vector; 0 for an empty one."""
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else 0.0


def test_prometheus_counts_analyses_errors_and_stages(
    start_inprocess_server, prometheus_for, tmp_path: Path
) -> None:
    running = start_inprocess_server(
        slide_root=make_slide_root(tmp_path / "slides"), metrics_port=free_port()
    )
    prometheus = prometheus_for(running.metrics_port)
    for _ in range(N_ANALYSES):
        analyze(running.target)
    assert analyze_error(running.target) == grpc.StatusCode.NOT_FOUND

    ok = 'sum(histohelper_calls_total{rpc="AnalyzeSlide",code="OK"})'
    prometheus.wait_for("the OK analyses", lambda: value(prometheus.query(ok)) == N_ANALYSES)
    assert value(prometheus.query(ok)) == N_ANALYSES
    not_found = (
        'histohelper_calls_total{rpc="AnalyzeSlide",code="NOT_FOUND",reason="SLIDE_NOT_FOUND"}'
    )
    prometheus.wait_for("the NOT_FOUND call", lambda: value(prometheus.query(not_found)) == 1)
    stages = {
        r["metric"]["stage"]: float(r["value"][1])
        for r in prometheus.query("sum by (stage) (histohelper_stage_seconds_count)")
    }
    assert set(stages) == {"tiling", "read", "model_batch", "mil"}
    assert stages["tiling"] == stages["mil"] == N_ANALYSES
    assert stages["read"] >= N_ANALYSES and stages["model_batch"] >= N_ANALYSES
    assert value(prometheus.query("histohelper_slide_seconds_count")) == N_ANALYSES
    info = prometheus.query("histohelper_model_info")
    assert [r["metric"]["precision"] for r in info] == ["fp32"]

    # Prometheus parses and evaluates every query of the Grafana dashboard.
    for expr in dashboard_expressions(DASHBOARD):
        for variable, stands_for in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, stands_for)
        prometheus.query(expr)
