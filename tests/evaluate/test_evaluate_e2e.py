"""``histohelper evaluate`` end to end through a real server process, against the same
artifact in-process on the same decoded + resized pixels."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from histohelper.cli import main
from histohelper.client import AsyncSlideClient, SlideClient
from histohelper.client.evaluate import evaluate_folder
from histohelper.v1 import slide_analysis_pb2 as pb

# (x_l0, y_l0, width, height, suffix): regions of CMU-1-Small-Region (2220 x 2967 px).
# Patches left of x = 1110 are labelled "benign", the others "malignant" (an arbitrary
# rule: the model is untrained; the figures only have to agree).
_SIZES = [(224, 224), (224, 224), (448, 448), (224, 224), (300, 300)]
_SUFFIXES = [".png", ".png", ".jpg", ".tif", ".png"]


def _regions() -> list[tuple[int, int, int, int, str]]:
    out = []
    k = 0
    for y in range(60, 2967 - 460, 400):
        for x in range(60, 2220 - 460, 330):
            w, h = _SIZES[k % len(_SIZES)]
            out.append((x, y, w, h, _SUFFIXES[k % len(_SUFFIXES)]))
            k += 1
    out.append((700, 900, 301, 157, ".png"))  # non-square, odd size (stretched by the server)
    out.append((1500, 1200, 97, 131, ".jpeg"))  # smaller than the model's patch (enlarged)
    return out


@pytest.fixture(scope="module")
def patch_folder(real_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patches")
    for cls in ("benign", "malignant"):
        (root / cls).mkdir()
    with openslide.OpenSlide(str(real_slide)) as slide:
        for x, y, w, h, suffix in _regions():
            rgba = np.asarray(slide.read_region((x, y), 0, (w, h)))
            bgr = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGR)
            cls = "benign" if x + w / 2 < 1110 else "malignant"
            ok, buf = cv2.imencode(suffix, bgr)
            assert ok
            (root / cls / f"x{x}_y{y}_{w}x{h}{suffix}").write_bytes(buf.tobytes())
    (root / "malignant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    (root / "benign" / "README.txt").write_text("not an image\n")
    return root


def _in_process(folder: Path, files: list[str], runtime) -> np.ndarray:
    """Decode and resize with the server's own helper, classify with the same artifact."""
    from histohelper.server.classify import decode_patch_image

    size = runtime.manifest.patch_size_px
    pixels = np.stack(
        [decode_patch_image(pb.PatchImage(encoded=(folder / f).read_bytes()), size) for f in files]
    )
    return runtime.predict_patches(pixels).probabilities


