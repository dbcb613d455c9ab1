"""Moved to :mod:`alignkit.rewards.learned`; this import path keeps working (the same module)."""

import sys

from alignkit.rewards import learned as _module

sys.modules[__name__] = _module
