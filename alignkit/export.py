"""Moved to :mod:`alignkit.cli.export`; this import path (and ``python -m``) keeps working."""

import importlib
import sys

_module = importlib.import_module("alignkit.cli.export")

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
