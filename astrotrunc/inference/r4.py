"""The detected branch, neural route: r4 on detected-source lists against a reference density.

r4 is a set network (`~astrotrunc.nre.DeepSetEmbedding`) over the detected-source list S_det of
a catalog, with ratio heads on θ, that estimates ``log p(S_det | θ) / ρ(S_det)`` against a
reference density ρ (the 1-D heads with the other parameters marginalised; how it is trained:
`DetectedCatalogRatio`), and, as DESIGN.md ("Combining") derives,

    p(I=1 | θ) ∝ E[r4(S_det; θ)],  S_det ~ ρ restricted to the regions R_i of the catalog,

exactly, because ρ(S_det) = p(N_det) ∏ ρ1(S_i) can be sampled inside the regions: the
reference catalogs have N_det sources, source i drawn from ρ1 restricted to R_i, so the
expectation is ``∏ ∫_{R_i} p(S | θ) S(S) / ρ1(R_i) × P(N_det | θ) / p(N_det)``, and every factor
that does not depend on θ drops out. The marginal p(S_det) that shuffled pairs (the usual NRE
contrast) stand for cannot be sampled inside the regions, which is why a reference density is
used.

Two choices of this module, argued:

* Source positions are pixel coordinates (x, y), not (l, b): the regions, the completeness
  table and the detector live on pixels, ρ1 is uniform inside each pixel (so sampling it inside
  a region is exact and cheap: a pixel by weight, then a uniform offset), and no WCS call sits
  on the training path. For the paper's CAR map (x, y) is an affine function of (l, b), and the
  set embedding standardises its inputs, so nothing is lost.
* By default the set network does *not* read the fluxes (``flux_feature="none"``). The
  indicator I(S_det) only constrains the positions (and, with the ``flux_threshold`` option,
  whether F ≥ F_th, which is then a 0/1 column), so p(I=1 | θ) integrates the fluxes out. A
  network that reads the fluxes leaves that integral to the Monte Carlo average over reference
  catalogs, whose variance grows exponentially with N_det (a product of N_det flux ratios): in a
  check with the exact flux ratios (a step-like S at F = 10, ρ1's flux the prior-predictive
  detected flux), 35 detections and 4096 references, the log-mean-exp of a quantity whose true
  value is 0 for every σ_F came out between -4 and 0 nats across σ_F ∈ [1, 3]. A network that
  never sees the fluxes learns the flux-marginalised ratio directly. ``flux_feature="log"``
  (features log F, x, y; ρ1's flux a log-normal) is offered for simulators whose indicator
  depends on the fluxes.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

from .._utils import available_device
from ..nre import DeepSetEmbedding, MarginalRatioEstimator
from ..truncation import CompletenessTable, ConditionalCompletenessTable, completeness_table

__all__ = [
    "DetectedCatalogRatio",
    "DetectedCatalogs",
    "NeuralCatalogLikelihood",
    "ReferenceDensity",
    "completeness_record",
    "simulate_detected",
]

_FLUX_FEATURES = ("none", "log")
_DEFAULT_R4 = "r4_paper.safetensors"


class ReferenceDensity(nn.Module):
    """ρ1(F, s): the single-source reference density of r4, and the features of a source list.

    Positions are drawn pixel by pixel with probabilities ``pixel_weights`` (uniform over the
    unmasked map by default; `from_model` makes them the prior-predictive density of detected
    sources, mixed with a uniform part) and uniformly inside the pixel. Fluxes (only drawn with
    ``flux_feature="log"``) are log-normal, restricted to F ≥ ``flux_threshold`` when that
    option is on. Sampling ρ1 restricted to a region R_i is exact: a pixel of R_i by weight, then
    a uniform offset. The weights are a buffer: they are saved with the estimator that owns this
    module, so the density it was trained against is the one it is evaluated with.

    Parameters
    ----------
    shape : tuple of int
        Map shape ``(ny, nx)``.
    flux_feature : {'none', 'log'}
        ``'none'``: features (x, y) (+ a 0/1 column F ≥ F_th with ``flux_threshold``);
        ``'log'``: features (log F, x, y).
    flux_threshold : float, optional
        The detected branch also requires F ≥ F_th (the paper's option; off by default, as in
        `~astrotrunc.inference.CatalogLikelihood`).
    flux_loc, flux_scale : float
        Mean and standard deviation of ρ1's log F (``flux_feature="log"`` only).
    max_detected : int
        Largest catalog the network is meant for (training raises beyond it).

    Examples
    --------
    >>> import numpy as np
    >>> from astrotrunc.inference import ReferenceDensity
    >>> from astrotrunc.truncation import DetectedRegions
    >>> ref = ReferenceDensity((16, 16))
    >>> ref.n_features
    2
    >>> labels = np.zeros((16, 16), int); labels[3, 4:6] = 1
    >>> x = ref.sample_in_regions(DetectedRegions(labels), 100, generator=0)
    >>> x.shape, bool(((x[..., 0] > 3.5) & (x[..., 0] < 5.5)).all())
    (torch.Size([100, 1, 3]), True)
    """

    def __init__(self, shape, *, flux_feature="none", flux_threshold=None, flux_loc=4.0,
                 flux_scale=1.5, max_detected=256):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 2 or min(self.shape) < 1:
            msg = f"shape must be a 2-D map shape, got {shape!r}"
            raise ValueError(msg)
        if flux_feature not in _FLUX_FEATURES:
            msg = f"flux_feature must be one of {_FLUX_FEATURES}, got {flux_feature!r}"
            raise ValueError(msg)
        if flux_threshold is not None and not float(flux_threshold) > 0:
            msg = f"flux_threshold must be positive, got {flux_threshold}"
            raise ValueError(msg)
        if not float(flux_scale) > 0:
            msg = f"flux_scale must be positive, got {flux_scale}"
            raise ValueError(msg)
        if int(max_detected) < 1:
            msg = f"max_detected must be at least 1, got {max_detected}"
            raise ValueError(msg)
        self.flux_feature = flux_feature
        self.flux_threshold = None if flux_threshold is None else float(flux_threshold)
        self.flux_loc, self.flux_scale = float(flux_loc), float(flux_scale)
        self.max_detected = int(max_detected)
        n_pix = self.shape[0] * self.shape[1]
        self.register_buffer("pixel_weights",
                             torch.full((n_pix,), 1.0 / n_pix, dtype=torch.float64))

    # -- settings ------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """JSON-serialisable settings (the pixel weights are a buffer, saved with the weights)."""
        return {"shape": list(self.shape), "flux_feature": self.flux_feature,
                "flux_threshold": self.flux_threshold, "flux_loc": self.flux_loc,
                "flux_scale": self.flux_scale, "max_detected": self.max_detected}

    @property
    def n_features(self) -> int:
        """Features per source (the presence column excluded)."""
        return 3 if self.flux_feature == "log" or self.flux_threshold is not None else 2

    def set_pixel_weights(self, weights):
        """Set the pixel probabilities (any non-negative map, normalised here)."""
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).reshape(-1)
        if w.numel() != self.pixel_weights.numel() or not torch.isfinite(w).all() or (w < 0).any():
            msg = (f"pixel weights must be a finite non-negative map of shape {self.shape}, got "
                   f"{w.numel()} values")
            raise ValueError(msg)
        if not w.sum() > 0:
            msg = "pixel weights are all zero"
            raise ValueError(msg)
        self.pixel_weights.copy_(w / w.sum())
        return self

    @classmethod
    def from_model(cls, model, completeness, *, n_pilot=20_000, seed=0, uniform_fraction=0.2,
                   smoothing=2.0, mask=None, **kwargs):
        """ρ1 close to the prior-predictive density of one detected source.

        A reference density near the marginal of the joint catalogs keeps the θ-free factor
        p(S_det) / ρ(S_det) of r4 moderate (easy to learn, little spread over the reference
        catalogs of the Monte Carlo average). The pixel weights are the
        histogram of the detected sources of ``n_pilot`` catalogs (`simulate_detected`),
        Gaussian-smoothed by ``smoothing`` pixels and mixed with ``uniform_fraction`` of the
        uniform density over the pixels where anything can be detected; the log-flux location
        and scale are those of the detected fluxes (the scale widened by 25 %).

        Parameters
        ----------
        model : `~astrotrunc.PointSourceModel`
            The full model.
        completeness : `~astrotrunc.CompletenessFunction` or `~astrotrunc.CompletenessTable`
            S(F, s) of the detector (or S(F, s | θ): a `~astrotrunc.ConditionalCompleteness` or
            its table).
        n_pilot : int
            Pilot catalogs.
        seed : int
            Seed of the pilot.
        uniform_fraction : float
            Weight of the uniform part (in (0, 1]).
        smoothing : float
            Gaussian smoothing of the histogram, in pixels.
        mask : 2-D bool array, optional
            Masked pixels (weight 0).
        **kwargs
            Settings of the density (``flux_feature``, ``flux_threshold``, ``max_detected``).
        """
        from scipy.ndimage import gaussian_filter

        if not 0 < uniform_fraction <= 1:
            msg = f"uniform_fraction must be in (0, 1], got {uniform_fraction}"
            raise ValueError(msg)
        table = _as_table(completeness, model, mask)
        ref = cls(model.shape, **kwargs)
        gen = torch.Generator().manual_seed(int(seed))
        counts = torch.zeros(model.shape[0] * model.shape[1], dtype=torch.float64)
        log_f = []
        for start in range(0, int(n_pilot), 1024):
            theta = model.prior.sample(min(1024, int(n_pilot) - start), generator=gen)
            flux, pixel, _, det = simulate_detected(model, table, theta, gen)
            counts.index_add_(0, pixel[det], torch.ones(int(det.sum()), dtype=torch.float64))
            log_f.append(torch.log(flux[det]).double())
        support = (_node_tables(table).amax((0, 2)) > 0 if _conditional(table)
                   else table.table.max(1).values > 0).double()
        hist = gaussian_filter(counts.reshape(model.shape).numpy(), smoothing, mode="constant")
        hist = torch.as_tensor(hist).reshape(-1) * support
        if not hist.sum() > 0:
            msg = "the pilot catalogs hold no detection: the completeness is ~0 everywhere"
            raise ValueError(msg)
        w = (1 - uniform_fraction) * hist / hist.sum() + uniform_fraction * support / support.sum()
        ref.set_pixel_weights(w)
        log_f = torch.cat(log_f)
        if "flux_loc" not in kwargs:
            ref.flux_loc = float(log_f.mean())
        if "flux_scale" not in kwargs:
            ref.flux_scale = 1.25 * float(log_f.std())
        return ref

    # -- features ------------------------------------------------------------------------------
    def features(self, flux, x, y) -> torch.Tensor:
        """``(..., n_features)`` features of sources of ``flux`` at pixel positions (x, y)."""
        cols = [x.float(), y.float()]
        if self.flux_feature == "log":
            cols.insert(0, torch.log(flux.float()))
        elif self.flux_threshold is not None:
            cols.append((flux >= self.flux_threshold).float())
        return torch.stack(cols, -1)

    def _log_flux(self, u01):
        """Log fluxes of ρ1 from uniforms (inverse CDF; restricted to F ≥ F_th if set)."""
        u01 = u01.double()
        if self.flux_threshold is not None:
            z_th = (math.log(self.flux_threshold) - self.flux_loc) / self.flux_scale
            a = torch.special.ndtr(torch.tensor(z_th, dtype=torch.float64))
            u01 = a + (1 - a) * u01
        z = torch.special.ndtri(u01.clamp(1e-300, 1 - 1e-16))
        log_f = self.flux_loc + self.flux_scale * z
        if self.flux_threshold is not None:
            log_f = log_f.clamp_min(math.log(self.flux_threshold))
        return log_f

    def _pack(self, pixel, offset, u_flux, present):
        nx = self.shape[1]
        x = (pixel % nx).float() + offset[..., 0]
        y = torch.div(pixel, nx, rounding_mode="floor").float() + offset[..., 1]
        if self.flux_feature == "log":
            feats = torch.stack([self._log_flux(u_flux).float(), x, y], -1)
        elif self.flux_threshold is not None:
            feats = torch.stack([x, y, torch.ones_like(x)], -1)
        else:
            feats = torch.stack([x, y], -1)
        out = torch.cat([feats, present[..., None].float()], -1)
        return out * present[..., None]

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, counts, generator=None) -> torch.Tensor:
        """Reference catalogs: ``counts[k]`` sources from ρ1 each, padded ``(B, width, d + 1)``.

        The width is the largest count (at least 1); the last column is the presence mask.
        """
        gen = _generator(generator)
        dev = self.pixel_weights.device
        counts = torch.as_tensor(counts, dtype=torch.long, device=dev).reshape(-1)
        b, width = len(counts), max(int(counts.max()) if len(counts) else 0, 1)
        pixel = torch.multinomial(self.pixel_weights, b * width, replacement=True,
                                  generator=gen).reshape(b, width)
        offset = torch.rand(b, width, 2, generator=gen, device=dev) - 0.5
        u_flux = torch.rand(b, width, generator=gen, dtype=torch.float64, device=dev)
        present = torch.arange(width, device=dev)[None] < counts[:, None]
        return self._pack(pixel, offset, u_flux, present)

    def sample_in_regions(self, regions, n, generator=None) -> torch.Tensor:
        """``n`` reference catalogs of the regions: source i from ρ1 restricted to R_i.

        Returns ``(n, N_det, d + 1)`` (all present). The draws are stratified across the ``n``
        catalogs (Latin hypercube per region: every catalog is still a draw of ρ restricted to
        the regions, so averages over them stay unbiased, with less variance).
        """
        if tuple(regions.shape) != self.shape:
            msg = f"the regions are on a {tuple(regions.shape)} map, ρ1 on a {self.shape} map"
            raise ValueError(msg)
        gen = _generator(generator)
        n, m = int(n), regions.n
        if m == 0:
            return torch.zeros(n, 0, self.n_features + 1)
        w = self.pixel_weights[regions.pixel_index]
        total = torch.zeros(m, dtype=torch.float64).index_add_(0, regions.region_index, w)
        if not (total > 0).all():
            bad = torch.nonzero(total <= 0).ravel().tolist()[:10]
            msg = f"regions {bad} have zero reference weight (pixels outside ρ1's support)"
            raise ValueError(msg)
        # keys: region index + cumulative weight inside the region, increasing over all pixels
        start = torch.cumsum(total, 0) - total
        keys = regions.region_index.double() + (torch.cumsum(w, 0) - start[regions.region_index]) \
            / total[regions.region_index]
        u_pix = _stratified(m, n, gen)  # (m, n)
        query = torch.arange(m, dtype=torch.float64)[:, None] + u_pix
        idx = torch.searchsorted(keys, query.reshape(-1), right=True).clamp(max=len(keys) - 1)
        pixel = regions.pixel_index[idx].reshape(m, n).T
        offset = torch.rand(n, m, 2, generator=gen) - 0.5
        u_flux = _stratified(m, n, gen).T
        return self._pack(pixel, offset, u_flux, torch.ones(n, m, dtype=torch.bool))


def simulate_detected(model, table, theta, generator=None):
    """Sources of the full model, each detected independently with probability S(F, s).

    With a θ-conditional table, a source of parameters θ_k is detected with probability
    S(F, s | θ_k): the node tables of every pixel (computed once per table and kept on it)
    interpolated as the catalog likelihood and the truncated model interpolate them
    (`~astrotrunc.truncation.ConditionalCompletenessTable.interpolate`), all catalogs at once.
    Everything is drawn on the device of ``theta``; the table is copied there once and kept on
    it.

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`
        The full model.
    table : `~astrotrunc.truncation.CompletenessTable`
        Tabulated S (0 outside the map and on masked pixels); a
        `~astrotrunc.truncation.ConditionalCompletenessTable` for S(F, s | θ).
    theta : `torch.Tensor`
        ``(n, n_params)`` parameters.
    generator : `torch.Generator`, optional
        Random numbers, on the device of ``theta``.

    Returns
    -------
    flux, pixel : `torch.Tensor`
        ``(n, max N)`` fluxes and flat pixel indices of every source (padded).
    xy : `torch.Tensor`
        ``(n, max N, 2)`` pixel positions.
    detected : `torch.Tensor`
        ``(n, max N)`` bool: the source exists and was detected.
    """
    theta = torch.as_tensor(theta)
    if not torch.isfinite(theta).all():
        msg = "theta holds NaN or infinite values"
        raise ValueError(msg)
    flux, lon, lat, valid = model.sample_sources(theta, generator)
    x, y = model.geometry.world_to_pixel(lon, lat)
    pixel, inside = table.pixel(x, y)
    lookup = _lookup(table, theta.device)
    if _conditional(table):  # only where a source exists (N varies: half the slots are padding)
        on = valid & inside
        s = torch.zeros(flux.shape, device=flux.device)
        s[on] = table.interpolate(lookup, flux[on], pixel[on],
                                  theta[on.nonzero(as_tuple=True)[0]])
    else:
        s = torch.where(inside, table.at_pixels(flux, pixel, lookup), 0.0)
    detected = valid & inside & (torch.rand(s.shape, generator=generator, device=s.device) < s)
    return flux, pixel, torch.stack([x, y], -1), detected


class DetectedCatalogs:
    """r4 training data as an engine batch source: fresh detected catalogs every epoch.

    θ ~ p(θ); the sources of the full model; each detected independently with probability
    S(F, s), or S(F, s | θ) of the catalog's own θ with a θ-conditional completeness (a table
    lookup: no maps are made, so catalogs cost microseconds; `simulate_detected`); the detected list
    as a padded set (``"x"``: features of `ReferenceDensity.features` plus the presence column).
    Every batch also holds reference catalogs (``"x_ref"``) of ρ(S_det) = p(N_det) ∏ ρ1: their
    N_det is that of another simulation of the batch (so it follows the marginal p(N_det)) and
    their sources are drawn from ρ1. Training batches are new every epoch; validation batches
    are the same every epoch.

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`
        The full model (θ drawn from its prior).
    completeness : `~astrotrunc.CompletenessFunction` or `~astrotrunc.truncation.CompletenessTable`
        S(F, s) of the detector; a `~astrotrunc.ConditionalCompleteness` (or its
        `~astrotrunc.truncation.ConditionalCompletenessTable`) for S(F, s | θ). Its
        `completeness_record` is ``record``: give it to the `DetectedCatalogRatio` trained on
        these catalogs.
    reference : `ReferenceDensity`
        ρ1 and the source features (usually ``estimator.reference_density``).
    n_train, n_val : int
        Catalogs per training epoch and in the validation set.
    seed : int
        Seed of everything drawn.
    mask : 2-D bool array, optional
        Masked pixels (nothing detected there), when ``completeness`` is not already a table.
    device : str or `torch.device`, optional
        Where the catalogs are drawn (default: the CPU). ``"cuda"`` draws them on the GPU that
        trains (give the `~astrotrunc.nre.Trainer` the same device; ``reference`` is moved
        there): on the CPU the table look-ups of S take most of r4's training time. Same
        statistics, other random numbers.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel, CompletenessFunction
    >>> from astrotrunc.inference import DetectedCatalogs, ReferenceDensity
    >>> model = PointSourceModel.paper()
    >>> data = DetectedCatalogs(model, CompletenessFunction.load_default(),
    ...                         ReferenceDensity(model.shape), n_train=64, n_val=16)
    >>> batch = next(iter(data.train_batches(32, epoch=0)))
    >>> sorted(batch), batch["theta"].shape
    (['theta', 'x', 'x_ref'], torch.Size([32, 3]))
    """

    def __init__(self, model, completeness, reference, n_train, n_val, seed=0, *, mask=None,
                 device=None):
        if tuple(model.shape) != reference.shape:
            msg = (f"the reference density is for a {reference.shape} map, the model's is "
                   f"{model.shape}")
            raise ValueError(msg)
        if int(n_train) < 1 or int(n_val) < 1:
            msg = f"n_train and n_val must be positive, got {n_train}, {n_val}"
            raise ValueError(msg)
        self.model, self.reference = model, reference
        self.table = _as_table(completeness, model, mask)
        self.record = completeness_record(self.table)
        self.n_train, self.n_val, self.seed = int(n_train), int(n_val), int(seed)
        self.device = torch.device("cpu") if device is None else available_device(device)
        reference.to(self.device)

    def batch(self, theta, generator=None) -> dict:
        """One batch of joint and reference catalogs for parameters ``theta``."""
        gen = _generator(generator, self.device)
        theta = torch.as_tensor(theta, dtype=torch.float32, device=gen.device)
        flux, _, xy, det = simulate_detected(self.model, self.table, theta, gen)
        counts = det.sum(1)
        width = max(int(counts.max()), 1)
        if width > self.reference.max_detected:
            msg = (f"a simulated catalog has {width} detections, more than max_detected="
                   f"{self.reference.max_detected}: raise max_detected")
            raise ValueError(msg)
        order = torch.argsort((~det).to(torch.int8), dim=1, stable=True)[:, :width]
        present = det.gather(1, order)
        f = flux.gather(1, order)
        x, y = xy[..., 0].gather(1, order), xy[..., 1].gather(1, order)
        feats = self.reference.features(f, x, y)
        x_set = torch.cat([feats, present[..., None].float()], -1) * present[..., None]
        x_ref = self.reference.sample(torch.roll(counts, 1), gen)
        return {"x": x_set, "x_ref": x_ref, "theta": theta}

    def _batches(self, n, seed, batch_size):
        gen = torch.Generator(self.device).manual_seed(
            int(np.random.SeedSequence(seed).generate_state(1)[0]))
        for start in range(0, n, batch_size):
            theta = self.model.prior.sample(min(batch_size, n - start), generator=gen)
            yield self.batch(theta, gen)

    def train_batches(self, batch_size, epoch):
        return self._batches(self.n_train, (self.seed, 1, int(epoch)), int(batch_size))

    def val_batches(self, batch_size):
        return self._batches(self.n_val, (self.seed, 0), int(batch_size))

    def n_batches(self, batch_size):
        return -(-self.n_train // int(batch_size))


class DetectedCatalogRatio(MarginalRatioEstimator):
    """r4: a DeepSets ratio estimator of detected-source lists against a reference density.

    The heads give ``log p(S_det | θ) / ρ(S_det)``: the 1-D heads with the other parameters
    marginalised, the joint head over all of θ (the one that multiplies r3). It owns its
    `ReferenceDensity` (``reference_density``), whose settings are part of `config` and whose
    pixel weights are saved with the network, so `save`/`load` give back the same ρ.

    The ratio is learned as a product of two classifiers on one set embedding,

        p(S_det | θ) / ρ(S_det) = [p(S_det | θ) / p(S_det)] × [p(S_det) / ρ(S_det)]:

    the θ-heads contrast joint pairs with pairs whose θ is shuffled (plain marginal NRE), and a
    θ-free head (`reference_log_ratio`) contrasts joint catalogs with reference catalogs. Their
    sum is exactly the reference-contrast ratio the expectation of eq. 9 needs. Contrasting
    (S_det, θ) directly with (S_ref, θ) (one classifier) lets the network separate the classes
    by S_det alone -- reference catalogs lack the coherence one θ gives a catalog -- and learns
    θ only weakly: on the default model such a network came out 5-40 times too flat in h (for
    61 detections, -14 nats at h = 1.5° where the exact route has -329).

    Parameters
    ----------
    reference : `ReferenceDensity` or dict
        ρ1 and the source features (or its ``config``).
    params : sequence of str
        Parameter names (θ of the model).
    pairs : sequence of pairs, optional
        2-D heads.
    n_features, set_hidden : int
        Output and hidden width of the set embedding.
    hidden, n_blocks, dropout
        Ratio heads, as in `~astrotrunc.nre.MarginalRatioEstimator`.
    log_params : sequence of str
        Positive parameters that enter the heads as their logarithm (before standardisation).
        A scale parameter is constrained to a relative precision (h to ~h / sqrt(2 N_det)), so
        in log it needs the same resolution everywhere in the prior; on the raw scale a catalog
        with small h asks the heads for a much sharper function than one with large h.
    completeness : dict, optional
        The S its training catalogs were thinned with (`completeness_record`; `DetectedCatalogs`
        has it as ``record``). Recorded in `config`, so a saved r4 tells which S it follows;
        `~astrotrunc.PopulationInference` warns when that is not the inference's S. `None`:
        not recorded.

    Examples
    --------
    >>> from astrotrunc.inference import DetectedCatalogRatio, ReferenceDensity
    >>> est = DetectedCatalogRatio(ReferenceDensity((128, 128)), hidden=16)
    >>> est.marginal_names
    ('N', 'sigma_F', 'h', 'N,sigma_F,h')
    >>> est.config["reference"]["flux_feature"]
    'none'
    """

    def __init__(self, reference, params=("N", "sigma_F", "h"), pairs=(), n_features=32,
                 set_hidden=64, hidden=64, n_blocks=2, dropout=0.0, log_params=("N", "h"),
                 completeness=None):
        if isinstance(reference, dict):
            reference = ReferenceDensity(**reference)
        if not isinstance(reference, ReferenceDensity):
            msg = ("reference must be a ReferenceDensity or its config, got "
                   f"{type(reference).__name__}")
            raise TypeError(msg)
        super().__init__(x_shape=(reference.max_detected, reference.n_features + 1), params=params,
                         pairs=pairs, embedding="deepsets",
                         embedding_kwargs={"n_features": int(n_features),
                                           "hidden": int(set_hidden)},
                         hidden=hidden, n_blocks=n_blocks, dropout=dropout, x_key="x",
                         theta_key="theta", reference_key="x_ref", joint=True)
        self.reference_density = reference
        self.completeness = None if completeness is None else _checked_record(completeness)
        unknown = [p for p in log_params if p not in self.param_names]
        if unknown:
            msg = f"log_params {unknown} are not parameters of r4 ({list(self.param_names)})"
            raise ValueError(msg)
        self.log_params = tuple(str(p) for p in log_params)
        if self.log_params:
            index = [self.param_names.index(p) for p in self.log_params]
            self.theta_norm = nn.Sequential(_LogColumns(len(self.param_names), index),
                                            self.theta_norm)
        n_feat, width = self.embedding.n_features, self.hidden
        self.reference_head = nn.Sequential(nn.Linear(n_feat, width), nn.SiLU(),
                                            nn.Linear(width, width), nn.SiLU(),
                                            nn.Linear(width, 1))

    @classmethod
    def load_default(cls) -> DetectedCatalogRatio:
        """The r4 shipped for `~astrotrunc.PointSourceModel.paper` and the shipped completeness.

        Trained on catalogs thinned by the shipped θ-conditional completeness S(F, s | θ) (the
        default of `~astrotrunc.PopulationInference`; recorded in ``completeness``) by
        ``benchmarks/r4_vs_exact.py`` (see ``astrotrunc/data/README.rst``), where it matches the
        exact catalog likelihood with the same S (Jensen-Shannon divergence of every 1-D
        marginal ≤ 0.05 on 24 catalogs of the shipped detector; the largest, 0.040, is N's of
        the joint head for a catalog with θ = (223, 1.52, 2.35)). No flux cut
        (``flux_threshold=None``).
        """
        return cls.load_shipped(_DEFAULT_R4)

    def check_completeness(self, completeness) -> bool:
        """Whether r4 was trained against ``completeness``; if not, warn, naming both.

        Parameters
        ----------
        completeness : `~astrotrunc.CompletenessFunction`, its table, or a `completeness_record`
            The S of the inference r4 is used in.

        Returns
        -------
        bool
            `True` when the recorded identities agree. Otherwise an
            `~astrotrunc.AstrotruncWarning` says that the neural detected branch
            follows r4's S, not this one (also when r4 does not record its S).

        Examples
        --------
        >>> import warnings
        >>> from astrotrunc import CompletenessFunction, ConditionalCompleteness
        >>> from astrotrunc.inference import (DetectedCatalogRatio, ReferenceDensity,
        ...                                   completeness_record)
        >>> S = ConditionalCompleteness(detector_id="example")
        >>> est = DetectedCatalogRatio(ReferenceDensity((16, 16)), hidden=8,
        ...                            completeness=completeness_record(S))
        >>> est.check_completeness(S)
        True
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     est.check_completeness(CompletenessFunction(detector_id="example"))
        False
        >>> "theta-averaged" in str(seen[0].message)
        True
        """
        from ..exceptions import AstrotruncWarning

        want = (_checked_record(completeness) if isinstance(completeness, dict)
                else completeness_record(completeness))
        have = self.completeness
        if have is not None and have.get("identity") is not None \
                and have.get("identity") == want.get("identity"):
            return True
        name = lambda r: (f"the {r['kind']} completeness {r.get('identity')} (detector "  # noqa: E731
                          f"{r.get('detector_id')})")
        trained = "an unrecorded completeness" if have is None else name(have)
        warnings.warn(f"r4 was trained on catalogs thinned by {trained}, this inference uses "
                      f"{name(want)}: the neural detected branch follows r4's S (the exact route "
                      "follows this inference's S)", AstrotruncWarning, stacklevel=2)
        return False

    def reference_log_ratio(self, features) -> torch.Tensor:
        """``(B,)`` log p(S_det) / ρ(S_det) of embedded catalogs (the θ-free factor of r4)."""
        return self.reference_head(features)[:, 0]

    def heads(self, features, theta, standardized=False) -> torch.Tensor:
        """Log-ratios ``log p(S_det | θ) / ρ(S_det)`` ``(B, n_heads)`` of features and θ."""
        theta_heads = super().heads(features, theta, standardized)
        return theta_heads + self.reference_log_ratio(features)[:, None]

    def loss(self, batch) -> torch.Tensor:
        """θ-heads: joint vs shuffled-θ pairs; reference head: joint vs reference catalogs."""
        theta = batch[self.theta_key]
        z = self.theta_norm(theta)
        f = self.features(batch[self.x_key])
        f_ref = self.features(batch[self.reference_key])
        n = len(theta)
        logits = MarginalRatioEstimator.heads(self, torch.cat([f, f]),
                                              torch.cat([z, torch.roll(z, 1, dims=0)]),
                                              standardized=True)
        ref_logits = self.reference_log_ratio(torch.cat([f, f_ref]))
        labels = torch.zeros_like(logits)
        labels[:n] = 1.0
        ref_labels = torch.zeros_like(ref_logits)
        ref_labels[:n] = 1.0
        bce = nn.functional.binary_cross_entropy_with_logits
        return 2 * bce(logits, labels) + 2 * bce(ref_logits, ref_labels)

    def build_embedding(self) -> nn.Module:
        """The DeepSets embedding, evaluated on the present sources only (same weights)."""
        return _PackedDeepSet(self.x_shape, **self.embedding_kwargs)

    @property
    def config(self) -> dict:
        return {"reference": self.reference_density.config, "params": list(self.param_names),
                "pairs": [[self.param_names[i] for i in p] for p in self.pairs],
                "n_features": self.embedding_kwargs["n_features"],
                "set_hidden": self.embedding_kwargs["hidden"], "hidden": self.hidden,
                "n_blocks": self.n_blocks, "dropout": self.dropout,
                "log_params": list(self.log_params), "completeness": self.completeness}


class NeuralCatalogLikelihood:
    """log p(I=1 | θ) of a catalog by r4: the detected branch, neural route.

    ``log_prob(θ)`` is, for every head of the estimator, ``log E[r4(S_det; θ)]`` over
    ``n_reference`` catalogs drawn from ρ restricted to the regions (N_det = ``regions.n``
    sources, source i from ρ1 restricted to R_i), a log-mean-exp. The set features of the
    reference catalogs are computed once; the heads are evaluated for all (θ, reference) pairs
    in batches. Parameters with N < N_det get ``-inf`` (such a θ cannot produce the catalog).

    Parameters
    ----------
    estimator : `DetectedCatalogRatio`
        Trained r4.
    model : `~astrotrunc.PointSourceModel`
        The model it was trained for (its map must be that of the regions).
    regions : `~astrotrunc.truncation.DetectedRegions`
        Regions of the observed catalog (may be empty).
    n_reference : int
        Reference catalogs of the Monte Carlo average.
    seed : int
        Seed of the reference catalogs.
    batch_size : int
        (θ, reference) pairs per head evaluation.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from astrotrunc import PointSourceModel
    >>> from astrotrunc.inference import (DetectedCatalogRatio, NeuralCatalogLikelihood,
    ...                                   ReferenceDensity)
    >>> from astrotrunc.truncation import DetectedRegions
    >>> model = PointSourceModel.paper()
    >>> est = DetectedCatalogRatio(ReferenceDensity(model.shape), hidden=16)
    >>> labels = np.zeros(model.shape, int); labels[64, 64] = 1
    >>> like = NeuralCatalogLikelihood(est, model, DetectedRegions(labels), n_reference=64)
    >>> like.log_prob(torch.tensor([[100.0, 2.0, 5.0], [0.5, 2.0, 5.0]])).shape
    torch.Size([2, 4])
    """

    def __init__(self, estimator, model, regions, *, n_reference=1024, seed=0, batch_size=65536):
        ref = estimator.reference_density
        if tuple(regions.shape) != ref.shape or tuple(model.shape) != ref.shape:
            msg = (f"r4 was trained on a {ref.shape} map; the model's map is {tuple(model.shape)} "
                   f"and the regions' {tuple(regions.shape)}")
            raise ValueError(msg)
        if tuple(model.param_names) != tuple(estimator.param_names):
            msg = (f"r4's parameters {estimator.param_names} differ from the model's "
                   f"{model.param_names}")
            raise ValueError(msg)
        if regions.n > ref.max_detected:
            msg = (f"the catalog has {regions.n} detections, r4 was trained for at most "
                   f"{ref.max_detected}")
            raise ValueError(msg)
        if int(n_reference) < 1:
            msg = f"n_reference must be positive, got {n_reference}"
            raise ValueError(msg)
        self.estimator, self.model, self.regions = estimator, model, regions
        self.batch_size = int(batch_size)
        n_ref = 1 if regions.n == 0 else int(n_reference)  # an empty catalog is one catalog
        refs = ref.sample_in_regions(regions, n_ref, generator=seed)
        device = next(estimator.parameters()).device
        with _evaluating(estimator), torch.no_grad():
            self.features = torch.cat([estimator.features(r.to(device))
                                       for r in refs.split(max(1, 2**20 // max(regions.n, 1)))])
            self.reference_log_ratio = estimator.reference_log_ratio(self.features).double()
        self.n_reference = n_ref

    @property
    def marginal_names(self) -> tuple:
        """Names of the columns of `log_prob` (the estimator's heads)."""
        return self.estimator.marginal_names

    @torch.no_grad()
    def log_prob(self, theta) -> torch.Tensor:
        """``(n, n_heads)`` log p(I=1 | θ) up to a constant per head (float64)."""
        est = self.estimator
        theta = torch.as_tensor(theta, dtype=torch.float32).reshape(-1, len(est.param_names))
        device = self.features.device
        k = self.features.shape[0]
        per = max(1, self.batch_size // k)
        # written in place: small result tensors kept between the large temporaries of each
        # chunk fragmented the heap (peak memory grew by ~10 MB per chunk)
        lp = torch.empty(len(theta), len(est.marginals), dtype=torch.float64)
        with _evaluating(est):
            for start in range(0, len(theta), per):
                t = theta[start:start + per].to(device)
                lr = _heads_grid(est, self.features, est.theta_norm(t)).double()
                lr = lr + self.reference_log_ratio[None, :, None]
                lp[start:start + per] = (torch.logsumexp(lr, 1) - math.log(k)).cpu()
        if "N" in est.param_names:
            i = est.param_names.index("N")
            lp = torch.where((torch.floor(theta[:, i]) >= self.regions.n)[:, None], lp, -math.inf)
        return lp

    def joint_log_prob(self, theta) -> torch.Tensor:
        """``(n,)`` log p(I=1 | θ) of the joint head: the factor that multiplies r3."""
        return self.log_prob(theta)[:, -1]


# ----------------------------------------------------------------------------------------------
class _PackedDeepSet(DeepSetEmbedding):
    """`~astrotrunc.nre.DeepSetEmbedding` whose element network runs on present elements only.

    Same parameters and output as the padded version; padded catalogs of very different sizes
    (a few to a hundred detections) no longer cost the largest one's width each.
    """

    def forward(self, x):
        present = x[..., -1] > 0.5
        feats = x[..., :-1][present]
        if self.norm is not None:
            if self.training:
                self.norm._update(feats.detach())
            feats = (feats - self.norm.mean) / self.norm.std
        count = present.sum(1).to(x.dtype)
        rows = torch.nonzero(present)[:, 0]
        phi = self.phi(feats)
        pooled = torch.zeros(x.shape[0], phi.shape[1], dtype=phi.dtype, device=x.device)
        pooled = pooled.index_add(0, rows, phi) / count.clamp_min(1)[:, None]
        return self.rho(torch.cat([pooled, torch.log1p(count)[:, None]], dim=1))


class _LogColumns(nn.Module):
    """Replace chosen columns of ``(B, n)`` parameters by their logarithm."""

    def __init__(self, n, index):
        super().__init__()
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(index)] = True
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, theta):
        return torch.where(self.mask, torch.log(theta.clamp_min(1e-30)), theta)


