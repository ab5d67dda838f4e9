"""`PopulationInference`: the population posterior of a map, r3 and the catalog likelihood combined.

The pipeline of "Detection is truncation" (DESIGN.md, "Combining"):

1. detect the sources of the map with r1 (`~astrotrunc.find_sources`): the catalog and its
   regions R_i;
2. build the truncated model of that catalog (`~astrotrunc.truncation.TruncatedModel`);
3. r3: train `SubThresholdRatio` on truncated simulations, TMNRE rounds shrinking θ's box
   (simulations in a `~astrotrunc.store.SimulationStore` filled through Dask);
4. the detected branch: p(I=1 | θ) of the catalog (`CatalogLikelihood`, exact);
5. weight prior draws: sub-threshold ∝ p(θ) r3, detected ∝ p(θ) p(I=1 | θ), combined ∝ both.
   r3's 1-D heads give the sub-threshold marginals; its joint head, raked to those marginals
   (`~astrotrunc.nre.match_marginals`), is the r3 that multiplies p(I=1 | θ).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..nre import RatioEstimator, Trainer, WeightedSamples, match_marginals
from ..priors import BoxPrior
from ..truncation import (DetectedRegions, TruncatedModel, TruncationResult, TruncationRound,
                          completeness_table, truncation_bounds)
from .likelihood import CatalogLikelihood
from .posterior import PopulationPosterior
from .r3 import SubThresholdRatio, TruncatedSimulations

__all__ = ["PopulationInference", "InferenceSettings"]


@dataclass(frozen=True)
class InferenceSettings:
    """Every setting of a population inference; recorded in the `PopulationPosterior`.

    Parameters
    ----------
    n_rounds : int
        TMNRE rounds of r3.
    n_simulations : int
        Truncated-model simulations per round.
    features : {'summary', 'cnn'}
        What r3 reads from the map (see `SubThresholdRatio`).
    hidden : int
        Width of r3's heads.
    max_epochs, batch_size, learning_rate, patience : int, int, float, int
        r3 training.
    epsilon : float
        TMNRE truncation threshold (relative to the maximum ratio).
    n_samples : int
        Prior draws weighted into each posterior.
    chunk_size : int
        Simulations per store chunk (and per simulator call).
    detected_flux_cut : bool
        Also require F ≥ F_th of detected sources (the paper's option; off by default, see
        `~astrotrunc.truncation.TruncatedModel`).
    balance : float
        Balanced-NRE weight of r3's loss (`~astrotrunc.nre.MarginalRatioEstimator`): > 0 makes
        r3 conservative where its simulations are few. Measured at the quick budget: 100 makes
        it very conservative (68 % regions hold the truth 90-93 % of the time, 4-6 times wider),
        3 changes the calibration by no more than the noise of the check; 0 (plain NRE) is the
        default.
    """

    n_rounds: int = 3
    n_simulations: int = 8192
    features: str = "summary"
    hidden: int = 64
    max_epochs: int = 40
    batch_size: int = 128
    learning_rate: float = 2e-3
    patience: int = 6
    epsilon: float = 1e-5
    n_samples: int = 50_000
    chunk_size: int = 256
    detected_flux_cut: bool = False
    balance: float = 0.0

    @classmethod
    def quick(cls, **kwargs) -> "InferenceSettings":
        """Settings for a quick look (a few minutes on a laptop CPU).

        At this budget (2 rounds of 2048 simulations) r3's local calibration depends on the
        observation (``benchmarks/inference.py r3 --n-rounds 2 --n-simulations 2048
        --max-epochs 20``, 300 held-out truncated simulations: 68 % regions held the truth
        63-67 % of the time for seed 31, 61-68 % for seed 7, 56-67 % for an earlier run); the
        default budget (3 rounds of 8192) is calibrated within ±0.05. Use the default for
        results you publish.
        """
        return cls(**{"n_rounds": 2, "n_simulations": 2048, "max_epochs": 20,
                      "n_samples": 20_000, **kwargs})

    def __post_init__(self):
        if self.n_rounds < 1 or self.n_simulations < self.chunk_size or self.n_samples < 100:
            raise ValueError(f"need n_rounds >= 1, n_simulations >= {self.chunk_size} and "
                             f"n_samples >= 100; got {self.n_rounds}, {self.n_simulations}, "
                             f"{self.n_samples}")
        if self.features not in ("summary", "cnn"):
            raise ValueError(f"features must be 'summary' or 'cnn', got {self.features!r}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")


class PopulationInference:
    """Population posterior of a map: r3 (sub-threshold) × p(I=1 | θ) (detected catalog).

    Parameters
    ----------
    model : `~astrotrunc.PointSourceModel`, optional
        The full model; `~astrotrunc.PointSourceModel.paper` by default.
    detector : `~astrotrunc.SourceDetector`, optional
        r1; the shipped detector by default.
    completeness : `~astrotrunc.CompletenessFunction`, optional
        r2 of that detector: with the shipped detector, the shipped θ-conditional
        `~astrotrunc.ConditionalCompleteness` by default (a θ-averaged S leaves the detected
        branch over-confident in crowded maps). Its ``threshold`` and ``flux_threshold`` define
        "detected" everywhere.
    flux_threshold, threshold : float, optional
        Must agree with the completeness (given only to state them).
    settings : `InferenceSettings`, optional
        Defaults for `run`.

    Examples
    --------
    >>> from astrotrunc import PointSourceModel, PopulationInference
    >>> model = PointSourceModel.paper()
    >>> obs = model.simulate(1, seed=7)
    >>> post = PopulationInference(model).run(obs.maps[0], quick=True,
    ...                                       progress=False)  # doctest: +SKIP
    >>> post.summary()  # doctest: +SKIP
    """

    def __init__(self, model=None, detector=None, completeness=None, *, flux_threshold=None,
                 threshold=None, settings=None):
        from ..completeness import CompletenessFunction, ConditionalCompleteness
        from ..detection import SourceDetector, default_detector
        from ..simulation import PointSourceModel

        self.model = PointSourceModel.paper() if model is None else model
        if not isinstance(self.model, PointSourceModel):
            raise TypeError(f"model must be a PointSourceModel, got {type(self.model).__name__}")
        if detector is None and completeness is None:
            detector, completeness = default_detector(), ConditionalCompleteness.load_default()
        elif detector is None:
            detector = default_detector()
        elif completeness is None:
            raise ValueError("give the completeness of this detector (CompletenessFunction."
                             "train(model, detector)); the shipped one belongs to the shipped "
                             "detector")
        if not isinstance(detector, SourceDetector):
            raise TypeError(f"detector must be a SourceDetector, got {type(detector).__name__}")
        if not isinstance(completeness, CompletenessFunction):
            raise TypeError("completeness must be a CompletenessFunction, got "
                            f"{type(completeness).__name__}")
        completeness.check_detector(detector)
        self.detector, self.completeness = detector, completeness
        for name, given in (("flux_threshold", flux_threshold), ("threshold", threshold)):
            have = getattr(completeness, name)
            if given is not None and (have is None or not math.isclose(float(given), have)):
                raise ValueError(f"{name}={given} differs from the completeness' {have}: "
                                 "'detected' must mean the same for the catalog and for S")
        self.flux_threshold = completeness.flux_threshold
        self.threshold = completeness.threshold
        self.settings = settings if settings is not None else InferenceSettings()
        self._table_cache = {}

    def __repr__(self):
        return (f"PopulationInference(detector={self.detector.identity}, threshold="
                f"{self.threshold}, flux_threshold={self.flux_threshold}, {self.settings})")

    # -- inputs ----------------------------------------------------------------------------
    def _observation(self, data, wcs, mask):
        from astropy.nddata import NDData

        from ..io import read_map

        if isinstance(data, (str, Path)):
            data = read_map(data)
        if hasattr(data, "header") and hasattr(data, "data") and not isinstance(data, NDData):
            from astropy.wcs import WCS

            hdr = data.header
            data = NDData(np.asarray(data.data, float), wcs=WCS(hdr) if "CTYPE1" in hdr else None)
        if isinstance(data, NDData):
            wcs = data.wcs if wcs is None else wcs
            mask = data.mask if mask is None else mask
            data = data.data
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        x = np.asarray(data, dtype=float)
        if x.shape != tuple(self.model.shape):
            raise ValueError(f"the map is {x.shape} but the model simulates "
                             f"{tuple(self.model.shape)} maps: project it (read_map(..., "
                             "shape=, resolution=)) or use a model of this geometry")
        bad = ~np.isfinite(x)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != x.shape:
                raise ValueError(f"mask shape {mask.shape} does not match the map {x.shape}")
            bad |= mask
        if bad.all():
            raise ValueError("every pixel of the map is masked or not finite")
        if wcs is not None:
            self._check_wcs(wcs)
        return x, (bad if bad.any() else None)

    def _check_wcs(self, wcs):
        mw = self.model.wcs
        w = wcs.celestial if hasattr(wcs, "celestial") else wcs
        scale = np.abs(np.asarray([s.to_value("deg") for s in w.proj_plane_pixel_scales()]))
        ref = np.abs(np.asarray([s.to_value("deg") for s in mw.proj_plane_pixel_scales()]))
        same_sky = np.allclose(w.wcs.crval, mw.wcs.crval, atol=1e-6) and \
            [c[-3:] for c in w.wcs.ctype] == [c[-3:] for c in mw.wcs.ctype]
        if not np.allclose(scale, ref, rtol=1e-3) or not same_sky:
            raise ValueError(f"the map's WCS (pixel scale {scale.round(5).tolist()} deg, "
                             f"{list(w.wcs.ctype)} at {w.wcs.crval.tolist()}) is not the model's "
                             f"({ref.round(5).tolist()} deg, {list(mw.wcs.ctype)} at "
                             f"{mw.wcs.crval.tolist()})")

    def _catalog(self, x, mask, catalog, segmentation, wcs):
        from photutils.utils import NoDetectionsWarning

        from ..detection import find_sources

        if catalog is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoDetectionsWarning)
                catalog, segmentation = find_sources(
                    x, self.detector, wcs=wcs if wcs is not None else self.model.wcs, mask=mask,
                    threshold=self.threshold, flux_threshold=self.flux_threshold,
                    return_segmentation=True)
        else:
            ident = catalog.meta.get("detector_id")
            if ident is not None and ident != self.detector.identity:
                raise ValueError(f"the catalog was made by detector {ident}, this inference uses "
                                 f"{self.detector.identity}")
            for key, have in (("threshold", self.threshold),
                              ("flux_threshold", self.flux_threshold)):
                got = catalog.meta.get(key)
                if got is not None and have is not None and not math.isclose(float(got), have):
                    raise ValueError(f"the catalog was made with {key}={got}, the completeness "
                                     f"with {have}")
        regions = DetectedRegions.from_catalog(catalog, self.model.shape,
                                               segmentation=segmentation, mask=mask)
        return catalog, regions

    def _tables(self, mask, flux_cut):
        """S tabulated on the map and the catalog likelihood of no detection (cached per mask)."""
        key = (None if mask is None else mask.tobytes(), flux_cut)
        if key not in self._table_cache:
            table = completeness_table(self.completeness, self.model, mask)
            none = DetectedRegions(np.zeros(self.model.shape, dtype=np.int32), ids=[], mask=mask)
            base = CatalogLikelihood(self.model, none, table, flux_threshold=flux_cut)
            self._table_cache = {key: (table, base)}
        return self._table_cache[key]

    # -- the run ---------------------------------------------------------------------------
    def run(self, data, catalog=None, *, wcs=None, mask=None, segmentation=None,
            branches=("sub-threshold", "detected"), catalog_likelihood="exact", n_rounds=None,
            n_simulations=None, quick=False, client=None, device=None, seed=0, progress=True,
            workdir=None, truth=None, settings=None, r4=None):
        """Population posterior of one map.

        Parameters
        ----------
        data : 2-D array, `~astropy.nddata.NDData`, HDU or path
            The observed map (the model's shape and WCS).
        catalog : `~astropy.table.QTable`, optional
            Its catalog; `None` runs `~astrotrunc.find_sources` with the completeness' settings
            (regions from its segmentation). A catalog without ``segmentation`` gets disk
            regions around its positions.
        wcs, mask : optional
            WCS and bad-pixel mask (NaN pixels are masked too); masked pixels are ignored by r3,
            by the regions and by S.
        segmentation : `~photutils.segmentation.SegmentationImage`, optional
            Regions of a given ``catalog``.
        branches : sequence of {'sub-threshold', 'detected'}
            Which branches to compute; ``combined`` is their product.
        catalog_likelihood : {'exact', 'neural'}
            Route of p(I=1 | θ): ``'exact'`` (quadrature, for models with a tractable source
            density, as the default model) or ``'neural'``: r4, the paper's route (the shipped
            `DetectedCatalogRatio` unless ``r4=`` is given). A warning says so when r4 was not
            trained against this inference's completeness
            (`DetectedCatalogRatio.check_completeness`).
        n_rounds, n_simulations : int, optional
            Override the settings' TMNRE rounds and simulations per round.
        quick : bool
            `InferenceSettings.quick` instead of the defaults.
        client : `distributed.Client`, str or None
            Where the simulation stores are filled (`None`: a local Dask cluster; ``"sync"``:
            in this thread).
        device : str, optional
            Training device (CUDA when available by default).
        seed : int
            Seed of everything random in the run.
        progress : bool
            Progress bars per stage.
        workdir : str or path-like, optional
            Where simulation stores, checkpoints and round results go; a killed run given the
            same ``workdir`` (and seed, settings, map) resumes without redoing finished rounds.
            A temporary directory (removed at the end) when `None`.
        truth : sequence of float, optional
            True θ (simulated observations), recorded for plots.
        settings : `InferenceSettings`, optional
            Instead of this object's settings.
        r4 : `DetectedCatalogRatio`, optional
            The r4 of ``catalog_likelihood='neural'``.

        Returns
        -------
        `PopulationPosterior`
        """
        branches = tuple(branches)
        if not branches or any(b not in ("sub-threshold", "detected") for b in branches):
            raise ValueError(f"branches must be a non-empty subset of ('sub-threshold', "
                             f"'detected'), got {branches}")
        if catalog_likelihood not in ("exact", "neural"):
            raise ValueError("catalog_likelihood must be 'exact' or 'neural', got "
                             f"{catalog_likelihood!r}")
        cfg = settings or (InferenceSettings.quick() if quick else self.settings)
        over = {k: v for k, v in (("n_rounds", n_rounds), ("n_simulations", n_simulations))
                if v is not None}
        cfg = replace(cfg, **over)
        times = {}
        t0 = time.perf_counter()
        x, bad = self._observation(data, wcs, mask)
        catalog, regions = self._catalog(x, bad, catalog, segmentation, wcs)
        f_cut = self.flux_threshold if cfg.detected_flux_cut else None
        table, base_likelihood = self._tables(bad, f_cut)
        truncated = TruncatedModel(self.model, regions, table, flux_threshold=f_cut)
        times["detection"] = time.perf_counter() - t0
        if progress:
            tqdm.write(f"catalog: {regions.n} detections (threshold {self.threshold}, F_th "
                       f"{self.flux_threshold})")
        names = self.model.param_names
        box0 = truncated.prior
        gen = torch.Generator().manual_seed(int(seed))
        posts, trunc, maps = {}, None, None
        log_r3, r4_record = None, None
        if "sub-threshold" in branches:
            t1 = time.perf_counter()
            result = self._rounds(truncated, x, bad, cfg, client, device, seed, progress, workdir)
            times["sub-threshold (r3 rounds)"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            est = result.estimator
            box = result.rounds[-1].prior
            theta = box.sample(cfg.n_samples, generator=gen)
            x_prep = est.prepare(x)
            lr = _raked(est, theta, _log_ratio(est, x_prep, theta))
            posts["sub-threshold"] = WeightedSamples(theta, lr, names=names,
                                                     marginals=est.marginals, units=_units(self))
            log_r3 = (lambda t: _log_ratio(est, x_prep, t), box, est)
            trunc = result.to_table()
            times["sub-threshold posterior"] = time.perf_counter() - t1
        if "detected" in branches:
            t1 = time.perf_counter()
            if catalog_likelihood == "exact":
                like = base_likelihood.for_regions(regions)
                log_like = like.log_prob
            else:
                from .r4 import DetectedCatalogRatio, NeuralCatalogLikelihood

                if r4 is None:
                    r4 = DetectedCatalogRatio.load_default()
                r4.check_completeness(table)  # warns unless r4 learned this inference's S
                r4_record = r4.completeness
                like = NeuralCatalogLikelihood(r4, self.model, regions, seed=int(seed))

                def log_like(t):
                    return like.log_prob(t)[:, -1]

            theta_d, lw_d = _focused_draws(log_like, box0, cfg.n_samples, gen)
            posts["detected"] = WeightedSamples(theta_d, lw_d, names=names, units=_units(self))
            if log_r3 is not None:
                r3_box = log_r3[1]

                def log_combined(t):
                    return log_r3[0](t)[:, -1].double() + log_like(t)

                theta_c, _ = _focused_draws(log_combined, r3_box, cfg.n_samples, gen)
                # the joint head's marginals, raked to the 1-D heads', times p(I=1 | θ)
                lw_c = (_raked(log_r3[2], theta_c, log_r3[0](theta_c))[:, -1].double()
                        + log_like(theta_c))
                posts["combined"] = WeightedSamples(theta_c, lw_c, names=names, units=_units(self))
            times[f"detected ({catalog_likelihood} likelihood)"] = time.perf_counter() - t1
        if "combined" not in posts:
            only = posts.get("detected") or posts["sub-threshold"]
            posts["combined"] = WeightedSamples(only.theta, only.log_weights[:, -1], names=names,
                                                units=_units(self))
        t1 = time.perf_counter()
        maps = self._example_maps(x, truncated, posts["combined"], seed)
        times["example maps"] = time.perf_counter() - t1
        times["total"] = time.perf_counter() - t0
        meta = {"parameters": list(names), "units": list(_units(self)), "n_detected": regions.n,
                "detector_id": self.detector.identity, "threshold": self.threshold,
                "flux_threshold": self.flux_threshold, "branches": list(branches),
                "catalog_likelihood": catalog_likelihood, "settings": asdict(cfg),
                "seed": int(seed), "times_s": {k: round(v, 3) for k, v in times.items()},
                "prior": box0.to_dict()}
        if catalog_likelihood == "neural" and "detected" in branches:
            meta["r4_completeness"] = r4_record
        if truth is not None:
            meta["truth"] = [float(t) for t in np.asarray(truth, float).ravel()]
        post = PopulationPosterior(posts.get("sub-threshold"), posts.get("detected"),
                                   posts["combined"], truncation=trunc, meta=meta, maps=maps)
        post.catalog, post.regions = catalog, regions
        if progress:
            tqdm.write("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
        return post

    def _rounds(self, truncated, x, bad, cfg, client, device, seed, progress, workdir):
        from ..store import SimulationStore

        tmp = None
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="astrotrunc-")
            workdir = tmp.name
        workdir = Path(workdir).expanduser()
        workdir.mkdir(parents=True, exist_ok=True)
        names = self.model.param_names
        try:
            rounds, box = [], truncated.prior
            bar = tqdm(range(cfg.n_rounds), desc="r3 TMNRE rounds", unit="round",
                       disable=None if progress else True)
            for k in bar:
                rdir = workdir / f"round_{k}"
                done = rdir / "round.json"
                est_path = rdir / "r3.safetensors"
                if done.exists() and est_path.exists():  # resume: this round is finished
                    info = json.loads(done.read_text())
                    est = RatioEstimator.load(est_path)
                    bounds = BoxPrior.from_dict(info["bounds"])
                    rounds.append(TruncationRound(k, BoxPrior.from_dict(info["prior"]), bounds,
                                                  info["n_simulations"], None, est))
                    box = bounds
                    continue
                rdir.mkdir(parents=True, exist_ok=True)
                est = SubThresholdRatio(self.model.shape, names, features=cfg.features,
                                        summary_kwargs={"scale": _exposure(self.model)},
                                        mask=bad, hidden=cfg.hidden, balance=cfg.balance)
                store = SimulationStore(rdir / "simulations.zarr")
                sim = TruncatedSimulations(truncated, box, est, chunk_size=cfg.chunk_size)
                store.fill(sim, cfg.n_simulations, chunk_size=cfg.chunk_size,
                           seed=int(seed) * 7919 + k, client=client, progress=bool(progress))
                trainer = Trainer(max_epochs=cfg.max_epochs, batch_size=cfg.batch_size,
                                  learning_rate=cfg.learning_rate, patience=cfg.patience,
                                  device=device, checkpoint_dir=rdir / "checkpoint",
                                  progress=bool(progress), seed=int(seed) + k)
                torch.manual_seed(int(seed) + k)  # network initialisation
                history = trainer.fit(est, store, resume=True)
                est.cpu().eval()
                bounds = truncation_bounds(est, est.prepare(x), box, epsilon=cfg.epsilon,
                                           n_samples=100_000, generator=int(seed) * 31 + k)
                est.save(est_path, overwrite=True)
                done.write_text(json.dumps({"prior": box.to_dict(), "bounds": bounds.to_dict(),
                                            "n_simulations": cfg.n_simulations}))
                rounds.append(TruncationRound(k, box, bounds, cfg.n_simulations, history, est))
                box = bounds
            return TruncationResult(rounds)
        finally:
            if tmp is not None:
                tmp.cleanup()

    def _example_maps(self, x, truncated, posterior, seed, n=3):
        """Maps of the full and truncated models at θ drawn from the combined posterior."""
        gen = torch.Generator().manual_seed(int(seed) + 103)
        w = torch.as_tensor(posterior.weights[:, -1])
        theta = torch.as_tensor(posterior.theta[torch.multinomial(w, n, True, generator=gen)],
                                dtype=torch.float32)
        full = self.model.simulate(n, seed=(int(seed), 101), theta=theta)
        trunc = truncated.simulate(n, seed=(int(seed), 102), theta=theta)
        return {"observation": x, "full": full.maps.numpy(), "truncated": trunc.maps.numpy(),
                "wcs": self.model.wcs, "regions": truncated.regions.label_image(),
                "full_theta": full.theta.numpy(), "truncated_theta": trunc.theta.numpy()}


def _focused_draws(log_fn, box, n, gen, epsilon=1e-7, n_iter=3):
    """Prior draws in ``box`` weighted by ``log_fn``, the box first shrunk to where it matters.

    A likelihood much narrower than the prior leaves few effective samples among plain prior
    draws; like a TMNRE round, draws are repeated in the box of the draws whose weight exceeds
    ``epsilon`` times the largest (widened by the spacing of the draws around it), which leaves
    the posterior unchanged up to that mass.
    """
    for _ in range(n_iter):
        theta = box.sample(n, generator=gen)
        lw = log_fn(theta).double()
        keep = lw > lw.max() + math.log(epsilon)
        if not torch.isfinite(lw.max()):
            raise ValueError("the posterior is zero on every draw of the prior: the catalog or "
                             "the map cannot come from this model")
        t_keep = theta[keep].double()
        width = box.high - box.low
        pad = width * (4.0 / max(int(keep.sum()), 1) ** (1 / len(box)) + 0.02)
        new = box.truncate(t_keep.min(0).values - pad, t_keep.max(0).values + pad)
        if new.volume() > 0.8 * box.volume():
            break
        box = new
    return theta, lw


def _raked(estimator, theta, log_ratio):
    """``log_ratio`` with its joint column raked to the 1-D heads' marginals (`match_marginals`).

    The joint head carries the dependence between the parameters (needed to multiply r3 by the
    catalog likelihood); the 1-D heads, trained on the same simulations, estimate each marginal
    more sharply and are the calibrated ones (``benchmarks/inference.py r3``).
    """
    heads = list(estimator.marginals)
    d = theta.shape[1]
    full = tuple(range(d))
    if full not in heads or any((i,) not in heads for i in range(d)):
        return log_ratio
    one_d = log_ratio[:, [heads.index((i,)) for i in range(d)]]
    out = log_ratio.clone().double()
    out[:, heads.index(full)] = torch.as_tensor(
        match_marginals(theta, log_ratio[:, heads.index(full)], one_d))
    return out


@torch.no_grad()
def _log_ratio(estimator, x_prepared, theta, batch_size=16384):
    estimator.eval()
    f = estimator.features(x_prepared.reshape(1, *estimator.x_shape))
    return torch.cat([estimator.heads(f.expand(len(t), -1), t) for t in theta.split(batch_size)])


def _units(inference):
    return tuple(c.unit for c in inference.model.prior.components.values())


def _exposure(model):
    return float(np.mean(model.instrument.exposure))

