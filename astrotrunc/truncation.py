"""Truncation of the prior: TMNRE prior boxes from 1-D marginal ratios, round by round.

Section "Prior truncation (TMNRE)" below implements swyft's practice: after a round of training,
the prior box is cut to where every 1-D marginal ratio evaluated on the observation exceeds
``epsilon`` times its maximum; the next round simulates from the smaller box. Every round is
recorded (box, volume, shrink factor) so that users see how the box shrank.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from astropy.table import QTable

from ._utils import evaluating
from .priors import BoxPrior

__all__ = ["truncation_bounds", "TruncationRound", "TruncationResult", "run_rounds"]


# ----------------------------------------------------------------------------------------------
# Prior truncation (TMNRE)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def truncation_bounds(estimator, x_obs, prior: BoxPrior, epsilon=1e-6, n_samples=100_000,
                      generator=None, batch_size=16384) -> BoxPrior:
    """The prior box cut to where the 1-D marginal ratios exceed ``epsilon`` × their maximum.

    The ratios of the estimator's 1-D heads are evaluated on the observation at ``n_samples``
    draws of ``prior``; for each parameter the new bounds are the prior draws just outside the
    outermost draws above the threshold (so the region is never cut between two draws).
    Parameters without a 1-D head keep their bounds.

    Parameters
    ----------
    estimator : `~astrotrunc.nre.MarginalRatioEstimator`
        Anything with ``log_ratio(x, theta)`` and ``marginals`` (parameter indices per head).
    x_obs : array-like
        The observation (one sample).
    prior : `~astrotrunc.priors.BoxPrior`
        The box the estimator was trained on.
    epsilon : float
        Threshold relative to the maximum ratio (swyft's default practice: 1e-6).
    n_samples : int
        Prior draws on which the ratios are evaluated.
    generator : int or `torch.Generator`, optional
        Seed of the draws.
    batch_size : int
        Evaluation batch size.

    Returns
    -------
    `~astrotrunc.priors.BoxPrior`
        The truncated box (inside ``prior``).
    """
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    heads = {m[0]: c for c, m in enumerate(estimator.marginals) if len(m) == 1}
    if not heads:
        raise ValueError("the estimator has no 1-D marginal heads to truncate with")
    device = next(estimator.parameters()).device
    x = torch.as_tensor(np.asarray(x_obs), dtype=torch.float32, device=device)
    x = x.reshape(1, *getattr(estimator, "x_shape", x.shape))
    theta = prior.sample(int(n_samples), generator=generator)
    with evaluating(estimator):
        log_r = torch.cat([estimator.log_ratio(x, t.to(device)).cpu()
                           for t in theta.split(batch_size)])
    if not torch.isfinite(log_r).all():
        raise ValueError("the estimator returned non-finite log-ratios on the observation")
    low, high = prior.low.clone(), prior.high.clone()
    for i, c in heads.items():  # loop over parameters
        order = torch.argsort(theta[:, i])
        values, lr = theta[order, i].double(), log_r[order, c]
        above = torch.nonzero(lr > lr.max() + math.log(epsilon)).ravel()
        first, last = int(above[0]), int(above[-1])
        if first > 0:
            low[i] = values[first - 1]
        if last < len(values) - 1:
            high[i] = values[last + 1]
    return prior.truncate(low, high)


@dataclass
class TruncationRound:
    """One TMNRE round: the box simulated from, the box it led to, and what was trained."""

    index: int
    prior: BoxPrior
    bounds: BoxPrior
    n_simulations: int
    history: QTable | None = None
    estimator: object = field(default=None, repr=False)

    @property
    def volume(self) -> float:
        """Volume of the box this round simulated from."""
        return self.prior.volume()

    @property
    def shrink_factor(self) -> float:
        """Volume of this round's box over that of the box it led to (≥ 1)."""
        return self.prior.volume() / self.bounds.volume()


class TruncationResult:
    """The rounds of a TMNRE run (`run_rounds`): the final box, estimator and a table of rounds.

    Examples
    --------
    >>> from astrotrunc.priors import BoxPrior, Uniform
    >>> from astrotrunc.truncation import TruncationResult, TruncationRound
    >>> p0 = BoxPrior(a=Uniform(0, 10))
    >>> res = TruncationResult([TruncationRound(0, p0, p0.truncate([2], [4]), 100)])
    >>> float(res.to_table()["shrink_factor"][0])
    5.0
    """

    def __init__(self, rounds):
        self.rounds = list(rounds)

    @property
    def prior(self) -> BoxPrior:
        """The last box (the prior for a further round or for the final posterior)."""
        return self.rounds[-1].bounds

    @property
    def estimator(self):
        """The estimator of the last round (trained on ``rounds[-1].prior``)."""
        return self.rounds[-1].estimator

    @property
    def total_shrink_factor(self) -> float:
        """Volume of the first box over that of the last."""
        return self.rounds[0].prior.volume() / self.prior.volume()

    def to_table(self) -> QTable:
        """One row per round: simulations, volume, shrink factor and the bounds it found."""
        names = self.rounds[0].prior.names
        rows = {"round": [r.index for r in self.rounds],
                "n_simulations": [r.n_simulations for r in self.rounds],
                "volume": [r.volume for r in self.rounds],
                "shrink_factor": [r.shrink_factor for r in self.rounds]}
        for i, n in enumerate(names):
            rows[f"{n}_low"] = [float(r.bounds.low[i]) for r in self.rounds]
            rows[f"{n}_high"] = [float(r.bounds.high[i]) for r in self.rounds]
        return QTable(rows)

    def plot(self, truth=None, axes=None):
        """Bounds per parameter against the round (one panel each), the truth as a line."""
        import matplotlib.pyplot as plt

        names = self.rounds[0].prior.names
        if axes is None:
            _, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 2.6), squeeze=False)
            axes = axes[0]
        r = np.arange(len(self.rounds) + 1)
        boxes = [self.rounds[0].prior] + [x.bounds for x in self.rounds]
        for i, (ax, n) in enumerate(zip(axes, names)):
            lo = [float(b.low[i]) for b in boxes]
            hi = [float(b.high[i]) for b in boxes]
            ax.fill_between(r, lo, hi, step="post", alpha=0.4)
            if truth is not None:
                ax.axhline(float(np.asarray(truth)[i]), color="k", lw=1)
            ax.set(xlabel="round", title=n)
        return axes

    def __len__(self) -> int:
        return len(self.rounds)

    def __repr__(self) -> str:
        return (f"<TruncationResult {len(self)} rounds, volume shrank "
                f"{self.total_shrink_factor:.3g}x: {self.prior!r}>")


