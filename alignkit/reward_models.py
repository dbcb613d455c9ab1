"""Moved to :mod:`alignkit.rewards.learned`; this import path keeps working (the same module)."""

import importlib
import sys

_module = importlib.import_module("alignkit.rewards.learned")

sys.modules[__name__] = _module
