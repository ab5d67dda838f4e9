"""Diagnostics of trained ratio estimators: expected coverage on held-out simulations."""

from __future__ import annotations

import numpy as np
import torch
from astropy.table import QTable
from scipy import stats

from ._utils import evaluating

__all__ = ["binomial_interval", "coverage", "credible_levels", "plot_coverage"]

_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.68, 0.7, 0.8, 0.9, 0.95, 0.99)


@torch.no_grad()
def credible_levels(estimator, x, theta_true, prior, n_samples=10_000, *, generator=None,
                    batch_size=2**17) -> np.ndarray:
    """HPD credible level of the true parameters of each held-out simulation, for every head.

    The marginal posterior of head ``c`` is ``prior x exp(log_ratio[:, c])`` on ``n_samples``
    prior draws (shared by all simulations); the level is the posterior mass of the draws whose
    ratio exceeds the ratio at the truth.

    Parameters
    ----------
    estimator : `~astrotrunc.nre.MarginalRatioEstimator`
        Anything with ``log_ratio(x, theta)`` (``x`` of batch 1 against many ``theta``).
    x : `torch.Tensor`, shape ``(n_test, *x_shape)``
        Held-out data.
    theta_true : `torch.Tensor`, shape ``(n_test, n_params)``
        Their parameters.
    prior : `~astrotrunc.priors.BoxPrior`
        The prior the estimator was trained on.
    n_samples : int
        Prior draws.
    generator : int or `torch.Generator`, optional
        Seed of the draws.
    batch_size : int
        Parameter vectors per network call.

    Returns
    -------
    levels : `numpy.ndarray`, shape ``(n_test, n_heads)``
    """
    device = next(estimator.parameters()).device
    samples = prior.sample(int(n_samples), generator=generator).to(device)
    x = torch.as_tensor(x, dtype=torch.float32, device=device)
    theta_true = torch.as_tensor(theta_true, dtype=torch.float32, device=device)
    out = []
    with evaluating(estimator):
        for i in range(len(x)):  # one held-out simulation at a time, all draws in one batch
            xi = x[i:i + 1]
            lr = torch.cat([estimator.log_ratio(xi, t) for t in samples.split(batch_size)])
            lr_true = estimator.log_ratio(xi, theta_true[i:i + 1])[0]
            w = torch.softmax(lr.double(), dim=0)
            out.append((w * (lr > lr_true)).sum(0).cpu().numpy())
    return np.array(out)


