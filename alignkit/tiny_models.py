"""Moved to :mod:`alignkit.models.tiny`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.models.tiny")

sys.modules[__name__] = _module
