"""Moved to :mod:`alignkit.tools.judge_server`; this path (and ``python -m``) keeps working."""

import sys

from alignkit.tools import judge_server as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
