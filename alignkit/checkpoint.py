"""Moved to :mod:`alignkit.engine.checkpoint`; this import path keeps working (the same module)."""

import sys

from alignkit.engine import checkpoint as _module

sys.modules[__name__] = _module
