"""Moved to :mod:`alignkit.tools.judge_server`; this path (and ``python -m``) keeps working."""

import importlib
import sys

_module = importlib.import_module("alignkit.tools.judge_server")

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
