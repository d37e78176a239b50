"""Cost of Prometheus metrics: a server with ``--metrics-port`` against one without (issue 19).

Two warm servers of this tree in this process (``start_server``), identical but for
metrics, sharing one loaded model runtime (the server's defaults: engine, precision,
threads), so that both run the very same engine on the same cores; calls alternate,
one at a time, so the runtime is never used by both at once. The "on" server serves
metrics and is scraped every second for the whole run by a thread (Prometheus's
default is every 15 s: a harsher case). After one warm-up analysis each,
AnalyzeSlide of the bench slide runs in ABBA order (off, on, on, off, ...:
``--rounds`` pairs), request to completed event, so a slow or fast minute of the
shared host and the order within a pair land on both sides. Prints each run's
patches/s, the on/off ratio of each pair, their median and the ratio of the medians.

Because one end-to-end run on this shared host varies by more than the 2 % budget,
the script also measures what the metrics add directly: the microseconds of each
report (``ServerMetrics.stage`` etc.) times the reports one analysis made (read back
from the on server's own counters), as a share of that analysis; and the time to
render one scrape (``generate_latest`` of the on server's registry), as a share of a
1 s and a 15 s scrape interval.

Usage: ``.venv/bin/python benchmarks/metrics_overhead.py [--rounds 6] [--slide-px 10000]``
(the artifact and slide are those of ``run.py``, cached outside the repository).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import slides  # noqa: E402
from ab_throughput import SOURCE_SLIDE, analyze, paired, report  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from run import ensure_artifact  # noqa: E402

from histohelper.server.app import start_server  # noqa: E402
from histohelper.server.config import ServerConfig  # noqa: E402
from histohelper.server.metrics import ServerMetrics  # noqa: E402
from histohelper.server.runtime import load_runtime  # noqa: E402


def _log(msg: str) -> None:
    print(f"[metrics {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper(threading.Thread):
    """Scrapes a metrics port every ``interval_s`` until stopped; keeps the last text."""

    def __init__(self, port: int, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval_s = interval_s
        self.halt = threading.Event()
        self.wall_s: list[float] = []
        self.text = ""

    def scrape(self) -> str:
        t0 = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=10) as reply:
            text = reply.read().decode()
        self.wall_s.append(time.perf_counter() - t0)
        return text

    def run(self) -> None:
        while not self.halt.wait(self.interval_s):
            self.text = self.scrape()


def report_cost_us(n: int = 200_000) -> dict[str, float]:
    """Microseconds per report of a ServerMetrics (one thread, no contention)."""
    m = ServerMetrics()
    out = {}
    for name, make_report in (
        ("stage", lambda: m.stage("read", 0.01)),
        ("patches_classified", lambda: m.patches_classified(32)),
        ("call_ended", lambda: m.call_ended("AnalyzeSlide", "OK", None, 1.0)),
    ):
        t0 = time.perf_counter()
        for _ in range(n):
            make_report()
        out[name] = (time.perf_counter() - t0) / n * 1e6
    return out


def counts(text: str) -> dict[str, float]:
    """Per-family totals the cost estimate needs, from an exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "histohelper_stage_seconds_count":
                out[f"stage:{s.labels['stage']}"] = s.value
            elif s.name in ("histohelper_calls_total", "histohelper_patches_classified_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def render_cost_s(metrics: ServerMetrics, n: int = 200) -> float:
    """Seconds to render one scrape of ``metrics`` (``generate_latest``, no HTTP)."""
    t0 = time.perf_counter()
    for _ in range(n):
        generate_latest(metrics.registry)
    return (time.perf_counter() - t0) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artifact (default: run.py's cached one)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--slide-px", type=int, default=10_000)
    parser.add_argument("--slide", type=Path, help="analyse this slide instead of the mosaic")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--control",
        action="store_true",
        help="A/A control: the 'on' server serves no metrics either (only the scraper's "
        "target differs: it scrapes a bare ServerMetrics); shows the bias of the setup",
    )
    args = parser.parse_args()

    model = args.model or ensure_artifact(slides.cache_dir())
    slide = args.slide or slides.ensure_slide(args.slide_px, SOURCE_SLIDE)
    r: dict[str, Any] = {"slide": slide.name, "load_avg_start": os.getloadavg()}
    base = ServerConfig(model_path=model, slide_root=slide.parent, port=0)
    runtime = load_runtime(
        model,
        device=base.device,
        precision=base.precision,
        num_threads=base.num_threads,
        backend=base.backend,
    )
    servers: dict[str, Any] = {}
    control = ServerMetrics()  # scraped in place of the on server's in a control run
    r["control"] = args.control
    try:
        on_port = 0 if args.control else _free_port()
        for name, port in (("off", 0), ("on", on_port)):
            servers[name] = start_server(replace(base, metrics_port=port), runtime=runtime)
        if args.control:
            control.serve("127.0.0.1", _free_port())
        scraper = Scraper(control.port if args.control else servers["on"].metrics_port)
        scraper.start()
        for name, server in servers.items():
            _log(f"warm-up ({name})")
            r[f"{name}_warmup"] = analyze(server.target, slide.name)
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for i in range(args.rounds):
            for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
                runs[name].append(analyze(servers[name].target, slide.name))
                _log(f"round {i + 1} {name}: {runs[name][-1]['patches_per_s']} patches/s")
        scraper.halt.set()
        final = scraper.scrape()
        render_s = render_cost_s(servers["on"].metrics or control)
    finally:
        control.close()
        for server in servers.values():
            server.stop(grace=0, drain=0)
    off = [x["patches_per_s"] for x in runs["off"]]
    on = [x["patches_per_s"] for x in runs["on"]]
    figures, table = paired(("off", "on"), off, on)

    # Direct cost: reports per analysis (the on server's own counts over its
    # rounds + warm-up) times the cost of one report, against the analysis time.
    c = counts(final)
    analyses = args.rounds + 1
    per_us = report_cost_us()
    reports = {
        "stage": sum(v for k, v in c.items() if k.startswith("stage:")) / analyses,
        "patches_classified": c.get("stage:model_batch", 0.0) / analyses,
        "call_ended": c.get("histohelper_calls_total", 0.0) / analyses,
    }
    report_s = sum(reports[k] * per_us[k] for k in reports) / 1e6
    analysis_s = statistics.median(x["total_s"] for x in runs["on"])
    scrape_s = statistics.median(scraper.wall_s) if scraper.wall_s else 0.0
    r.update(
        runs=runs,
        off_patches_per_s=off,
        on_patches_per_s=on,
        **figures,
        report_cost_us=per_us,
        reports_per_analysis=reports,
        report_share=report_s / analysis_s,
        scrapes=len(scraper.wall_s),
        scrape_wall_s_median=scrape_s,
        scrape_render_s=render_s,
        scrape_share_at_1s=render_s / 1.0,
        scrape_share_at_15s=render_s / 15.0,
        load_avg_end=os.getloadavg(),
    )
    lines = [
        f"slide {slide.name}: {runs['on'][0]['patches']} patches; served "
        f"{runs['on'][0]['served']}; two warm in-process servers sharing one runtime; "
        "ABBA order; the on server scraped every 1 s"
        + (" (CONTROL RUN: neither server has metrics)" if args.control else ""),
        *table,
        "direct cost per analysis: "
        + ", ".join(f"{reports[k]:.0f} x {k} at {per_us[k]:.2f} us" for k in reports)
        + f" = {report_s * 1e3:.3f} ms of {analysis_s:.1f} s ({r['report_share']:.5%})",
        f"scrape: {render_s * 1e3:.3f} ms to render ({r['scrape_share_at_1s']:.3%} of one "
        f"core at one scrape a second, {r['scrape_share_at_15s']:.4%} at one per 15 s); "
        f"median {scrape_s * 1e3:.2f} ms wall over HTTP ({len(scraper.wall_s)} scrapes)",
    ]
    return report(r, lines, args.json)


if __name__ == "__main__":
    sys.exit(main())
