"""Moved to :mod:`alignkit.models.flops`; this import path keeps working (the same module)."""

import sys

from alignkit.models import flops as _module

sys.modules[__name__] = _module
