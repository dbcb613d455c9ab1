"""Moved to :mod:`alignkit.data.prompts`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.data.prompts")

sys.modules[__name__] = _module