def _channel_grid(net, features, params):
    """A `~astrotrunc.nre.ChannelResidualNet` on every (parameter, feature) pair: ``(m, K, C)``.

    The feature part of the first layer is computed once per feature row and the parameter part
    once per parameter row; only the residual blocks run on the ``m × K`` pairs.
    """
    k, m, c, h = features.shape[0], params.shape[0], net.channels, net.hidden
    hf = (features @ net.w_features).view(k, c, h).transpose(0, 1)  # (C, K, H)
    hp = torch.baddbmm(net.bias, params.transpose(0, 1), net.w_params)  # (C, m, H)
    z = (hp[:, :, None, :] + hf[:, None, :, :]).reshape(c, m * k, h)
    silu = nn.functional.silu
    for first, second in net.blocks:
        z = z + second(net.dropout(silu(first(silu(z)))))
    return net.out(silu(z))[..., 0].reshape(c, m, k).permute(1, 2, 0)


def _heads_grid(est, features, z):
    """``(m, K, n_heads)`` log-ratios of standardised parameters ``z`` (m) × features (K)."""
    out = [_channel_grid(est.marginal_heads, features, z.unsqueeze(-1))]
    if est.pair_heads is not None:
        out.append(_channel_grid(est.pair_heads, features, z[:, est._pair_index]))
    if est.joint_head is not None:
        out.append(_channel_grid(est.joint_head, features, z.unsqueeze(1)))
    return torch.cat(out, -1)


