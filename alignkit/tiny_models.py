"""Moved to :mod:`alignkit.models.tiny`; this import path keeps working (the same module)."""

import sys

from alignkit.models import tiny as _module

sys.modules[__name__] = _module
