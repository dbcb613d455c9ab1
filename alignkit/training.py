"""Moved to :mod:`alignkit.rl.update`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.rl.update")

sys.modules[__name__] = _module
