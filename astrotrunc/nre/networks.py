"""Building blocks of the ratio estimators: online standardisation, channelled heads, embeddings.

Everything here is a small `torch.nn.Module` built from JSON-serialisable arguments, so that a
ratio estimator made of them can be rebuilt from its ``config`` (see `RatioEstimator.load`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["OnlineStandardize", "ChannelResidualNet", "MLPEmbedding", "CNNEmbedding",
           "MapSummaries", "DeepSetEmbedding", "make_embedding", "EMBEDDINGS"]


class OnlineStandardize(nn.Module):
    """Standardise inputs with running mean and standard deviation learned from the data.

    In training mode every batch updates the exact running mean and variance of all samples
    seen so far (Chan et al.'s parallel update); in evaluation mode the stored statistics are
    used unchanged. The statistics are buffers: they are saved and restored with the weights.

    Parameters
    ----------
    shape : int or tuple of int
        Shape of one sample (the batch axis excluded).
    eps : float
        Floor of the standard deviation.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.nre import OnlineStandardize
    >>> norm = OnlineStandardize(2)
    >>> z = norm(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))   # training mode: updates the stats
    >>> norm.mean.tolist(), norm.std.tolist()
    ([1.0, 20.0], [1.0, 10.0])
    """

    def __init__(self, shape, eps=1e-6):
        super().__init__()
        shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
        self.eps = float(eps)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("m2", torch.zeros(shape))

    @property
    def std(self) -> torch.Tensor:
        """Current standard deviation (1 before any data were seen)."""
        if self.count < 1:
            return torch.ones_like(self.m2)
        return (self.m2 / self.count).clamp_min(0).sqrt().clamp_min(self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._update(x.detach())
        return (x - self.mean) / self.std

    @torch.no_grad()
    def _update(self, x):
        n_b = x.shape[0]
        if n_b == 0:
            return
        x = x.to(self.mean.dtype)
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n_a = self.count.to(x.dtype)
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta**2 * (n_a * n_b / n)
        self.count += n_b


class _ChannelLinear(nn.Module):
    """``C`` independent linear maps applied in one batched matmul: ``(C, B, i) -> (C, B, o)``."""

    def __init__(self, channels, n_in, n_out):
        super().__init__()
        bound = 1 / math.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(channels, n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels, 1, n_out).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class ChannelResidualNet(nn.Module):
    """Many small residual MLPs ("channels") evaluated together (swyft's
    ``ResidualNetWithChannel``).

    Channel ``c`` maps ``(features, params[:, c, :])`` to one logit. The feature part of the first
    layer is a single matmul shared by all channels, then every layer is one batched matmul over
    the channels: there is no Python loop over channels.

    Parameters
    ----------
    channels : int
        Number of independent heads.
    n_features : int
        Width of the shared feature vector.
    n_params : int
        Parameters per channel (1 for marginals, 2 for pairs).
    hidden : int
        Hidden width of every channel.
    n_blocks : int
        Residual blocks per channel.
    dropout : float
        Dropout probability inside the blocks.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.nre import ChannelResidualNet
    >>> net = ChannelResidualNet(channels=3, n_features=5, n_params=1, hidden=8)
    >>> net(torch.randn(4, 5), torch.randn(4, 3, 1)).shape
    torch.Size([4, 3])
    """

    def __init__(self, channels, n_features, n_params, hidden=64, n_blocks=2, dropout=0.0):
        super().__init__()
        self.channels, self.hidden = int(channels), int(hidden)
        bound = 1 / math.sqrt(n_features + n_params)
        self.w_features = nn.Parameter(
            torch.empty(n_features, channels * hidden).uniform_(-bound, bound)
        )
        self.w_params = nn.Parameter(
            torch.empty(channels, n_params, hidden).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(channels, 1, hidden).uniform_(-bound, bound))
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [_ChannelLinear(channels, hidden, hidden), _ChannelLinear(channels, hidden, hidden)]
            )
            for _ in range(int(n_blocks))
        )
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.out = _ChannelLinear(channels, hidden, 1)

    def forward(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """``features (B, F)``, ``params (B, C, P)`` -> logits ``(B, C)``."""
        b = features.shape[0]
        h = (features @ self.w_features).view(b, self.channels, self.hidden).transpose(0, 1)
        h = torch.baddbmm(h + self.bias, params.transpose(0, 1), self.w_params)  # (C, B, H)
        for first, second in self.blocks:
            h = h + second(self.dropout(nn.functional.silu(first(nn.functional.silu(h)))))
        return self.out(nn.functional.silu(h))[..., 0].transpose(0, 1)


class MLPEmbedding(nn.Module):
    """Flatten the data and pass it through an MLP (``n_layers=0``: flatten only, identity)."""

    def __init__(self, x_shape, n_features=None, hidden=64, n_layers=2):
        super().__init__()
        n_in = math.prod(x_shape)
        layers, width = [nn.Flatten()], n_in
        for _ in range(int(n_layers)):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        if n_features is not None and int(n_layers) > 0:
            layers.append(nn.Linear(width, int(n_features)))
            width = int(n_features)
        self.net = nn.Sequential(*layers)
        self.n_features = width

    def forward(self, x):
        return self.net(x)


class CNNEmbedding(nn.Module):
    """A small convolutional embedding of maps ``(B, H, W)`` or ``(B, C, H, W)``.

    Strided convolution blocks followed by global average and max pooling (peak-count style
    summaries) and a linear layer to ``n_features``.
    """

    def __init__(self, x_shape, n_features=32, channels=(8, 16, 32)):
        super().__init__()
        in_ch = 1 if len(x_shape) == 2 else int(x_shape[0])
        self._add_channel = len(x_shape) == 2
        layers = []
        for ch in channels:
            layers += [nn.Conv2d(in_ch, int(ch), 3, padding=1), nn.SiLU(),
                       nn.Conv2d(int(ch), int(ch), 3, padding=1, stride=2), nn.SiLU()]
            in_ch = int(ch)
        self.conv = nn.Sequential(*layers)
        self.head = nn.Linear(2 * in_ch, int(n_features))
        self.n_features = int(n_features)

    def forward(self, x):
        if self._add_channel:
            x = x.unsqueeze(1)
        h = self.conv(x)
        pooled = torch.cat([h.mean((-2, -1)), h.amax((-2, -1))], dim=1)
        return self.head(pooled)


class DeepSetEmbedding(nn.Module):
    """A permutation-invariant embedding of padded variable-length sets (DeepSets).

    The data are ``(B, max_size, d + 1)``: ``d`` features per element and a last column that is
    1 for a present element and 0 for padding. Each present element's features are standardised
    online (from present elements only), mapped by an MLP, and mean-pooled; the pooled vector
    and ``log(1 + set size)`` go through a second MLP. Padding never changes the output.
    The embedding standardises its own input (``standardizes_input``), so the estimator leaves
    the mask column alone.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.nre import DeepSetEmbedding
    >>> emb = DeepSetEmbedding((5, 3), n_features=4).eval()
    >>> x = torch.zeros(1, 5, 3)
    >>> x[0, :2] = torch.tensor([[1.0, 2.0, 1.0], [3.0, 4.0, 1.0]])   # two sources, three pads
    >>> swapped = x[:, [1, 0, 2, 3, 4]]
    >>> torch.allclose(emb(x), emb(swapped))
    True
    """

    standardizes_input = True

    def __init__(self, x_shape, n_features=32, hidden=64, standardize=True):
        super().__init__()
        if len(x_shape) != 2 or x_shape[1] < 2:
            raise ValueError(
                f"a set embedding needs data of shape (max_size, d + 1), got {x_shape}"
            )
        d = int(x_shape[1]) - 1
        self.norm = OnlineStandardize(d) if standardize else None
        self.phi = nn.Sequential(
            nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.rho = nn.Sequential(
            nn.Linear(hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, n_features)
        )
        self.n_features = int(n_features)

    def forward(self, x):
        feats, present = x[..., :-1], x[..., -1:] > 0.5
        if self.norm is not None:
            if self.training:
                self.norm._update(feats[present[..., 0]].detach())
            feats = (feats - self.norm.mean) / self.norm.std
        count = present.sum(1).to(x.dtype)
        pooled = (self.phi(feats) * present).sum(1) / count.clamp_min(1)
        return self.rho(torch.cat([pooled, torch.log1p(count)], dim=1))


class MapSummaries(nn.Module):
    """Fast summary statistics of maps ``(B, H, W)``: a fixed (parameter-free) data compression.

    The statistics a population leaves in a map of point sources, all of
    ``v = log1p(scale * max(x, 0))``: the histogram of pixel values (one-point PDF), the
    latitude and longitude profiles of the mean value, the number of local maxima above a few
    levels per latitude band (peak counts), and the mean and standard deviation. Orders of
    magnitude cheaper than a CNN: compute them once per simulation and train an MLP embedding
    on them.

    Parameters
    ----------
    x_shape : tuple of int
        ``(H, W)``.
    scale : float
        Scale of the value transform (the exposure of count data: ``v = log1p(counts)``).
    n_bins : int
        Histogram bins over ``v`` in ``[0, v_max]`` (values beyond go to the last bin).
    v_max : float
        Upper edge of the histogram.
    n_profile : int
        Bins of the latitude (rows) and longitude (columns) profiles and of the peak counts.
    peak_levels : sequence of float
        ``v`` levels of the peak counts.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.nre import MapSummaries
    >>> summ = MapSummaries((32, 32), n_profile=4)
    >>> summ(torch.rand(5, 32, 32)).shape == (5, summ.n_stats)
    True
    """

    def __init__(self, x_shape, scale=100.0, n_bins=48, v_max=12.0, n_profile=16,
                 peak_levels=(2.0, 3.0, 4.0, 5.0)):
        super().__init__()
        if len(x_shape) != 2:
            raise ValueError(f"map summaries need maps of shape (H, W), got {x_shape}")
        self.scale, self.v_max = float(scale), float(v_max)
        self.n_bins, self.n_profile = int(n_bins), min(int(n_profile), *x_shape)
        self.register_buffer("peak_levels", torch.as_tensor(peak_levels, dtype=torch.float32))
        self.n_stats = self.n_bins + (2 + len(peak_levels)) * self.n_profile + 2

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The summary vectors ``(B, n_stats)`` of maps ``(B, H, W)``."""
        v = torch.log1p(x.clamp_min(0) * self.scale)
        b, h, w = v.shape
        idx = (v * (self.n_bins / self.v_max)).long().clamp_(0, self.n_bins - 1).reshape(b, -1)
        hist = torch.zeros(b, self.n_bins, device=x.device).scatter_add_(
            1, idx, torch.ones_like(v).reshape(b, -1))
        pool = lambda a: nn.functional.adaptive_avg_pool1d(a[:, None], self.n_profile)[:, 0]  # noqa: E731
        lat, lon = pool(v.mean(2)), pool(v.mean(1))
        peak = v == nn.functional.max_pool2d(v[:, None], 3, stride=1, padding=1)[:, 0]
        above = peak[:, None] & (v[:, None] > self.peak_levels[None, :, None, None])
        bands = nn.functional.adaptive_avg_pool1d(above.float().sum(3), self.n_profile)
        moments = torch.stack([v.mean((1, 2)), v.std((1, 2))], 1)
        return torch.cat([torch.log1p(hist), lat, lon,
                          torch.log1p(bands.reshape(b, -1) * (h / self.n_profile)), moments], 1)


EMBEDDINGS = {"mlp": MLPEmbedding, "identity": lambda x_shape: MLPEmbedding(x_shape, n_layers=0),
              "cnn": CNNEmbedding, "deepsets": DeepSetEmbedding}
"""Embedding networks that a `MarginalRatioEstimator` can build by name."""


def make_embedding(name: str, x_shape, **kwargs) -> nn.Module:
    """Build a registered embedding network by name (see `EMBEDDINGS`).

    Parameters
    ----------
    name : str
        A key of `EMBEDDINGS`.
    x_shape : tuple of int
        Shape of one data sample.
    **kwargs
        Passed to the embedding's constructor.

    Returns
    -------
    `torch.nn.Module`
        It exposes ``n_features`` (width of its output).
    """
    try:
        factory = EMBEDDINGS[name]
    except KeyError:
        raise ValueError(f"unknown embedding {name!r}; choose one of {sorted(EMBEDDINGS)} or "
                         "override MarginalRatioEstimator.build_embedding") from None
    return factory(tuple(x_shape), **kwargs)
