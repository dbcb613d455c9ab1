"""Moved to :mod:`alignkit.models.lean`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.models.lean")

sys.modules[__name__] = _module
