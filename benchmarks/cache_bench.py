"""Result cache: AnalyzeSlide cache hit against miss on the large bench slide (issue 19).

One ``histohelper serve`` process (of this tree, or of ``--tree``) with its defaults and
``--cache-dir`` (a fresh temporary directory) serves the ``run.py`` artifact over the
20,000 px bench slide. Each round asks for the slide with a ``min_tissue_fraction`` no
earlier round used (a new key: a miss that tiles, infers and stores), then repeats that
same request ``--hits`` times (hits: lookup, verification, replay); the hit/miss ratio
of a round is its miss time over its median hit time, request to completed event,
measured by this client one call at a time, so both sides of a ratio share the minute
they ran in. A last request of round 1's key goes to a fresh server process on the same
directory (the cache outlives the process; the server's code is in the key, so serve a
fixed ``--tree`` while others edit this one). The first miss also hashes the slide's
content once (memoised after): that cost and the hashing rate are printed, measured on
the same file in this process.

Usage: ``.venv/bin/python benchmarks/cache_bench.py [--rounds 3] [--hits 3]
[--slide-px 20000] [--model PT] [--slide-dir DIR] [--tree DIR] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import slides  # noqa: E402
import treeserve  # noqa: E402
from ab_throughput import SOURCE_SLIDE  # noqa: E402
from run import ensure_artifact, machine_line  # noqa: E402

from histohelper.client import (  # noqa: E402
    AnalysisOptions,
    Completed,
    PatchBatch,
    SlideClient,
    Started,
)
from histohelper.server.cache import file_sha256  # noqa: E402


def _log(msg: str) -> None:
    print(f"[cache {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def analyze(client: SlideClient, slide_name: str, min_tissue_fraction: float) -> dict[str, Any]:
    """One AnalyzeSlide call through the SDK (its defaults, attention included): client
    seconds from the request to the first event of each kind, and the completed one."""
    options = AnalysisOptions(min_tissue_fraction=min_tissue_fraction)
    t0 = time.perf_counter()
    seen: dict[str, float] = {}
    n = 0
    done: Completed | None = None
    served = ""
    for ev in client.stream(slide_name, options, timeout=1800):
        seen.setdefault(type(ev).__name__, time.perf_counter() - t0)
        if isinstance(ev, Started):
            served = f"{ev.model.device} {ev.model.precision} {ev.model.engine}"
        elif isinstance(ev, PatchBatch):
            n += len(ev.patch_index)
        elif isinstance(ev, Completed):
            done = ev
    if done is None or done.prediction is None:
        raise RuntimeError("no completed event with a prediction")
    return {
        "patches": n,
        "total_s": round(seen["Completed"], 4),
        "started_s": round(seen["Started"], 4),
        "first_result_s": round(seen.get("PatchBatch", float("nan")), 4),
        "cached": done.cached,
        "served": served,
        "probabilities": list(done.prediction.probabilities),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hits", type=int, default=3)
    parser.add_argument("--slide-px", type=int, default=20_000)
    parser.add_argument("--model", type=Path, help="artifact (default: run.py's, cached)")
    parser.add_argument("--slide-dir", type=Path, help="where the slide is cached (run.py's)")
    parser.add_argument(
        "--tree", type=Path, help="serve this code tree (e.g. a git archive; default: this one)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    slide = slides.ensure_slide(args.slide_px, SOURCE_SLIDE, args.slide_dir)
    model = args.model or ensure_artifact(slides.cache_dir())
    r: dict[str, Any] = {"machine": machine_line()["line"], "slide_px": args.slide_px}
    size = slide.stat().st_size
    hash_s = []
    for _ in range(2):
        t0 = time.perf_counter()
        file_sha256(slide)
        hash_s.append(time.perf_counter() - t0)
    r["slide_bytes"] = size
    r["hash_s"] = [round(s, 3) for s in hash_s]
    r["hash_mb_per_s"] = round(size / min(hash_s) / 1e6, 1)
    _log(f"slide {size / 1e6:.1f} MB hashed in {hash_s} s")

    rounds = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        cache_dir = tmp / "cache"
        server = treeserve.start_server(
            args.tree, model, slide.parent, tmp / "server", "--cache-dir", str(cache_dir)
        )
        try:
            for i in range(args.rounds):
                fraction = round(0.5 + 0.01 * i, 2)
                with SlideClient(server.target) as client:
                    miss = analyze(client, slide.name, fraction)
                    hits = [analyze(client, slide.name, fraction) for _ in range(args.hits)]
                assert not miss["cached"] and all(h["cached"] for h in hits)
                assert all(h["probabilities"] == miss["probabilities"] for h in hits)
                hit_s = statistics.median(h["total_s"] for h in hits)
                r["served"] = miss["served"]
                rounds.append(
                    {
                        "min_tissue_fraction": fraction,
                        "patches": miss["patches"],
                        "miss_s": miss["total_s"],
                        "miss_started_s": miss["started_s"],
                        "miss_first_result_s": miss["first_result_s"],
                        "hit_s": [h["total_s"] for h in hits],
                        "hit_started_s": statistics.median(h["started_s"] for h in hits),
                        "hit_first_result_s": statistics.median(h["first_result_s"] for h in hits),
                        "ratio": round(miss["total_s"] / hit_s, 1),
                    }
                )
                _log(f"round {i + 1}: {rounds[-1]}")
        finally:
            server.stop()
        entries = list(cache_dir.glob("entries/*/*.hhr"))
        r["entry_bytes"] = [p.stat().st_size for p in entries]
        server = treeserve.start_server(
            args.tree, model, slide.parent, tmp / "server2", "--cache-dir", str(cache_dir)
        )
        try:
            # A miss here means the server's code changed meanwhile (it is in the key):
            # serve a fixed tree (--tree) in a tree others are editing.
            with SlideClient(server.target) as client:
                after = analyze(client, slide.name, rounds[0]["min_tissue_fraction"])
        finally:
            server.stop()
    r["rounds"] = rounds
    r["hit_after_restart_s"] = after["total_s"]
    r["hit_after_restart_cached"] = after["cached"]
    r["ratio_median"] = statistics.median(x["ratio"] for x in rounds)
    r["target_hit_ge_20x"] = r["ratio_median"] >= 20

    print(f"machine: {r['machine']}; served: {r['served']}")
    print(
        f"slide: {args.slide_px} px, {size / 1e6:.1f} MB; content SHA-256 "
        f"{min(hash_s):.2f} s ({r['hash_mb_per_s']} MB/s; first read {hash_s[0]:.2f} s)"
    )
    print("| round | patches | miss s (Started / first) | hits s (Started / first) | miss/hit |")
    print("| --- | --- | --- | --- | --- |")
    for i, x in enumerate(rounds, 1):
        print(
            f"| {i} | {x['patches']} | {x['miss_s']:.2f} ({x['miss_started_s']:.2f} / "
            f"{x['miss_first_result_s']:.2f}) | {', '.join(f'{h:.3f}' for h in x['hit_s'])} "
            f"({x['hit_started_s']:.3f} / {x['hit_first_result_s']:.3f}) | **{x['ratio']}x** |"
        )
    print(
        f"median miss/hit: {r['ratio_median']}x (target >= 20x: {r['target_hit_ge_20x']}); "
        f"from a restarted server: {r['hit_after_restart_s']:.3f} s "
        f"({'hit' if after['cached'] else 'MISS: the code changed'}); "
        f"entry sizes: {', '.join(f'{b / 1e6:.2f} MB' for b in r['entry_bytes'])}"
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
