"""A plugin that holds each job at ``run_start`` until BARRIER_N jobs have reached it.

Jobs that run one after the other can never all arrive, so the first one times out: a sweep
finishing with this plugin active proves its jobs ran at the same time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from alignkit import RunContext, hookimpl


@hookimpl
def run_start(ctx: RunContext) -> None:
    folder, expected = Path(os.environ["BARRIER_DIR"]), int(os.environ["BARRIER_N"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + float(os.environ.get("BARRIER_TIMEOUT", "180"))
    while len(list(folder.iterdir())) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError("barrier: the other jobs never started; they did not run at once")
        time.sleep(0.1)
