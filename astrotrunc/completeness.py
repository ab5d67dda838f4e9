"""r2 -- the completeness (source-sensitivity) function S(F, l, b) of the r1 detector.

S(F, s) is the probability that a source of flux F at position s is detected by r1 (with a given
odds threshold and F_th channel), marginalised over everything else in the map. It is learned by
the NRE engine as a classifier of detected/undetected labels d on (log F, l, b) -- its logit is
``log p(d=1 | F, s) / p(d=0 | F, s)``, so ``S = sigmoid(logit)`` -- and checked against the
classical brute-force measurement, `injection_recovery`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import QTable
from torch import nn
from tqdm.auto import tqdm

from ._utils import evaluating, nearest_pixel, weights_identity
from .detection import NeuralSourceFinder, default_detector
from .detection.finder import as_finder
from .diagnostics import binomial_interval
from .exceptions import AstrotruncWarning
from .nre import RatioEstimator, Trainer
from .nre._ddp import RankView, shard_indices

__all__ = ["CompletenessFunction", "ConditionalCompleteness", "CompletenessLabels",
           "injection_recovery", "match_sources", "default_completeness", "detect_batch"]

_DEFAULT_COMPLETENESS = "completeness_paper.safetensors"
_DEFAULT_CONDITIONAL = "completeness_conditional_paper.safetensors"


# ----------------------------------------------------------------------------------------------
# Detection labels for simulated sources
# ----------------------------------------------------------------------------------------------
def detect_batch(detector, maps, *, threshold=5.0, flux_threshold=None, batch_size=32):
    """Deprecated: use ``NeuralSourceFinder(detector, threshold, ...).find_batch(maps)``.

    Parameters
    ----------
    detector : `~astrotrunc.SourceDetector`
        The detector.
    maps : array ``(n, H, W)``
        The maps.
    threshold, flux_threshold : float
        Finder settings.
    batch_size : int
        Maps per network call.

    Returns
    -------
    `numpy.ndarray`
        Region labels ``(n, H, W)``.
    """
    from astropy.utils.exceptions import AstropyDeprecationWarning

    warnings.warn("detect_batch is deprecated: use NeuralSourceFinder(detector, threshold, "
                  "flux_threshold=...).find_batch(maps), which carries every detection setting",
                  AstropyDeprecationWarning, stacklevel=2)
    finder = NeuralSourceFinder(detector, threshold, flux_threshold=flux_threshold,
                                batch_size=batch_size)
    return finder.find_batch(maps)


def match_sources(segmentation, flux, x, y, valid):
    """One-to-one detection labels of true sources from region label maps.

    A source is detected (``d = 1``) when its centre pixel lies in a detected region and it is
    the brightest true source centred in that region; every region detects at most one source.

    Parameters
    ----------
    segmentation : int array ``(n, H, W)``
        Region labels (0 = none), e.g. from `~astrotrunc.NeuralSourceFinder.find_batch`.
    flux, x, y : arrays ``(n, n_max)``
        True sources (pixel coordinates 0-based).
    valid : bool array ``(n, n_max)``
        Which entries are real sources inside the map.

    Returns
    -------
    d : bool array ``(n, n_max)``
    """
    segmentation = np.asarray(segmentation)
    flux, x, y, valid = (np.asarray(a) for a in (flux, x, y, valid))
    n, ny, nx = segmentation.shape
    ix, iy = nearest_pixel(x, nx), nearest_pixel(y, ny)
    region = segmentation[np.arange(n)[:, None], iy, ix] * valid
    # for each (map, region), the brightest source wins: sort by (map, region, -flux)
    m_idx, s_idx = np.nonzero(region > 0)
    d = np.zeros(flux.shape, dtype=bool)
    if len(m_idx):
        order = np.lexsort((-flux[m_idx, s_idx], region[m_idx, s_idx], m_idx))
        m_s, s_s = m_idx[order], s_idx[order]
        key = m_s.astype(np.int64) * (int(segmentation.max()) + 1) + region[m_s, s_s]
        first = np.ones(len(key), dtype=bool)
        first[1:] = key[1:] != key[:-1]
        d[m_s[first], s_s[first]] = True
    return d


# ----------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------
class _MonotoneFluxLogit(nn.Module):
    """logit(F, s) = a(s) + Σ_k w_k(s) tanh(g_k(s) (log F - c_k(s))), w_k, g_k > 0: increasing in F.

    Each step has its own position-dependent height, slope and location, so sharp completeness
    edges (e.g. at F_th) and gentle confusion-limited tails are both representable.
    """

    def __init__(self, hidden=64, n_steps=8, n_in=2):
        super().__init__()
        self.n_steps = n_steps
        self.position = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                      nn.SiLU(), nn.Linear(hidden, 1 + 3 * n_steps))
        # spread the initial steps over the log-flux range of typical training data
        with torch.no_grad():
            self.position[-1].bias[1 + n_steps:1 + 2 * n_steps] = torch.linspace(-2, 2, n_steps)

    def forward(self, z_flux, z_pos):
        return self.table(self.position(z_pos), z_flux[:, None])[:, 0]

    def table(self, p, z_flux):
        """Logits ``(n, m)`` for position outputs ``p`` ``(n, 1 + 3k)`` and log fluxes ``z_flux``
        (``(m,)``, shared by every position, or ``(n, m)``)."""
        k = self.n_steps
        bias, w, c, g = p[:, :1], p[:, 1:1 + k], p[:, 1 + k:1 + 2 * k], p[:, 1 + 2 * k:]
        slope = nn.functional.softplus(g + 1.0) + 0.1
        z = z_flux[None, None, :] if z_flux.ndim == 1 else z_flux[:, None, :]
        steps = torch.tanh(slope[:, :, None] * (z - c[:, :, None]))
        return bias + (nn.functional.softplus(w)[:, :, None] * steps).sum(1)


class CompletenessFunction(RatioEstimator):
    """r2: the completeness S(F, l, b) of a detector, learned on simulations.

    ``S = sigmoid(log r2-odds)``, monotone increasing in flux by construction.

    Parameters
    ----------
    detector_id : str
        `SourceDetector.identity` of the detector whose completeness this is.
    flux_threshold, threshold : float
        The detector's F_th channel and odds threshold that define "detected".
    hidden : int
        Width of the position network.
    log_flux_scale, lon_scale, lat_scale : float
        Input scalings (log-flux, degrees, degrees).
    flux_unit : str
        Flux unit.
    extent : list of float, optional
        ``[l_min, l_max, b_min, b_max]`` (deg) of the map it was learned on; positions outside
        give NaN.
    n_pixels, deblend, tile_overlap
        The other settings of the `~astrotrunc.NeuralSourceFinder` whose detections define
        "detected" (`finder` rebuilds it).

    Examples
    --------
    >>> from astrotrunc import CompletenessFunction
    >>> S = CompletenessFunction(detector_id="example")
    >>> S([1.0, 10.0, 100.0], 0.0, 0.0).shape
    (3,)
    """

    def __init__(self, detector_id="", flux_threshold=None, threshold=5.0, hidden=64,
                 log_flux_center=1.0, log_flux_scale=2.0, lon_scale=20.0, lat_scale=10.0,
                 flux_unit="", extent=None, n_pixels=1, deblend=True, tile_overlap=32):
        super().__init__()
        self.n_pixels, self.deblend, self.tile_overlap = (
            int(n_pixels),
            bool(deblend),
            int(tile_overlap),
        )
        self.extent = None if extent is None else [float(e) for e in extent]
        self.detector_id = str(detector_id)
        self.flux_threshold = None if flux_threshold is None else float(flux_threshold)
        self.threshold = float(threshold)
        self.hidden = int(hidden)
        self.scales = (
            float(log_flux_center),
            float(log_flux_scale),
            float(lon_scale),
            float(lat_scale),
        )
        self.flux_unit = u.Unit(flux_unit).to_string()
        self.net = _MonotoneFluxLogit(self.hidden)

    @property
    def config(self) -> dict:
        c, s, ls, bs = self.scales
        return dict(detector_id=self.detector_id, flux_threshold=self.flux_threshold,
                    threshold=self.threshold, hidden=self.hidden, log_flux_center=c,
                    log_flux_scale=s, lon_scale=ls, lat_scale=bs, flux_unit=self.flux_unit,
                    extent=self.extent, n_pixels=self.n_pixels, deblend=self.deblend,
                    tile_overlap=self.tile_overlap)

    # -- NRE engine interface --------------------------------------------------------------
    def forward(self, batch) -> torch.Tensor:
        """Logit of S for ``batch["flux"], batch["l"], batch["b"]`` (1-D tensors)."""
        c, s, ls, bs = self.scales
        zf = (torch.log(batch["flux"].clamp_min(1e-30)) - c) / s
        zl = (torch.remainder(batch["l"] + 180.0, 360.0) - 180.0) / ls
        zb = batch["b"] / bs
        return self.net(zf, torch.stack([zl, zb], dim=-1))

    def loss(self, batch) -> torch.Tensor:
        """Binary cross-entropy of the detected/undetected labels ``batch["d"]``."""
        return nn.functional.binary_cross_entropy_with_logits(self(batch), batch["d"].float())

    @torch.no_grad()
    def logit_table(self, flux, l, b) -> torch.Tensor:  # noqa: E741
        """Logits of S on a grid: ``(n_positions, n_fluxes)`` for 1-D tensors ``flux`` and ``l, b``.

        The position network runs once per position (not once per flux), so tabulating S over
        every pixel of a map and a fine flux grid is cheap. Positions in degrees, fluxes in the
        model's unit; no input checks (an engine-level method).
        """
        c, s, ls, bs = self.scales
        zf = (torch.log(torch.as_tensor(flux, dtype=torch.float32).clamp_min(1e-30)) - c) / s
        zl = (torch.remainder(torch.as_tensor(l, dtype=torch.float32) + 180.0, 360.0) - 180.0) / ls
        zb = torch.as_tensor(b, dtype=torch.float32) / bs
        p = self.net.position(torch.stack([zl, zb], dim=-1))  # no dropout/normalisation layers
        return self.net.table(p, zf)

    # -- user interface --------------------------------------------------------------------
    def __call__(self, flux, l=None, b=None):  # noqa: E741
        """Detection probability S(F, l, b), broadcasting; ``l`` may be a `SkyCoord` (no ``b``).

        ``flux`` in the model's flux unit (or a Quantity), ``l, b`` in degrees or Quantities.
        Non-positive or non-finite fluxes, and positions outside the map the completeness was
        learned on, give NaN with a warning; shapes that do not broadcast raise `ValueError`.
        """
        if isinstance(flux, dict):  # engine call
            return super().__call__(flux)
        flux, lon, lat = self._inputs(flux, l, b)
        shape = np.broadcast_shapes(flux.shape, lon.shape, lat.shape)
        f, lo, la = (np.broadcast_to(a, shape).ravel() for a in (flux, lon, lat))
        bad = ~(np.isfinite(f) & (f > 0) & np.isfinite(lo) & np.isfinite(la))
        if bad.any():
            warnings.warn(f"{bad.sum()} input(s) with non-positive or non-finite flux or position: "
                          "completeness set to NaN", AstrotruncWarning, stacklevel=2)
        if self.extent is not None:
            l0, l1, b0, b1 = self.extent
            lw = (lo + 180.0) % 360.0 - 180.0
            outside = ~bad & ((lw < l0) | (lw > l1) | (la < b0) | (la > b1))
            if outside.any():
                warnings.warn(f"{outside.sum()} position(s) outside the map the completeness was "
                              f"learned on (l in [{l0:g}, {l1:g}], b in [{b0:g}, {b1:g}] deg): "
                              "completeness set to NaN", AstrotruncWarning, stacklevel=2)
                bad = bad | outside
        t = lambda a: torch.as_tensor(np.where(bad, 1.0, a), dtype=torch.float32)  # noqa: E731
        with evaluating(self):
            p = torch.sigmoid(super().__call__({"flux": t(f), "l": t(lo), "b": t(la)})).numpy()
        p = np.where(bad, np.nan, p.astype(np.float64))
        return p.reshape(shape)

    def _inputs(self, flux, l, b):  # noqa: E741
        if isinstance(flux, u.Quantity):
            flux = flux.to_value(u.Unit(self.flux_unit)) if self.flux_unit else flux.value
        if isinstance(l, SkyCoord):
            if b is not None:
                raise ValueError("give either a SkyCoord or (l, b), not both")
            g = l.galactic
            lon, lat = g.l.wrap_at(180 * u.deg).deg, g.b.deg
        else:
            if l is None or b is None:
                raise ValueError("positions are required: (l, b) in degrees or a SkyCoord")
            lon = l.to_value(u.deg) if isinstance(l, u.Quantity) else l
            lat = b.to_value(u.deg) if isinstance(b, u.Quantity) else b
        return (np.asarray(flux, dtype=np.float64), np.asarray(lon, dtype=np.float64),
                np.asarray(lat, dtype=np.float64))

    def flux_at(self, completeness=0.5, l=0.0, b=0.0, *, flux_range=(1e-3, 1e5)):  # noqa: E741
        """Flux where S reaches ``completeness`` at (l, b) (bisection in log F; monotone S).

        Parameters
        ----------
        completeness : float
            The level, in (0, 1).
        l, b : float, array or `~astropy.units.Quantity`
            Positions (degrees), broadcasting; ``l`` may be a `~astropy.coordinates.SkyCoord`.
        flux_range : tuple of float
            Search interval.

        Returns
        -------
        `~astropy.units.Quantity` or array
            NaN where the level is not reached inside ``flux_range``.
        """
        if not 0 < completeness < 1:
            raise ValueError(f"completeness must be in (0, 1), got {completeness}")
        _, lon, lat = self._inputs(1.0, l, b)
        lon, lat = np.broadcast_arrays(lon, lat)
        lo = np.full(lon.shape, math.log(flux_range[0]))
        hi = np.full(lon.shape, math.log(flux_range[1]))
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            above = self(np.exp(mid), lon, lat) >= completeness
            hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
        res = np.exp(0.5 * (lo + hi))
        reached = (self(np.exp(hi), lon, lat) >= completeness) & (
            self(np.exp(lo), lon, lat) < completeness
        )
        res = np.where(reached, res, np.nan)
        return res * u.Unit(self.flux_unit) if self.flux_unit else res

    # -- training --------------------------------------------------------------------------
    @classmethod
    def for_finder(cls, finder, model, **kwargs) -> "CompletenessFunction":
        """An untrained completeness of ``finder``'s detections on maps of ``model``.

        Parameters
        ----------
        finder : `~astrotrunc.NeuralSourceFinder`
            Its settings (and its detector's identity) are recorded.
        model : `~astrotrunc.PointSourceModel`
            Gives the map extent and the flux unit.
        **kwargs
            Other constructor arguments (``hidden``, input scalings).

        Returns
        -------
        `CompletenessFunction`
        """
        ny, nx = model.shape
        corners = model.geometry.pixel_to_world([-0.5, nx - 0.5, -0.5, nx - 0.5],
                                                [-0.5, -0.5, ny - 0.5, ny - 0.5])
        lon = corners.l.wrap_at(180 * u.deg).deg
        extent = [float(lon.min()), float(lon.max()), float(corners.b.deg.min()),
                  float(corners.b.deg.max())]
        st = finder.settings
        return cls(detector_id=st["detector_id"], flux_threshold=st["flux_threshold"],
                   threshold=st["threshold"], n_pixels=st["n_pixels"], deblend=st["deblend"],
                   tile_overlap=st["tile_overlap"], flux_unit=model.flux_unit.to_string(),
                   extent=extent, **kwargs)

    @classmethod
    def fit_to(cls, model, finder=None, *, n_maps=2000, n_val_maps=200, seed=0, hidden=64,
               progress=True, resume=False, **trainer_kwargs):
        """The completeness of ``finder`` learned on ``n_maps`` simulations of ``model``.

        Equivalent to ``labels = CompletenessLabels(model, finder, ...)``,
        ``S = CompletenessFunction.for_finder(labels.finder, model)`` and
        ``Trainer(**trainer_kwargs).fit(S, labels)``.

        Parameters
        ----------
        model : `~astrotrunc.PointSourceModel`
            The full simulation model.
        finder : `~astrotrunc.NeuralSourceFinder` or `~astrotrunc.SourceDetector`, optional
            What "detected" means; a detector is used with the default finder settings, `None`
            is the shipped detector.
        n_maps, n_val_maps : int
            Training and validation maps (each holds ~N sources, all labelled).
        seed : int
            Seed of the simulations, the network initialisation and the trainer.
        hidden : int
            Width of the position network.
        progress : bool
            Progress bars.
        resume : bool
            Continue from the trainer's checkpoint.
        **trainer_kwargs
            Passed to `~astrotrunc.nre.Trainer`.

        Returns
        -------
        `CompletenessFunction`
            Trained, in evaluation mode; ``history`` holds the trainer's history.
        """
        labels = CompletenessLabels(model, finder, n_maps, n_val_maps, seed=seed,
                                    progress=progress)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            S = cls.for_finder(labels.finder, model, hidden=hidden)
        trainer_kwargs.setdefault("seed", seed)
        S.history = Trainer(progress=progress, **trainer_kwargs).fit(S, labels, resume=resume)
        return S

    @staticmethod
    def simulate_labels(model, finder, n_maps, *, seed=0, threshold=None, flux_threshold=None,
                        chunk_size=256, progress=True):
        """Detected/undetected labels of every in-map source of ``n_maps`` full-model maps.

        Parameters
        ----------
        model : `~astrotrunc.PointSourceModel`
            The full simulation model.
        finder : `~astrotrunc.NeuralSourceFinder` or `~astrotrunc.SourceDetector`
            What "detected" means (with a detector, ``threshold`` and ``flux_threshold`` build
            the finder).
        n_maps : int
            Maps to simulate.
        seed : int
            Simulation seed.
        threshold, flux_threshold : float, optional
            Finder settings, only with a detector.
        chunk_size : int
            Maps simulated at once.
        progress : bool
            Progress bar.

        Returns
        -------
        dict of `torch.Tensor`
            1-D ``flux, l, b, d`` (one entry per source).
        """
        finder = as_finder(finder, threshold=threshold, flux_threshold=flux_threshold)
        return _label_sources(model, finder, n_maps, seed, chunk_size, progress)

    def check_detector(self, detector):
        """Raise `ValueError` unless this completeness was learned for ``detector``.

        Parameters
        ----------
        detector : `~astrotrunc.SourceDetector`
            The detector to check.
        """
        if detector.identity != self.detector_id:
            raise ValueError(f"this completeness belongs to detector {self.detector_id}, not to "
                             f"{detector.identity} ({detector.name}); retrain it for that detector")

    @property
    def identity(self) -> str:
        """A short hash of this completeness' weights and configuration.

        What a model trained against S records (r4 does): equal files, equal identities.
        """
        return weights_identity(self.config, self.state_dict().values())

    # -- plots -----------------------------------------------------------------------------
    def plot(self, positions=((0.0, 0.0), (0.0, 5.0), (0.0, 20.0)), *, flux_range=(0.1, 1000.0),
             sky_shape=(64, 64), extent=40.0, axes=None):
        """Completeness vs flux at chosen (l, b), and a sky map of the 50 %-completeness flux.

        Parameters
        ----------
        positions : sequence of (l, b)
            Where to draw S against flux (degrees).
        flux_range : tuple of float
            Flux axis.
        sky_shape : tuple of int
            Grid of the sky map.
        extent : float
            Half width of the sky map (degrees).
        axes : pair of `matplotlib.axes.Axes`, optional
            Where to draw.

        Returns
        -------
        axes : pair of `matplotlib.axes.Axes`
        """
        import matplotlib.pyplot as plt

        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        ax1, ax2 = axes
        fl = np.geomspace(*flux_range, 200)
        for lon, lat in positions:
            ax1.plot(fl, self(fl, lon, lat), label=f"l={lon:g}°, b={lat:g}°")
        ax1.set_xscale("log")
        ax1.set_xlabel(f"flux [{self.flux_unit or 'model units'}]")
        ax1.set_ylabel("completeness S(F, l, b)")
        ax1.set_ylim(0, 1.02)
        ax1.legend()
        lon = np.linspace(extent, -extent, sky_shape[1])
        lat = np.linspace(-extent, extent, sky_shape[0])
        f50 = self.flux_at(0.5, lon[None, :], lat[:, None])
        f50 = getattr(f50, "value", f50)
        im = ax2.imshow(np.log10(f50), origin="lower", extent=(extent, -extent, -extent, extent),
                        cmap="viridis")
        plt.colorbar(im, ax=ax2, label="log10 F(S = 0.5)")
        ax2.set_xlabel("l [deg]")
        ax2.set_ylabel("b [deg]")
        return axes

    def finder(self, detector=None) -> NeuralSourceFinder:
        """The `~astrotrunc.NeuralSourceFinder` whose detections this completeness describes.

        Parameters
        ----------
        detector : `~astrotrunc.SourceDetector`, optional
            Its detector (the shipped default when `None`); checked with `check_detector`.

        Returns
        -------
        `~astrotrunc.NeuralSourceFinder`
        """
        detector = default_detector() if detector is None else detector
        self.check_detector(detector)
        return NeuralSourceFinder(detector, self.threshold, self.n_pixels, self.flux_threshold,
                                  deblend=self.deblend, tile_overlap=self.tile_overlap)

    @classmethod
    def load_default(cls) -> "CompletenessFunction":
        """The completeness shipped beside the default detector.

        Returns
        -------
        `CompletenessFunction`
        """
        return cls.load_shipped(_DEFAULT_COMPLETENESS)


def default_completeness() -> CompletenessFunction:
    """The shipped completeness of the shipped default detector.

    Returns
    -------
    `CompletenessFunction`
    """
    return CompletenessFunction.load_default()


# ----------------------------------------------------------------------------------------------
# Training data: labelled population sources
# ----------------------------------------------------------------------------------------------
def _label_sources(model, finder, n_maps, seed, chunk_size=256, progress=True, counts=None):
    """Labelled sources (dict of 1-D tensors, and ``theta``: the θ of each source's map).

    ``counts`` (a list) gets the sources per map.
    """
    cols = {k: [] for k in ("flux", "l", "b", "d", "theta")}
    bar = tqdm(total=n_maps, desc="labelling sources", unit="map",
               disable=None if progress else True)
    for sims in model.iter_simulate(int(n_maps), seed=seed, chunk_size=chunk_size):
        segm = finder.find_batch(sims.maps)
        d = match_sources(segm, sims.flux.numpy(), sims.x.numpy(), sims.y.numpy(),
                          sims.in_map.numpy())
        keep = sims.in_map.numpy()
        if counts is not None:
            counts.extend(keep.sum(1).tolist())
        cols["flux"].append(sims.flux.numpy()[keep])
        cols["l"].append(sims.l.numpy()[keep])
        cols["b"].append(sims.b.numpy()[keep])
        cols["d"].append(d[keep].astype(np.float32))
        cols["theta"].append(sims.theta.numpy()[np.nonzero(keep)[0]])
        bar.update(len(sims))
    bar.close()
    return {k: torch.as_tensor(np.concatenate(v)) for k, v in cols.items()}


class CompletenessLabels:
    """r2 training data as a batch source of `~astrotrunc.nre.Trainer.fit`.

    Every in-map source of ``n_maps + n_val_maps`` full-model maps is labelled detected or not
    by ``finder`` and `match_sources` (made once, at construction); the sources of the last
    ``n_val_maps`` maps are the validation set, so that no map has sources on both sides.

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`
        The full simulation model.
    finder : `~astrotrunc.NeuralSourceFinder` or `~astrotrunc.SourceDetector`, optional
        What "detected" means (a detector gets the default finder settings; `None` is the
        shipped detector).
    n_maps, n_val_maps : int
        Training and validation maps.
    seed : int
        Seed of the simulations and of the batch order.
    chunk_size : int
        Maps simulated and detected at once.
    progress : bool
        Progress bar while labelling.

    Attributes
    ----------
    train, val : dict of `torch.Tensor`
        The labelled sources ``flux, l, b, d``.

    Examples
    --------
    >>> from astrotrunc import CompletenessFunction, NeuralSourceFinder, PointSourceModel
    >>> from astrotrunc.completeness import CompletenessLabels
    >>> from astrotrunc.nre import Trainer
    >>> model = PointSourceModel.paper()
    >>> labels = CompletenessLabels(model, NeuralSourceFinder(flux_threshold=10.0), 4, 2,
    ...                             progress=False)
    >>> S = CompletenessFunction.for_finder(labels.finder, model)
    >>> history = Trainer(max_epochs=1, batch_size=256, progress=False).fit(S, labels)
    >>> S.flux_threshold, S.threshold
    (10.0, 5.0)
    """

    checked = True  # validated once here

    def __init__(self, model, finder=None, n_maps=2000, n_val_maps=200, *, seed=0,
                 chunk_size=256, progress=True):
        if int(n_maps) < 1 or int(n_val_maps) < 1:
            msg = f"n_maps and n_val_maps must be at least 1, got {n_maps}, {n_val_maps}"
            raise ValueError(msg)
        self.finder = as_finder(finder)
        self.seed = int(seed)
        counts = []
        every = _label_sources(model, self.finder, int(n_maps) + int(n_val_maps), seed,
                               chunk_size, progress, counts)
        n_val_sources = int(sum(counts[int(n_maps):]))
        n = len(every["d"])
        if n - n_val_sources < 2 or n_val_sources < 1:
            msg = f"too few labelled sources ({n}) to train and validate; simulate more maps"
            raise ValueError(msg)
        self.train = {k: v[:n - n_val_sources] for k, v in every.items()}
        self.val = {k: v[n - n_val_sources:] for k, v in every.items()}

    def __repr__(self):
        return (f"CompletenessLabels({len(self.train['d'])} training and {len(self.val['d'])} "
                f"validation sources, {self.finder!r})")

    def _take(self, data, idx, batch_size):
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield {k: v[j] for k, v in data.items()}

    def train_batches(self, batch_size, epoch, rank=0, world_size=1):
        """Shuffled batches of the training sources (the order depends on seed and epoch).

        With ``world_size`` processes, ``rank`` takes every ``world_size``-th source of that
        order (padded by wrapping around so that every rank has as many).
        """
        gen = torch.Generator().manual_seed(self.seed * 100003 + int(epoch))
        order = shard_indices(torch.randperm(len(self.train["d"]), generator=gen), rank,
                              world_size)
        return self._take(self.train, order, batch_size)

    def val_batches(self, batch_size, rank=0, world_size=1):
        """Batches of the validation sources (``rank``'s share of ``world_size``)."""
        order = shard_indices(torch.arange(len(self.val["d"])), rank, world_size, pad=False)
        return self._take(self.val, order, batch_size)

    def n_batches(self, batch_size, rank=0, world_size=1):
        """Training batches per epoch."""
        n = len(shard_indices(torch.arange(len(self.train["d"])), rank, world_size))
        return -(-n // batch_size)

    def shard(self, rank, world_size):
        """Process ``rank``'s share of ``world_size`` (a batch source, for data-parallel training).
        """
        return RankView(self, rank, world_size)


# ----------------------------------------------------------------------------------------------
# Injection-recovery: the classical measurement
# ----------------------------------------------------------------------------------------------
def injection_recovery(model, finder=None, fluxes=(1, 3, 10, 30, 100), positions=((0, 0),),
                       n_maps=100, *, seed=0, threshold=None, flux_threshold=None,
                       population_weighted=True, progress=True):
    """Brute-force completeness: inject sources of known flux, run the detector, count.

    For every (flux, position) pair, one source is injected into each of ``n_maps`` full-model
    maps (at the same pixel), the maps are detected by ``finder``
    (`~astrotrunc.NeuralSourceFinder.find_batch`), and the injected source counts as recovered
    under the same one-to-one matching as the labels of `CompletenessFunction`.

    With ``population_weighted=True`` (default) the maps' θ are drawn from
    p(θ | a source (F, l, b)) ∝ p(θ) N p(F, l, b | θ) by sampling-importance-resampling, which is
    the distribution a source of the population at (F, l, b) lives in -- the quantity S(F, s)
    that `CompletenessFunction` learns from labelled population sources (near the plane, for
    instance, a population source is more likely to sit in a crowded small-h map). With `False`,
    θ ~ p(θ) as in the classical measurement, which answers "how complete is a map of the prior
    for an extra injected source".

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`
        The full simulation model.
    finder : `~astrotrunc.NeuralSourceFinder` or `~astrotrunc.SourceDetector`, optional
        What "detected" means; `None` is the shipped detector with the default settings.
    fluxes : sequence of float or `~astropy.units.Quantity`
        Injected fluxes (positive).
    positions : sequence of (l, b)
        Injection positions in degrees (inside the map).
    n_maps : int
        Maps per (flux, position).
    seed : int
        Seed of the maps and the noise.
    threshold, flux_threshold : float, optional
        Settings of the finder built when ``finder`` is a detector (an error with a finder,
        which carries its own).
    population_weighted : bool
        Draw the maps' θ from p(θ | a source at (F, l, b)) (default) or from p(θ).
    progress : bool
        Progress bar.

    Returns
    -------
    `~astropy.table.QTable`
        One row per (flux, position): ``flux, l, b, n_injected, n_recovered, completeness`` and
        the 68 % Clopper-Pearson interval ``completeness_low, completeness_high``; ``meta``
        holds the finder's settings, the seed and ``population_weighted``.

    Raises
    ------
    ValueError
        Non-positive fluxes, positions outside the map, ``n_maps < 1``.
    """
    finder = as_finder(finder, threshold=threshold, flux_threshold=flux_threshold)
    if int(n_maps) < 1:
        msg = f"n_maps must be at least 1, got {n_maps}"
        raise ValueError(msg)
    fluxes = np.atleast_1d(np.asarray(getattr(fluxes, "value", fluxes), dtype=float))
    pos = np.atleast_2d(np.asarray(positions, dtype=float))
    if pos.shape[1] != 2:
        raise ValueError("positions must be a sequence of (l, b) pairs in degrees")
    if (fluxes <= 0).any() or not np.isfinite(fluxes).all():
        raise ValueError("injected fluxes must be positive and finite")
    ny, nx = model.shape
    px, py = model.geometry.world_to_pixel(torch.as_tensor(pos[:, 0]), torch.as_tensor(pos[:, 1]))
    px, py = px.numpy(), py.numpy()
    outside = (px < -0.5) | (px >= nx - 0.5) | (py < -0.5) | (py >= ny - 0.5)
    if outside.any():
        raise ValueError(f"positions {pos[outside].tolist()} fall outside the map")
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    bar = tqdm(
        total=len(fluxes) * len(pos), desc="injection-recovery", disable=None if progress else True
    )
    if population_weighted:
        pool = model.sample_population(50 * n_maps, seed=seed + 2)
    else:
        base = model.simulate(n_maps, seed=seed, noise=False)
    for (lon, lat), x0, y0 in zip(pos, px, py):
        for f in fluxes:
            if population_weighted:
                logw = torch.log(pool[:, 0].double().clamp_min(1e-300)) + model.source_log_density(
                    torch.tensor(f), torch.tensor(lon), torch.tensor(lat), pool)
                pick = torch.multinomial(torch.softmax(logw, 0).float(), n_maps, replacement=True,
                                         generator=gen)
                base = model.simulate(n_maps, seed=(seed, len(rows)), theta=pool[pick], noise=False)
            inj = model.render(
                torch.full((n_maps, 1), f),
                torch.full((n_maps, 1), float(x0)),
                torch.full((n_maps, 1), float(y0)),
                torch.ones(n_maps, 1, dtype=torch.bool),
            )
            bkg = model.instrument.background
            mu = (
                base.maps
                + inj
                - (torch.as_tensor(bkg, dtype=torch.float32) if np.ndim(bkg) or bkg else 0)
            )
            data = model.observe(mu, gen)
            segm = finder.find_batch(data)
            flux = torch.cat([base.flux, torch.full((n_maps, 1), f)], 1).numpy()
            x = torch.cat([base.x, torch.full((n_maps, 1), float(x0))], 1).numpy()
            y = torch.cat([base.y, torch.full((n_maps, 1), float(y0))], 1).numpy()
            valid = torch.cat([base.in_map, torch.ones(n_maps, 1, dtype=torch.bool)], 1).numpy()
            k = int(match_sources(segm, flux, x, y, valid)[:, -1].sum())
            lo, hi = binomial_interval(k, n_maps, 0.6827, method="clopper-pearson")
            rows.append((f, lon, lat, n_maps, k, k / n_maps, lo, hi))
            bar.update()
    bar.close()
    t = QTable(rows=rows, names=("flux", "l", "b", "n_injected", "n_recovered", "completeness",
                                 "completeness_low", "completeness_high"))
    t["flux"] = t["flux"] * model.flux_unit
    t["l"] = t["l"] * u.deg
    t["b"] = t["b"] * u.deg
    t.meta.update(finder.settings)
    t.meta.update({"seed": seed, "population_weighted": bool(population_weighted)})
    return t


# ----------------------------------------------------------------------------------------------
# Completeness that depends on the population (crowding)
# ----------------------------------------------------------------------------------------------
class ConditionalCompleteness(CompletenessFunction):
    """r2 conditional on θ: S(F, l, b | θ), the completeness of a detector in a map of population θ.

    In crowded maps (many sources, a thin disk) a source is harder to detect than the
    θ-averaged `CompletenessFunction` says, and easier in sparse ones; a catalog likelihood
    with a θ-averaged S is then biased (checked in ``benchmarks/inference.py detected``). This
    estimator adds θ to the inputs of S's position network (standardised ``log N, sigma_F,
    log h``); S stays monotone in flux.

    Parameters
    ----------
    params : sequence of str
        Names of θ (the model's ``param_names``).
    theta_center, theta_scale : sequence of float
        Standardisation of ``(log N, sigma_F, log h)``.
    **kwargs
        As `CompletenessFunction`.

    Examples
    --------
    >>> from astrotrunc import ConditionalCompleteness
    >>> S = ConditionalCompleteness(detector_id="example")
    >>> S([1.0, 100.0], 0.0, 0.0, theta=[200.0, 2.0, 5.0]).shape
    (2,)
    """

    def __init__(self, detector_id="", params=("N", "sigma_F", "h"), theta_center=(5.0, 2.0, 1.7),
                 theta_scale=(1.0, 0.6, 0.8), **kwargs):
        super().__init__(detector_id=detector_id, **kwargs)
        self.params = tuple(str(p) for p in params)
        self.theta_center = tuple(float(c) for c in theta_center)
        self.theta_scale = tuple(float(c) for c in theta_scale)
        self.net = _MonotoneFluxLogit(self.hidden, n_in=2 + len(self.params))

    @property
    def config(self) -> dict:
        return dict(super().config, params=list(self.params), theta_center=list(self.theta_center),
                    theta_scale=list(self.theta_scale))

    def _z_theta(self, theta):
        theta = torch.as_tensor(theta, dtype=torch.float32).reshape(-1, len(self.params))
        t = torch.stack([torch.log(theta[:, 0].clamp_min(1)), theta[:, 1],
                         torch.log(theta[:, 2].clamp_min(1e-3))], 1)
        return (t - torch.tensor(self.theta_center)) / torch.tensor(self.theta_scale)

    def forward(self, batch) -> torch.Tensor:
        """Logit of S for 1-D ``batch["flux"], batch["l"], batch["b"]`` and ``batch["theta"]``."""
        c, s, ls, bs = self.scales
        zf = (torch.log(batch["flux"].clamp_min(1e-30)) - c) / s
        zl = (torch.remainder(batch["l"] + 180.0, 360.0) - 180.0) / ls
        zb = batch["b"] / bs
        zt = self._z_theta(batch["theta"]).to(zf.device).expand(len(zf), -1)
        return self.net(zf, torch.cat([torch.stack([zl, zb], dim=-1), zt], 1))

    @torch.no_grad()
    def logit_table(self, flux, l, b, theta=None) -> torch.Tensor:  # noqa: E741
        """Logits ``(n_positions, n_fluxes)`` of S on a grid, for one ``theta`` (required)."""
        if theta is None:
            raise ValueError("a ConditionalCompleteness needs theta")
        c, s, ls, bs = self.scales
        zf = (torch.log(torch.as_tensor(flux, dtype=torch.float32).clamp_min(1e-30)) - c) / s
        zl = (torch.remainder(torch.as_tensor(l, dtype=torch.float32) + 180.0, 360.0) - 180.0) / ls
        zb = torch.as_tensor(b, dtype=torch.float32) / bs
        zt = self._z_theta(theta).expand(len(zl), -1)
        p = self.net.position(torch.cat([torch.stack([zl, zb], dim=-1), zt], 1))
        return self.net.table(p, zf)

    @classmethod
    def load_default(cls) -> "ConditionalCompleteness":
        """The θ-conditional completeness shipped beside the default detector.

        Returns
        -------
        `ConditionalCompleteness`
        """
        return cls.load_shipped(_DEFAULT_CONDITIONAL)

    def __call__(self, flux, l=None, b=None, theta=None):  # noqa: E741
        """S(F, l, b | θ) (numpy, broadcasting over flux and position); ``theta`` is one θ."""
        if isinstance(flux, dict):  # engine call
            return nn.Module.__call__(self, flux)
        if theta is None:
            raise ValueError("a ConditionalCompleteness needs theta=(N, sigma_F, h)")
        flux, lon, lat = self._inputs(flux, l, b)
        shape = np.broadcast_shapes(flux.shape, lon.shape, lat.shape)
        f, lo, la = (np.broadcast_to(a, shape).ravel() for a in (flux, lon, lat))
        t = lambda a: torch.as_tensor(np.asarray(a, float), dtype=torch.float32)  # noqa: E731
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                logit = nn.Module.__call__(self, {"flux": t(np.clip(f, 1e-30, None)), "l": t(lo),
                                                  "b": t(la), "theta": t(theta)})
        finally:
            self.train(was_training)
        return torch.sigmoid(logit).numpy().astype(np.float64).reshape(shape)
