"""Moved to :mod:`alignkit.rl.optim`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.rl.optim")

sys.modules[__name__] = _module
