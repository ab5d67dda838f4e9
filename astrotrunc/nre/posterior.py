"""Weighted posterior samples: prior draws weighted by learned ratios, summaries and HPD levels."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from astropy.table import QTable

from ..exceptions import LowEffectiveSampleSizeWarning

__all__ = ["WeightedSamples", "effective_sample_size", "hpd_credible_level", "match_marginals"]


def _normalised(log_weights: np.ndarray) -> np.ndarray:
    """Weights normalised along axis -2 (samples), computed with log-sum-exp."""
    lw = log_weights - np.max(log_weights, axis=-2, keepdims=True)
    w = np.exp(lw)
    return w / w.sum(axis=-2, keepdims=True)


def effective_sample_size(log_weights) -> np.ndarray:
    """Kish's effective sample size ``1 / sum(w**2)`` of (unnormalised) log-weights.

    Parameters
    ----------
    log_weights : array
        Shape ``(n,)`` or ``(n, k)`` (one ESS per column).

    Returns
    -------
    `numpy.ndarray`
        The ESS (a scalar array or one per column).

    Examples
    --------
    >>> import numpy as np
    >>> from astrotrunc.nre import effective_sample_size
    >>> float(effective_sample_size(np.zeros(100)))
    100.0
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    w = _normalised(lw[:, None] if lw.ndim == 1 else lw)
    ess = 1.0 / (w**2).sum(0)
    return ess[0] if lw.ndim == 1 else ess


def match_marginals(theta, log_weights, marginal_log_weights, *, bins=40, n_iter=30,
                    tol=1e-4) -> np.ndarray:
    """Reweight joint samples so that their 1-D marginals are the given ones (raking).

    A joint ratio head over all parameters learns the dependence between them but, trained
    beside the 1-D heads on the same simulations, its marginals are wider and noisier than
    theirs (a 3-D function is harder to learn than three 1-D ones). Iterative proportional
    fitting finds the distribution closest in Kullback–Leibler divergence to the joint one whose
    1-D marginals are those of the 1-D heads: the joint head keeps the shape of the dependence,
    the 1-D heads set each marginal. The correction of each parameter is a smooth function of
    that parameter (interpolated between quantile bins of the samples).

    Parameters
    ----------
    theta : array, shape ``(n, d)``
        Samples (draws of the prior box).
    log_weights : array, shape ``(n,)``
        Log-weights of the joint posterior (e.g. the joint head).
    marginal_log_weights : array, shape ``(n, d)``
        Log-weights of each parameter's 1-D posterior on the same samples (the 1-D heads).
    bins : int
        Quantile bins per parameter.
    n_iter : int
        Maximum sweeps over the parameters.
    tol : float
        Stop when no bin's marginal differs from its target by more than this (absolute).

    Returns
    -------
    `numpy.ndarray`, shape ``(n,)``
        The adjusted log-weights (up to a constant).

    Examples
    --------
    >>> import numpy as np
    >>> from astrotrunc.nre import WeightedSamples, match_marginals
    >>> t = np.random.default_rng(0).uniform(-6, 6, size=(40000, 2))
    >>> wide = -0.5 * (t**2).sum(1) / 4           # joint: N(0, 2²) in each
    >>> sharp = -0.5 * t**2                         # 1-D heads: N(0, 1) in each
    >>> lw = match_marginals(t, wide, sharp)
    >>> np.round(WeightedSamples(t, lw).std(), 1)
    array([1., 1.])
    """
    theta, lw = _numpy(theta), _numpy(log_weights).astype(np.float64).ravel().copy()
    target = _numpy(marginal_log_weights).astype(np.float64)
    n, d = theta.shape
    if lw.shape != (n,) or target.shape != (n, d):
        raise ValueError(f"need log_weights ({n},) and marginal_log_weights ({n}, {d}), got "
                         f"{lw.shape} and {target.shape}")
    index, centre, goal = [], [], []
    for k in range(d):
        edges = np.unique(np.quantile(theta[:, k], np.linspace(0, 1, bins + 1)))
        i = np.clip(np.searchsorted(edges, theta[:, k], side="right") - 1, 0, len(edges) - 2)
        index.append(i)
        centre.append(0.5 * (edges[:-1] + edges[1:]))
        goal.append(np.bincount(i, _normalised(target[:, k:k + 1])[:, 0], len(edges) - 1))
    for _ in range(n_iter):
        worst = 0.0
        for k in range(d):
            have = np.bincount(index[k], _normalised(lw[:, None])[:, 0], len(goal[k]))
            worst = max(worst, float(np.abs(have - goal[k]).max()))
            ok = (have > 0) & (goal[k] > 0)
            if ok.sum() < 2:
                continue
            step = np.log(goal[k][ok]) - np.log(have[ok])
            lw = lw + np.interp(theta[:, k], centre[k][ok], step)
            lw[(goal[k] == 0)[index[k]]] = -np.inf
        if worst < tol:
            break
    return lw


