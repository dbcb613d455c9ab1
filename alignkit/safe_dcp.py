"""Moved to :mod:`alignkit.backends.safe_dcp`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.backends.safe_dcp")

sys.modules[__name__] = _module
