"""Moved to :mod:`alignkit.engine.run_lock`; this import path keeps working (the same module)."""

import sys

from alignkit.engine import run_lock as _module

sys.modules[__name__] = _module
