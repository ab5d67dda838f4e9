"""Expected coverage: calibrated for an exact ratio, undercovering for an overconfident one."""

import matplotlib
import numpy as np
import pytest
import torch

from astrotrunc.diagnostics import coverage, plot_coverage
from astrotrunc.priors import BoxPrior, Uniform

matplotlib.use("Agg")

PRIOR = BoxPrior(a=Uniform(-5, 5), b=Uniform(-5, 5))
pytestmark = pytest.mark.usefixtures("one_thread")


class _Exact(torch.nn.Module):
    """Exact log-ratios of x = theta + N(0, 1) (up to a constant), sharpened by ``scale``."""

    marginal_names = ("a", "b")
    x_key, theta_key = "x", "theta"

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)), requires_grad=False)

    def log_ratio(self, x, theta):
        return -0.5 * self.scale * (x - theta) ** 2


def _simulator(theta):
    return theta + torch.randn(theta.shape, generator=torch.Generator().manual_seed(3))


def test_exact_ratio_is_calibrated_and_overconfident_is_not():
    table = coverage(_Exact(), _simulator, PRIOR, levels=[0.5, 0.68, 0.95], n_samples=4000,
                     n_test=400, seed=1)
    assert len(table) == 6 and set(table["marginal"]) == {"a", "b"}
    assert table.meta["credible_levels"].shape == (400, 2)
    assert (table["lower"] <= table["empirical"]).all() and (
        table["empirical"] <= table["upper"]
    ).all()
    np.testing.assert_allclose(table["empirical"], table["nominal"], atol=0.06)
    sharp = coverage(_Exact(scale=4.0), _simulator, PRIOR, levels=[0.5, 0.68, 0.95], n_samples=4000,
                     n_test=400, seed=1)
    assert (sharp["upper"] < sharp["nominal"]).all()  # overconfident: significantly below
    ax = plot_coverage(table)
    assert ax.get_xlabel() == "nominal credibility" and len(ax.get_lines()) == 3


def test_coverage_on_given_data_and_bad_input():
    theta = PRIOR.sample(50, generator=2)
    data = {"theta": theta, "x": _simulator(theta)}
    table = coverage(_Exact(), data, PRIOR, levels=[0.9], n_samples=1000, n_test=30)
    assert list(table["n_test"]) == [30, 30]
    with pytest.raises(ValueError, match="NaN"):
        coverage(_Exact(), dict(data, x=data["x"] * np.nan), PRIOR, n_samples=100)
    with pytest.raises(ValueError, match="same positive number"):
        coverage(_Exact(), dict(data, x=data["x"][:5]), PRIOR, n_samples=100)
    with pytest.raises(ValueError, match="levels"):
        coverage(_Exact(), data, PRIOR, levels=[1.5], n_samples=100)
