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
from astropy import units as u
from astropy.table import QTable

from ._utils import evaluating
from .priors import BoxPrior

__all__ = ["truncation_bounds", "TruncationRound", "TruncationResult", "run_rounds",
           "DetectedRegions", "CompletenessTable", "ConditionalCompletenessTable",
           "completeness_table", "TruncatedModel"]


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


# ----------------------------------------------------------------------------------------------
# Detection as truncation: the regions of a catalog and the truncated model
# ----------------------------------------------------------------------------------------------
class DetectedRegions:
    """The detection regions R_i of an observed catalog: the pixels each detected source may hold.

    Region ``i`` is the set of map pixels in which the source standing for catalog row ``i``
    may sit; "detected" in the truncated model, in the completeness S(F, s) and in the catalog
    likelihood means the same thing: the detector found a region there.

    Parameters
    ----------
    labels : 2-D int array
        Region label of every pixel (0: none), e.g. a segmentation image's ``data``.
    ids : sequence of int, optional
        The labels of the regions, in catalog order (every positive label by default).
    mask : 2-D bool array, optional
        Masked pixels; they belong to no region.

    Attributes
    ----------
    n : int
        Number of regions (N_det).
    shape : tuple
        Map shape.
    pixel_index, region_index : `torch.Tensor`
        Flat index of every region pixel, and the region it belongs to (0 ... n - 1).

    Examples
    --------
    >>> import numpy as np
    >>> from astrotrunc.truncation import DetectedRegions
    >>> labels = np.zeros((8, 8), int)
    >>> labels[2, 2:4] = 1
    >>> labels[6, 6] = 2
    >>> regions = DetectedRegions(labels)
    >>> regions.n, regions.sizes.tolist()
    (2, [2, 1])
    """

    def __init__(self, labels, ids=None, mask=None):
        labels = np.asarray(labels)
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"region labels must be a 2-D integer image, got {labels.dtype} "
                             f"of shape {labels.shape}")
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != labels.shape:
                raise ValueError(f"mask shape {mask.shape} does not match the regions' "
                                 f"{labels.shape}")
            labels = np.where(mask, 0, labels)
        ids = np.unique(labels[labels > 0]) if ids is None else np.asarray(ids, dtype=int)
        flat = labels.ravel()
        order = np.argsort(flat, kind="stable")
        start = np.searchsorted(flat[order], ids, side="left")
        stop = np.searchsorted(flat[order], ids, side="right")
        empty = stop == start
        if empty.any():
            raise ValueError(f"regions {ids[empty].tolist()} have no unmasked pixel in the map")
        self.shape = labels.shape
        self.ids = ids
        self.mask = mask
        self.pixel_index = torch.as_tensor(np.concatenate([order[a:b] for a, b in zip(start, stop)])
                                           if len(ids) else np.zeros(0, int), dtype=torch.long)
        self.sizes = torch.as_tensor(stop - start, dtype=torch.long)
        self.region_index = torch.repeat_interleave(torch.arange(len(ids)), self.sizes)

    @property
    def n(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"<DetectedRegions {self.n} regions, {int(self.sizes.sum())} pixels, "
                f"map {self.shape}>")

    def label_image(self) -> np.ndarray:
        """Region number + 1 of every pixel (0: none), in catalog order."""
        out = np.zeros(self.shape[0] * self.shape[1], dtype=np.int32)
        out[self.pixel_index.numpy()] = self.region_index.numpy() + 1
        return out.reshape(self.shape)

    @classmethod
    def from_catalog(cls, catalog, shape, *, segmentation=None, mask=None, radius=1.5):
        """The regions of a `~astrotrunc.find_sources` catalog.

        Parameters
        ----------
        catalog : `~astropy.table.Table` or `None`
            Rows with ``x_centroid, y_centroid`` (pixels) and, with a segmentation, ``label``.
            `None` or an empty table: no detection (zero regions).
        shape : tuple of int
            Map shape.
        segmentation : `~photutils.segmentation.SegmentationImage` or 2-D int array, optional
            The regions found by the detector (``find_sources(..., return_segmentation=True)``).
            Without it each region is the disk of ``radius`` pixels around the catalog position
            (for catalogs made elsewhere).
        mask : 2-D bool array, optional
            Masked pixels (they belong to no region).
        radius : float
            Disk radius (pixels) when there is no segmentation.
        """
        ny, nx = (int(s) for s in shape)
        if catalog is None or len(catalog) == 0:
            return cls(np.zeros((ny, nx), dtype=np.int32), ids=[], mask=mask)
        if segmentation is not None:
            data = np.asarray(getattr(segmentation, "data", segmentation))
            if data.shape != (ny, nx):
                raise ValueError(f"the segmentation is {data.shape}, the map {(ny, nx)}")
            if "label" not in catalog.colnames:
                raise ValueError("a catalog given with its segmentation needs a 'label' column")
            return cls(data.astype(np.int64), ids=np.asarray(catalog["label"], dtype=int),
                       mask=mask)
        for col in ("x_centroid", "y_centroid"):
            if col not in catalog.colnames:
                raise ValueError(f"the catalog has no {col!r} column")
        x = np.asarray(getattr(catalog["x_centroid"], "value", catalog["x_centroid"]), float)
        y = np.asarray(getattr(catalog["y_centroid"], "value", catalog["y_centroid"]), float)
        outside = ~((x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5))
        if outside.any():
            raise ValueError(f"{int(outside.sum())} catalog position(s) fall outside the "
                             f"{ny}x{nx} map (rows {np.nonzero(outside)[0].tolist()[:10]})")
        yy, xx = np.mgrid[0:ny, 0:nx]
        d2 = (xx[None] - x[:, None, None]) ** 2 + (yy[None] - y[:, None, None]) ** 2
        near = d2 <= radius**2
        ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
        near[np.arange(len(x)), iy, ix] = True  # the pixel of the source itself
        # overlapping disks: a pixel goes to the nearest catalog position
        owner = np.where(near, d2, np.inf).argmin(0)
        labels = np.where(near.any(0), owner + 1, 0)
        return cls(labels, ids=np.arange(1, len(x) + 1), mask=mask)