def coverage(estimator, data_or_simulator, prior, levels=_LEVELS, n_samples=10_000, n_test=200,
             *, seed=0, confidence=0.68, x_key=None, theta_key=None) -> QTable:
    """Expected coverage of a trained estimator's marginal posteriors on held-out simulations.

    For every head and nominal credible level, the empirical coverage is the fraction of
    held-out simulations whose true parameters lie inside the highest-posterior-density region
    of that level. A calibrated estimator has empirical = nominal; below the diagonal it is
    overconfident, above it conservative.

    Parameters
    ----------
    estimator : `~astrotrunc.nre.MarginalRatioEstimator`
        The trained estimator (``log_ratio``, ``marginal_names``).
    data_or_simulator : dict or callable
        Held-out simulations ``{"theta": ..., "x": ...}`` (the estimator's batch keys), or a
        simulator ``simulator(theta) -> x`` run on ``n_test`` draws of ``prior``.
    prior : `~astrotrunc.priors.BoxPrior`
        The prior the estimator was trained on.
    levels : sequence of float
        Nominal credible levels.
    n_samples : int
        Prior draws per posterior.
    n_test : int
        Held-out simulations used (the first ``n_test`` of given data).
    seed : int
        Seed of the draws.
    confidence : float
        Confidence of the binomial (Jeffreys) intervals on the empirical coverage.
    x_key, theta_key : str, optional
        Batch keys (the estimator's by default).

    Returns
    -------
    `~astropy.table.QTable`
        One row per (marginal, nominal level): ``marginal``, ``nominal``, ``empirical``,
        ``lower``, ``upper``, ``n_test``. ``table.meta["credible_levels"]`` holds the per-
        simulation levels ``(n_test, n_heads)``.
    """
    x_key = x_key or getattr(estimator, "x_key", "x")
    theta_key = theta_key or getattr(estimator, "theta_key", "theta")
    if callable(data_or_simulator):
        theta = prior.sample(int(n_test), generator=torch.Generator().manual_seed(seed + 1))
        x = data_or_simulator(theta)
    else:
        theta = torch.as_tensor(np.asarray(data_or_simulator[theta_key]))[:n_test]
        x = torch.as_tensor(np.asarray(data_or_simulator[x_key]))[:n_test]
    if len(theta) == 0 or len(theta) != len(x):
        raise ValueError(f"need the same positive number of parameters and data, got {len(theta)} "
                         f"and {len(x)}")
    if not (
        torch.isfinite(theta).all()
        and torch.isfinite(torch.as_tensor(x, dtype=torch.float32)).all()
    ):
        raise ValueError("the held-out parameters or data hold NaN or infinite values")
    levels = np.asarray(levels, dtype=np.float64)
    if ((levels <= 0) | (levels >= 1)).any():
        raise ValueError(f"nominal levels must be in (0, 1), got {levels}")
    cred = credible_levels(estimator, x, theta, prior, n_samples, generator=seed)
    n = len(cred)
    names = getattr(estimator, "marginal_names", tuple(f"head_{c}" for c in range(cred.shape[1])))
    rows = []
    for c, name in enumerate(names):
        for level in levels:
            k = int((cred[:, c] < level).sum())
            lo, hi = binomial_interval(k, n, confidence)
            rows.append((name, level, k / n, lo, hi, n))
    table = QTable(
        rows=rows, names=("marginal", "nominal", "empirical", "lower", "upper", "n_test")
    )
    table.meta["credible_levels"] = cred
    table.meta["confidence"] = confidence
    return table


def binomial_interval(k, n, confidence=0.6827, method="jeffreys"):
    """Interval on a binomial fraction ``k / n``: ``"jeffreys"`` or ``"clopper-pearson"`` (exact).

    Parameters
    ----------
    k, n : int or array
        Successes and trials.
    confidence : float
        Probability content of the interval (68.27 % by default).
    method : {'jeffreys', 'clopper-pearson'}
        Jeffreys (Beta(k + 1/2, n - k + 1/2) quantiles) or the exact Clopper-Pearson interval.

    Returns
    -------
    low, high : float or array

    Examples
    --------
    >>> from astrotrunc.diagnostics import binomial_interval
    >>> lo, hi = binomial_interval(50, 100)
    >>> bool(lo < 0.5 < hi)
    True
    """
    if method not in ("jeffreys", "clopper-pearson"):
        raise ValueError(f"method must be 'jeffreys' or 'clopper-pearson', got {method!r}")
    tail = (1 - confidence) / 2
    a_lo, b_lo = (k + 0.5, n - k + 0.5) if method == "jeffreys" else (k, n - k + 1)
    a_hi, b_hi = (k + 0.5, n - k + 0.5) if method == "jeffreys" else (k + 1, n - k)
    lo = float(stats.beta.ppf(tail, a_lo, b_lo)) if k > 0 else 0.0
    hi = float(stats.beta.ppf(1 - tail, a_hi, b_hi)) if k < n else 1.0
    return lo, hi


def plot_coverage(table, ax=None):
    """Empirical against nominal coverage with binomial bands, one line per marginal.

    Parameters
    ----------
    table : `~astropy.table.QTable`
        The output of `coverage`.
    ax : `matplotlib.axes.Axes`, optional
        Axes to draw on (a new figure otherwise).

    Returns
    -------
    `matplotlib.axes.Axes`
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="k", lw=1, ls="--", label="calibrated")
    for name in dict.fromkeys(table["marginal"]):
        rows = table[table["marginal"] == name]
        line, = ax.plot(rows["nominal"], rows["empirical"], marker="o", ms=3, label=name)
        ax.fill_between(
            rows["nominal"], rows["lower"], rows["upper"], color=line.get_color(), alpha=0.2
        )
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal credibility", ylabel="empirical coverage",
           aspect="equal")
    ax.legend(fontsize="small")
    return ax
