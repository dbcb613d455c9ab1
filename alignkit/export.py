"""Moved to :mod:`alignkit.cli.export`; this import path (and ``python -m``) keeps working."""

import sys

from alignkit.cli import export as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
