"""Moved to :mod:`alignkit.data.prompts`; this import path keeps working (the same module)."""

import sys

from alignkit.data import prompts as _module

sys.modules[__name__] = _module