def _checked_record(record) -> dict:
    """A copy of a `completeness_record` given as a dict (``ValueError`` if it is not one)."""
    if not (isinstance(record, dict) and {"kind", "identity"} <= set(record)):
        msg = ("expected a completeness_record (a dict with 'kind' and 'identity'), got "
               f"{record!r}")
        raise ValueError(msg)
    return dict(record)


def completeness_record(completeness) -> dict:
    """Which S a model was trained against: its kind, identity and detector (JSON-ready).

    Parameters
    ----------
    completeness : `~astrotrunc.CompletenessFunction` or `~astrotrunc.truncation.CompletenessTable`
        S, or its table.

    Returns
    -------
    dict
        ``kind`` (``'theta-averaged'`` or ``'theta-conditional'``), ``identity``
        (`~astrotrunc.CompletenessFunction.identity`, `None` for an S without one) and
        ``detector_id``.

    Examples
    --------
    >>> from astrotrunc import ConditionalCompleteness
    >>> from astrotrunc.inference import completeness_record
    >>> rec = completeness_record(ConditionalCompleteness(detector_id="example"))
    >>> rec["kind"], rec["detector_id"], len(rec["identity"])
    ('theta-conditional', 'example', 16)
    """
    s = completeness.completeness if isinstance(completeness, CompletenessTable) else completeness
    if s is None or not hasattr(s, "logit_table"):
        msg = f"expected a completeness function or its table, got {type(completeness).__name__}"
        raise TypeError(msg)
    conditional = _conditional(completeness) or hasattr(s, "theta_center")
    ident = getattr(s, "identity", None)
    detector = getattr(s, "detector_id", None)
    return {"kind": "theta-conditional" if conditional else "theta-averaged",
            "identity": None if ident is None else str(ident),
            "detector_id": None if detector is None else str(detector)}


