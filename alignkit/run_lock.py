"""Moved to :mod:`alignkit.engine.run_lock`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.engine.run_lock")

sys.modules[__name__] = _module
