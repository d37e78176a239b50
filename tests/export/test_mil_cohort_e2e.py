"""Issue 17 acceptance: serve -> features -> train-mil -> export the head -> serve it.

A synthetic cohort of 40 slides (20 patients, 2 slides each, one label per patient,
10 positive patients) is written with tifffile: pink/purple H&E-like noise with
scattered purple nuclei on white glass, tissue on whole cells of the 224 px (0.5 mpp)
patch grid. Each positive slide carries a planted morphology, dense dark-blue dots,
on 5 known grid cells (at most 10 % of its tissue patches); negatives never show it.

Features come from the session's UNTRAINED artifact (random seeded ResNet18) over a
real server; train-mil runs once through its API (held-out attention is exposed only
there, ``TrainResult.oof_attention``) and once with shuffled patient labels through
the command line.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import synthetic_slides as syn
import torch

h5py = pytest.importorskip("h5py")

from server_fixtures import spawn_server, stop_server  # noqa: E402

from histohelper.cli import main  # noqa: E402
from histohelper.model_export.modules import GatedAttentionMIL  # noqa: E402
from histohelper.model_export.train_mil import TrainOptions, train_mil  # noqa: E402

pytestmark = pytest.mark.slow

CELL = 224  # level-0 px of one patch: 224 px at 0.5 mpp on a 0.5 mpp slide
GRID_W, GRID_H = 10, 9  # slide of 2240 x 2016 px
N_PATIENTS = 20
N_PLANTED = 5
CLASSES = ("negative", "positive")
SEED = 0
OPTS = TrainOptions(folds=5, seed=SEED, max_epochs=40, patience=8, lr=1e-3, bootstrap=200)


def _tissue(h: int, w: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """Smooth pink/purple texture, pixel noise and sparse purple nuclei."""
    img = syn.tissue_rgb(h, w, seed=int(rng.integers(1 << 30))).astype(np.float32)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    img = img.clip(0, 255).astype(np.uint8)
    for _ in range(h * w // 2500):
        x, y = int(rng.integers(w)), int(rng.integers(h))
        cv2.circle(img, (x, y), int(rng.integers(3, 6)), (110, 50, 140), -1, cv2.LINE_AA)
    return img


def _plant(cell: npt.NDArray[np.uint8], rng: np.random.Generator) -> None:
    """Dense dark-blue dots over the whole cell (in place)."""
    for _ in range(260):
        x, y = int(rng.integers(CELL)), int(rng.integers(CELL))
        cv2.circle(cell, (x, y), int(rng.integers(4, 8)), (25, 30, 110), -1, cv2.LINE_AA)


def make_slide(path: Path, seed: int, positive: bool) -> tuple[set, set]:
    """Write one slide; returns (tissue cells, planted cells) as {(col, row)}."""
    rng = np.random.default_rng(seed)
    h, w = GRID_H * CELL, GRID_W * CELL
    img = syn.glass_rgb(h, w, seed=seed)
    cells = {(c, r) for c in range(1, 9) for r in range(1, 8)}  # 56 cells
    corners = [(1, 1), (8, 1), (1, 7), (8, 7)]
    for i in rng.choice(4, int(rng.integers(0, 5)), replace=False):
        cells.discard(corners[int(i)])
    tissue = _tissue(h, w, rng)
    for c, r in cells:
        sl = np.s_[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        img[sl] = tissue[sl]
    planted: set = set()
    if positive:
        order = sorted(cells)
        for i in rng.choice(len(order), N_PLANTED, replace=False):
            c, r = order[int(i)]
            planted.add((c, r))
            _plant(img[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL], rng)
    syn.write_slide(path, img, [(w // 4, h // 4), (w // 16, h // 16)], compression="jpeg")
    return cells, planted


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mil_cohort")
    slide_root = root / "slides"
    (slide_root / "cohort").mkdir(parents=True)
    rows, planted, tissue = [], {}, {}
    for p in range(N_PATIENTS):
        label = CLASSES[p % 2]
        for k in range(2):
            slide = f"cohort/p{p:02d}-s{k}.tiff"
            cells, plant = make_slide(slide_root / slide, 1000 + 2 * p + k, label == "positive")
            rows.append((slide, label, f"patient-{p:02d}"))
            planted[slide], tissue[slide] = plant, cells
    csv_path = root / "cohort.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "label", "patient"])
        w.writerows(rows)
    return {
        "root": root,
        "slide_root": slide_root,
        "csv": csv_path,
        "rows": rows,
        "planted": planted,
        "tissue": tissue,
    }


@pytest.fixture(scope="module")
def features(cohort: dict, model_artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    server = spawn_server(model_artifact, cohort["slide_root"], tmp_path_factory.mktemp("srv"))
    try:
        out = cohort["root"] / "features"
        code = main(
            [
                "features",
                str(cohort["csv"]),
                "--server",
                server.target,
                "--out",
                str(out),
                "--jobs",
                "2",
                "--quiet",
            ]
        )
    finally:
        stop_server(server)
    assert code == 0
    return out


def _bag(features_dir: Path, slide: str) -> tuple[np.ndarray, np.ndarray]:
    with open(features_dir / "features_index.csv", newline="") as fh:
        name = {r["slide"]: r["file"] for r in csv.DictReader(fh)}[slide]
    with h5py.File(features_dir / name, "r") as f:
        return np.asarray(f["features"]), np.asarray(f["coords"])


def test_cohort_e2e(cohort: dict, features: Path, model_artifact: Path, tmp_path: Path) -> None:
    # the bags are the tissue cells, on the grid
    for slide, _, _ in cohort["rows"]:
        feats, coords = _bag(features, slide)
        assert feats.shape == (len(coords), 512)
        assert {(int(x) // CELL, int(y) // CELL) for x, y in coords} == cohort["tissue"][slide]
        assert len(cohort["planted"][slide]) <= 0.1 * len(coords)

    run = tmp_path / "run"
    result = train_mil(cohort["csv"], features, run / "mil_head.pt", OPTS)
    report = json.loads((run / "report.json").read_text())
    auc = report["pooled_out_of_fold"]["auc"]["value"]
    print(f"out-of-fold AUC {auc}")
    assert auc >= 0.90

    hits = []
    for slide, label, _ in cohort["rows"]:
        if label != "positive":
            continue
        _, coords = _bag(features, slide)
        att = result.oof_attention[slide]
        top = np.argsort(-att, kind="stable")[:5]
        cells = {(int(coords[i, 0]) // CELL, int(coords[i, 1]) // CELL) for i in top}
        hits.append(cells <= cohort["planted"][slide])
    print(f"attention hit rate {np.mean(hits):.3f} over {len(hits)} positive slides")
    assert np.mean(hits) >= 0.80

    # shuffled patient labels, through the command line
    rng = np.random.default_rng(SEED)
    patients = sorted({p for _, _, p in cohort["rows"]})
    labels = [CLASSES[i % 2] for i in range(len(patients))]
    shuffled = dict(zip(patients, rng.permutation(labels), strict=True))
    sh_csv = tmp_path / "shuffled.csv"
    with sh_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "label", "patient"])
        w.writerows((s, shuffled[p], p) for s, _, p in cohort["rows"])
    sh = tmp_path / "shuffled"
    code = main(
        [
            "train-mil",
            str(sh_csv),
            "--features",
            str(features),
            "--out",
            str(sh / "mil_head.pt"),
            "--folds",
            "5",
            "--seed",
            str(SEED),
            "--max-epochs",
            str(OPTS.max_epochs),
            "--patience",
            str(OPTS.patience),
            "--lr",
            str(OPTS.lr),
            "--bootstrap",
            "200",
            "--no-plots",
        ]
    )
    assert code == 0
    sh_auc = json.loads((sh / "report.json").read_text())["pooled_out_of_fold"]["auc"]["value"]
    print(f"shuffled-label AUC {sh_auc}")
    assert sh_auc <= 0.70

    # export with the head (same patch weights: seed 0), serve in fp32, compare
    artifact = tmp_path / "trained.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(
            [
                "export",
                str(artifact),
                "--mil-weights",
                str(run / "mil_head.pt"),
                "--slide-classes",
                *CLASSES,
                "--seed",
                "0",
                "--variants",
            ]
        )
    assert code == 0
    ckpt = torch.load(run / "mil_head.pt", map_location="cpu", weights_only=True)
    head = GatedAttentionMIL(512, OPTS.attention_dim, len(CLASSES))
    head.load_state_dict(ckpt["state_dict"])
    head.eval()
    slide = next(s for s, lbl, _ in cohort["rows"] if lbl == "positive")
    feats, _ = _bag(features, slide)
    with torch.no_grad():
        logits, _ = head(torch.from_numpy(feats))
        expected = torch.softmax(logits, 0).double().numpy()

    from histohelper.client.sync import SlideClient

    (tmp_path / "srv2").mkdir()
    server = spawn_server(artifact, cohort["slide_root"], tmp_path / "srv2")
    try:
        with SlideClient(server.target) as client:
            info = client.get_model_info()
            res = client.analyze(slide)
    finally:
        stop_server(server)
    assert "mil" not in info.manifest.get("untrained_parts", [])
    assert res.prediction is not None
    served = np.array(res.prediction.probabilities)
    diff = float(np.abs(served - expected).max())
    print(f"served vs in-process max |dp| {diff:.2e}")
    assert diff <= 1e-5
