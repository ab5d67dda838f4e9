"""Toy problems with exact answers, shared by the tests and the benchmarks (private).

* the linear-Gaussian problem of the NRE engine: ``theta ~ U(-3, 3)^3``,
  ``x = A theta + N(0, 0.6^2 I)``; its posterior is N(mu, Sigma) restricted to the box;
* detection labels drawn from a known completeness ``S = sigmoid(3 (log F - log F50(b)))``.
"""

from __future__ import annotations

import numpy as np
import torch

from .priors import BoxPrior, Uniform

__all__: list[str] = []  # private module

LG_MATRIX = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0]])
LG_SIGMA = 0.6
LG_PRIOR = BoxPrior(a=Uniform(-3, 3), b=Uniform(-3, 3), c=Uniform(-3, 3))


def linear_gaussian_simulate(theta, seed):
    """``x = A theta + N(0, sigma^2 I)`` with the noise seeded by ``seed``."""
    noise = torch.randn(theta.shape, generator=torch.Generator().manual_seed(int(seed)))
    return theta @ LG_MATRIX.T + LG_SIGMA * noise


def linear_gaussian(n, seed):
    """``n`` joint draws ``{"theta", "x"}`` (θ seeded by ``seed``, the noise by ``seed + 1``)."""
    theta = LG_PRIOR.sample(n, generator=seed)
    return {"theta": theta, "x": linear_gaussian_simulate(theta, seed + 1)}


def linear_gaussian_moments(x_obs, n_draws=400_000):
    """Mean and std of the exact posterior of ``x_obs``: N(mu, Sigma) restricted to the box."""
    a = LG_MATRIX.double()
    cov = LG_SIGMA**2 * torch.linalg.inv(a.T @ a)
    mu = cov @ a.T @ torch.as_tensor(x_obs).double().reshape(3) / LG_SIGMA**2
    z = mu + torch.randn(n_draws, 3, generator=torch.Generator().manual_seed(9),
                         dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    z = z[(z.abs() < 3).all(1)]
    return z.mean(0).numpy(), z.std(0).numpy()


def toy_f50(lat):
    """The 50 %-completeness flux of the toy completeness: 3, tripled on the plane."""
    return 3.0 * (1 + 2 * np.exp(-0.5 * (np.asarray(lat) / 4) ** 2))


def toy_completeness_labels(n=20000, seed=0):
    """Detection labels ``{"flux", "l", "b", "d"}`` drawn from the toy completeness."""
    rng = np.random.default_rng(seed)
    f = np.exp(rng.normal(1.0, 2.0, n))
    lon, lat = rng.normal(0, 20, n), rng.normal(0, 8, n)
    p = 1 / (1 + np.exp(-3 * (np.log(f) - np.log(toy_f50(lat)))))
    d = rng.random(n) < p
    return {k: torch.as_tensor(v, dtype=torch.float32)
            for k, v in (("flux", f), ("l", lon), ("b", lat), ("d", d))}
