"""Benchmark (not a test): ``histohelper features`` throughput against ``analyze``.

Writes ``--slides`` small synthetic slides (tissue boxes on glass, tifffile pyramids
from ``tests/synthetic_slides.py``) into a temporary slide root, exports a seed-0
model (once, cached like ``starvation.py``), starts a real ``histohelper serve`` on
port 0 and, alternating ``--rounds`` times, runs

- ``analyze``: one ``histohelper analyze SLIDE`` per slide, one after another (the CLI
  a user types; each run pays the interpreter start-up);
- ``features``: one ``histohelper features COHORT --jobs 1 --overwrite`` over the
  same slides (one process, one slide in flight, so the comparison is per slide).

That pair compares what a user types, start-up and overlays included. The like-for-like
pair, in this process and alternated the same way, isolates what writing HDF5 costs:

- ``sdk``: ``AsyncSlideClient.analyze`` of every slide with the request ``features``
  sends (embeddings on, attention off), ``--jobs`` in flight, results kept in memory;
- ``features_sdk``: :func:`histohelper.client.features.extract_features` over the same
  slides with the same ``--jobs`` (the same analyses, plus one HDF5 bag per slide).

Prints slides/h of each (median over rounds) and the ratios features / analyze and
features_sdk / sdk (the issue's target: >= 0.95).

Usage: ``python benchmarks/features_bench.py [--slides 12 --rounds 2]``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import starvation  # noqa: E402
import treeserve  # noqa: E402


def write_slides(root: Path, n: int, size: int) -> list[str]:
    import synthetic_slides as ss

    names = []
    for i in range(n):
        img = ss.slide_with_tissue(
            size, size, [(size // 8, size // 8, size * 3 // 4, size * 3 // 4)], seed=i
        )
        name = f"synthetic-{i:02d}.tiff"
        ss.write_slide(root / name, img, [(size // 4, size // 4)], mpp=0.5)
        names.append(name)
    return names


def in_process(
    target: str, names: list[str], work: Path, rounds: int, jobs: int
) -> dict[str, list[float]]:
    """slides/h of SDK analyses against extract_features, alternated, in this process."""
    import asyncio

    from histohelper.client import AnalysisOptions, AsyncSlideClient
    from histohelper.client.features import CohortRow, ModelIdentity, extract_features

    request = AnalysisOptions(return_embeddings=True, return_attention=False)
    rows = [CohortRow(slide=n) for n in names]

    async def sdk(client: AsyncSlideClient) -> None:
        gate = asyncio.Semaphore(jobs)

        async def one(name: str) -> None:
            async with gate:
                await client.analyze(name, request)

        await asyncio.gather(*(one(n) for n in names))

    async def run() -> dict[str, list[float]]:
        rates: dict[str, list[float]] = {"sdk": [], "features_sdk": []}
        (work / "features_sdk").mkdir(exist_ok=True)
        async with AsyncSlideClient(target) as client:
            model = ModelIdentity.from_info(await client.get_model_info())
            await sdk(client)  # warm-up
            for r in range(rounds):
                for kind in ("sdk", "features_sdk") if r % 2 == 0 else ("features_sdk", "sdk"):
                    t0 = time.perf_counter()
                    if kind == "sdk":
                        await sdk(client)
                    else:
                        outcomes = await extract_features(
                            client, rows, work / "features_sdk", model, AnalysisOptions(),
                            jobs=jobs, overwrite=True,
                        )  # fmt: skip
                        assert all(o.status == "written" for o in outcomes), outcomes
                    dt = time.perf_counter() - t0
                    rates[kind].append(len(names) * 3600 / dt)
                    print(f"round {r} {kind}: {dt:.1f} s, {rates[kind][-1]:.0f} slides/h")
        return rates

    return asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--size", type=int, default=2048, help="slide side in px (0.5 um/px)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", type=Path, help="exported model (default: seed-0 export)")
    ap.add_argument("--jobs", type=int, default=2, help="slides in flight (in-process pair)")
    args = ap.parse_args()
    cmd = treeserve.histohelper_command(None)
    with tempfile.TemporaryDirectory(prefix="features-bench-") as tmp:
        work = Path(tmp)
        slide_root = work / "slides"
        slide_root.mkdir()
        names = write_slides(slide_root, args.slides, args.size)
        with open(work / "cohort.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slide"])
            w.writerows([n] for n in names)
        model = args.model or starvation.ensure_model(
            None, Path(tempfile.gettempdir()) / "histohelper-starvation"
        )
        server = treeserve.start_server(None, model, slide_root, work)
        rates: dict[str, list[float]] = {"analyze": [], "features": []}
        try:
            conn = ["--server", server.target]
            subprocess.run(
                [*cmd, "analyze", names[0], *conn, "--out", str(work / "warm"), "-q"],
                check=True,
                capture_output=True,
            )
            for r in range(args.rounds):
                for kind in ("analyze", "features") if r % 2 == 0 else ("features", "analyze"):
                    t0 = time.perf_counter()
                    if kind == "analyze":
                        for n in names:
                            out = work / "analyze" / n
                            subprocess.run(
                                [*cmd, "analyze", n, *conn, "--out", str(out), "-q"],
                                check=True,
                                capture_output=True,
                            )
                    else:
                        subprocess.run(
                            [
                                *cmd,
                                "features",
                                str(work / "cohort.csv"),
                                *conn,
                                "--out",
                                str(work / "features"),
                                "--jobs",
                                "1",
                                "--overwrite",
                                "-q",
                            ],
                            check=True,
                            capture_output=True,
                        )
                    dt = time.perf_counter() - t0
                    rates[kind].append(len(names) * 3600 / dt)
                    print(f"round {r} {kind}: {dt:.1f} s, {rates[kind][-1]:.0f} slides/h")
            rates.update(in_process(server.target, names, work, args.rounds, args.jobs))
        finally:
            server.stop()
    s_, fs = statistics.median(rates["sdk"]), statistics.median(rates["features_sdk"])
    a, f_ = statistics.median(rates["analyze"]), statistics.median(rates["features"])
    print("| command | slides/h (median) | rounds |")
    print("| --- | --- | --- |")
    print(f"| analyze (one CLI run per slide) | {a:.0f} | {rates['analyze']} |")
    print(f"| features (one run, --jobs 1) | {f_:.0f} | {rates['features']} |")
    print(f"| sdk analyze, in process (--jobs {args.jobs}) | {s_:.0f} | {rates['sdk']} |")
    fsr = rates["features_sdk"]
    print(f"| extract_features, in process (--jobs {args.jobs}) | {fs:.0f} | {fsr} |")
    print(f"ratio features / analyze (CLI): {f_ / a:.3f}")
    print(f"ratio features / analyze (in process, like for like): {fs / s_:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
