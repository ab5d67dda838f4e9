"""Box priors over population parameters: the object that TMNRE truncation shrinks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from astropy import units as u
from astropy.table import QTable

__all__ = ["Uniform", "BoxPrior"]


@dataclass(frozen=True)
class Uniform:
    """A uniform prior on ``[low, high]``.

    Parameters
    ----------
    low, high : float
        Bounds, in the units of ``unit``; ``low < high``.
    integer : bool, optional
        If `True` the parameter is a count: a sample is drawn uniformly on ``[low, high]`` and
        rounded
        down, as in the paper's simulator (``int(np.random.uniform(10, 500))``).
    unit : str, optional
        Unit of the parameter (any string `astropy.units.Unit` accepts; ``""`` for dimensionless).
    """

    low: float
    high: float
    integer: bool = False
    unit: str = ""

    def __post_init__(self):
        low, high = float(self.low), float(self.high)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"prior bounds must be finite, got low={self.low}, high={self.high}")
        if not low < high:
            raise ValueError(
                f"prior bounds must satisfy low < high, got low={self.low}, high={self.high}"
            )
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        u.Unit(self.unit)  # raises ValueError on an unknown unit string


class BoxPrior:
    """Independent uniform priors on named parameters (a box), as used for θ = (N, σ_F, h).

    Parameters
    ----------
    **components : `Uniform`
        One uniform prior per parameter, in order.

    Examples
    --------
    >>> from astrotrunc.priors import BoxPrior, Uniform
    >>> prior = BoxPrior(N=Uniform(10, 500, integer=True), sigma_F=Uniform(1, 3))
    >>> theta = prior.sample(4, generator=0)
    >>> theta.shape
    torch.Size([4, 2])
    >>> prior.truncate(low=[100, 1.5], high=[200, 2.0]).volume() < prior.volume()
    True
    """

    def __init__(self, **components: Uniform):
        if not components:
            raise ValueError("a BoxPrior needs at least one parameter")
        for name, comp in components.items():
            if not isinstance(comp, Uniform):
                raise TypeError(f"prior of {name!r} must be a Uniform, got {type(comp).__name__}")
        self.components = dict(components)

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, in order."""
        return tuple(self.components)

    @property
    def low(self) -> torch.Tensor:
        """Lower bounds, shape ``(n_params,)``, float64."""
        return torch.tensor([c.low for c in self.components.values()], dtype=torch.float64)

    @property
    def high(self) -> torch.Tensor:
        """Upper bounds, shape ``(n_params,)``, float64."""
        return torch.tensor([c.high for c in self.components.values()], dtype=torch.float64)

    @property
    def integer(self) -> torch.Tensor:
        """Boolean mask of the count (integer) parameters."""
        return torch.tensor([c.integer for c in self.components.values()])

    def __len__(self) -> int:
        return len(self.components)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}=[{c.low:g}, {c.high:g}]" for k, c in self.components.items())
        return f"BoxPrior({parts})"

    def __eq__(self, other) -> bool:
        return isinstance(other, BoxPrior) and self.components == other.components

    def sample(self, n: int, generator=None, device=None) -> torch.Tensor:
        """Draw ``n`` parameter vectors.

        Parameters
        ----------
        n : int
            Number of draws.
        generator : `torch.Generator`, int or None
            Random source: a generator, an integer seed, or `None` (torch's global RNG).
        device : str or `torch.device`, optional
            Device of the result.

        Returns
        -------
        `torch.Tensor`
            ``(n, n_params)``, float32.
        """
        gen = _as_generator(generator)
        where = gen.device if gen is not None else device
        u01 = torch.rand(n, len(self), generator=gen, dtype=torch.float64, device=where)
        low, high = self.low.to(u01.device), self.high.to(u01.device)
        theta = low + (high - low) * u01
        theta = torch.where(self.integer.to(u01.device), torch.floor(theta), theta)
        return theta.to(device=device, dtype=torch.float32)

    def log_prob(self, theta) -> torch.Tensor:
        """Log density of ``theta``; ``-inf`` outside the box.

        Count parameters are treated through their continuous parent density on ``[low, high]``.

        Parameters
        ----------
        theta : array-like
            ``(..., n_params)``.

        Returns
        -------
        `torch.Tensor`
            ``(...)``, float64.
        """
        theta = torch.as_tensor(theta, dtype=torch.float64)
        low, high = self.low.to(theta.device), self.high.to(theta.device)
        inside = ((theta >= low) & (theta <= high)).all(-1)
        logp = -torch.log(high - low).sum()
        return torch.where(inside, logp, torch.tensor(-math.inf, dtype=theta.dtype))

    def contains(self, theta) -> torch.Tensor:
        """Whether each parameter vector lies inside the box.

        Parameters
        ----------
        theta : array-like
            ``(..., n_params)``.

        Returns
        -------
        `torch.Tensor`
            ``(...)``, bool.
        """
        return torch.isfinite(self.log_prob(theta))

    def volume(self) -> float:
        """Volume of the box.

        Returns
        -------
        float
            The product of the widths.
        """
        return float(torch.prod(self.high - self.low))

    def truncate(self, low=None, high=None) -> "BoxPrior":
        """A new prior restricted to ``[max(low, self.low), min(high, self.high)]``.

        The shape of the prior inside the box is unchanged (TMNRE truncation).

        Parameters
        ----------
        low, high : array-like, optional
            New bounds (``n_params`` values each); the current ones where `None`.

        Returns
        -------
        `BoxPrior`
        """
        new_low = self.low if low is None else torch.maximum(self.low, _as_f64(low, len(self)))
        new_high = self.high if high is None else torch.minimum(self.high, _as_f64(high, len(self)))
        comps = {}
        for i, (name, comp) in enumerate(self.components.items()):
            comps[name] = Uniform(float(new_low[i]), float(new_high[i]), comp.integer, comp.unit)
        return BoxPrior(**comps)

    def to_table(self) -> QTable:
        """The box as a table.

        Returns
        -------
        `~astropy.table.QTable`
            One row per parameter: ``name, low, high, integer, unit``.
        """
        rows = [(n, c.low, c.high, c.integer, c.unit) for n, c in self.components.items()]
        return QTable(rows=rows, names=("name", "low", "high", "integer", "unit"))

    def to_dict(self) -> dict:
        """JSON-serialisable description (see `from_dict`).

        Returns
        -------
        dict
        """
        return {
            n: {"low": c.low, "high": c.high, "integer": c.integer, "unit": c.unit}
            for n, c in self.components.items()
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BoxPrior":
        """Inverse of `to_dict`.

        Parameters
        ----------
        d : dict
            A description written by `to_dict`.

        Returns
        -------
        `BoxPrior`
        """
        return cls(**{n: Uniform(**v) for n, v in d.items()})


def _as_f64(values, n: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.float64)).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"expected {n} bounds, got {t.numel()}")
    return t


def _as_generator(generator) -> torch.Generator | None:
    """A `torch.Generator` from a generator, an integer seed or `None`."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))
