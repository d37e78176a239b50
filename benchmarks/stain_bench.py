"""Cost and effect of stain normalisation (issue 21), measured side by side in one run.

Three parts, each with its sides alternated within every round (rotating order), so a
slow or fast minute of the shared host lands on every side:

1. **Per patch, own code vs library** (224 px patches of ``CMU-1-Small-Region.svs``,
   batches of 32): this project's Macenko and Reinhard ``apply`` (server/tiling/stain.py,
   the slide's statistics fitted once) against torchstain 1.4.1's numpy backend:
   ``MacenkoNormalizer.normalize`` (its only public per-patch call: it refits the stains
   on every patch), its apply steps alone (OD, ``lstsq`` on the slide's matrix, ``exp``,
   through its private methods: what a fit-once use would cost) and
   ``ReinhardNormalizer.normalize`` (CIE Lab). Plus the per-slide fit on the tissue mask's
   pixels, own vs torchstain.
2. **Reading cost per patch, ratio to off**: ``PatchReader`` over the real slide's grid
   (stride 56 px: 655 patches) without normalisation, with Macenko and with Reinhard
   (the fitted normalizer applied on the reader threads), patches/s.
3. **Served effect and cost**: a real server on loopback (this tree, the seeded
   UNTRAINED artifact, fp32 TorchScript), the real slide and its HED-jittered copy
   (tests/stain_support.py, H x1.35, E x0.65): mean cosine of the served embeddings and
   mean absolute probability difference between the copies, off vs Macenko vs
   Reinhard; and AnalyzeSlide patches/s of the real slide per method (ratio to off).

Usage: ``.venv/bin/python benchmarks/stain_bench.py [--rounds 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from ab_throughput import SOURCE_SLIDE, report  # noqa: E402
from stain_support import PERTURBATION, measure_agreement, write_perturbed_copy  # noqa: E402

from histohelper.server.tiling import (  # noqa: E402
    PatchReader,
    Resolution,
    TilingOptions,
    open_slide,
    plan_tiling,
)
from histohelper.server.tiling import stain as st  # noqa: E402

METHODS = ("macenko", "reinhard")


def _log(msg: str) -> None:
    print(f"[stain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rotated(sides: list[str], r: int) -> list[str]:
    k = r % len(sides)
    return sides[k:] + sides[:k]


def _time(fn: Callable[[], object], repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _patches(slide: Path, n: int = 32) -> np.ndarray:
    """``[n, 224, 224, 3]`` uint8 tissue patches of the slide (grid order)."""
    with open_slide(slide) as s:
        plan = plan_tiling(s, TilingOptions(target=Resolution(0.5)))
    images = [b.images for b in PatchReader(slide, plan.grid, batch_size=n).iter_batches()]
    return np.concatenate(images)[:n]


def per_patch(slide: Path, rounds: int) -> tuple[dict[str, Any], list[str]]:
    """Part 1: ms per 224 px patch of each implementation, and the per-slide fit."""
    import torchstain

    with open_slide(slide) as s:
        plan = plan_tiling(s, TilingOptions())
    tissue = plan.tissue_rgb
    images = _patches(slide)
    fitted = {m: st.fit_stain(m, tissue) for m in METHODS}
    own = {m: st.StainNormalizer(m, fitted[m], st.PUBLISHED[m]) for m in METHODS}
    ts_mac = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts_mac.HERef = np.asarray(st.PUBLISHED["macenko"].stain_matrix).reshape(2, 3).T
    ts_mac.maxCRef = np.asarray(st.PUBLISHED["macenko"].max_concentrations)
    ts_rein = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    ts_rein.fit(tissue.reshape(-1, 1, 3))
    he_slide = np.asarray(fitted["macenko"].stain_matrix).reshape(2, 3).T
    max_slide = np.asarray(fitted["macenko"].max_concentrations)

    def ts_apply_only(img: np.ndarray) -> np.ndarray:
        # torchstain's own steps with the slide's fitted matrix (no per-patch fit).
        od, _ = ts_mac._NumpyMacenkoNormalizer__convert_rgb2od(img.reshape(-1, 3))
        c = ts_mac._NumpyMacenkoNormalizer__find_concentration(od, he_slide)
        c2 = c / (max_slide / ts_mac.maxCRef)[:, None]
        out = np.minimum(240 * np.exp(-ts_mac.HERef.dot(c2)), 255)
        return out.T.reshape(img.shape).astype(np.uint8)

    sides: dict[str, Callable[[], object]] = {
        "own macenko": lambda: own["macenko"](images),
        "own reinhard": lambda: own["reinhard"](images),
        "torchstain macenko normalize": lambda: [ts_mac.normalize(i, stains=False) for i in images],
        "torchstain macenko apply-only": lambda: [ts_apply_only(i) for i in images],
        "torchstain reinhard normalize": lambda: [ts_rein.normalize(i) for i in images],
    }
    ms: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(rounds):
        for name in _rotated(list(sides), r):
            ms[name].append(1e3 * _time(sides[name]) / len(images))
    fit_ms = {
        "own macenko fit": [1e3 * _time(lambda: st.fit_stain("macenko", tissue)) for _ in range(3)],
        "torchstain macenko fit": [
            1e3 * _time(lambda: ts_mac.fit(tissue.reshape(-1, 1, 3))) for _ in range(3)
        ],
        "own reinhard fit": [
            1e3 * _time(lambda: st.fit_stain("reinhard", tissue)) for _ in range(3)
        ],
    }
    med = {k: round(statistics.median(v), 3) for k, v in ms.items()}
    fits = {k: round(statistics.median(v), 1) for k, v in fit_ms.items()}
    lines = [f"part 1: ms per 224 px patch (batches of {len(images)}, median of {rounds} rounds)"]
    lines += [f"  {k:<32} {v:>8.3f} ms" for k, v in med.items()]
    lines.append(
        f"  torchstain normalize / own macenko: "
        f"{med['torchstain macenko normalize'] / med['own macenko']:.1f}x; apply-only / own: "
        f"{med['torchstain macenko apply-only'] / med['own macenko']:.1f}x"
    )
    lines.append(f"  per-slide fit on {tissue.shape[0]} tissue px of the mask level:")
    lines += [f"  {k:<32} {v:>8.1f} ms" for k, v in fits.items()]
    return {"per_patch_ms": med, "fit_ms": fits, "tissue_px": int(tissue.shape[0])}, lines


def reading(slide: Path, rounds: int) -> tuple[dict[str, Any], list[str]]:
    """Part 2: PatchReader patches/s over the real slide's grid, per method."""
    with open_slide(slide) as s:
        plan = plan_tiling(s, TilingOptions(stride_px=56))
    normalizers: dict[str, Any] = {"off": None}
    for m in METHODS:
        normalizers[m] = st.StainNormalizer(m, st.fit_stain(m, plan.tissue_rgb), st.PUBLISHED[m])
    rates: dict[str, list[float]] = {k: [] for k in normalizers}
    n = len(plan.grid)
    for r in range(rounds):
        for name in _rotated(list(normalizers), r):
            reader = PatchReader(
                slide, plan.grid, batch_size=32, num_workers=2, transform=normalizers[name]
            )
            t = _time(lambda reader=reader: sum(len(b) for b in reader.iter_batches()))
            rates[name].append(n / t)
    ratios = {
        m: round(statistics.median([x / o for x, o in zip(rates[m], rates["off"], strict=True)]), 3)
        for m in METHODS
    }
    med = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    lines = [f"part 2: PatchReader over {n} patches (2 threads), patches/s, median of {rounds}"]
    lines += [
        f"  {k:<9} {med[k]:>8.1f} p/s" + (f"  ratio to off {ratios[k]:.3f}" if k in ratios else "")
        for k in med
    ]
    return {"reader_patches_per_s": med, "reader_ratio_to_off": ratios, "patches": n}, lines


