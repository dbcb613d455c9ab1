"""Progress of long loops: a live rich bar on a terminal, plain log lines everywhere else.

Under SLURM or ``nohup`` output is a file: a rich bar there shows nothing until its loop ends.
Off a terminal, :func:`progress_bar` returns a :class:`LogProgress` instead, which writes a
plain line through :mod:`logging` (so Hydra's job log ``alignkit.log`` has it too) at every
tenth of the loop and at least every ``ALIGNKIT_PROGRESS_INTERVAL`` seconds (default 30).
``ALIGNKIT_PROGRESS=plain`` or ``rich`` forces either display.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from alignkit.tracking import console

log = logging.getLogger("alignkit.progress")

ENV_MODE = "ALIGNKIT_PROGRESS"
ENV_INTERVAL = "ALIGNKIT_PROGRESS_INTERVAL"
MILESTONES = 10
"""Plain progress logs a line each time another tenth of the loop is done."""


def interactive() -> bool:
    """Whether a live bar can be shown: stdout and the console are both terminals."""
    mode = os.environ.get(ENV_MODE, "").strip().lower()
    if mode in ("plain", "rich"):
        return mode == "rich"
    return bool(console.is_terminal and sys.stdout.isatty())


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogProgress(Progress):
    """A :class:`~rich.progress.Progress` that logs plain lines instead of drawing a bar.

    Same interface (``add_task``, ``update``, ``advance``), so loops written for a bar work
    unchanged; lines never wrap, so paths in them stay whole.
    """

    def __init__(self, interval_s: float | None = None) -> None:
        super().__init__(console=console, disable=True)
        env = os.environ.get(ENV_INTERVAL)
        self.interval_s = float(env) if interval_s is None and env else (interval_s or 30.0)
        self._last: dict[TaskID, tuple[float, int]] = {}

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._last[task_id] = (time.monotonic(), -1)
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def _maybe_log(self, task_id: TaskID) -> None:
        if console.quiet:  # a rank other than 0 (alignkit.cli): rank 0 alone reports
            return
        task = self._tasks[task_id]
        last_time, last_mark = self._last[task_id]
        total = task.total or 0
        mark = int(task.completed * MILESTONES // total) if total else -1
        now = time.monotonic()
        done = bool(total) and task.completed >= total
        if done or mark > last_mark or now - last_time >= self.interval_s:
            self._last[task_id] = (now, mark)
            log.info(self.line(task_id))

    def line(self, task_id: TaskID) -> str:
        """``rl: 12/75 (16%) elapsed 0:01:02 eta 0:05:10 reward 0.123``."""
        task = self._tasks[task_id]
        completed = int(task.completed)
        parts = [f"{task.description}: {completed}"]
        if task.total:
            parts[0] += f"/{int(task.total)} ({100 * task.completed / task.total:.0f}%)"
        parts.append(f"elapsed {_clock(task.elapsed or 0.0)}")
        if task.total and task.completed < task.total and task.speed:
            parts.append(f"eta {_clock((task.total - task.completed) / task.speed)}")
        info = str(task.fields.get("info", "") or "")
        return " ".join(parts + ([info] if info else []))


def progress_bar() -> Progress:
    """A rich bar (description, bar, n/total, elapsed, remaining, ``info`` field) on a
    terminal, a :class:`LogProgress` elsewhere; use as ``with progress_bar() as p:``."""
    if not interactive():
        return LogProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


@contextmanager
def tracked(label: str, total: int) -> Iterator[Callable[[int, str], None]]:
    """Yield ``advance(n, info)`` for a loop of ``total`` units shown as ``label``."""
    with progress_bar() as progress:
        task = progress.add_task(label, total=total, info="")
        yield lambda n, info="": progress.update(task, advance=n, info=info)


def chunked(items: Sequence[Any], unit: int, parts: int = MILESTONES) -> list[Sequence[Any]]:
    """``items`` cut into about ``parts`` slices, each a multiple of ``unit`` long.

    Cutting at multiples of a batch size keeps the batches, hence the results, of a batched
    computation the same as on the whole list.
    """
    unit = max(1, int(unit))
    batches = math.ceil(len(items) / unit)
    size = unit * max(1, math.ceil(batches / parts))
    return [items[i : i + size] for i in range(0, len(items), size)]


def sample_with_progress(
    label: str,
    records: Sequence[Any],
    batch_size: int,
    pad_id: int,
    sample: Callable[[Sequence[Any]], Any],
) -> Any:
    """``sample(records)`` (a :func:`alignkit.evaluation.sample_policy` call), run in slices
    of whole batches so that progress shows; the slices' samples are joined into one.

    ``sample_policy`` draws batch after batch from one generator, so the slices give exactly
    the samples of a single call.
    """
    pieces = []
    with tracked(label, len(records)) as advance:
        for part in chunked(records, batch_size):
            pieces.append(sample(part))
            advance(len(part), "")
    return join_samples(pieces, pad_id)


def join_samples(pieces: list[Any], pad_id: int) -> Any:
    """One :class:`alignkit.evaluation.Samples` from consecutive pieces, padded as
    ``sample_policy`` pads its batches (prompts on the left, responses on the right)."""
    from alignkit.evaluation import Samples, _cat_padded

    if len(pieces) == 1:
        return pieces[0]
    return Samples(
        records=[r for p in pieces for r in p.records],
        responses=[r for p in pieces for r in p.responses],
        prompt_ids=_cat_padded([p.prompt_ids for p in pieces], pad_id, left=True),
        prompt_mask=_cat_padded([p.prompt_mask for p in pieces], 0, left=True),
        response_ids=_cat_padded([p.response_ids for p in pieces], pad_id, left=False),
        response_mask=_cat_padded([p.response_mask for p in pieces], 0, left=False),
        finished=None
        if any(p.finished is None for p in pieces)
        else [f for p in pieces for f in p.finished],
    )


_reported: set[str] = set()
"""Report lines already printed by this process (see :func:`print_report`)."""


def print_report(prefix: str, lines: Sequence[str]) -> None:
    """Print a data report (``FeedbackReport.lines()``), each problem list only once.

    The pipeline's feedback stage checks the records it writes and the reward-model stage
    checks them again when it reads them: the same locations (``file:line``) would be listed
    twice. A list printed before is shown by its count only.
    """
    for i, line in enumerate(lines):
        if i > 0 and line in _reported:
            title = line.split(":", 1)[0]
            console.print(f"{prefix}: {title} (listed above)")
            continue
        _reported.add(line)
        console.print(f"{prefix}: {line}")
