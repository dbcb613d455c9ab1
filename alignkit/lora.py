"""Moved to :mod:`alignkit.models.lora`; this import path keeps working (the same module)."""

import sys

from alignkit.models import lora as _module

sys.modules[__name__] = _module
