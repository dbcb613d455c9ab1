"""Moved to :mod:`alignkit.models.packing`; this import path keeps working (the same module)."""

import sys

from alignkit.models import packing as _module

sys.modules[__name__] = _module