class _SubpixelGrid:
    """Sky positions of a regular sub-grid of every pixel: where truncated sources are placed.

    Each pixel is split into ``oversample²`` cells; cell centres carry (l, b) in degrees, pixel
    coordinates (x, y) and the (l, b)-coordinate area of the cell in square degrees, so that
    ``sum exp(log p(l, b | θ)) * area`` over a pixel's cells is the prior mass of that pixel.
    """

    def __init__(self, geometry, oversample=4):
        ny, nx = geometry.shape
        k = int(oversample)
        off = (np.arange(k) + 0.5) / k - 0.5
        oy, ox = np.meshgrid(off, off, indexing="ij")
        yy, xx = np.mgrid[0:ny, 0:nx]
        x = (xx.reshape(-1, 1) + ox.reshape(1, -1))  # (npix, k*k)
        y = (yy.reshape(-1, 1) + oy.reshape(1, -1))
        sky = geometry.pixel_to_world(x.ravel(), y.ravel())
        lon = sky.l.wrap_at(180 * u.deg).deg.reshape(x.shape)
        lat = sky.b.deg.reshape(x.shape)
        # cell area in (l, b) coordinates from the local Jacobian of pixel -> world
        eps = 1e-3
        sx = geometry.pixel_to_world(x.ravel() + eps, y.ravel())
        sy = geometry.pixel_to_world(x.ravel(), y.ravel() + eps)
        dl_dx = ((sx.l.wrap_at(180 * u.deg).deg.reshape(x.shape) - lon + 180) % 360 - 180) / eps
        db_dx = (sx.b.deg.reshape(x.shape) - lat) / eps
        dl_dy = ((sy.l.wrap_at(180 * u.deg).deg.reshape(x.shape) - lon + 180) % 360 - 180) / eps
        db_dy = (sy.b.deg.reshape(x.shape) - lat) / eps
        area = np.abs(dl_dx * db_dy - dl_dy * db_dx) / k**2
        as_t = lambda a: torch.as_tensor(np.nan_to_num(a), dtype=torch.float64)  # noqa: E731
        self.l, self.b, self.area = as_t(lon), as_t(lat), as_t(area)
        self.x, self.y = as_t(x).float(), as_t(y).float()
        self.shape, self.oversample = (ny, nx), k

    def log_mass(self, model, theta, pixels=None) -> torch.Tensor:
        """``(n_theta, n_pixels, k²)`` log prior mass of the cells (float64)."""
        lon, lat, area = ((a if pixels is None else a[pixels]) for a in (self.l, self.b, self.area))
        theta = torch.as_tensor(theta, dtype=torch.float64)
        lp = model.position_log_density(lon[None], lat[None], theta[:, None, None, :])
        return lp + torch.log(area)[None]


