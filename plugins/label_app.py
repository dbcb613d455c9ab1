"""``feedback.annotator=app``: people label the feedback stage's samples in the labelling app.

The feedback stage samples its K responses per prompt as usual, then this annotator writes
them as a labelling queue (``<run_dir>/feedback_queue``, :mod:`alignkit.label`), serves the
app on ``feedback.queue.host:port`` (``feedback.queue.serve``) and waits until every item has
``feedback.queue.labels_per_item`` answers. Annotators are added from another terminal with
``alignkit label <run_dir>/feedback_queue --add-annotator NAME``, which prints their login
link (tokens are never written to the run's log). The labels are then exported
(``<run_dir>/feedback_queue/export``) and returned to the stage in ``feedback.format``:
rankings (one per label), ratings (one per rated response) or pairwise (the ordered pairs
of each ranking).

Nothing is lost by stopping: every label is committed when given, and running the same
stage again (same run directory and seed, so the same samples) finds the queue and waits
for what is missing. ``feedback.queue.wait_seconds`` bounds the wait; when it runs out the
stage stops with a message saying how far the queue is and how to resume.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from alignkit import RunContext, hookimpl
from alignkit.data.feedback import FeedbackRecord, RankingFeedback, ranking_to_pairs, read_feedback
from alignkit.errors import ConfigError, DataError
from alignkit.registry import ComponentRegistry
from alignkit.tracking import console

QUEUE_DIR = "feedback_queue"
TASKS = {"rankings": ("rank", "critique"), "ratings": ("rate", "critique")}


class LabelsPending(ConfigError):
    """The queue is not fully labelled yet: run the stage again to go on waiting."""


class AppAnnotator:
    """Labels whole batches through the labelling app (``label_batch``)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg.feedback.queue
        self.queue_dir = ctx.run_dir / QUEUE_DIR

    def label_batch(self, fmt: str, items: Sequence[dict[str, Any]]) -> list[FeedbackRecord]:
        """Queue ``items`` (``id``, ``prompt``, ``prompt_id``, ``responses``), wait for their
        labels, and return them as feedback records in ``fmt``."""
        from alignkit.label import export_labels

        self._queue(fmt, items)
        self._wait()
        files = export_labels(self.queue_dir, self.queue_dir / "export")
        if fmt == "ratings":
            return read_feedback(files["ratings"])
        rankings = read_feedback(files["rankings"])
        if fmt == "pairwise":
            return [
                p for r in rankings if isinstance(r, RankingFeedback) for p in ranking_to_pairs(r)
            ]
        return rankings

    def _queue(self, fmt: str, items: Sequence[dict[str, Any]]) -> None:
        from alignkit.label import read_queue, write_queue

        if (self.queue_dir / "queue.json").is_file():
            existing = read_queue(self.queue_dir)
            same = [(i.id, i.prompt, list(i.responses)) for i in existing.items] == [
                (i["id"], i["prompt"], list(i["responses"])) for i in items
            ]
            if not same:
                raise DataError(
                    f"{self.queue_dir}: a queue of other samples is already here (another "
                    "policy, seed or feedback.* setting); move it away or use another run_dir"
                )
            return
        write_queue(
            self.queue_dir,
            items,
            labels_per_item=int(self.cfg.labels_per_item),
            rating_scale=int(self.ctx.cfg.feedback.rating_scale),
            tasks=TASKS.get(fmt, TASKS["rankings"]),
        )

    def _wait(self) -> None:
        from alignkit.label import queue_progress

        server = self._serve() if self.cfg.serve else None
        limit = self.cfg.wait_seconds
        deadline = None if limit is None else time.monotonic() + float(limit)
        try:
            while True:
                progress = queue_progress(self.queue_dir)
                if progress["complete"]:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise LabelsPending(
                        f"feedback: {progress['labels_given']}/{progress['labels_needed']} "
                        f"labels in {self.queue_dir} after feedback.queue.wait_seconds={limit}; "
                        "nothing is lost: run the same command again to go on waiting"
                    )
                time.sleep(float(self.cfg.poll_seconds))
        finally:
            if server is not None:
                server.shutdown()

    def _serve(self) -> Any:
        from alignkit.label import create_app
        from alignkit.label.cli import make_label_server

        server = make_label_server(create_app(self.queue_dir), self.cfg.host, int(self.cfg.port))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        console.print(
            f"feedback: {self.queue_dir} is served on http://{self.cfg.host}:"
            f"{server.server_port}/ ; add annotators with `alignkit label {self.queue_dir} "
            "--add-annotator NAME` (it prints each one's login link)"
        )
        return server


def build(ctx: RunContext) -> AppAnnotator:
    """The app annotator of ``ctx``'s run (``feedback.queue.*``)."""
    if str(ctx.cfg.feedback.format) not in ("rankings", "ratings", "pairwise"):
        raise ConfigError(
            f"feedback.annotator=app: unknown feedback.format={ctx.cfg.feedback.format}"
        )
    return AppAnnotator(ctx)


@hookimpl
def register_components(registry: ComponentRegistry) -> None:
    registry.add("annotator", "app", build)