def _as_table(completeness, model, mask=None):
    if isinstance(completeness, CompletenessTable):
        return completeness
    return completeness_table(completeness, model, mask)


def _conditional(table):
    return isinstance(table, ConditionalCompletenessTable)


def _node_tables(table, nodes_per_call=8):
    """S ``(n_nodes, n_pixels, n_flux)`` of a conditional table on every pixel (cached on it)."""
    cached = table.__dict__.get("_r4_node_tables")
    if cached is None:
        npix = table.shape[0] * table.shape[1]
        cached = torch.empty(table.n_nodes, npix, table.n_flux)
        pixels = torch.arange(npix)
        with torch.no_grad():
            for nodes in torch.arange(table.n_nodes).split(nodes_per_call):
                cached[nodes] = table.all_nodes(pixels, nodes=nodes).float()
        table.__dict__["_r4_node_tables"] = cached
    return cached


def _lookup(table, device):
    """What `simulate_detected` reads S from, on ``device`` (kept on the table per device)."""
    key = f"_r4_lookup_{torch.device(device)}"
    cached = table.__dict__.get(key)
    if cached is None:
        cached = (_node_tables(table) if _conditional(table) else table.table).to(device)
        table.__dict__[key] = cached
    return cached


def _generator(generator, device="cpu"):
    if isinstance(generator, torch.Generator):
        return generator
    gen = torch.Generator(device)
    if generator is None:
        gen.seed()
    else:
        gen.manual_seed(int(generator))
    return gen


def _stratified(m, n, gen):
    """``(m, n)`` uniforms, a Latin hypercube along the second axis (one stratum per column)."""
    perm = torch.argsort(torch.rand(m, n, generator=gen), dim=1)
    return (perm.double() + torch.rand(m, n, generator=gen, dtype=torch.float64)) / n


class _evaluating:
    """Put a module in evaluation mode, restoring its mode afterwards (also on exceptions)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        self.module.train(self.was_training)
        return False
