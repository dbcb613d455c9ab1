"""Moved to :mod:`alignkit.models.generation`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.models.generation")

sys.modules[__name__] = _module