def completeness_table(completeness, model, mask=None):
    """The tabulated S of a completeness on ``model``'s map: conditional on θ or not."""
    if hasattr(completeness, "theta_center"):
        return ConditionalCompletenessTable(completeness, model.geometry, model.prior, mask)
    return CompletenessTable(completeness, model.geometry, mask)


class CompletenessTable:
    """S(F, s) of a completeness function tabulated on every pixel of a map and a log-flux grid.

    The truncated model and the catalog likelihood evaluate S millions of times; a table over
    the pixel centres (the map resolves nothing finer: sources are binned to pixels) and a fine
    log-flux grid, interpolated linearly in log F, makes that a gather. Masked pixels, pixels
    outside the map the completeness was learned on, and positions outside the map have S = 0
    (nothing can be detected there).

    Parameters
    ----------
    completeness : `~astrotrunc.CompletenessFunction`
        The learned S.
    geometry : `~astrotrunc.SkyGeometry`
        The map.
    mask : 2-D bool array, optional
        Masked pixels.
    flux_range : tuple of float
        Range of the flux grid (S is taken as constant beyond it).
    n_flux : int
        Grid points in log F.
    """

    def __init__(self, completeness, geometry, mask=None, flux_range=(1e-3, 1e5), n_flux=161):
        self._setup(completeness, geometry, mask, flux_range, n_flux)
        self.completeness = completeness
        table = torch.sigmoid(completeness.logit_table(torch.exp(self.log_flux), self.lon,
                                                       self.lat))
        self.table = torch.where(self.off[:, None], 0.0, table).float().contiguous()

    def _setup(self, completeness, geometry, mask, flux_range, n_flux):
        """Pixel-centre sky positions, pixels where S = 0 (``off``) and the log-flux grid."""
        ny, nx = geometry.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        sky = geometry.pixel_to_world(xx.ravel(), yy.ravel())
        self.lon = torch.as_tensor(sky.l.wrap_at(180 * u.deg).deg, dtype=torch.float32)
        self.lat = torch.as_tensor(sky.b.deg, dtype=torch.float32)
        self.log_flux = torch.linspace(math.log(flux_range[0]), math.log(flux_range[1]), n_flux,
                                       dtype=torch.float64)
        off = torch.zeros(ny * nx, dtype=torch.bool)
        extent = getattr(completeness, "extent", None)
        if extent is not None:
            l0, l1, b0, b1 = extent
            off |= (self.lon < l0) | (self.lon > l1) | (self.lat < b0) | (self.lat > b1)
        if mask is not None:
            off |= torch.as_tensor(np.asarray(mask, dtype=bool)).reshape(-1)
        self.off = off
        self.shape, self.n_flux = (ny, nx), int(n_flux)
        self._step = float(self.log_flux[1] - self.log_flux[0])

    def pixel(self, x, y):
        """Flat pixel index of positions (x, y), and whether they fall inside the map."""
        ny, nx = self.shape
        ix, iy = torch.floor(x + 0.5).long(), torch.floor(y + 0.5).long()
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        return torch.where(inside, iy * nx + ix, 0), inside

    def _flux_index(self, flux):
        """Grid index below each flux and the fraction of the step above it (linear in log F)."""
        pos = (torch.log(flux.double().clamp_min(1e-300)) - float(self.log_flux[0])) / self._step
        pos = pos.clamp(0, self.n_flux - 1)
        i0 = pos.floor().long().clamp(max=self.n_flux - 2)
        return i0, (pos - i0).float()

    def at_pixels(self, flux, pixel, table=None):
        """S at fluxes ``flux`` in flat pixels ``pixel`` (same shapes), interpolated in log F.

        ``table``: a copy of `table` to read instead (on the device of ``flux``).
        """
        i0, frac = self._flux_index(flux)
        flat = (self.table if table is None else table).reshape(-1)
        base = pixel * self.n_flux + i0
        return flat[base] * (1 - frac) + flat[base + 1] * frac

    def __call__(self, flux, x, y, active=None):
        """S of sources of ``flux`` at pixel positions (x, y); 0 outside the map.

        ``active`` (bool, same shape) marks the sources whose S is needed; a table may skip the
        others (their value is then unspecified).
        """
        pixel, inside = self.pixel(x, y)
        return torch.where(inside, self.at_pixels(flux, pixel), 0.0)


