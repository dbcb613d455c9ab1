"""Moved to :mod:`alignkit.engine.checkpoint`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.engine.checkpoint")

sys.modules[__name__] = _module
