"""Maths of the eager model: gated attention MIL (Ilse et al. 2018) and CAMs (Zhou et al. 2016)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from histohelper.model_export.modules import GatedAttentionMIL, HistoHelperModel


@pytest.fixture(scope="module")
def mil() -> GatedAttentionMIL:
    torch.manual_seed(0)
    return GatedAttentionMIL(512, 128, 3).eval()


def _bag(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)).abs()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 10_000), scale=st.floats(0.01, 50.0))
def test_attention_is_a_distribution(
    mil: GatedAttentionMIL, n: int, seed: int, scale: float
) -> None:
    with torch.no_grad():
        logits, att = mil(_bag(n, seed) * scale)
    assert att.shape == (n,) and logits.shape == (3,)
    assert (att >= 0).all()
    assert torch.isfinite(logits).all()
    assert abs(float(att.double().sum()) - 1.0) < 1e-5


def test_matches_ilse_gated_attention_formula(mil: GatedAttentionMIL) -> None:
    h = _bag(17, 3)
    v, u, w, c = mil.attention_V[0], mil.attention_U[0], mil.attention_weights, mil.classifier
    with torch.no_grad():
        a = (
            torch.tanh(h @ v.weight.T + v.bias) * torch.sigmoid(h @ u.weight.T + u.bias)
        ) @ w.weight.T
        a = torch.softmax(a.squeeze(1) + w.bias, 0)
        z = (a[:, None] * h).sum(0)
        expected = c.weight @ z + c.bias
        logits, att = mil(h)
    torch.testing.assert_close(att, a)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("n", [2, 7, 513], ids=lambda n: f"n{n}")
def test_permutation_invariance(mil: GatedAttentionMIL, n: int) -> None:
    h = _bag(n, 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, att = mil(h)
        logits_p, att_p = mil(h[perm])
    torch.testing.assert_close(logits_p, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att_p, att[perm])


def test_bag_of_one(mil: GatedAttentionMIL) -> None:
    h = _bag(1, 5)
    with torch.no_grad():
        logits, att = mil(h)
        expected = mil.classifier(h[0])
    assert att.tolist() == [1.0]
    torch.testing.assert_close(logits, expected)


def test_empty_bag_raises_not_nan(mil: GatedAttentionMIL) -> None:
    with pytest.raises(RuntimeError, match="EmptyBag"):
        mil(torch.zeros(0, 512))


def test_identical_instances_get_equal_attention(mil: GatedAttentionMIL) -> None:
    h = _bag(1, 9).repeat(10, 1)
    with torch.no_grad():
        _, att = mil(h)
    torch.testing.assert_close(att, torch.full((10,), 0.1))


@pytest.fixture(scope="module")
def model() -> HistoHelperModel:
    torch.manual_seed(0)
    return HistoHelperModel().eval()


def test_cams_average_to_logits(model: HistoHelperModel) -> None:
    """CAM (Zhou et al. 2016): mean over h, w of cams[c] plus fc.bias[c] is logit c."""
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        logits, emb, cams = model.predict_patches_uint8(x, True)
    assert cams is not None and cams.shape == (2, 2, 7, 7)
    assert emb.shape == (2, 512) and (emb >= 0).all()
    torch.testing.assert_close(
        cams.mean((2, 3)) + model.patch.fc.bias, logits, atol=1e-4, rtol=1e-4
    )


def test_relu_cams_equal_grad_cam(model: HistoHelperModel) -> None:
    """Grad-CAM (Selvaraju et al. 2017) at layer4 = relu(cams) / (h * w) for GAP + linear."""
    x = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        _, _, cams = model.predict_patches_uint8(x, True)
    assert cams is not None
    fmap = model._features(model.normalise_uint8(x)).detach().requires_grad_(True)
    logits = model.patch.fc(torch.flatten(model.patch.avgpool(fmap), 1))
    for c in range(2):
        (grad,) = torch.autograd.grad(logits[0, c], fmap, retain_graph=True)
        alpha = grad.mean((2, 3), keepdim=True)  # Grad-CAM channel weights
        grad_cam = torch.relu((alpha * fmap).sum(1))[0]
        torch.testing.assert_close(grad_cam, torch.relu(cams[0, c]) / 49, atol=1e-5, rtol=1e-4)


def test_uint8_entry_equals_float_entry(model: HistoHelperModel) -> None:
    """The uint8 NHWC entry normalises exactly as the manifest says: (x/255 - mean)/std."""
    x = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    xf = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        a = model.predict_patches_uint8(x)[0]
        b = model.predict_patches_nchw(xf)[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_preprocessing_yields_channels_last_without_copy(model: HistoHelperModel) -> None:
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert x.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last)
    assert model.normalise_uint8(x).is_contiguous(memory_format=torch.channels_last)
