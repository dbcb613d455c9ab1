"""Moved to :mod:`alignkit.rl.ops`; this import path keeps working (the same module)."""

import sys

from alignkit.rl import ops as _module

sys.modules[__name__] = _module
