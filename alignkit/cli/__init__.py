"""The command line: ``alignkit`` (the Hydra app and its helper commands).

* :mod:`alignkit.cli.app` - the Hydra app: compose, check, activate plugins, run a stage;
  ``alignkit plugins``;
* :mod:`alignkit.cli.compare` - ``alignkit compare``: runs side by side, with bootstrap
  intervals and plots;
* :mod:`alignkit.cli.export` - ``alignkit export``: plain Hugging Face folders from runs.

``alignkit.cli`` keeps the names it had when it was one module.
"""

from __future__ import annotations

import importlib
from typing import Any

from alignkit.cli.app import (
    check_secret_overrides,
    main,
    registration,
    report_error,
    run_stage,
    version,
)

__all__ = [
    "check_secret_overrides",
    "main",
    "registration",
    "report_error",
    "run_stage",
    "version",
]


def __getattr__(name: str) -> Any:
    # Any other name of the former single module (PEP 562).
    return getattr(importlib.import_module("alignkit.cli.app"), name)
