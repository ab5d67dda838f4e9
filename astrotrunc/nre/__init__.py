"""The neural ratio estimation engine shared by r1-r4: estimators, trainer, safe files, posteriors.
"""

from .estimator import RatioEstimator, contrastive_loss
from .marginal import MarginalRatioEstimator
from .networks import (EMBEDDINGS, CNNEmbedding, ChannelResidualNet, DeepSetEmbedding,
                       MapSummaries, MLPEmbedding, OnlineStandardize, make_embedding)
from .posterior import (WeightedSamples, effective_sample_size, hpd_credible_level,
                        match_marginals)
from .trainer import Trainer

__all__ = [
    "RatioEstimator",
    "contrastive_loss",
    "MarginalRatioEstimator",
    "Trainer",
    "ChannelResidualNet",
    "OnlineStandardize",
    "MLPEmbedding",
    "CNNEmbedding",
    "DeepSetEmbedding",
    "MapSummaries",
    "make_embedding",
    "EMBEDDINGS",
    "WeightedSamples",
    "effective_sample_size",
    "match_marginals",
    "hpd_credible_level",
]
