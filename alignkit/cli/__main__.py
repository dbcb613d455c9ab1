"""``python -m alignkit.cli``: the ``alignkit`` command."""

import sys

from alignkit.cli.main import main

sys.exit(main())
