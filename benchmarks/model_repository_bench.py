"""Model repository (issue 22): memory with 1 and 3 loaded models, and what a hot swap
adds to the latency of the analyses running through it.

Artifacts: seeded untrained exports (seeds 0, 1, 2; fp32 TorchScript, no ONNX), made
once into ``--work``. Each server is a ``histohelper serve --model-repository`` child
process (``--precision fp32 --device cpu``), so its RSS is its own.

Memory: a repository of 1 model, then one of 3 models (each its own name, so all three
are default versions and load at start); after one analysis per model of
CMU-1-Small-Region (every model has run real batches), the server's RSS (psutil) is
read. The two servers alternate ``--rounds`` times; the added MiB per model is
``(RSS_3 - RSS_1) / 2``.

Swap: one server over ``m/1``; this client analyses the slide one call after another.
Each round: ``--steady`` analyses, then a new version folder is dropped in and SIGHUP
sent while analyses continue; the *swap* analyses are those in flight at any time
between the SIGHUP and the first analysis served by the new version (the load and
warm-up happen on the server meanwhile); then the new version serves. Latency =
request to the completed event, client side. Printed: median steady latency against
median swap latency, side by side per round, and their ratio; every analysis is
checked to succeed.

Usage: ``.venv/bin/python benchmarks/model_repository_bench.py [--rounds 3]
[--steady 4] [--work DIR] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psutil

from histohelper.client import SlideClient

REPO_ROOT = Path(__file__).resolve().parents[1]
SLIDES = REPO_ROOT.parent / "shared" / "slides"
SLIDE = "real/CMU-1-Small-Region.svs"


def _log(msg: str) -> None:
    print(f"[models {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def artifacts(work: Path, seeds: tuple[int, ...]) -> list[Path]:
    """One fp32 export per seed, made once into ``work``."""
    from histohelper.model_export.export import export_model

    out = []
    for seed in seeds:
        path = work / f"seed{seed}.pt"
        if not path.exists():
            _log(f"exporting seed {seed}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_model(path, seed=seed, variants=(), calibration_patches=16, onnx=False)
        out.append(path)
    return out


def add_version(repo: Path, name: str, version: str, artifact: Path) -> None:
    """``repo/name/version/model.pt`` -> ``artifact``, renamed into place at once."""
    (repo / name).mkdir(parents=True, exist_ok=True)
    hidden = repo / name / f".{version}.incoming"
    hidden.mkdir()
    (hidden / "model.pt").symlink_to(artifact)
    os.rename(hidden, repo / name / version)


def serve(repo: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A ``histohelper serve`` process over ``repo``; returns it and its target."""
    ready = workdir / "ready.json"
    cmd = [
        sys.executable, "-m", "histohelper.cli", "serve", "--model-repository", str(repo),
        "--slide-root", str(SLIDES), "--port", "0", "--ready-file", str(ready),
        "--precision", "fp32", "--device", "cpu", "--log-level", "WARNING",
    ]  # fmt: skip
    log = (workdir / "server.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((workdir / "server.log").read_text())
        time.sleep(0.1)
    return proc, f"127.0.0.1:{json.loads(ready.read_text())['port']}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def memory_mib(models: list[Path], work: Path) -> float:
    """RSS (MiB) of a server with one model per artifact, after one analysis each."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        repo = Path(tmp) / "repo"
        for i, artifact in enumerate(models):
            add_version(repo, f"m{i}", "1", artifact)
        proc, target = serve(repo, Path(tmp))
        try:
            with SlideClient(target) as client:
                for i in range(len(models)):
                    client.analyze(SLIDE, model=f"m{i}")
            return float(psutil.Process(proc.pid).memory_info().rss) / 2**20
        finally:
            stop(proc)


def swap_rounds(arts: list[Path], work: Path, rounds: int, steady: int) -> list[dict[str, Any]]:
    """Steady and swap latencies per round (see the module docstring)."""
    out = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        repo = Path(tmp) / "repo"
        add_version(repo, "m", "1", arts[0])
        proc, target = serve(repo, Path(tmp))
        try:
            with SlideClient(target) as client:
                client.analyze(SLIDE)  # first-call costs out of the figures
                for r in range(rounds):
                    new = str(r + 2)
                    calls: list[tuple[float, float, str]] = []

                    def one(calls: list[tuple[float, float, str]] = calls) -> None:
                        t0 = time.perf_counter()
                        result = client.analyze(SLIDE)
                        calls.append((t0, time.perf_counter(), result.model_version))

                    for _ in range(steady):
                        one()
                    n_steady = len(calls)
                    add_version(repo, "m", new, arts[(r + 1) % len(arts)])
                    t_hup = time.perf_counter()
                    proc.send_signal(signal.SIGHUP)
                    while not any(v == new for _, _, v in calls[n_steady:]):
                        one()
                    t_new = next(t0 for t0, _, v in calls[n_steady:] if v == new)
                    swap = [e - s for s, e, v in calls[n_steady:] if s < t_new and e > t_hup]
                    steady_s = [e - s for s, e, _ in calls[:n_steady]]
                    out.append(
                        {
                            "round": r + 1,
                            "new_version": new,
                            "steady_s": steady_s,
                            "swap_s": swap,
                            "median_steady_s": statistics.median(steady_s),
                            "median_swap_s": statistics.median(swap) if swap else None,
                            "hup_to_new_version_s": t_new - t_hup,
                        }
                    )
                    _log(f"round {r + 1}: {out[-1]}")
        finally:
            stop(proc)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steady", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "hh-model-bench")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    arts = artifacts(args.work, (0, 1, 2))
    one_model, three_models = [], []
    for r in range(args.rounds):  # alternated, so both see the same load over time
        one_model.append(memory_mib(arts[:1], args.work))
        three_models.append(memory_mib(arts, args.work))
        _log(f"memory round {r + 1}: 1 model {one_model[-1]:.0f} MiB, 3 {three_models[-1]:.0f}")
    swaps = swap_rounds(arts, args.work, args.rounds, args.steady)
    lines = [
        f"load average at the end: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})",
        "memory (server RSS after one analysis per loaded model, MiB):",
        "  round  1 model  3 models  added per model",
    ]
    for r, (a, b) in enumerate(zip(one_model, three_models, strict=True), 1):
        lines.append(f"  {r:>5}  {a:>7.0f}  {b:>8.0f}  {(b - a) / 2:>15.0f}")
    m1, m3 = statistics.median(one_model), statistics.median(three_models)
    lines.append(
        f"  median {m1:.0f} vs {m3:.0f} MiB: x{m3 / m1:.2f}, +{(m3 - m1) / 2:.0f} MiB/model"
    )
    lines.append("swap (client latency of one analysis, request to completed, seconds):")
    lines.append("  round  steady median  swap median  ratio  n_swap  SIGHUP->new version")
    ratios = []
    for s in swaps:
        ratio = s["median_swap_s"] / s["median_steady_s"] if s["median_swap_s"] else float("nan")
        ratios.append(ratio)
        lines.append(
            f"  {s['round']:>5}  {s['median_steady_s']:>13.2f}  "
            f"{(s['median_swap_s'] or float('nan')):>11.2f}  {ratio:>5.2f}  "
            f"{len(s['swap_s']):>6}  {s['hup_to_new_version_s']:>17.2f}"
        )
    lines.append(f"  median ratio swap/steady: {statistics.median(ratios):.2f}")
    print("\n".join(lines))
    if args.json is not None:
        figures = {"memory_1_mib": one_model, "memory_3_mib": three_models, "swaps": swaps}
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
