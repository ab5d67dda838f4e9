"""The detected branch, exact route: the probability p(I=1 | θ) that the model reproduces a catalog.

For a source model with a tractable density (the default `~astrotrunc.PointSourceModel`),

    p(I=1 | θ) ∝ N! / (N - N_det)! · (1 - p̄(θ))^(N - N_det) · ∏_i P_i(θ),

with p̄(θ) = E[S(F, s) | θ] the probability that one source of the population is detected, and
P_i(θ) the probability that it is detected inside region R_i (and, optionally, has F ≥ F_th):
the integral of p(F, s | θ) S(F, s) over R_i. Both integrals are quadratures: S is tabulated on
every pixel and a fine log-flux grid (`~astrotrunc.truncation.CompletenessTable`), the flux
density integrated exactly over each log-flux bin, the position density over a sub-pixel grid.
"""

from __future__ import annotations

import copy
import math

from astropy import units as u

import numpy as np
import torch

from ..truncation import (CompletenessTable, ConditionalCompletenessTable, _SubpixelGrid,
                          completeness_table)

__all__ = ["CatalogLikelihood", "naive_catalog_log_likelihood"]


def _flux_bin_mass(model, log_edges, sigma, log_min=None):
    """``(n, n_bins)`` probability of each log-flux bin under LogNormal(mu, sigma) (float64)."""
    z = (log_edges[None, :] - model.flux_mu) / sigma[:, None]
    if log_min is not None:
        z = torch.maximum(z, (math.log(log_min) - model.flux_mu) / sigma[:, None])
    cdf = torch.special.ndtr(z)
    return (cdf[:, 1:] - cdf[:, :-1]).clamp_min(0)


