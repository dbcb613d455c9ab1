"""Moved to :mod:`alignkit.rl.kl_control`; this import path keeps working (the same module)."""

import sys

from alignkit.rl import kl_control as _module

sys.modules[__name__] = _module
