"""A/B end-to-end throughput: the server of an old code tree against this one (issue 16).

Two warm ``histohelper serve`` processes with their defaults, started once each, one
from ``--old`` (a code tree, e.g. ``git archive d935e09`` unpacked; see ``treeserve.py``)
and one from this working tree, both serving the same artifact over the same slide
root. After one warm-up analysis each, AnalyzeSlide of the bench slide runs
old, new, old, new, ... (``--rounds`` pairs), one call at a time, request to
completed event, so a slow or fast minute of the shared host lands on both sides of a
pair. Prints each run's patches/s, the new/old ratio of each adjacent pair and the
median of those ratios beside the ratio of the medians.

The bench slide is ``slides.py``'s mosaic of ``--slide-px`` pixels (cached outside the
repository); ``--slide`` analyses another file instead.

Usage: ``.venv/bin/python benchmarks/ab_throughput.py --old /tmp/old-hh --model M.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import slides  # noqa: E402
import treeserve  # noqa: E402

from histohelper.v1 import slide_analysis_pb2 as pb  # noqa: E402
from histohelper.v1 import slide_analysis_pb2_grpc as pb_grpc  # noqa: E402

SOURCE_SLIDE = HERE.parent.parent / "shared" / "slides" / "real" / "CMU-1-Small-Region.svs"


def _log(msg: str) -> None:
    print(f"[ab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def analyze(target: str, slide_name: str) -> dict[str, Any]:
    """One AnalyzeSlide call, request to completed event."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.SlideAnalysisServiceStub(channel)
        t0 = time.perf_counter()
        n = 0
        served = ""
        done = None
        for ev in stub.AnalyzeSlide(pb.AnalyzeSlideRequest(slide_path=slide_name), timeout=1800):
            kind = ev.WhichOneof("event")
            if kind == "started":
                m = ev.started.model
                served = f"{m.device} {m.precision} {m.engine}".strip()
            elif kind == "patches":
                n += len(ev.patches.patch_index)
            elif kind == "completed":
                done = ev.completed
        total = time.perf_counter() - t0
    if done is None:
        raise RuntimeError("no completed event")
    return {
        "patches": n,
        "total_s": round(total, 3),
        "patches_per_s": round(n / total, 2),
        "served": served,
    }


def paired(
    names: tuple[str, str], a: list[float], b: list[float]
) -> tuple[dict[str, Any], list[str]]:
    """Figures and table lines of runs alternated in pairs (patches/s of sides a and b).

    Returns:
        ``pair_ratios`` (b/a per pair), ``median_pair_ratio`` and ``ratio_of_medians``;
        and the table: one line per pair, then the medians.
    """
    pairs = [round(y / x, 3) for x, y in zip(a, b, strict=True)]
    figures = {
        "pair_ratios": pairs,
        "median_pair_ratio": round(statistics.median(pairs), 3),
        "ratio_of_medians": round(statistics.median(b) / statistics.median(a), 3),
    }
    first, second = names
    lines = [
        f"{'round':>5}  {first + ' p/s':>9}  {second + ' p/s':>9}  {second + '/' + first:>7}",
        *(
            f"{i + 1:>5}  {x:>9.2f}  {y:>9.2f}  {p:>7.3f}"
            for i, (x, y, p) in enumerate(zip(a, b, pairs, strict=True))
        ),
        f"{'median':>5}  {statistics.median(a):>9.2f}  {statistics.median(b):>9.2f}  "
        f"{figures['median_pair_ratio']:>7.3f} (median of pair ratios; "
        f"ratio of medians {figures['ratio_of_medians']:.3f})",
    ]
    return figures, lines


def report(figures: dict[str, Any], lines: list[str], json_path: Path | None) -> int:
    """Print ``lines`` and the load averages (``load_avg_start``/``_end`` of
    ``figures``); write ``figures`` as JSON to ``json_path`` unless None. Returns 0."""
    start, end = figures["load_avg_start"][0], figures["load_avg_end"][0]
    print("\n".join([*lines, f"load average start {start:.2f}, end {end:.2f}"]))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="code tree of the old server")
    parser.add_argument("--model", type=Path, required=True, help="artifact both servers load")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slide-px", type=int, default=20_000)
    parser.add_argument("--slide", type=Path, help="analyse this slide instead of the mosaic")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    slide = args.slide or slides.ensure_slide(args.slide_px, SOURCE_SLIDE)
    r: dict[str, Any] = {
        "old": str(args.old.resolve()),
        "slide": slide.name,
        "load_avg_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="hh-ab-") as tmp:
        servers = {}
        try:
            for name, tree in (("old", args.old), ("new", None)):
                _log(f"starting the {name} server")
                servers[name] = treeserve.start_server(
                    tree, args.model, slide.parent, Path(tmp) / name
                )
            for name, server in servers.items():
                _log(f"warm-up ({name})")
                r[f"{name}_warmup"] = analyze(server.target, slide.name)
            runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
            for i in range(args.rounds):
                for name in ("old", "new"):
                    runs[name].append(analyze(servers[name].target, slide.name))
                    _log(f"round {i + 1} {name}: {runs[name][-1]['patches_per_s']} patches/s")
        finally:
            for server in servers.values():
                server.stop()
    old = [x["patches_per_s"] for x in runs["old"]]
    new = [x["patches_per_s"] for x in runs["new"]]
    figures, table = paired(("old", "new"), old, new)
    r.update(
        runs=runs,
        old_patches_per_s=old,
        new_patches_per_s=new,
        **figures,
        load_avg_end=os.getloadavg(),
    )
    lines = [
        f"slide {slide.name}: {runs['new'][0]['patches']} patches; "
        f"served old: {runs['old'][0]['served']}, new: {runs['new'][0]['served']}; warm servers",
        *table,
    ]
    return report(r, lines, args.json)


if __name__ == "__main__":
    sys.exit(main())
