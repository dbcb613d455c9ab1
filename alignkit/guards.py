"""Moved to :mod:`alignkit.engine.guards`; this import path keeps working (the same module)."""

import sys

from alignkit.engine import guards as _module

sys.modules[__name__] = _module
