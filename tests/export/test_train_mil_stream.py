"""``train-mil`` with bags streamed from HDF5 gives exactly the in-memory result.

The cohort: 20 slides of 10 patients (one label per patient), bags of 20-60
standard-normal 64-d features; positive slides carry 4 patches shifted along one
direction. Written here with h5py in the ``histohelper features`` layout.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from histohelper.cli import main as histohelper_main
from histohelper.model_export.train_mil import (
    BagOptions,
    InMemoryBags,
    StreamedBags,
    TrainOptions,
    load_bags,
    open_bags,
    train_mil,
)

OPTS = TrainOptions(folds=3, max_epochs=4, patience=2, lr=1e-3, bootstrap=50, seed=3, plots=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bags")
    rng = np.random.default_rng(7)
    u = rng.standard_normal(64)
    rows, index = [], []
    for s in range(20):
        label = "pos" if (s // 2) % 2 else "neg"
        feats = rng.standard_normal((int(rng.integers(20, 61)), 64))
        if label == "pos":
            feats[:4] += 3 * u
        name = f"s{s:02d}"
        with h5py.File(root / f"{name}.h5", "w") as h5:
            h5["features"] = feats.astype(np.float32)
            h5["coords"] = np.zeros((len(feats), 2), np.int64)
            h5.attrs["slide"] = name
            h5.attrs["model_hash"] = "hash-a"
        rows.append((name, label, f"p{s // 2}"))
        index.append((name, f"{name}.h5", len(feats), "ok", ""))
    for fname, header, data in (
        ("cohort.csv", ["slide", "label", "patient"], rows),
        ("features_index.csv", ["slide", "file", "n_patches", "status", "reason"], index),
    ):
        with open(root / fname, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(data)
    return root


def _paths(root: Path) -> list[Path]:
    return sorted(root.glob("s*.h5"))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _same_run(a: Path, b: Path) -> None:
    ra = json.loads((a.parent / "report.json").read_text())
    rb = json.loads((b.parent / "report.json").read_text())
    assert ra.pop("bags")["mode"] == "memory"
    assert rb.pop("bags")["mode"] == "streamed"
    assert ra == rb
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("cache_bags", [0, 3, 100], ids=["no-lru", "small-lru", "lru-holds-all"])
def test_streamed_training_equals_in_memory(cohort: Path, tmp_path: Path, cache_bags: int) -> None:
    mem = train_mil(
        cohort / "cohort.csv", cohort, tmp_path / "m" / "head.pt", OPTS, bag_opts=BagOptions(False)
    )
    cache = cache_bags * 60 * 64 * 4  # bags of at most 60 x 64 float32
    streamed = train_mil(
        cohort / "cohort.csv",
        cohort,
        tmp_path / "s" / "head.pt",
        OPTS,
        bag_opts=BagOptions(stream=True, max_memory_bytes=cache),
    )
    _same_run(tmp_path / "m" / "head.pt", tmp_path / "s" / "head.pt")
    assert mem.oof_probs.keys() == streamed.oof_probs.keys()
    for s, att in mem.oof_attention.items():
        assert np.array_equal(att, streamed.oof_attention[s])


def test_cli_stream_flag_equals_in_memory(cohort: Path, tmp_path: Path) -> None:
    train_mil(cohort / "cohort.csv", cohort, tmp_path / "m" / "head.pt", OPTS)
    rc = histohelper_main(
        [
            "train-mil",
            str(cohort / "cohort.csv"),
            "--features",
            str(cohort),
            "--out",
            str(tmp_path / "s" / "head.pt"),
            "--stream",
            "--folds=3",
            "--max-epochs=4",
            "--patience=2",
            "--lr=1e-3",
            "--bootstrap=50",
            "--seed=3",
            "--no-plots",
        ]
    )
    assert rc == 0
    _same_run(tmp_path / "m" / "head.pt", tmp_path / "s" / "head.pt")


def test_memory_budget_picks_streaming(cohort: Path, tmp_path: Path) -> None:
    paths = _paths(cohort)
    total = sum(4 * 64 * len(b) for b in load_bags(paths))
    assert isinstance(open_bags(paths, BagOptions(max_memory_bytes=total)), InMemoryBags)
    assert isinstance(open_bags(paths), InMemoryBags)  # half of MemAvailable: fits
    src = open_bags(paths, BagOptions(max_memory_bytes=total - 1))
    assert isinstance(src, StreamedBags) and src.total_bytes == total
    assert isinstance(open_bags(paths, BagOptions(stream=False, max_memory_bytes=0)), InMemoryBags)
    # a train-mil run under that budget streams, and says so
    train_mil(
        cohort / "cohort.csv",
        cohort,
        tmp_path / "head.pt",
        OPTS,
        bag_opts=BagOptions(max_memory_bytes=total // 4),
    )
    bags = json.loads((tmp_path / "report.json").read_text())["bags"]
    assert bags == {"mode": "streamed", "total_bytes": total, "n_patches": total // 256}


def test_streamed_lru_stays_within_its_budget(cohort: Path) -> None:
    paths = _paths(cohort)
    ref = load_bags(paths)
    budget = 3 * 60 * 64 * 4
    src = StreamedBags(paths, cache_bytes=budget, prefetch=2)
    order = list(range(len(paths))) * 2 + [5, 5, 5]
    for i, bag in zip(order, src.iterate(order), strict=True):
        assert torch.equal(bag, ref[i])
        assert sum(4 * b.numel() for b in src._lru.values()) <= budget
    reads = src.reads
    assert torch.equal(src[19], ref[19]) and src.reads == reads  # recent: an LRU hit
    assert torch.equal(src[0], ref[0]) and src.reads == reads + 1  # evicted: read again
