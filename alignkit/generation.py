"""Moved to :mod:`alignkit.models.generation`; this import path keeps working (the same module)."""

import sys

from alignkit.models import generation as _module

sys.modules[__name__] = _module
