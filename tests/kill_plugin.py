"""A plugin that parks the run at a chosen moment so a test can SIGKILL it there.

* ``KILL_AT_STEP=N``: at ``step_start`` of step N (after the checkpoints before it exist).
* ``KILL_IN_SAVE=step_000004``: inside the ``save_checkpoint`` hook of that checkpoint, i.e.
  while its files sit in the temporary directory, before the rename.

Either way it touches ``KILL_MARKER`` and sleeps; without the variables it does nothing, so
the same command line serves the interrupted, resumed and reference runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from alignkit import RunContext, hookimpl


def _park() -> None:
    Path(os.environ["KILL_MARKER"]).touch()
    time.sleep(float(os.environ.get("KILL_SLEEP", "300")))


@hookimpl
def step_start(ctx: RunContext, step: int) -> None:
    if os.environ.get("KILL_AT_STEP") == str(step):
        _park()


@hookimpl
def save_checkpoint(ctx: RunContext, directory: Path) -> None:
    name = os.environ.get("KILL_IN_SAVE")
    if name and directory.name.startswith(f".{name}."):
        _park()
