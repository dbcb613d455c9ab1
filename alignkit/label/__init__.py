"""Human labelling: a queue of prompts with K responses, a local web app where annotators rank,
rate and critique them, and exports in alignkit's feedback formats (``docs/labelling.md``).

The Python API a pipeline uses::

    write_queue(dir, items, labels_per_item=2)   # the queue folder
    add_annotator(dir, "ana")                     # -> token; URL http://host:port/?token=...
    queue_progress(dir)["complete"]               # poll until every item has its labels
    export_labels(dir, out_dir)                   # rankings.jsonl, ratings.jsonl, ...

``create_app(dir)`` is the Flask app ``alignkit label DIR`` serves. Writing and reading a
queue needs nothing beyond alignkit; the label database needs SQLAlchemy and the app Flask
(the ``label`` extra), imported only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.label.queue import Queue, QueueItem, QueueSettings, read_queue, write_queue

if TYPE_CHECKING:
    from flask import Flask

__all__ = [
    "Queue",
    "QueueItem",
    "QueueSettings",
    "add_annotator",
    "create_app",
    "export_labels",
    "queue_progress",
    "read_queue",
    "write_queue",
]


def add_annotator(queue_dir: str | Path, name: str) -> str:
    """Create annotator ``name`` (or give an existing one a new link) and return the token.

    Only the token's hash is stored: keep the returned token, it cannot be shown again. The
    annotator logs in by opening ``http://HOST:PORT/?token=TOKEN``.
    """
    from alignkit.label.db import LabelStore

    read_queue(queue_dir)  # refuse a folder that is not a queue before creating a database
    store = LabelStore(queue_dir)
    try:
        return store.add_annotator(name)[1]
    finally:
        store.close()


def queue_progress(queue_dir: str | Path) -> dict[str, Any]:
    """How far a queue is: ``items``, ``labels_needed``, ``labels_given``, ``complete``, ...

    See :func:`alignkit.label.stats.progress` for every key.
    """
    from alignkit.label.stats import queue_progress as _queue_progress

    return _queue_progress(queue_dir)


def export_labels(queue_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``rankings``, ``ratings``, ``critiques``, ``preferences`` and ``flags`` ``.jsonl``
    under ``out_dir``; file stem -> path (:mod:`alignkit.label.export`)."""
    from alignkit.label.export import export_labels as _export_labels

    return _export_labels(queue_dir, out_dir)


def create_app(queue_dir: str | Path, **kwargs: Any) -> Flask:
    """The labelling web app of a queue folder (see :func:`alignkit.label.app.create_app`)."""
    from alignkit.label.app import create_app as _create_app

    return _create_app(Path(queue_dir), **kwargs)
