"""Moved to :mod:`alignkit.rl.update`; this import path keeps working (the same module)."""

import sys

from alignkit.rl import update as _module

sys.modules[__name__] = _module
