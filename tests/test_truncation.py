"""TMNRE truncation: rounds on a narrow posterior shrink the box and keep the truth."""

import numpy as np
import pytest
import torch

from astrotrunc.nre import MarginalRatioEstimator, Trainer
from astrotrunc.priors import BoxPrior, Uniform
from astrotrunc.truncation import TruncationResult, run_rounds, truncation_bounds

pytestmark = pytest.mark.usefixtures("one_thread")


def _simulator(theta, seed=0):
    g = torch.Generator().manual_seed(int(theta.sum() * 1000) % 2**31 + seed)
    return theta + 0.05 * torch.randn(theta.shape, generator=g)


@pytest.mark.parametrize("truth", [(1.3, -2.2), (-3.9, 0.4)])
def test_rounds_shrink_box_and_keep_truth(truth):
    prior = BoxPrior(a=Uniform(-5, 5), b=Uniform(-5, 5))
    theta_true = torch.tensor([truth])
    x_obs = _simulator(theta_true, seed=1)
    torch.manual_seed(0)
    result = run_rounds(
        _simulator,
        prior,
        lambda box: MarginalRatioEstimator(2, prior.names, hidden=32),
        x_obs,
        n_rounds=2,
        n_simulations=2000,
        epsilon=1e-6,
        n_samples=50_000,
        trainer=Trainer(
            max_epochs=15, batch_size=128, learning_rate=3e-3, progress=False, seed=0, patience=100
        ),
    )
    assert isinstance(result, TruncationResult) and len(result) == 2
    for r in result.rounds:  # every box holds the truth
        assert bool(r.bounds.contains(theta_true)), r
        assert r.shrink_factor >= 1
    assert result.total_shrink_factor >= 10
    table = result.to_table()
    assert list(table["round"]) == [0, 1] and "a_low" in table.colnames
    np.testing.assert_allclose(table["volume"][0], 100.0)
    assert "shrank" in repr(result)


def test_truncation_bounds_keeps_region_between_draws():
    class Gaussian(torch.nn.Module):  # an exact log-ratio: N(1, 0.1) in a, flat in b
        marginals = ((0,), (1,))
        x_shape = (1,)

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def log_ratio(self, x, theta):
            return torch.stack([-0.5 * ((theta[:, 0] - x[0, 0]) / 0.1) ** 2,
                                torch.zeros(len(theta))], dim=1)

    prior = BoxPrior(a=Uniform(-5, 5), b=Uniform(0, 1))
    box = truncation_bounds(Gaussian(), [1.0], prior, epsilon=1e-6, n_samples=20_000, generator=0)
    half = 0.1 * np.sqrt(2 * np.log(1e6))  # where the ratio falls to 1e-6 of its maximum
    assert float(box.low[0]) <= 1 - half and float(box.high[0]) >= 1 + half
    assert float(box.high[0] - box.low[0]) < 2 * half + 0.01
    assert box.components["b"] == prior.components["b"]
    with pytest.raises(ValueError, match="epsilon"):
        truncation_bounds(Gaussian(), [1.0], prior, epsilon=2)
