"""astrotrunc: point-source catalogs and source populations from sky maps.

An implementation of "Detection is truncation" (truncated marginal neural ratio estimation):

* ``r1`` -- :class:`SourceDetector` / :func:`find_sources`: per-pixel detection odds and the catalog;
* ``r2`` -- :class:`CompletenessFunction`: the probability that r1 detects a source (F, l, b);
* ``r3`` / ``r4`` -- population posteriors from the sub-threshold map and the detected catalog.

Everything is trained on simulations of a :class:`PointSourceModel`.
"""

try:
    from ._version import version as __version__
except ImportError:  # pragma: no cover - running from a source tree without a build
    __version__ = "0.0.0"

from .exceptions import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403
from .simulation import *  # noqa: F401,F403
from .detection import *  # noqa: F401,F403
from .completeness import *  # noqa: F401,F403
from .nre import *  # noqa: F401,F403
from .store import *  # noqa: F401,F403
from .truncation import *  # noqa: F401,F403
from .diagnostics import *  # noqa: F401,F403
from .survey import *  # noqa: F401,F403
