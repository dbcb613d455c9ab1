"""Moved to :mod:`alignkit.backends.safe_dcp`; this import path keeps working (the same module)."""

import sys

from alignkit.backends import safe_dcp as _module

sys.modules[__name__] = _module
