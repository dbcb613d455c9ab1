"""Moved to :mod:`alignkit.models.packing`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.models.packing")

sys.modules[__name__] = _module