def run_rounds(simulator, prior: BoxPrior, estimator_factory, x_obs, *, n_rounds=3,
               n_simulations=10_000, trainer=None, epsilon=1e-6, n_samples=100_000, seed=0,
               min_shrink=1.0):
    """Truncated marginal NRE: train, truncate the box, simulate again in it, ``n_rounds`` times.

    Parameters
    ----------
    simulator : callable
        ``simulator(theta) -> x``: data (a tensor or array with one row per row of ``theta``),
        or a dict of arrays merged into the training batch.
    prior : `~astrotrunc.priors.BoxPrior`
        The initial box.
    estimator_factory : callable
        ``estimator_factory(prior)`` (or ``estimator_factory()``) returns a fresh estimator.
    x_obs : array-like
        The observation.
    n_rounds : int
        Maximum number of rounds.
    n_simulations : int or sequence of int
        Simulations per round.
    trainer : `~astrotrunc.nre.Trainer`, optional
        The trainer (a default one without progress bars otherwise).
    epsilon : float
        Truncation threshold relative to the maximum ratio.
    n_samples : int
        Prior draws for the bounds.
    seed : int
        Seed of the parameter draws of every round.
    min_shrink : float
        Stop early when a round shrinks the box by less than this factor (1: never stop early).

    Returns
    -------
    `TruncationResult`
    """
    from .nre import Trainer

    trainer = trainer if trainer is not None else Trainer(progress=False, seed=seed)
    counts = ([int(n_simulations)] * int(n_rounds) if np.ndim(n_simulations) == 0
              else [int(n) for n in n_simulations])
    takes_prior = len(inspect.signature(estimator_factory).parameters) > 0
    rounds, box = [], prior
    for k, n in enumerate(counts):
        theta = box.sample(n, generator=torch.Generator().manual_seed(seed * 1000 + k))
        out = simulator(theta)
        data = dict(out) if isinstance(out, dict) else {"x": out}
        estimator = estimator_factory(box) if takes_prior else estimator_factory()
        data[getattr(estimator, "theta_key", "theta")] = theta
        history = trainer.fit(estimator, data)
        bounds = truncation_bounds(estimator, x_obs, box, epsilon=epsilon, n_samples=n_samples,
                                   generator=seed * 1000 + k + 500)
        rounds.append(TruncationRound(k, box, bounds, n, history, estimator))
        box = bounds
        if rounds[-1].shrink_factor < min_shrink:
            break
    return TruncationResult(rounds)
