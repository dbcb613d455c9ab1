"""Moved to :mod:`alignkit.models.flops`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.models.flops")

sys.modules[__name__] = _module
