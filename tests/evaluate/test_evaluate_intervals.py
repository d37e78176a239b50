"""Intervals of proportions: Clopper-Pearson against the exact binomial and published
values, at 0 and 1 (where a percentile bootstrap collapses), and with grouped patches."""

from __future__ import annotations

import numpy as np
import pytest

from histohelper.client.evaluate import compute_metrics, format_metrics
from histohelper.client.intervals import clopper_pearson, effective_count

CLASSES = ("benign", "malignant")


def _binary(tp: int, fn: int, tn: int, fp: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.array([1] * (tp + fn) + [0] * (tn + fp))
    pred = np.array([1] * tp + [0] * fn + [0] * tn + [1] * fp)
    return y, np.where(pred[:, None] == np.arange(2), 0.9, 0.1)


def test_zero_and_all_of_twelve_match_the_exact_binomial() -> None:
    """0/12: upper = 1 - 0.025^(1/12) (the p at which P(X = 0) = 0.025); 12/12 mirrors it."""
    upper = 1 - 0.025 ** (1 / 12)
    assert upper == pytest.approx(0.264648, abs=1e-6)
    assert clopper_pearson(0, 12) == pytest.approx((0.0, upper), abs=1e-12)
    assert clopper_pearson(12, 12) == pytest.approx((1 - upper, 1.0), abs=1e-12)
    # The defining property: the binomial tail at each limit is alpha / 2.
    from scipy.stats import binom

    lo, hi = clopper_pearson(7, 12)
    assert binom.sf(6, 12, lo) == pytest.approx(0.025, abs=1e-9)  # P(X >= 7 | lo)
    assert binom.cdf(7, 12, hi) == pytest.approx(0.025, abs=1e-9)  # P(X <= 7 | hi)


@pytest.mark.parametrize(
    ("x", "n", "want"),
    [
        pytest.param(81, 263, (0.2527, 0.3676), id="81-of-263"),
        pytest.param(15, 148, (0.0578, 0.1617), id="15-of-148"),
        pytest.param(0, 20, (0.0, 0.1684), id="0-of-20"),
        pytest.param(1, 29, (0.0009, 0.1776), id="1-of-29"),
    ],
)
def test_published_exact_intervals(x: int, n: int, want: tuple[float, float]) -> None:
    """Newcombe, Statistics in Medicine 17:857-872 (1998), table II, method 5 (exact)."""
    assert clopper_pearson(x, n) == pytest.approx(want, abs=5e-5)


def test_sensitivity_of_zero_of_twelve_is_not_a_point() -> None:
    """The issue's case: 12 positives, none found. Bootstrap gave [0.00, 0.00]."""
    y, probs = _binary(tp=0, fn=12, tn=30, fp=0)
    m = compute_metrics(y, probs, CLASSES, "malignant", n_bootstrap=200, seed=0)
    sens, spec = m.estimates["sensitivity"], m.estimates["specificity"]
    assert (sens.value, sens.ci_low, sens.method) == (0.0, 0.0, "clopper-pearson")
    assert sens.ci_high == pytest.approx(1 - 0.025 ** (1 / 12))
    assert (spec.value, spec.ci_high) == (1.0, 1.0)
    assert spec.ci_low == pytest.approx(0.025 ** (1 / 30))
    assert m.estimates["npv"].value == pytest.approx(30 / 42)
    assert m.estimates["precision"].value is None  # nothing predicted positive
    assert m.estimates["roc_auc"].method == "percentile bootstrap"
    text = "\n".join(format_metrics(m))
    assert "[0.00, 26.46]" in text and "Clopper-Pearson exact binomial" in text
    assert "percentile bootstrap, 200 resamples" in text
    assert "bootstrap interval of F1 and ROC AUC has width 0" in text  # said, not hidden


def test_effective_count_of_groups() -> None:
    """Singleton groups: no design effect. Four slides all right or all wrong: the
    effective n is far below the 100 patches."""
    rng = np.random.default_rng(0)
    success = rng.random(50) < 0.3
    singletons = [np.array([i]) for i in range(50)]
    assert effective_count(success, singletons) == pytest.approx((success.sum(), 50))
    slides = np.repeat([True, False, True, False], 25)
    members = [np.arange(25 * g, 25 * g + 25) for g in range(4)]
    x, n = effective_count(slides, members)
    assert x == pytest.approx(n / 2) and n < 2.0  # deff 33, times (t_99 / t_3)^2 = 0.39
    # All successes: no variance, deff taken as 1; only the degrees of freedom shrink n.
    x, n = effective_count(np.ones(100, dtype=bool), members)
    assert x == n and n == pytest.approx(100 * (1.9842 / 3.1824) ** 2, rel=1e-3)