class CatalogLikelihood:
    """log p(I=1 | θ) of an observed catalog: the exact detected-branch likelihood.

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`
        The full model (its flux and position densities).
    regions : `~astrotrunc.truncation.DetectedRegions`
        The regions R_i of the catalog.
    completeness : `~astrotrunc.CompletenessFunction` or `~astrotrunc.ConditionalCompleteness`
        S(F, s) of the detector that made the catalog; a `~astrotrunc.ConditionalCompleteness`
        gives S(F, s | θ), interpolated between θ nodes.
    flux_threshold : float, optional
        Also require F ≥ ``flux_threshold`` of detected sources (the paper's option).
    oversample : int
        Sub-pixel grid for the position integrals.
    n_h, n_sigma : int
        Grids in h and σ_F on which p̄ and the flux integrals are tabulated (they depend on θ
        through σ_F and h only, besides S's own dependence on θ).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from astrotrunc import PointSourceModel, CompletenessFunction
    >>> from astrotrunc.truncation import DetectedRegions
    >>> from astrotrunc.inference import CatalogLikelihood
    >>> model = PointSourceModel.paper()
    >>> labels = np.zeros(model.shape, int); labels[64, 64] = 1
    >>> like = CatalogLikelihood(model, DetectedRegions(labels), CompletenessFunction())
    >>> like.log_prob(torch.tensor([[100.0, 2.0, 5.0], [0.5, 2.0, 5.0]])).isfinite().tolist()
    [True, False]
    """

    def __init__(self, model, regions, completeness, *, flux_threshold=None, oversample=4,
                 n_h=200, n_sigma=64, grid=None):
        self.model, self.regions = model, regions
        self.flux_threshold = None if flux_threshold is None else float(flux_threshold)
        self.table = (completeness if isinstance(completeness, CompletenessTable) else
                      completeness_table(completeness, model, regions.mask))
        self.conditional = isinstance(self.table, ConditionalCompletenessTable)
        self.grid = grid if grid is not None else _SubpixelGrid(model.geometry, oversample)
        lf = self.table.log_flux
        mid = 0.5 * (lf[1:] + lf[:-1])
        inf = torch.tensor([math.inf], dtype=torch.float64)
        self.log_edges = torch.cat([-inf, mid, inf])
        # prior mass of every pixel on a grid in h (the position density depends on h only)
        i_h = model.param_names.index("h")
        lo, hi = float(model.prior.low[i_h]), float(model.prior.high[i_h])
        self.h_grid = torch.linspace(lo, hi, int(n_h) if not self.conditional else 100,
                                     dtype=torch.float64)
        mass = []
        for hs in self.h_grid.split(8):
            theta = torch.zeros(len(hs), len(model.param_names), dtype=torch.float64)
            theta[:, 1], theta[:, i_h] = 1.0, hs
            mass.append(torch.exp(self.grid.log_mass(model, theta)).sum(-1))  # (n, npix)
        mass = torch.cat(mass)
        npix = mass.shape[1]
        unmasked = (torch.ones(npix, dtype=torch.float64) if regions.mask is None else
                    torch.as_tensor(~np.asarray(regions.mask, bool).reshape(-1),
                                    dtype=torch.float64))
        self._inside_h = mass @ unmasked  # (n_h,) prior mass of the unmasked map
        # the flux integrals are linear in S: contract them once on a fine grid in sigma_F
        i_s = model.param_names.index("sigma_F")
        self.sigma_grid = torch.linspace(float(model.prior.low[i_s]), float(model.prior.high[i_s]),
                                         n_sigma, dtype=torch.float64)
        self._w = _flux_bin_mass(model, self.log_edges, self.sigma_grid)  # (n_sigma, n_flux)
        self._w_cut = _flux_bin_mass(model, self.log_edges, self.sigma_grid, self.flux_threshold)
        # p̄ per node of S: V[node, j, k] = sum_p m_p(h_j) sum_f S_node(F_f, p) w_f(sigma_k)
        if self.conditional:
            self._pbar = self._conditional_pbar(mass * unmasked, model.geometry)
        else:
            self._pbar = ((mass * unmasked) @ self.table.table.double() @ self._w.T)[None]
        self._region_table = self._region_tables(regions)

    def _conditional_pbar(self, mass, geometry, block=2, nodes_per_call=8):
        """p̄ at every node of a conditional S, with S evaluated on ``block``² super-pixels.

        S varies over many pixels (crowding, latitude), the prior mass over few: the mass is
        summed exactly over each super-pixel, S taken at its centre. Masked pixels and pixels
        outside S's extent carry no mass (``mass`` is zero there).
        """
        ny, nx = geometry.shape
        off = self.table.off.double()
        mass = mass * (1 - off)
        by, bx = -(-ny // block), -(-nx // block)
        pad = lambda a: torch.nn.functional.pad(  # noqa: E731
            a.reshape(-1, ny, nx), (0, bx * block - nx, 0, by * block - ny))
        coarse = pad(mass).reshape(-1, by, block, bx, block).sum((2, 4)).reshape(len(mass), -1)
        yy, xx = np.mgrid[0:by, 0:bx]
        sky = geometry.pixel_to_world(np.minimum(xx.ravel() * block + (block - 1) / 2, nx - 1),
                                      np.minimum(yy.ravel() * block + (block - 1) / 2, ny - 1))
        lon = torch.as_tensor(sky.l.wrap_at(180 * u.deg).deg, dtype=torch.float32)
        lat = torch.as_tensor(sky.b.deg, dtype=torch.float32)
        out = []
        for nodes in torch.arange(self.table.n_nodes).split(nodes_per_call):
            s = self.table.all_nodes(lon=lon, lat=lat, nodes=nodes)  # (n, P, n_flux)
            a = s @ self._w.T.float()  # (n, P, n_sigma)
            out.append(torch.einsum("hp,npk->nhk", coarse.float(), a).double())
        return torch.cat(out)

    def _region_tables(self, regions):
        """``(n_nodes, n_sigma, P_R)``: flux-integrated S of every region pixel."""
        if self.conditional:
            tables = self.table.all_nodes(regions.pixel_index).double()
        else:
            tables = self.table.table[regions.pixel_index].double()[None]
        return torch.einsum("kf,npf->nkp", self._w_cut, tables)

    def _grid_pos(self, values, grid):
        pos = ((values - grid[0]) / (grid[1] - grid[0])).clamp(0, len(grid) - 1)
        i0 = pos.floor().long().clamp(max=len(grid) - 2)
        return i0, pos - i0

    def _corners(self, theta):
        if not self.conditional:
            n = len(theta)
            return (torch.zeros(n, 1, dtype=torch.long),
                    torch.ones(n, 1, dtype=torch.float64))
        return self.table.corners(theta)

    def for_regions(self, regions) -> "CatalogLikelihood":
        """The likelihood of another catalog on the same map (mask), reusing the tabulated p̄."""
        if tuple(regions.shape) != tuple(self.regions.shape):
            raise ValueError(f"regions on a {regions.shape} map, this likelihood's map is "
                             f"{self.regions.shape}")
        new = copy.copy(self)
        new.regions = regions
        new._region_table = self._region_tables(regions)
        return new

    def _interp_h(self, h, values):
        """Linear interpolation along the first axis of ``values`` (tabulated on ``h_grid``)."""
        g = self.h_grid
        pos = ((h - g[0]) / (g[1] - g[0])).clamp(0, len(g) - 1)
        i0 = pos.floor().long().clamp(max=len(g) - 2)
        frac = (pos - i0).reshape(-1, *([1] * (values.ndim - 1)))
        return values[i0] * (1 - frac) + values[i0 + 1] * frac

    def detection_fraction(self, theta) -> torch.Tensor:
        """p̄(θ): the probability that one source of the population is detected (float64)."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, len(self.model.param_names))
        idx, cw = self._corners(theta)  # (n, c)
        ih, fh = self._grid_pos(theta[:, 2], self.h_grid)
        js, fs = self._grid_pos(theta[:, 1], self.sigma_grid)
        ih, js, fh, fs = ih[:, None], js[:, None], fh[:, None], fs[:, None]
        v = self._pbar
        val = ((v[idx, ih, js] * (1 - fs) + v[idx, ih, js + 1] * fs) * (1 - fh)
               + (v[idx, ih + 1, js] * (1 - fs) + v[idx, ih + 1, js + 1] * fs) * fh)
        return (val * cw).sum(1).clamp(0, 1)

    def region_log_prob(self, theta) -> torch.Tensor:
        """``(n, N_det)`` log P_i(θ): a source of the population is detected in region R_i."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, len(self.model.param_names))
        n, m = len(theta), self.regions.n
        if m == 0:
            return torch.zeros(n, 0, dtype=torch.float64)
        idx, cw = self._corners(theta)
        js, fs = self._grid_pos(theta[:, 1], self.sigma_grid)
        r = self._region_table
        fs = fs[:, None, None]
        g = r[idx, js[:, None]] * (1 - fs) + r[idx, js[:, None] + 1] * fs
        g = (g * cw[..., None]).sum(1)  # (n, P_R): flux-integrated S, between the nodes
        mass = torch.exp(self.grid.log_mass(self.model, theta, self.regions.pixel_index)).sum(-1)
        per_region = torch.zeros(n, m, dtype=torch.float64)
        per_region.index_add_(1, self.regions.region_index, g * mass)
        return torch.log(per_region)

    def in_map_fraction(self, theta) -> torch.Tensor:
        """The probability that one source of the population falls in the unmasked map."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, len(self.model.param_names))
        return self._interp_h(theta[:, 2], self._inside_h).clamp(0, 1)

    def log_prob(self, theta, batch_size=4096) -> torch.Tensor:
        """log p(I=1 | θ) up to a constant, ``(n,)`` float64; ``-inf`` where N < N_det."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, len(self.model.param_names))
        out = []
        m = self.regions.n
        for t in theta.split(batch_size):
            n_src = torch.floor(t[:, 0])
            pbar = self.detection_fraction(t)
            rest = (n_src - m).clamp_min(0)
            lp = (torch.lgamma(n_src + 1) - torch.lgamma(rest + 1)
                  + rest * torch.log1p(-pbar.clamp(max=1 - 1e-12))
                  + self.region_log_prob(t).sum(1))
            out.append(torch.where(n_src >= m, lp, -math.inf))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def naive_catalog_log_likelihood(likelihood, catalog, theta):
    """The classical fit that takes the catalog as complete: what selection bias looks like.

    Every catalog row is taken as a source of the population with the catalogued flux and
    position, and every source inside the map as catalogued:
    ``log L = log N!/(N - n)! + (N - n) log(1 - q(h)) + sum_i log p(F_i, l_i, b_i | θ)``,
    with q(h) the probability that a source falls inside the (unmasked) map. For comparison
    only: it ignores the completeness, so faint sources are missing and N, σ_F, h come out
    biased.

    Parameters
    ----------
    likelihood : `CatalogLikelihood`
        Of the same map (for its model and the in-map fraction q).
    catalog : `~astropy.table.Table` or `None`
        Rows with ``flux``, ``l``, ``b``.
    theta : array-like
        ``(n, 3)`` parameters.
    """
    model = likelihood.model
    theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, len(model.param_names))
    n_det = 0 if catalog is None else len(catalog)
    q = likelihood.in_map_fraction(theta).clamp(max=1 - 1e-12)
    n_src = torch.floor(theta[:, 0])
    rest = (n_src - n_det).clamp_min(0)
    lp = torch.lgamma(n_src + 1) - torch.lgamma(rest + 1) + rest * torch.log1p(-q)
    if n_det:
        value = lambda c: np.asarray(getattr(catalog[c], "value", catalog[c]), float)  # noqa: E731
        flux = torch.as_tensor(np.clip(value("flux"), 1e-6, None))
        lp = lp + model.source_log_density(flux[None], torch.as_tensor(value("l"))[None],
                                           torch.as_tensor(value("b"))[None],
                                           theta[:, None, :]).sum(1)
    return torch.where(n_src >= n_det, lp, -math.inf)
