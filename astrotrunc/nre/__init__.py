"""The neural ratio estimation engine shared by r1-r4: estimator base, trainer, safe files."""

from .estimator import *  # noqa: F401,F403
from .trainer import *  # noqa: F401,F403