def test_evaluate_cli_matches_in_process(
    analysis_server, served_runtime, patch_folder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "report" / "evaluation.json"
    rc = main(
        [
            "evaluate",
            str(patch_folder),
            "--server",
            analysis_server.target,
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--bootstrap",
            "200",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out.read_text())
    n_regions = len(_regions())
    assert doc["n_images"] == n_regions + 1
    assert doc["n_classified"] == n_regions and doc["n_skipped"] == 1
    assert doc["skipped"][0]["file"] == "malignant/broken.png"
    assert doc["ignored"] == ["benign/README.txt"]
    assert doc["model"]["untrained"] is True and doc["positive_class"] == "malignant"
    assert doc["bootstrap"] == {
        "resamples": 200,
        "seed": 0,
        "confidence": 0.95,
        "method": "percentile",
        "unit": "patch",
        "units": n_regions,
    }

    # The same figures in-process: same artifact, same decode + resize, same labels.
    files = sorted(
        p.relative_to(patch_folder).as_posix()
        for p in patch_folder.rglob("*")
        if p.suffix != ".txt" and p.name != "broken.png" and p.is_file()
    )
    probs = _in_process(patch_folder, files, served_runtime)
    y_true = np.array([0 if f.startswith("benign/") else 1 for f in files])
    y_pred = probs.argmax(axis=1)
    cm = np.zeros((2, 2), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    assert doc["confusion_matrix"]["matrix"] == cm.tolist()
    tp, fn, tn, fp = cm[1, 1], cm[1, 0], cm[0, 0], cm[0, 1]
    assert doc["counts"] == {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
    assert doc["metrics"]["accuracy"]["value"] == pytest.approx((tp + tn) / cm.sum())
    assert "malignant/broken.png" in printed and "UNTRAINED" in printed.upper()
    print(json.dumps({"served": doc["confusion_matrix"]["matrix"], "in_process": cm.tolist()}))


def test_evaluate_probabilities_match_in_process(
    analysis_server, served_runtime, patch_folder: Path
) -> None:
    with SlideClient(analysis_server.target) as client:
        report = evaluate_folder(client, patch_folder, batch_size=5, n_bootstrap=0)
    probs = _in_process(patch_folder, list(report.files), served_runtime)
    diff = float(np.abs(report.probabilities - probs).max())
    assert diff < 1e-4, diff
    assert (report.probabilities.argmax(1) == probs.argmax(1)).all()
    margin = float(np.abs(probs[:, 1] - probs[:, 0]).min())
    print(f"max |p_served - p_in_process| = {diff:.2e}; smallest class margin {margin:.3f}")


def test_evaluate_unknown_class_is_a_clear_error(
    analysis_server, patch_folder: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "folder"
    (root / "benign").mkdir(parents=True)
    (root / "tumour").mkdir()
    src = next((patch_folder / "benign").glob("*.png"))
    (root / "benign" / "a.png").write_bytes(src.read_bytes())
    (root / "tumour" / "b.png").write_bytes(src.read_bytes())
    out = tmp_path / "r.json"
    rc = main(["evaluate", str(root), "--server", analysis_server.target, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'tumour'" in err and "benign, malignant" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--group-by", "subfolder"], "directly in a class folder"),
        (["--group-regex", "("], "--group-regex is not a regular expression"),
        (["--group-regex", "TCGA-(\\d+)"], "does not match"),
    ],
    ids=["flat-folder", "bad-regex", "no-match"],
)
def test_evaluate_grouping_errors_come_before_any_call(
    patch_folder: Path, tmp_path: Path, capsys, flags: list[str], says: str
) -> None:
    # No server listens on port 9: the error must come from the folder check first.
    rc = main(["evaluate", str(patch_folder), "--server", "127.0.0.1:9", "--quiet", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err, err


def test_evaluate_cli_groups_by_subfolder(analysis_server, patch_folder: Path, tmp_path: Path):
    root = tmp_path / "grouped"
    files = sorted(p for p in patch_folder.rglob("*.png") if p.name != "broken.png")
    for k, src in enumerate(files):
        rel = src.relative_to(patch_folder)
        dst = root / rel.parts[0] / f"slide-{k % 3}" / rel.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    out = tmp_path / "g.json"
    argv = ["evaluate", str(root), "--server", analysis_server.target, "--quiet"]
    assert main([*argv, "--group-by", "subfolder", "--bootstrap", "50", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["bootstrap"]["unit"] == "group" and doc["bootstrap"]["units"] == 3
    assert doc["n_classified"] == len(files)


def test_async_classify_matches_sync(analysis_server, patch_folder: Path) -> None:
    """AsyncSlideClient.classify: same answers as SlideClient.classify, plain or async
    input, in order; an error raised by the input comes after the answers so far."""
    files = sorted(p for p in patch_folder.rglob("*") if p.suffix != ".txt" and p.is_file())
    images = [(p.name, p.read_bytes()) for p in files]
    assert any(name == "broken.png" for name, _ in images)
    with SlideClient(analysis_server.target) as client:
        want = list(client.classify(images, batch_size=4))

    class InputBrokeError(RuntimeError):
        pass

    async def agen():
        for item in images:
            await asyncio.sleep(0)
            yield item

    def breaking():
        yield from images[:9]
        raise InputBrokeError("the folder went away")

    async def run():
        async with AsyncSlideClient(analysis_server.target, timeout=120) as client:
            plain = [p async for p in client.classify(images, batch_size=4)]
            streamed = [p async for p in client.classify(agen(), batch_size=3, max_in_flight=1)]
            partial = []
            with pytest.raises(InputBrokeError):
                async for p in client.classify(breaking(), batch_size=4):
                    partial.append(p)
            return plain, streamed, partial

    plain, streamed, partial = asyncio.run(run())
    for got in (plain, streamed):
        assert [p.id for p in got] == [p.id for p in want]
        assert [bool(p.error) for p in got] == [bool(p.error) for p in want]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    assert any(p.error for p in plain)
    # 9 images were read before the failure: the two full requests (8 images) were
    # sent and answered; the ninth, in a request not yet full, was not sent.
    assert [p.id for p in partial] == [p.id for p in want[:8]]