class ConditionalCompletenessTable(CompletenessTable):
    """S(F, s | θ) of a `~astrotrunc.ConditionalCompleteness`, tabulated per θ node on demand.

    S depends smoothly on θ (through crowding), so the catalog likelihood interpolates it
    trilinearly in ``(log N, sigma_F, log h)`` between the nodes of a grid over the prior box;
    the truncated model evaluates it exactly at each source and the θ of its map.

    Parameters
    ----------
    completeness : `~astrotrunc.ConditionalCompleteness`
        The learned S(F, s | θ).
    geometry : `~astrotrunc.SkyGeometry`
        The map.
    prior : `~astrotrunc.priors.BoxPrior`
        The box the nodes cover.
    mask : 2-D bool array, optional
        Masked pixels.
    n_nodes : tuple of int
        Nodes in N (log-spaced), sigma_F and h (log-spaced).
    flux_range, n_flux
        The log-flux grid, as `CompletenessTable`.
    """

    def __init__(self, completeness, geometry, prior, mask=None, n_nodes=(5, 4, 6),
                 flux_range=(1e-3, 1e5), n_flux=161):
        self._setup(completeness, geometry, mask, flux_range, n_flux)
        self.completeness, self.table = completeness, None
        lo, hi = prior.low.double(), prior.high.double()
        nn_, ns, nh = n_nodes
        self.axes = (torch.linspace(math.log(max(lo[0], 1.0)), math.log(hi[0]), nn_,
                                    dtype=torch.float64),
                     torch.linspace(float(lo[1]), float(hi[1]), ns, dtype=torch.float64),
                     torch.linspace(math.log(lo[2]), math.log(hi[2]), nh, dtype=torch.float64))
        grid = torch.meshgrid(*self.axes, indexing="ij")
        self.nodes = torch.stack([torch.exp(grid[0]), grid[1], torch.exp(grid[2])],
                                 -1).reshape(-1, 3)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def corners(self, theta):
        """Trilinear interpolation: ``(n, 8)`` node indices and weights of each θ."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1, 3)
        coords = [torch.log(theta[:, 0].clamp_min(1.0)), theta[:, 1],
                  torch.log(theta[:, 2].clamp_min(1e-6))]
        i0s, fracs = [], []
        for c, ax in zip(coords, self.axes):
            pos = ((c - ax[0]) / (ax[1] - ax[0])).clamp(0, len(ax) - 1)
            i0 = pos.floor().long().clamp(max=len(ax) - 2)
            i0s.append(i0)
            fracs.append(pos - i0)
        sizes = [len(a) for a in self.axes]
        idx, w = [], []
        for corner in range(8):
            bits = [(corner >> k) & 1 for k in range(3)]
            flat = (((i0s[0] + bits[0]) * sizes[1] + (i0s[1] + bits[1])) * sizes[2]
                    + i0s[2] + bits[2])
            weight = torch.ones_like(fracs[0])
            for b, f in zip(bits, fracs):
                weight = weight * (f if b else 1 - f)
            idx.append(flat)
            w.append(weight)
        return torch.stack(idx, 1), torch.stack(w, 1)

    def node_table(self, node, pixels=None) -> torch.Tensor:
        """S ``(n_pixels, n_flux)`` at one node (all pixels, or the flat ``pixels``)."""
        lon, lat, off = ((a if pixels is None else a[pixels])
                         for a in (self.lon, self.lat, self.off))
        t = torch.sigmoid(self.completeness.logit_table(torch.exp(self.log_flux), lon, lat,
                                                        theta=self.nodes[node]))
        return torch.where(off[:, None], 0.0, t)

    def all_nodes(self, pixels=None, lon=None, lat=None, nodes=None) -> torch.Tensor:
        """S ``(n_nodes, n_positions, n_flux)`` at the nodes (all, or the indices ``nodes``).

        Positions are flat ``pixels`` (masked ones get S = 0) or sky positions ``lon, lat``.
        """
        nodes = torch.arange(self.n_nodes) if nodes is None else torch.as_tensor(nodes)
        if pixels is not None:
            lon, lat, off = self.lon[pixels], self.lat[pixels], self.off[pixels]
        else:
            off = torch.zeros(len(lon), dtype=torch.bool)
        k, n = len(lon), len(nodes)
        theta = self.nodes[nodes].repeat_interleave(k, 0)
        t = torch.sigmoid(self.completeness.logit_table(torch.exp(self.log_flux), lon.repeat(n),
                                                        lat.repeat(n), theta=theta))
        return torch.where(off.repeat(n)[:, None], 0.0, t).reshape(n, k, self.n_flux)

    def interpolate(self, tables, flux, index, theta):
        """S from node tables: trilinear between the θ nodes, linear in log F.

        The interpolation the catalog likelihood uses, so a truncated model and the likelihood
        that read the same ``tables`` agree on S exactly.

        Parameters
        ----------
        tables : tensor ``(n_nodes, P, n_flux)``
            S at every node on ``P`` positions (`all_nodes`).
        flux, index : tensors of one shape ``(n, ...)``
            Fluxes and indices into the ``P`` positions.
        theta : tensor ``(n, 3)``
            θ of each leading row.
        """
        idx, w = self.corners(theta)  # (n, 8)
        lead = (len(theta),) + (1,) * (flux.ndim - 1) + (8,)
        idx, w = idx.reshape(lead), w.reshape(lead).float()
        i0, frac = self._flux_index(flux)
        base = (idx * tables.shape[1] + index[..., None]) * self.n_flux + i0[..., None]
        flat = tables.reshape(-1)
        s = flat[base] * (1 - frac[..., None]) + flat[base + 1] * frac[..., None]
        return (s * w).sum(-1)

    def at_pixels(self, flux, pixel, theta=None, active=None):
        """S at ``flux`` in flat pixels ``pixel``, for θ ``(n, 3)`` of the leading axis.

        The network runs only where ``active`` (default: everywhere); elsewhere S is 0.
        """
        if theta is None:
            raise ValueError("a conditional completeness needs the θ of each map")
        theta = torch.as_tensor(theta, dtype=torch.float32)
        th = theta.reshape(theta.shape[0], *([1] * (flux.ndim - 1)), 3).expand(*flux.shape, 3)
        flat, pix = flux.reshape(-1), pixel.reshape(-1)
        on = ~self.off[pix]
        if active is not None:
            on &= active.reshape(-1)
        need = torch.nonzero(on).ravel()
        s = torch.zeros(flat.shape)
        with torch.no_grad():
            logit = self.completeness({"flux": flat[need].float(), "l": self.lon[pix[need]],
                                       "b": self.lat[pix[need]],
                                       "theta": th.reshape(-1, 3)[need]})
        s[need] = torch.sigmoid(logit)
        return s.reshape(flux.shape)

    def __call__(self, flux, x, y, theta=None, active=None):
        pixel, inside = self.pixel(x, y)
        on = inside if active is None else inside & active
        return torch.where(inside, self.at_pixels(flux, pixel, theta, on), 0.0)


class TruncatedModel:
    """The truncated simulation model of an observation: detection is truncation.

    Given the N_det detection regions R_i of the observed catalog, a simulation draws
    θ ~ p(θ) restricted to N ≥ N_det (or a TMNRE box of it), then

    * N_det detected sources, source i inside R_i, from p(F, s | θ) S(F, s) (optionally also
      F ≥ ``flux_threshold``), drawn by sampling-importance-resampling of ``n_candidates``
      proposals from the prior restricted to R_i;
    * N − N_det sub-threshold sources from p(F, s | θ) (1 − S(F, s)), by rejection with S;

    and renders the map from all N sources with the instrument and noise of the model. So the
    maps look like the observation in their detected sources (the paper's fig. 2).

    "Detected" means what S means: the detector finds a region at the source (the definition
    the completeness was learned with). The paper also requires F ≥ F_th of detected sources;
    that is the ``flux_threshold`` option, off by default because the detector's regions already
    contain sources below F_th (its odds are a probability, not a cut), so the cut would make the
    truncated model disagree with S and with the catalog likelihood.

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`
        The full model.
    regions : `DetectedRegions`
        Regions of the observed catalog.
    completeness : `~astrotrunc.CompletenessFunction` or `CompletenessTable`
        S(F, s) of the detector that made the catalog (tabulated on the map's pixels).
    flux_threshold : float, optional
        Also require F ≥ this of detected sources.
    prior : `~astrotrunc.priors.BoxPrior`, optional
        The θ box (the model's prior by default); N is restricted to N ≥ N_det.
    n_candidates : int
        Proposals per detected source.
    oversample : int
        Sub-pixel grid of positions inside the regions.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel, CompletenessFunction
    >>> from astrotrunc.truncation import DetectedRegions, TruncatedModel
    >>> import numpy as np
    >>> model = PointSourceModel.paper()
    >>> labels = np.zeros(model.shape, int); labels[64, 60:62] = 1
    >>> tm = TruncatedModel(model, DetectedRegions(labels), CompletenessFunction())
    >>> sims = tm.simulate(3, seed=0)
    >>> int(sims.detected.sum(1).min()), bool((sims.theta[:, 0] >= 1).all())
    (1, True)
    """

    def __init__(self, model, regions, completeness, *, flux_threshold=None, prior=None,
                 n_candidates=32, oversample=4):
        if tuple(regions.shape) != tuple(model.shape):
            raise ValueError(f"the regions are on a {regions.shape} map, the model's map is "
                             f"{model.shape}")
        self.model, self.regions, self.completeness = model, regions, completeness
        self.flux_threshold = None if flux_threshold is None else float(flux_threshold)
        if self.flux_threshold is not None and not self.flux_threshold > 0:
            raise ValueError(f"flux_threshold must be positive, got {flux_threshold}")
        self.prior = self.restrict(model.prior if prior is None else prior)
        self.n_candidates, self.grid = int(n_candidates), _SubpixelGrid(model.geometry, oversample)
        self.table = (completeness if isinstance(completeness, CompletenessTable) else
                      completeness_table(completeness, model, regions.mask))
        self._theta_arg = isinstance(self.table, ConditionalCompletenessTable)
        if self._theta_arg:  # S inside the regions: node tables, as the catalog likelihood reads
            self._region_pixels = torch.unique(self.regions.pixel_index)
            self._region_tables = self.table.all_nodes(self._region_pixels).float()
        # padded region cells: (n_det, max cells) flat indices into the grid's (pixel, cell) table
        k2 = oversample**2
        cells = (self.regions.pixel_index[:, None] * k2 + torch.arange(k2)).reshape(-1)
        owner = self.regions.region_index.repeat_interleave(k2)
        width = int(self.regions.sizes.max()) * k2 if self.regions.n else 1
        self._cells = torch.zeros(self.regions.n, width, dtype=torch.long)
        self._cell_ok = torch.zeros(self.regions.n, width, dtype=torch.bool)
        slot = torch.arange(len(cells)) - torch.repeat_interleave(
            torch.cumsum(self.regions.sizes * k2, 0) - self.regions.sizes * k2,
            self.regions.sizes * k2)
        self._cells[owner, slot] = cells
        self._cell_ok[owner, slot] = True

    @property
    def n_detected(self) -> int:
        return self.regions.n

    def restrict(self, box):
        """``box`` with N restricted to N ≥ N_det (a `ValueError` if the box has no such N)."""
        i = box.names.index("N")
        if float(box.high[i]) <= self.regions.n:
            raise ValueError(f"the catalog has {self.regions.n} detections, but the prior allows "
                             f"N < {float(box.high[i]):g} sources only")
        low = box.low.clone()
        low[i] = max(float(low[i]), float(self.regions.n))
        return box.truncate(low=low)

    def _detected_sources(self, theta, gen):
        n, m = len(theta), self.regions.n
        k = self.n_candidates
        g = self.grid
        cells = self._cells.reshape(-1)
        lp = self.model.position_log_density(g.l.reshape(-1)[cells].reshape(m, -1)[None],
                                             g.b.reshape(-1)[cells].reshape(m, -1)[None],
                                             theta.double()[:, None, None, :])
        lp = lp + torch.log(g.area.reshape(-1)[cells].reshape(m, -1))[None]
        lp = torch.where(self._cell_ok[None], lp, -math.inf)
        probs = torch.softmax(lp, -1).reshape(n * m, -1).float()
        pick = torch.multinomial(probs, k, replacement=True, generator=gen).reshape(n, m, k)
        cell = self._cells[torch.arange(m)[None, :, None], pick]
        lon = g.l.reshape(-1)[cell].float()
        lat = g.b.reshape(-1)[cell].float()
        sig = theta[:, 1].double()[:, None, None]
        u01 = torch.rand(n, m, k, generator=gen, dtype=torch.float64)
        if self.flux_threshold is not None:  # F >= F_th: inverse CDF of the truncated normal
            a = torch.special.ndtr((math.log(self.flux_threshold) - self.model.flux_mu) / sig)
            u01 = a + (1 - a) * u01
        z = torch.special.ndtri(u01.clamp(1e-300, 1 - 1e-16))
        flux = torch.exp(self.model.flux_mu + sig * z).float()
        pixel = cell // self.grid.oversample**2
        if self._theta_arg:
            index = torch.searchsorted(self._region_pixels, pixel)
            s = self.table.interpolate(self._region_tables, flux, index, theta)
        else:
            s = self.table.at_pixels(flux, pixel)
        w = torch.where(s.sum(-1, keepdim=True) > 0, s, torch.ones_like(s)).reshape(n * m, k)
        one = torch.multinomial(w, 1, generator=gen).reshape(n, m, 1)
        take = lambda a: a.gather(2, one)[..., 0]  # noqa: E731
        cell = take(cell)
        return take(flux), take(lon), take(lat), g.x.reshape(-1)[cell], g.y.reshape(-1)[cell]

    def _undetected_sources(self, theta, counts, gen):
        n = len(theta)
        total = torch.zeros(n, dtype=torch.long)
        parts = []
        need = counts.clone()
        for _ in range(100):  # rejection with S: a few passes at most
            if int(need.max()) <= 0:
                break
            n_prop = int(need.max() * 1.4) + 16
            prop = theta.clone()
            prop[:, 0] = n_prop
            flux, lon, lat, _ = self.model.sample_sources(prop, gen)
            x, y = self.model.geometry.world_to_pixel(lon, lat)
            # proposals are padded to the chunk's largest need: S only where one may be kept
            active = torch.arange(n_prop)[None, :] < (need[:, None] * 1.4 + 16)
            s = self.table(flux, x, y, *((theta,) if self._theta_arg else ()), active=active)
            accept = (torch.rand(s.shape, generator=gen) >= s) & active
            rank = torch.cumsum(accept.long(), 1)
            keep = accept & (rank <= need[:, None])
            parts.append((flux, lon, lat, x, y, keep))
            got = keep.sum(1)
            total += got
            need = need - got
        else:  # pragma: no cover - S ~ 1 everywhere would make this loop forever
            raise RuntimeError("could not draw enough undetected sources: the completeness is ~1 "
                               "over the whole prior")
        cat = [torch.cat([p[i] for p in parts], 1) for i in range(6)]
        keep = cat[5]
        # compact the kept sources to the left, padded to the largest count
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        width = max(int(counts.max()), 1)
        sel = order[:, :width]
        out = [a.gather(1, sel) for a in cat[:5]]
        valid = keep.gather(1, sel)
        return (*out, valid)

    def simulate(self, n: int, seed=None, *, theta=None, prior=None, chunk_size=256, device=None,
                 noise=True):
        """Simulate ``n`` truncated-model maps (a `~astrotrunc.SimulationBatch` with ``detected``).

        Parameters
        ----------
        n : int
            Number of maps.
        seed : int or sequence of int, optional
            Same seed, same maps.
        theta : array-like, optional
            ``(n, 3)`` parameters (N ≥ N_det) instead of draws of the prior.
        prior : `~astrotrunc.priors.BoxPrior`, optional
            Draw θ from this box (restricted to N ≥ N_det) instead of the model's prior.
        chunk_size : int
            Maps simulated at once.
        device : str, optional
            Rendering device (sources are drawn on the CPU).
        noise : bool
            If `False`, the noiseless mean maps.
        """
        from .simulation import SimulationBatch

        n = int(n)
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        box = self.prior if prior is None else self.restrict(prior)
        if theta is not None:
            theta = torch.as_tensor(theta, dtype=torch.float32)
            if theta.shape != (n, len(box)):
                raise ValueError(f"theta must have shape ({n}, {len(box)}), got "
                                 f"{tuple(theta.shape)}")
            if (theta[:, 0] < self.regions.n).any():
                raise ValueError(f"every theta needs N >= N_det = {self.regions.n}")
        root = np.random.SeedSequence(seed)
        batches = []
        for k, start in enumerate(range(0, n, chunk_size)):
            stop = min(start + chunk_size, n)
            state = np.random.SeedSequence(root.entropy, spawn_key=(k,))
            gen = torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))
            th = theta[start:stop] if theta is not None else box.sample(stop - start, gen)
            batches.append(self._simulate_chunk(th, gen, noise, device))
        return batches[0] if len(batches) == 1 else SimulationBatch.concatenate(batches)

    def _simulate_chunk(self, theta, gen, noise, device):
        from .simulation import SimulationBatch

        m = self.regions.n
        counts = theta[:, 0].floor().long()
        uf, ul, ub, ux, uy, uvalid = self._undetected_sources(theta, counts - m, gen)
        if m:
            df, dl, db, dx, dy = self._detected_sources(theta, gen)
            ones = torch.ones(len(theta), m, dtype=torch.bool)
            flux, lon, lat = torch.cat([df, uf], 1), torch.cat([dl, ul], 1), torch.cat([db, ub], 1)
            x, y = torch.cat([dx, ux], 1), torch.cat([dy, uy], 1)
            valid = torch.cat([ones, uvalid], 1)
            detected = torch.cat([ones, torch.zeros_like(uvalid)], 1)
        else:
            flux, lon, lat, x, y, valid = uf, ul, ub, ux, uy, uvalid
            detected = torch.zeros_like(uvalid)
        ny, nx = self.model.shape
        in_map = valid & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        dev = torch.device(device or "cpu")
        mu = self.model.render(flux.to(dev), x.to(dev), y.to(dev), in_map.to(dev))
        maps = self.model.observe(mu, gen if dev.type == "cpu" else None) if noise else mu
        return SimulationBatch(maps.cpu(), theta, flux, lon, lat, x, y, valid, in_map,
                               self.model.param_names, self.model.flux_unit.to_string(),
                               detected=detected)
