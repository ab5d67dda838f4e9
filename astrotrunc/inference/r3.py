"""r3 -- the sub-threshold branch: a marginal ratio estimator of θ from the map, trained on the
truncated model of the observation.

Trained on maps of the truncated model (θ restricted to the TMNRE box, detected sources pinned
in their regions), its heads estimate p(x | θ, I=1) / p(x | I=1): the information the map holds
about the population beyond the catalog -- above all, in the sources too faint to detect.
"""

from __future__ import annotations

import numpy as np
import torch

from ..nre import MapSummaries, MarginalRatioEstimator, OnlineStandardize

__all__ = ["SubThresholdRatio", "TruncatedSimulations", "R3_FEATURES"]

#: What r3 reads from a map: fast summary statistics (`~astrotrunc.nre.MapSummaries`) through an
#: MLP, or the whole map through a CNN.
R3_FEATURES = ("summary", "cnn")


class SubThresholdRatio(MarginalRatioEstimator):
    """r3: 1-D, pair and joint log-ratios of θ given a map of the truncated model.

    ``features="summary"`` compresses each map with `~astrotrunc.nre.MapSummaries` (once, when
    it is simulated) and embeds the statistics with an MLP; ``features="cnn"`` embeds the map
    with `~astrotrunc.nre.CNNEmbedding`. Call `prepare` on maps before `log_ratio`.

    Parameters
    ----------
    map_shape : tuple of int
        ``(H, W)`` of the maps.
    params : sequence of str
        Parameter names.
    features : {'summary', 'cnn'}
        What the estimator reads.
    summary_kwargs : dict, optional
        `~astrotrunc.nre.MapSummaries` settings (``scale``: the exposure).
    mask : 2-D bool array or list, optional
        Masked pixels: zeroed in every map before it is read (so they carry no information).
    **kwargs
        `~astrotrunc.nre.MarginalRatioEstimator` settings (``hidden``, ``pairs``...).

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.inference import SubThresholdRatio
    >>> r3 = SubThresholdRatio((32, 32), ["N", "sigma_F", "h"], summary_kwargs={"n_profile": 4})
    >>> x = r3.prepare(torch.rand(2, 32, 32))
    >>> r3.log_ratio(x, torch.rand(2, 3)).shape   # N, sigma_F, h and the joint head
    torch.Size([2, 4])
    """

    def __init__(self, map_shape, params, features="summary", summary_kwargs=None, mask=None,
                 **kwargs):
        if features not in R3_FEATURES:
            raise ValueError(f"features must be one of {R3_FEATURES}, got {features!r}")
        map_shape = tuple(int(s) for s in map_shape)
        summary = MapSummaries(map_shape, **(summary_kwargs or {}))
        kwargs.setdefault("joint", True)
        if features == "summary":
            super().__init__(x_shape=(summary.n_stats,), params=params, embedding="mlp",
                             embedding_kwargs=kwargs.pop("embedding_kwargs", {"hidden": 128,
                                                                              "n_features": 64}),
                             **kwargs)
        else:
            super().__init__(x_shape=map_shape, params=params, embedding="cnn",
                             embedding_kwargs=kwargs.pop("embedding_kwargs", {}), **kwargs)
        self.map_shape, self.features_name = map_shape, features
        self.summary_kwargs = dict(summary_kwargs or {})
        self.summary = summary
        m = np.zeros(map_shape, bool) if mask is None else np.asarray(mask, dtype=bool)
        if m.shape != map_shape:
            raise ValueError(f"mask shape {m.shape} does not match the maps' {map_shape}")
        self.register_buffer("mask", torch.as_tensor(m))
        if features == "summary" and self.standardize:  # statistics constant in training stay ~0
            self.x_norm = OnlineStandardize(summary.n_stats, eps=0.05)

    @property
    def config(self) -> dict:
        cfg = {k: v for k, v in super().config.items()
               if k not in ("x_shape", "embedding")}
        return dict(cfg, map_shape=list(self.map_shape), features=self.features_name,
                    summary_kwargs=self.summary_kwargs, mask=self.mask.numpy().tolist()
                    if bool(self.mask.any()) else None)

    @torch.no_grad()
    def prepare(self, maps) -> torch.Tensor:
        """What the network reads from maps ``(B, H, W)`` (or one map): summaries or the maps."""
        x = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps,
                            dtype=torch.float32)
        x = x.reshape(-1, *self.map_shape).to(self.mask.device)
        x = torch.where(self.mask | ~torch.isfinite(x), 0.0, x)
        return self.summary(x) if self.features_name == "summary" else x


class TruncatedSimulations:
    """Simulator of r3's training data for a `~astrotrunc.store.SimulationStore`.

    ``sim(n, seed)`` draws θ from ``box`` (restricted to N ≥ N_det), simulates the truncated
    model and returns ``{"theta": (n, 3), "x": prepared maps}`` as numpy arrays. Picklable, so
    the fill runs on any Dask cluster.
    """

    def __init__(self, truncated_model, box, estimator, chunk_size=256):
        self.truncated_model, self.box = truncated_model, box
        self.prepare = estimator.prepare
        self.chunk_size = int(chunk_size)

    def __call__(self, n, seed):
        sims = self.truncated_model.simulate(int(n), seed, prior=self.box,
                                             chunk_size=self.chunk_size)
        return {"theta": sims.theta.numpy().astype(np.float32),
                "x": self.prepare(sims.maps).numpy().astype(np.float32)}
