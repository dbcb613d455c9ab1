"""``python -m alignkit.cli``: the ``alignkit`` command."""

import sys

from alignkit.cli.app import main

sys.exit(main())
