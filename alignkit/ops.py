"""Moved to :mod:`alignkit.rl.ops`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.rl.ops")

sys.modules[__name__] = _module
