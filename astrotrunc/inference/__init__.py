"""Population inference (r3, r4 and their combination): what population produced this map?"""

from .likelihood import *  # noqa: F401,F403
from .r3 import *  # noqa: F401,F403
from .posterior import *  # noqa: F401,F403
from .population import *  # noqa: F401,F403
from .r4 import *  # noqa: F401,F403