def hpd_credible_level(log_density, weights, log_density_point) -> np.ndarray:
    """Highest-density credible level of a point: the posterior mass denser than it.

    Parameters
    ----------
    log_density : array-like, shape ``(..., n, k)``
        Log posterior density (up to a constant) at ``n`` samples, for ``k`` marginals.
    weights : array-like, shape ``(..., n, k)``
        Normalised weights of the samples.
    log_density_point : array-like, shape ``(..., k)``
        Log density at the point (same constant).

    Returns
    -------
    level : `numpy.ndarray`, shape ``(..., k)``
        The smallest HPD credible level whose region contains the point (0 at the mode, 1 far
        in the tails). For well-calibrated posteriors it is uniform on [0, 1] over simulations.
    """
    above = np.asarray(log_density) > np.asarray(log_density_point)[..., None, :]
    return (np.asarray(weights) * above).sum(-2)


class WeightedSamples:
    """Importance-weighted samples of a posterior (e.g. prior draws weighted by ratios).

    Parameters
    ----------
    theta : array-like, shape ``(n, n_params)``
        Samples (prior draws).
    log_weights : array-like, shape ``(n,)`` or ``(n, k)``
        Unnormalised log-weights: one column for a joint posterior, or one column per marginal
        (the log-ratios of a `MarginalRatioEstimator`'s heads).
    names : sequence of str, optional
        Parameter names.
    marginals : sequence of tuple of int, optional
        Parameters of each weight column (default: ``(0,), (1,), ...`` for ``k = n_params``
        columns, or all parameters for one column).
    log_weight_fn : callable, optional
        ``log_weight_fn(theta) -> (m, k)`` log-weights at other points (same constant); used by
        `credible_level` for exact ranks. Without it a weighted histogram estimates the density.
    units : sequence of str, optional
        Units of the parameters (for tables).
    min_ess : float
        A `~astrotrunc.exceptions.LowEffectiveSampleSizeWarning` is issued for every column whose
        effective sample size is below this.

    Examples
    --------
    >>> import numpy as np
    >>> from astrotrunc.nre import WeightedSamples
    >>> rng = np.random.default_rng(0)
    >>> theta = rng.uniform(-5, 5, size=(20000, 1))
    >>> post = WeightedSamples(theta, -0.5 * theta[:, 0] ** 2, names=["a"])  # N(0, 1)
    >>> bool(abs(post.std()[0] - 1) < 0.05)
    True
    >>> round(float(post.credible_level([1.0])[0]), 1)   # P(|a| < 1) of N(0, 1)
    0.7
    """

    def __init__(self, theta, log_weights, names=None, marginals=None, log_weight_fn=None,
                 units=None, min_ess=50):
        theta = _numpy(theta)
        lw = _numpy(log_weights)
        if theta.ndim == 1:
            theta = theta[:, None]
        if lw.ndim == 1:
            lw = lw[:, None]
        if theta.ndim != 2 or lw.ndim != 2 or len(theta) != len(lw):
            raise ValueError(
                f"theta (n, n_params) and log_weights (n,) or (n, k) must have the same "
                f"number of samples, got {theta.shape} and {lw.shape}"
            )
        if len(theta) == 0:
            raise ValueError("no samples")
        if np.isnan(lw).any() or np.isposinf(lw).any():
            raise ValueError("log_weights holds NaN or +inf")
        if not np.isfinite(lw).any(0).all():
            raise ValueError("every sample has zero weight (log_weights all -inf) in some column")
        n_params, k = theta.shape[1], lw.shape[1]
        self.names = (
            tuple(names) if names is not None else tuple(f"theta_{i}" for i in range(n_params))
        )
        if len(self.names) != n_params:
            raise ValueError(f"{len(self.names)} names for {n_params} parameters")
        if marginals is None:
            marginals = (
                [(i,) for i in range(n_params)] if k == n_params else [tuple(range(n_params))] * k
            )
        self.marginals = tuple(tuple(int(i) for i in m) for m in marginals)
        if len(self.marginals) != k:
            raise ValueError(f"{len(self.marginals)} marginals for {k} weight columns")
        self.units = tuple(units) if units is not None else ("",) * n_params
        self.theta, self.log_weights, self.log_weight_fn = theta, lw, log_weight_fn
        self.weights = _normalised(lw)
        self.ess = 1.0 / (self.weights**2).sum(0)
        low = self.ess < min_ess
        if low.any():
            cols = ", ".join(f"{n} ({e:.1f})"
                             for n, e, b in zip(self.column_names, self.ess, low) if b)
            warnings.warn(f"low effective sample size of the weighted samples: {cols}; draw more "
                          "samples or truncate the prior", LowEffectiveSampleSizeWarning,
                          stacklevel=2)

    @property
    def column_names(self) -> tuple:
        """Names of the weight columns (``"a"`` or ``"a,b"``)."""
        return tuple(",".join(self.names[i] for i in m) for m in self.marginals)

    def _column(self, i: int) -> int:
        """Weight column of the 1-D marginal of parameter ``i`` (its own head, else a joint one)."""
        for c, m in enumerate(self.marginals):
            if m == (i,):
                return c
        for c, m in enumerate(self.marginals):
            if i in m:
                return c
        raise ValueError(f"no weight column covers parameter {self.names[i]!r}")

    def _marginal_weights(self) -> np.ndarray:
        """``(n, n_params)``: the weights of each parameter's 1-D marginal."""
        return self.weights[:, [self._column(i) for i in range(self.theta.shape[1])]]

    def mean(self) -> np.ndarray:
        """Posterior mean of every parameter.

        Returns
        -------
        `numpy.ndarray`
            ``(n_params,)``.
        """
        return (self._marginal_weights() * self.theta).sum(0)

    def std(self) -> np.ndarray:
        """Posterior standard deviation of every parameter.

        Returns
        -------
        `numpy.ndarray`
            ``(n_params,)``.
        """
        w = self._marginal_weights()
        mu = (w * self.theta).sum(0)
        return np.sqrt((w * (self.theta - mu) ** 2).sum(0))

    def quantile(self, q) -> np.ndarray:
        """Weighted marginal quantiles.

        Parameters
        ----------
        q : float or sequence of float
            Probabilities in [0, 1].

        Returns
        -------
        `numpy.ndarray`
            ``(n_params,)`` for a scalar ``q``, else ``(len(q), n_params)``.
        """
        q_arr = np.atleast_1d(np.asarray(q, dtype=np.float64))
        if ((q_arr < 0) | (q_arr > 1)).any():
            raise ValueError(f"quantiles must be in [0, 1], got {q}")
        w = self._marginal_weights()
        out = np.empty((len(q_arr), self.theta.shape[1]))
        for i in range(self.theta.shape[1]):  # loop over parameters, not samples
            order = np.argsort(self.theta[:, i])
            cdf = np.cumsum(w[order, i])
            cdf = (cdf - 0.5 * w[order, i]) / cdf[-1]
            out[:, i] = np.interp(q_arr, cdf, self.theta[order, i])
        return out[0] if np.ndim(q) == 0 else out

    def credible_level(self, point) -> np.ndarray:
        """Highest-posterior-density mass enclosing ``point``, for every weight column.

        Uses ``log_weight_fn`` when given (exact ranks of the densities), else a
        weighted-histogram density estimate (see `hpd_credible_level`).

        Parameters
        ----------
        point : array-like
            A full parameter vector ``(n_params,)``.

        Returns
        -------
        `numpy.ndarray`
            ``(k,)``, one level per weight column.
        """
        point = _numpy(point).reshape(-1)
        if len(point) != self.theta.shape[1]:
            raise ValueError(f"point must have {self.theta.shape[1]} parameters, got {len(point)}")
        if self.log_weight_fn is not None:
            lp = _numpy(self.log_weight_fn(point[None, :])).reshape(-1)
            return hpd_credible_level(self.log_weights, self.weights, lp)
        levels = np.empty(len(self.marginals))
        for c, m in enumerate(self.marginals):  # loop over weight columns
            dens_s, dens_p = self._histogram_density(c, m, point)
            w = self.weights[:, c]  # samples in bins as dense as the point's count half
            levels[c] = (w * (dens_s > dens_p)).sum() + 0.5 * (w * (dens_s == dens_p)).sum()
        return levels

    def hpd_threshold(self, levels, column=0) -> np.ndarray:
        """Log-weight thresholds of the HPD regions of given credible ``levels`` (for contours).

        The region ``log_weights[:, column] >= threshold`` holds posterior mass ``level``.

        Parameters
        ----------
        levels : float or sequence of float
            Credible levels.
        column : int
            Weight column.

        Returns
        -------
        `numpy.ndarray`
            One threshold per level.
        """
        lw, w = self.log_weights[:, column], self.weights[:, column]
        order = np.argsort(-lw)
        mass = np.cumsum(w[order])
        idx = np.searchsorted(mass, np.atleast_1d(levels)).clip(0, len(lw) - 1)
        return lw[order][idx]

    def _histogram_density(self, c, m, point):
        """Weighted-histogram density at the samples and at ``point`` (marginal ``m``)."""
        t, w = self.theta[:, list(m)], self.weights[:, c]
        n_bins = max(5, int(round(3 * self.ess[c] ** (1 / (len(m) + 2)))))
        ranges = []
        for j in range(len(m)):  # bins over the weighted 0.05-99.95 % range of each parameter
            order = np.argsort(t[:, j])
            cdf = np.cumsum(w[order])
            lo, hi = np.interp([5e-4, 1 - 5e-4], cdf / cdf[-1], t[order, j])
            ranges.append((lo, hi) if hi > lo else (lo - 0.5, hi + 0.5))
        hist, edges = np.histogramdd(t, bins=n_bins, range=ranges, weights=w)

        def lookup(values):
            idx = [
                np.searchsorted(e, values[..., j], side="right") - 1 for j, e in enumerate(edges)
            ]
            inside = np.all([(i >= 0) & (i < n_bins) for i in idx], axis=0)
            dens = hist[tuple(np.clip(i, 0, n_bins - 1) for i in idx)]
            return np.where(inside, dens, 0.0)

        return lookup(t), lookup(point[list(m)][None, :])[0]

    def summary(self) -> QTable:
        """Per-parameter mean, std, median, 68 % interval and ESS as a `~astropy.table.QTable`.

        Parameters have different units, so values are plain numbers with a ``unit`` column.

        Returns
        -------
        `~astropy.table.QTable`
            One row per parameter.
        """
        q = self.quantile([0.16, 0.5, 0.84])
        ess = self.ess[[self._column(i) for i in range(self.theta.shape[1])]]
        return QTable({"name": list(self.names), "mean": self.mean(), "std": self.std(),
                       "q16": q[0], "median": q[1], "q84": q[2], "ess": ess,
                       "unit": list(self.units)})

    def __len__(self) -> int:
        return len(self.theta)

    def __repr__(self) -> str:
        ess = ", ".join(f"{n}={e:.0f}" for n, e in zip(self.column_names, self.ess))
        return f"<WeightedSamples n={len(self)} ESS: {ess}>"


def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)
