"""Stain normalisation maths (server/tiling/stain.py) on synthetic H&E pixels made from
known hematoxylin and eosin concentrations (Beer-Lambert: ``I = 240 exp(-c @ HE) - 1``)."""

from __future__ import annotations

import json
import math

import numpy as np
import numpy.typing as npt
import pytest

from histohelper.errors import InvalidOptionsError
from histohelper.server.tiling import stain as st

IO = st.MACENKO_IO


def _unit(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def _he_image(
    he: npt.NDArray[np.float64], n: int = 120_000, seed: int = 0, c_scale=(1.0, 1.0)
) -> npt.NDArray[np.uint8]:
    """``[n, 3]`` uint8 pixels: a third mostly H, a third mostly E, a third mixed."""
    rng = np.random.default_rng(seed)
    c = np.zeros((n, 2))
    kind = rng.integers(0, 3, n)
    c[kind == 0, 0] = rng.uniform(0.2, 2.0, (kind == 0).sum())
    c[kind == 1, 1] = rng.uniform(0.2, 1.2, (kind == 1).sum())
    c[kind == 2] = rng.uniform(0.2, 1.0, ((kind == 2).sum(), 2))
    c *= np.asarray(c_scale)
    od = c @ _unit(he)
    return np.clip(np.rint(IO * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def _angle_deg(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    return math.degrees(math.acos(min(1.0, cos)))


PUBLISHED_HE = np.asarray(st.PUBLISHED["macenko"].stain_matrix).reshape(2, 3)
#: Another lab's stains (each channel's OD >= 0.15 somewhere, as Macenko's fit needs).
OTHER_HE = np.array([[0.70, 0.65, 0.30], [0.25, 0.85, 0.46]])


def test_registry_lists_the_methods_and_refuses_unknown_ones() -> None:
    assert st.stain_methods() == ("macenko", "reinhard")
    with pytest.raises(InvalidOptionsError, match="unknown stain method 'vahadane'"):
        st.get_stain_method("vahadane")


@pytest.mark.parametrize("he", [PUBLISHED_HE, OTHER_HE], ids=["published", "other-lab"])
def test_macenko_recovers_a_known_stain_matrix(he: npt.NDArray[np.float64]) -> None:
    fitted = st.fit_stain("macenko", _he_image(he))
    got = np.asarray(fitted.stain_matrix).reshape(2, 3)
    for row, (h_or_e, want) in enumerate(zip(("H", "E"), _unit(he), strict=True)):
        assert _angle_deg(got[row], want) < 1.0, h_or_e
    # The 99th percentile of the drawn concentrations (H up to 2.0, E up to 1.2).
    assert fitted.max_concentrations == pytest.approx((1.93, 1.16), rel=0.05)


def test_own_macenko_fit_equals_torchstains() -> None:
    torchstain = pytest.importorskip("torchstain", reason="torchstain is in the dev extra")
    pixels = _he_image(OTHER_HE, seed=3)
    ours = st.fit_stain("macenko", pixels)
    theirs = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    theirs.fit(pixels.reshape(-1, 1, 3))
    np.testing.assert_allclose(
        np.asarray(ours.stain_matrix).reshape(2, 3), theirs.HERef.T, atol=1e-6
    )
    np.testing.assert_allclose(ours.max_concentrations, theirs.maxCRef, rtol=1e-6)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalising_onto_its_own_statistics_changes_little(method: str) -> None:
    image = _he_image(OTHER_HE, n=224 * 224).reshape(224, 224, 3)
    fitted = st.fit_stain(method, image)
    out = st.StainNormalizer(method, fitted, fitted)(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).mean() < 1.0


def test_macenko_output_refits_to_the_target() -> None:
    source = _he_image(OTHER_HE, c_scale=(0.6, 1.4))
    fitted = st.fit_stain("macenko", source)
    out = st.StainNormalizer("macenko", fitted, st.PUBLISHED["macenko"])(source)
    refit = st.fit_stain("macenko", out)
    got = np.asarray(refit.stain_matrix).reshape(2, 3)
    for row in range(2):
        assert _angle_deg(got[row], PUBLISHED_HE[row]) < 2.0
    assert refit.max_concentrations == pytest.approx(
        st.PUBLISHED["macenko"].max_concentrations, rel=0.05
    )
    # Applying twice is (nearly) applying once: the output already has the target's stats.
    again = st.StainNormalizer("macenko", refit, st.PUBLISHED["macenko"])(out)
    assert np.abs(again.astype(int) - out).mean() < 2.0


def test_reinhard_output_has_the_target_statistics() -> None:
    source = _he_image(OTHER_HE, c_scale=(0.6, 1.4))
    fitted = st.fit_stain("reinhard", source)
    target = st.PUBLISHED["reinhard"]
    out = st.StainNormalizer("reinhard", fitted, target)(source)
    refit = st.fit_stain("reinhard", out)
    np.testing.assert_allclose(refit.means, target.means, atol=0.02)
    np.testing.assert_allclose(refit.stds, target.stds, rtol=0.1)


def test_reinhard_lab_matches_histomicstks_definition() -> None:
    """l-alpha-beta of white and of a pure channel, worked out by hand from the
    matrices (RGB 0..255 -> LMS, natural log, Ruderman's rotation)."""
    lab = st.rgb_to_lab(np.array([[255, 255, 255]], np.uint8))[0]
    # LMS of white is 255 times each row's sum (1.0, 0.9993, 0.9973).
    logs = np.log(255 * st.RGB2LMS.sum(axis=1))
    assert lab[0] == pytest.approx(logs.sum() / math.sqrt(3))
    assert lab[1] == pytest.approx((logs[0] + logs[1] - 2 * logs[2]) / math.sqrt(6))
    assert lab[2] == pytest.approx((logs[0] - logs[1]) / math.sqrt(2))


def test_macenko_undoes_a_change_of_stain_strength() -> None:
    """The same tissue stained differently (H at 60 %, E at 140 %), normalised with the
    original as the reference, ends much closer to the original."""
    a = _he_image(PUBLISHED_HE, seed=5)
    b = _he_image(PUBLISHED_HE, seed=5, c_scale=(0.6, 1.4))
    nb = st.StainNormalizer("macenko", st.fit_stain("macenko", b), st.fit_stain("macenko", a))(b)
    assert np.abs(a.astype(int) - nb).mean() < 0.5 * np.abs(a.astype(int) - b).mean()


def test_reinhard_undoes_a_colour_cast() -> None:
    """A global cast (scanner lighting: red x 0.9, blue x 1.1) is undone by matching the
    l-alpha-beta statistics to the original's. (A change of one stain's strength is
    not: Reinhard moves all colours together; see the README's measured figures.)"""
    a = _he_image(PUBLISHED_HE, seed=5)
    b = np.clip(np.rint(a * np.array([0.9, 1.0, 1.1])), 0, 255).astype(np.uint8)
    nb = st.StainNormalizer("reinhard", st.fit_stain("reinhard", b), st.fit_stain("reinhard", a))(b)
    assert np.abs(a.astype(int) - nb).mean() < 0.5 * np.abs(a.astype(int) - b).mean()


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_too_few_tissue_pixels_is_a_warning_not_an_error(method: str) -> None:
    few = _he_image(PUBLISHED_HE, n=100)
    with pytest.raises(st.StainFitError, match="at least 500"):
        st.fit_stain(method, few)
    choice = st.StainChoice(method, "published", "request", st.PUBLISHED[method])
    normalizer, applied = st.fit_normalizer(choice, few)
    assert normalizer is None
    assert applied.method == "none" and applied.source == "request"
    assert f"{method} stain normalisation not applied" in applied.warning


def test_glass_alone_cannot_be_fitted() -> None:
    glass = np.full((10_000, 3), 236, np.uint8)
    with pytest.raises(st.StainFitError):
        st.fit_stain("macenko", glass)


def test_reference_image_round_trip(tmp_path) -> None:
    """A reference image (PNG with glass around the tissue) -> targets -> JSON (as in a
    manifest) -> targets; the Macenko target is the stains it was drawn from."""
    import cv2

    tissue = _he_image(OTHER_HE, n=200 * 300).reshape(200, 300, 3)
    image = np.full((300, 400, 3), 242, np.uint8)
    image[50:250, 50:350] = tissue
    path = tmp_path / "reference.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    targets = st.reference_targets(st.read_reference_image(path))
    assert set(targets) == {"macenko", "reinhard"}
    got = np.asarray(targets["macenko"].stain_matrix).reshape(2, 3)
    assert _angle_deg(got[0], OTHER_HE[0]) < 1.0 and _angle_deg(got[1], OTHER_HE[1]) < 1.0
    text = json.dumps({k: v.as_dict() for k, v in targets.items()})
    back = {k: st.StainStats.from_dict(v) for k, v in json.loads(text).items()}
    assert back == targets


def test_unreadable_reference_image_is_refused(tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InvalidOptionsError, match="could not be read"):
        st.read_reference_image(bad)


def test_stats_from_dict_refuses_unknown_keys_and_nan() -> None:
    with pytest.raises(InvalidOptionsError, match="unknown stain statistics"):
        st.StainStats.from_dict({"matrix": [1.0]})
    with pytest.raises(InvalidOptionsError, match="finite"):
        st.StainStats.from_dict({"means": [float("nan"), 0.0, 0.0]})


def test_empty_batch_passes_through() -> None:
    n = st.StainNormalizer("macenko", st.PUBLISHED["macenko"], st.PUBLISHED["macenko"])
    empty = np.zeros((0, 224, 224, 3), np.uint8)
    assert n(empty) is empty
