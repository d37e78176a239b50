"""Confidence intervals for proportions (sensitivity, specificity, accuracy, PPV, NPV).

A proportion ``x / n`` gets the Clopper-Pearson "exact" interval: the set of ``p``
whose binomial test does not reject at ``(1 - confidence) / 2`` in either tail, written
with beta quantiles (C. J. Clopper and E. S. Pearson, "The use of confidence or
fiducial limits illustrated in the case of the binomial", *Biometrika* 26(4):404-413,
1934)::

    lower = Beta.ppf(alpha / 2, x, n - x + 1)      (0 when x = 0)
    upper = Beta.ppf(1 - alpha / 2, x + 1, n - x)  (1 when x = n)

It never collapses at 0 or 1 (0 of 12 gives [0, 1 - 0.025^(1/12)] = [0, 26.46 %]) and
its coverage is at least the nominal level for every ``p``; scipy's
``binomtest(x, n).proportion_ci(method="exact")`` gives the same numbers.

Patches of one slide are correlated. When the patches come in groups (slides,
patients), the interval is the Clopper-Pearson one at the Korn-Graubard effective
sample size (E. L. Korn and B. I. Graubard, "Confidence intervals for proportions with
small expected number of positive counts estimated from survey data", *Survey
Methodology* 24(2):193-201, 1998): the design effect is the cluster-robust variance of
the ratio estimate over the variance of ``n`` independent patches, the effective size
``n / deff`` (``deff`` at least 1) is scaled by ``(t_{n-1} / t_{G-1})^2`` for the
``G - 1`` degrees of freedom of ``G`` groups, and ``x`` by the same factor. At ``p = 0``
or ``1`` the variance is 0 and ``deff`` is taken as 1 (their rule), so the interval
stays the binomial one of the patches scaled only by the degrees of freedom.

scipy (``scipy.stats.beta``, ``scipy.stats.t``) comes with scikit-learn in the
``evaluate`` extra; it is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

#: Name of the method, as reports print it.
PROPORTION_METHOD = "clopper-pearson"
CLUSTERED_PROPORTION_METHOD = "clopper-pearson (korn-graubard effective n)"


def clopper_pearson(x: float, n: float, confidence: float = 0.95) -> tuple[float, float] | None:
    """Clopper-Pearson interval of the proportion ``x / n``.

    Args:
        x: successes, ``0 <= x <= n`` (a float where an effective count is used).
        n: trials (patches); ``n = 0`` has no interval.
        confidence: coverage in (0, 1).

    Returns:
        ``(lower, upper)`` in [0, 1], or None when ``n <= 0``.

    Raises:
        ValueError: ``x`` outside ``[0, n]`` or ``confidence`` outside (0, 1).
    """
    from scipy.stats import beta  # type: ignore[import-untyped]  # scipy ships no stubs

    if n <= 0:
        return None
    if not 0.0 <= x <= n:
        raise ValueError(f"successes {x} outside [0, {n}]")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    alpha = 1.0 - confidence
    lower = 0.0 if x <= 0 else float(beta.ppf(alpha / 2, x, n - x + 1))
    upper = 1.0 if x >= n else float(beta.ppf(1 - alpha / 2, x + 1, n - x))
    return lower, upper


def effective_count(
    success: npt.NDArray[np.bool_],
    members: Sequence[npt.NDArray[np.intp]],
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Korn-Graubard effective ``(x, n)`` of a proportion over grouped patches.

    Args:
        success: bool ``[m]``, one per patch in the proportion's denominator.
        members: the patch indices (into ``success``) of each group with at least one
            such patch; every index appears once.
        confidence: coverage, for the t quantiles of the degrees-of-freedom factor.

    Returns:
        ``(x_eff, n_eff)``: ``p_hat * n_eff`` and the effective sample size, which is
        ``m`` when every group holds one patch (no design effect, ``G - 1 = m - 1``).
    """
    from scipy.stats import t

    m = int(success.size)
    g = len(members)
    if m == 0:
        return 0.0, 0.0
    p_hat = float(success.mean())
    if g < 2 or m < 2:
        return p_hat * m, float(m)
    y_g = np.array([success[idx].sum() for idx in members], dtype=np.float64)
    m_g = np.array([idx.size for idx in members], dtype=np.float64)
    # Cluster-robust (linearised) variance of the ratio y / m, and the same estimator's
    # form for m independent patches: deff = 1 exactly when every group is one patch.
    v_cluster = g / (g - 1) * float(((y_g - p_hat * m_g) ** 2).sum()) / m**2
    v_srs = p_hat * (1.0 - p_hat) / (m - 1)
    deff = max(1.0, v_cluster / v_srs) if v_srs > 0 else 1.0
    q = 1.0 - (1.0 - confidence) / 2
    df_factor = (float(t.ppf(q, m - 1)) / float(t.ppf(q, g - 1))) ** 2
    n_eff = min(float(m), m / deff * df_factor)
    return p_hat * n_eff, n_eff
