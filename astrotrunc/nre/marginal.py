"""Marginal ratio estimators: a data embedding followed by all 1-D (and chosen 2-D) ratio heads."""

from __future__ import annotations

import torch
from torch import nn

from .._utils import evaluating
from .estimator import RatioEstimator
from .networks import ChannelResidualNet, OnlineStandardize, make_embedding

__all__ = ["MarginalRatioEstimator"]


class MarginalRatioEstimator(RatioEstimator):
    """Marginal neural ratio estimator (swyft's TMNRE heads) on any data embedding.

    The data ``x`` go through an embedding network; the features then feed one head per
    parameter (the 1-D marginal log-ratios ``log p(theta_i | x) / p(theta_i)``) and one head per
    chosen pair (2-D marginals, for contours). All heads are channels of one network evaluated
    in one pass (`ChannelResidualNet`). Parameters and data are standardised online.

    Parameters
    ----------
    x_shape : int or sequence of int
        Shape of one data sample (without the batch axis).
    params : sequence of str or int
        Parameter names (or their number: then ``theta_0, theta_1, ...``).
    pairs : sequence of pairs, optional
        Joint 2-D heads, as pairs of parameter names or indices.
    embedding : str
        Name of the embedding network (`~astrotrunc.nre.EMBEDDINGS`: ``"mlp"``, ``"identity"``,
        ``"cnn"``, ``"deepsets"``). Subclasses with their own embedding override
        `build_embedding`.
    embedding_kwargs : dict, optional
        Keyword arguments of the embedding (JSON-serialisable).
    hidden, n_blocks : int
        Width and residual depth of every head.
    dropout : float
        Dropout inside the heads.
    standardize : bool
        Standardise ``theta`` and ``x`` online (running mean and std of the training data);
        ``x`` is left to embeddings that standardise their own input (``standardizes_input``).
    x_key, theta_key : str
        Batch keys of the data and the parameters.
    reference_key : str, optional
        Reference-density contrast: the marginal pairs are ``(batch[reference_key], theta)``
        instead of ``(x, shuffled theta)``; the heads then learn ``log p(x | theta) / rho(x)``.
    joint : bool
        Add one head over all parameters (the joint ratio), after the 1-D and pair heads: what
        a product with another likelihood (r3 × p(I=1 | θ)) needs.
    balance : float
        Weight λ of the balancing term of balanced NRE (Delaunoy et al. 2022),
        ``λ (E_joint[σ(logit)] + E_marginal[σ(logit)] − 1)²`` per head: it pushes the classifier
        towards conservative (not over-confident) posteriors when simulations are few. 0 is
        plain NRE; Delaunoy et al. use 100.

    Examples
    --------
    >>> import torch
    >>> from astrotrunc.nre import MarginalRatioEstimator
    >>> est = MarginalRatioEstimator(x_shape=3, params=["a", "b"], pairs=[("a", "b")], hidden=16)
    >>> est.marginal_names
    ('a', 'b', 'a,b')
    >>> est.log_ratio(torch.randn(5, 3), torch.randn(5, 2)).shape
    torch.Size([5, 3])
    """

    def __init__(self, x_shape, params, pairs=(), embedding="mlp", embedding_kwargs=None,
                 hidden=64, n_blocks=2, dropout=0.0, standardize=True, x_key="x",
                 theta_key="theta", reference_key=None, joint=False, balance=0.0):
        super().__init__()
        self.x_shape = (
            (int(x_shape),) if isinstance(x_shape, int) else tuple(int(s) for s in x_shape)
        )
        names = (
            [f"theta_{i}" for i in range(params)]
            if isinstance(params, int)
            else [str(p) for p in params]
        )
        if not names or len(set(names)) != len(names):
            raise ValueError(f"params must be distinct names (at least one), got {params!r}")
        self.param_names = tuple(names)
        index = {n: i for i, n in enumerate(names)}
        self.pairs = tuple(tuple(_param_index(p, index) for p in pair) for pair in pairs)
        if any(len(p) != 2 or p[0] == p[1] for p in self.pairs):
            raise ValueError(f"pairs must be pairs of two different parameters, got {pairs!r}")
        self.joint = bool(joint)
        self.balance = float(balance)
        if not self.balance >= 0:
            raise ValueError(f"balance must be >= 0, got {balance!r}")
        self.embedding_name = str(embedding)
        self.embedding_kwargs = dict(embedding_kwargs or {})
        self.hidden, self.n_blocks, self.dropout = int(hidden), int(n_blocks), float(dropout)
        self.standardize = bool(standardize)
        self.x_key, self.theta_key, self.reference_key = str(x_key), str(theta_key), reference_key
        self.embedding = self.build_embedding()
        n_features = self.embedding.n_features
        n = len(names)
        self.theta_norm = OnlineStandardize(n) if self.standardize else nn.Identity()
        own = getattr(self.embedding, "standardizes_input", False)
        self.x_norm = (
            OnlineStandardize(self.x_shape) if self.standardize and not own else nn.Identity()
        )
        self.marginal_heads = ChannelResidualNet(
            n, n_features, 1, self.hidden, self.n_blocks, self.dropout
        )
        self.pair_heads = (
            ChannelResidualNet(
                len(self.pairs), n_features, 2, self.hidden, self.n_blocks, self.dropout
            )
            if self.pairs
            else None
        )
        self.register_buffer(
            "_pair_index", torch.tensor(self.pairs, dtype=torch.long).reshape(-1, 2)
        )
        self.joint_head = (ChannelResidualNet(1, n_features, n, self.hidden, self.n_blocks,
                                              self.dropout) if self.joint else None)

    @property
    def config(self) -> dict:
        return dict(x_shape=list(self.x_shape), params=list(self.param_names),
                    pairs=[[self.param_names[i] for i in p] for p in self.pairs],
                    embedding=self.embedding_name, embedding_kwargs=self.embedding_kwargs,
                    hidden=self.hidden, n_blocks=self.n_blocks, dropout=self.dropout,
                    standardize=self.standardize, x_key=self.x_key, theta_key=self.theta_key,
                    reference_key=self.reference_key, joint=self.joint, balance=self.balance)

    def build_embedding(self) -> nn.Module:
        """The data embedding (a module with an ``n_features`` attribute); override to customise.

        Built from ``self.embedding_name`` and ``self.embedding_kwargs`` by default, so that the
        estimator is rebuilt from its `config` when loaded.
        """
        return make_embedding(self.embedding_name, self.x_shape, **self.embedding_kwargs)

    # -- what the heads estimate -------------------------------------------------------------
    @property
    def marginals(self) -> tuple:
        """Parameter indices of every head: ``(0,), (1,), ..., (i, j), ...``, then all if joint."""
        n = len(self.param_names)
        return (tuple((i,) for i in range(n)) + self.pairs
                + ((tuple(range(n)),) if self.joint else ()))

    @property
    def marginal_names(self) -> tuple:
        """Names of the heads: parameter names, then ``"a,b"`` for a pair (a, b)."""
        return tuple(",".join(self.param_names[i] for i in m) for m in self.marginals)

    # -- network -------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding features ``(B, n_features)`` of data ``(B, *x_shape)``."""
        return self.embedding(self.x_norm(x))

    def heads(
        self, features: torch.Tensor, theta: torch.Tensor, standardized=False
    ) -> torch.Tensor:
        """Log-ratios ``(B, n_heads)`` of features ``(B, F)`` and parameters ``(B, n_params)``."""
        z = theta if standardized else self.theta_norm(theta)
        out = self.marginal_heads(features, z.unsqueeze(-1))
        if self.pair_heads is not None:
            out = torch.cat([out, self.pair_heads(features, z[:, self._pair_index])], dim=1)
        if self.joint_head is not None:
            out = torch.cat([out, self.joint_head(features, z.unsqueeze(1))], dim=1)
        return out

    def log_ratio(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Log-ratios of every head, ``(B, n_heads)``.

        ``x`` holds ``B`` data samples paired with ``theta`` ``(B, n_params)``, or one sample
        (batch 1) evaluated against all ``B`` parameter vectors.
        """
        f = self.features(x)
        if f.shape[0] == 1 and theta.shape[0] != 1:
            f = f.expand(theta.shape[0], -1)
        return self.heads(f, theta)

    def forward(self, batch) -> torch.Tensor:
        """Log-ratio logits ``(B, n_heads)`` of a batch dict."""
        return self.log_ratio(batch[self.x_key], batch[self.theta_key])

    def loss(self, batch) -> torch.Tensor:
        """Contrastive loss; the embedding is evaluated once for joint and marginal pairs."""
        theta = batch[self.theta_key]
        z = self.theta_norm(theta)
        f = self.features(batch[self.x_key])
        if self.reference_key is not None:
            f_marg, z_marg = self.features(batch[self.reference_key]), z
        else:
            f_marg, z_marg = f, torch.roll(z, 1, dims=0)
        logits = self.heads(torch.cat([f, f_marg]), torch.cat([z, z_marg]), standardized=True)
        labels = torch.zeros_like(logits)
        labels[: len(theta)] = 1.0
        loss = 2 * nn.functional.binary_cross_entropy_with_logits(logits, labels)
        if self.balance > 0:  # balanced NRE: E_joint[d] + E_marginal[d] = 1 for every head
            d = torch.sigmoid(logits)
            gap = d[: len(theta)].mean(0) + d[len(theta):].mean(0) - 1
            loss = loss + self.balance * (gap**2).mean()
        return loss

    # -- posterior -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, x_obs, prior, n_samples=10_000, *, generator=None, batch_size=16384,
               min_ess=50):
        """Weighted marginal posterior samples ``prior x ratio`` for one observation.

        Parameters
        ----------
        x_obs : array-like
            One observation, shape ``x_shape`` (or ``(1, *x_shape)``).
        prior : `~astrotrunc.priors.BoxPrior`
            The prior the estimator was trained on (its parameters in order).
        n_samples : int
            Prior draws.
        generator : int or `torch.Generator`, optional
            Seed of the prior draws.
        batch_size : int
            Evaluation batch size.
        min_ess : float
            Warn (`~astrotrunc.exceptions.LowEffectiveSampleSizeWarning`) below this ESS.

        Returns
        -------
        `~astrotrunc.nre.WeightedSamples`
            One weight column per head; `~astrotrunc.nre.WeightedSamples.credible_level`
            evaluates the heads at the point asked for.
        """
        from .posterior import WeightedSamples

        if tuple(prior.names) != self.param_names:
            raise ValueError(f"prior parameters {prior.names} differ from the estimator's "
                             f"{self.param_names}")
        device = next(self.parameters()).device
        x = torch.as_tensor(x_obs, dtype=torch.float32, device=device).reshape(1, *self.x_shape)
        theta = prior.sample(int(n_samples), generator=generator)
        with evaluating(self):
            f = self.features(x)
            lw = torch.cat([self.heads(f.expand(len(t), -1), t.to(device))
                            for t in theta.split(batch_size)])

        def log_weight_fn(t):
            with torch.no_grad():
                t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(
                    -1, len(self.param_names)
                )
                return self.heads(self.features(x).expand(len(t), -1), t).cpu()

        return WeightedSamples(theta, lw.cpu(), names=self.param_names, marginals=self.marginals,
                               log_weight_fn=log_weight_fn, min_ess=min_ess)


def _param_index(p, index):
    if isinstance(p, str):
        if p not in index:
            raise ValueError(f"unknown parameter {p!r} in pairs; parameters are {list(index)}")
        return index[p]
    i = int(p)
    if not 0 <= i < len(index):
        raise ValueError(f"parameter index {i} out of range in pairs")
    return i
