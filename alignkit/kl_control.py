"""Moved to :mod:`alignkit.rl.kl_control`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.rl.kl_control")

sys.modules[__name__] = _module