def served(
    artifact: Path, rounds: int, precision: str = "fp32"
) -> tuple[dict[str, Any], list[str]]:
    """Part 3: the measured effect through a real server, and AnalyzeSlide patches/s."""
    from histohelper.client import AnalysisOptions, SlideClient
    from histohelper.server.app import start_server
    from histohelper.server.config import ServerConfig

    root = Path(tempfile.mkdtemp(prefix="stain-bench-"))
    try:
        shutil.copyfile(SOURCE_SLIDE, root / "original.svs")
        write_perturbed_copy(Path(SOURCE_SLIDE), root / "perturbed.tif", PERTURBATION)
        config = ServerConfig(
            model_path=artifact, slide_root=root, port=0, precision=precision, grace_s=2.0
        )
        running = start_server(config)
        engine, precision_served = running.worker.runtime.engine, running.worker.runtime.precision
        try:
            with SlideClient(f"127.0.0.1:{running.port}") as client:
                effect = {
                    str(m or "off"): measure_agreement(client, "original.svs", "perturbed.tif", m)
                    for m in (None, *METHODS)
                }
                sides = ["off", *METHODS]
                rates: dict[str, list[float]] = {k: [] for k in sides}
                for r in range(rounds):
                    for name in _rotated(sides, r):
                        opts = AnalysisOptions(
                            return_attention=False,
                            stain_normalization="none" if name == "off" else name,
                        )  # type: ignore[arg-type]
                        res = client.analyze("original.svs", opts)
                        rates[name].append(res.patch_count / res.timings.total_s)
        finally:
            running.stop(grace=0, drain=0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = {
        m: round(statistics.median([x / o for x, o in zip(rates[m], rates["off"], strict=True)]), 3)
        for m in METHODS
    }
    lines = [
        f"part 3: served, original vs HED-jittered copy (H x{PERTURBATION.scale[0]}, "
        f"E x{PERTURBATION.scale[1]}), {int(effect['off']['cells'])} cells",
        f"  {'method':<9} {'cosine':>9} {'1-cosine':>9} {'centred cos':>11} {'|dp| mean':>9}",
    ]
    for k, f in effect.items():
        lines.append(
            f"  {k:<9} {f['cosine']:>9.6f} {1 - f['cosine']:>9.2e} {f['centred_cosine']:>11.4f} "
            f"{f['prob_abs_diff']:>9.5f}"
        )
    lines.append(f"  AnalyzeSlide patches/s (median of {rounds}), ratio to off:")
    lines += [
        f"  {k:<9} {statistics.median(v):>8.2f} p/s"
        + (f"  ratio {ratios[k]:.3f}" if k in ratios else "")
        for k, v in rates.items()
    ]
    return {
        "engine": engine,
        "precision": precision_served,
        "effect": effect,
        "served_patches_per_s": {k: round(statistics.median(v), 2) for k, v in rates.items()},
        "served_ratio_to_off": ratios,
    }, lines


def _artifact(cache: Path) -> Path:
    """The seeded UNTRAINED model (seed 0, fp32 TorchScript only), exported once."""
    out = cache / "stain-bench" / "histohelper-untrained.pt"
    if not out.exists():
        import warnings

        from histohelper.model_export.export import export_model

        out.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_model(out, seed=0, variants=(), onnx=False, calibration_patches=16)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "histohelper-bench"
    )
    parser.add_argument(
        "--artifact",
        type=Path,
        help="model artifact of part 3 (default: a seeded untrained fp32 TorchScript export)",
    )
    parser.add_argument(
        "--precision", default="fp32", help="serve precision of part 3 (auto, int8, ...)"
    )
    parser.add_argument(
        "--parts", default="1,2,3", help="which parts to run, comma-separated (default: all)"
    )
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    slide = Path(SOURCE_SLIDE)
    figures: dict[str, Any] = {"load_avg_start": os.getloadavg()}
    lines: list[str] = []
    for number, part in ((1, per_patch), (2, reading)):
        if number not in parts:
            continue
        _log(part.__name__)
        f, text = part(slide, args.rounds)
        figures.update(f)
        lines += text
    if 3 in parts:
        _log("served")
        artifact = args.artifact or _artifact(args.cache)
        f, text = served(artifact, args.rounds, args.precision)
        figures.update(f)
        lines += [text[0], f"  engine {f['engine']}, precision {f['precision']}", *text[1:]]
    figures["load_avg_end"] = os.getloadavg()
    return report(figures, lines, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
