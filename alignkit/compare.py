"""Moved to :mod:`alignkit.cli.compare`; this import path (and ``python -m``) keeps working."""

import sys

from alignkit.cli import compare as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
