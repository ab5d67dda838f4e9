"""The neural ratio estimation engine shared by r1-r4: estimators, trainer, safe files, posteriors."""

from .estimator import *  # noqa: F401,F403
from .networks import *  # noqa: F401,F403
from .marginal import *  # noqa: F401,F403
from .posterior import *  # noqa: F401,F403
from .trainer import *  # noqa: F401,F403
