"""Moved to :mod:`alignkit.models.lean`; this import path keeps working (the same module)."""

import sys

from alignkit.models import lean as _module

sys.modules[__name__] = _module
