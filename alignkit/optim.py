"""Moved to :mod:`alignkit.rl.optim`; this import path keeps working (the same module)."""

import sys

from alignkit.rl import optim as _module

sys.modules[__name__] = _module
