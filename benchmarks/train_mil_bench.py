"""Benchmark (not a test): ``histohelper train-mil`` time per epoch and peak memory.

Writes synthetic HDF5 bags in the ``histohelper features`` layout (dataset
``features`` float32 ``[M, D]``, ``coords`` int64 ``[M, 2]`` level-0 x, y; attributes
``slide``, ``model_hash``, ...) for N slides of M patches under a cache folder outside
the repository (default ``~/.cache/histohelper-bench/train_mil``; about 20 GB for the
default 1,000 x 10,000 x 512), with ``features_index.csv`` and a cohort CSV whose
``split`` column (70 % train, 15 % val, 15 % test) fixes one train -> val split (no
k-fold). Files already there with the same shape and seed are kept.

Then runs ``histohelper train-mil`` in a child process per configuration:

- ``streamed``: every slide, ``--stream`` with a small LRU (``--stream-gib``);
- ``memory`` and ``streamed`` on the first ``--subset`` slides (bags that fit), for
  comparison on the same data.

Each child times every epoch (the ``_epoch`` of :mod:`train_mil`, wrapped in the child
only) and its peak RSS comes from ``os.wait4`` (``ru_maxrss``, KiB on Linux). Prints a
table; ``--json`` writes the figures. The page cache is not RSS: a streamed run whose
files fit in the page cache reads from memory after the first epoch.

Usage: ``python benchmarks/train_mil_bench.py [--slides 1000 --patches 10000]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_CHILD = r"""
import json, sys, time
from histohelper.model_export import train_mil as tm
from histohelper.cli import main

times, orig = [], tm._epoch
def timed(*a, **k):
    t0 = time.perf_counter()
    r = orig(*a, **k)
    times.append(time.perf_counter() - t0)
    return r
