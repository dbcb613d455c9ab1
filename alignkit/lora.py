"""Moved to :mod:`alignkit.models.lora`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.models.lora")

sys.modules[__name__] = _module
