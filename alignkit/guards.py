"""Moved to :mod:`alignkit.engine.guards`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.engine.guards")

sys.modules[__name__] = _module