tm._epoch = timed
t0 = time.perf_counter()
rc = main(sys.argv[2:])
total = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "epoch_s": times, "total_s": total}, f)
sys.exit(rc)
"""


def generate(root: Path, n_slides: int, n_patches: int, dim: int, seed: int) -> float:
    """Write (or keep) the bags, index and cohort; returns the seconds spent writing."""
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    t0 = time.perf_counter()
    rows, index = [], []
    coords = np.stack(
        [np.arange(n_patches) % 100 * 224, np.arange(n_patches) // 100 * 224], 1
    ).astype(np.int64)
    for s in range(n_slides):
        name = f"slide-{s:04d}"
        label = "pos" if s % 2 else "neg"
        split = "train" if s % 20 < 14 else ("val" if s % 20 < 17 else "test")
        rows.append((name, label, f"patient-{s:04d}", split))
        index.append((name, f"{name}.h5", n_patches, "ok", ""))
        path = root / f"{name}.h5"
        if path.is_file():
            try:
                with h5py.File(path, "r") as h5:
                    if h5["features"].shape == (n_patches, dim) and h5.attrs["seed"] == seed:
                        continue
            except (OSError, KeyError):
                pass
        srng = np.random.default_rng([seed, s])
        feats = srng.standard_normal((n_patches, dim), dtype=np.float32)
        if label == "pos":  # a planted direction in 5 % of the patches
            feats[: max(1, n_patches // 20)] += 3.0 * direction
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("features", data=feats)
            ds = h5.create_dataset("coords", data=coords)
            ds.attrs["frame"] = "level0_px"
            h5.attrs.update(
                {
                    "format": "histohelper.features/1",
                    "slide": name,
                    "model_hash": "bench-synthetic",
                    "model_name": "synthetic",
                    "patch_size_l0": 224.0,
                    "effective_mpp": 0.5,
                    "options_json": "{}",
                    "seed": seed,
                }
            )
        os.replace(tmp, path)
    for fname, header, data in (
        ("features_index.csv", ["slide", "file", "n_patches", "status", "reason"], index),
        ("cohort.csv", ["slide", "label", "patient", "split"], rows),
    ):
        with open(root / fname, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(data)
    return time.perf_counter() - t0


def subset_cohort(root: Path, n: int, dest: Path) -> Path:
    """A cohort CSV of the first ``n`` rows of ``root/cohort.csv``."""
    with open(root / "cohort.csv", newline="") as f:
        rows = list(csv.reader(f))
    with open(dest, "w", newline="") as f:
        csv.writer(f).writerows(rows[: n + 1])
    return dest


def run_train(cohort: Path, features: Path, out: Path, epochs: int, extra: list[str]) -> dict:
    """One ``train-mil`` child; returns its epoch times, wall time and peak RSS."""
    out.mkdir(parents=True, exist_ok=True)
    stats = out / "child.json"
    argv = [
        sys.executable,
        "-c",
        _CHILD,
        str(stats),
        "train-mil",
        str(cohort),
        "--features",
        str(features),
        "--out",
        str(out / "mil_head.pt"),
        "--max-epochs",
        str(epochs),
        "--patience",
        str(epochs),
        "--bootstrap",
        "100",
        "--no-plots",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"train-mil exited {proc.returncode} ({' '.join(extra)})")
    child = json.loads(stats.read_text())
    report = json.loads((out / "report.json").read_text())
    return {
        "epoch_s": child["epoch_s"],
        "total_s": round(wall, 2),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
        "mode": report["bags"]["mode"],
        "bag_gib": round(report["bags"]["total_bytes"] / 2**30, 2),
        "weights_sha": _sha(out / "mil_head.pt"),
    }


def _sha(path: Path) -> str:
    import hashlib

    import torch

    sd = torch.load(path, weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(sd[k].numpy().tobytes())
    return h.hexdigest()[:12]


def machine() -> str:
    model = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f'lscpu model "{model}", {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}'


def table(results: dict[str, Any]) -> str:
    lines = [
        "| run | slides | bags GiB | mode | epochs (s each) | s/epoch (mean) | "
        "total s | peak RSS GiB | weights |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["runs"].items():
        ep = r["epoch_s"]
        lines.append(
            f"| {name} | {r['slides']} | {r['bag_gib']} | {r['mode']} | "
            f"{', '.join(f'{e:.1f}' for e in ep)} | {np.mean(ep):.1f} | {r['total_s']} | "
            f"{r['peak_rss_gib']} | {r['weights_sha']} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--patches", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2, help="--max-epochs of train-mil")
    ap.add_argument("--subset", type=int, default=100, help="slides of the memory comparison")
    ap.add_argument("--stream-gib", type=float, default=1.0, help="LRU of the streamed runs")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "histohelper-bench" / "train_mil",
    )
    ap.add_argument("--skip-full", action="store_true", help="only the subset comparison")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    root = args.cache / f"{args.slides}x{args.patches}x{args.dim}-s{args.seed}"
    gen_s = generate(root, args.slides, args.patches, args.dim, args.seed)
    print(f"features in {root} ({gen_s:.0f} s to write)", flush=True)
    results: dict[str, Any] = {"machine": machine(), "generate_s": round(gen_s, 1), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="train-mil-bench-") as tmp:
        work = Path(tmp)
        n_sub = min(args.subset, args.slides)
        sub = subset_cohort(root, n_sub, work / "subset.csv")
        plan = [
            ("subset memory", sub, n_sub, ["--max-memory-gib", "1000"]),
            ("subset streamed", sub, n_sub, ["--stream", "--max-memory-gib", str(args.stream_gib)]),
        ]
        if not args.skip_full:
            plan.append(
                (
                    "all streamed",
                    root / "cohort.csv",
                    args.slides,
                    ["--stream", "--max-memory-gib", str(args.stream_gib)],
                )
            )
        for name, cohort, n, extra in plan:
            print(f"running {name} ...", flush=True)
            r = run_train(cohort, root, work / name.replace(" ", "_"), args.epochs, extra)
            r["slides"] = n
            results["runs"][name] = r
            print(f"  {r}", flush=True)
    print(results["machine"])
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
