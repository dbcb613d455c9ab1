"""A labelling queue is a folder: ``items.jsonl`` (what to label) and ``queue.json`` (how).

``items.jsonl`` holds one item per line::

    {"id": "q1", "prompt": "...", "prompt_id": "arith-1", "responses": ["...", "..."], "meta": {}}

``queue.json`` holds the settings::

    {"labels_per_item": 2, "rating_scale": 7, "tasks": ["rank", "rate", "critique"],
     "created": "2026-01-01T12:00:00+00:00"}

The labels themselves live next to them in ``labels.sqlite`` (:mod:`alignkit.label.db`). Both
files are written atomically (a temporary file and a rename), so a reader never sees half a
queue. Every error names the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alignkit.data.jsonl import read_jsonl, require_str
from alignkit.errors import DataError
from alignkit.io import atomic_write_text

ITEMS_FILE = "items.jsonl"
SETTINGS_FILE = "queue.json"
TASKS: tuple[str, ...] = ("rank", "rate", "critique")
MAX_RATING_SCALE = 10
"""Ratings run 1..scale; keys 1-9 and 0 (for 10) reach every point of a scale up to 10."""


@dataclass(frozen=True)
class QueueItem:
    """One prompt and the K >= 2 responses to compare, in their original order."""

    id: str
    prompt: str
    responses: tuple[str, ...]
    prompt_id: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "prompt_id": self.prompt_id,
            "responses": list(self.responses),
            "meta": dict(self.meta),
        }

    @property
    def digest(self) -> str:
        """SHA-256 of the prompt and responses: a label is only valid for the text it saw."""
        payload = json.dumps([self.prompt, list(self.responses)], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class QueueSettings:
    """How many labels each item needs and what an annotator does with it."""

    labels_per_item: int = 1
    rating_scale: int = 7
    tasks: tuple[str, ...] = TASKS
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels_per_item": self.labels_per_item,
            "rating_scale": self.rating_scale,
            "tasks": list(self.tasks),
            "created": self.created,
        }


@dataclass(frozen=True)
class Queue:
    """A queue folder as read from disk."""

    path: Path
    settings: QueueSettings
    items: tuple[QueueItem, ...]

    def item(self, item_id: str) -> QueueItem | None:
        """The item with this id, or None."""
        return self._by_id().get(item_id)

    def _by_id(self) -> dict[str, QueueItem]:
        # Cached on the frozen instance: the lookup runs on every request.
        cache = self.__dict__.get("_index")
        if cache is None:
            cache = {item.id: item for item in self.items}
            object.__setattr__(self, "_index", cache)
        return cache


# --------------------------------------------------------------------------------------------
# parsing and checks
# --------------------------------------------------------------------------------------------


def parse_item(raw: Mapping[str, Any], where: str) -> QueueItem:
    """One line of ``items.jsonl``; errors start with ``where`` (``file:line``)."""
    item_id = require_str(raw, "id", where)
    prompt = require_str(raw, "prompt", where)
    prompt_id = raw.get("prompt_id")
    if prompt_id is not None:
        prompt_id = require_str(raw, "prompt_id", where)
    responses = raw.get("responses")
    if not isinstance(responses, list):
        raise DataError(f"{where}: field 'responses' must be a list of strings")
    if len(responses) < 2:
        raise DataError(
            f"{where}: field 'responses' needs at least 2 entries, got {len(responses)}"
        )
    for i, text in enumerate(responses):
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field 'responses[{i}]' must be a string, got {type(text).__name__}"
            )
    meta = raw.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise DataError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    return QueueItem(item_id, prompt, tuple(responses), prompt_id, dict(meta))


def _as_item(item: QueueItem | Mapping[str, Any], where: str) -> QueueItem:
    return item if isinstance(item, QueueItem) else parse_item(item, where)


def check_settings(settings: QueueSettings, where: str) -> QueueSettings:
    """``settings`` when every value is in range; a DataError naming the field otherwise."""
    per_item = settings.labels_per_item
    if isinstance(per_item, bool) or not isinstance(per_item, int) or per_item < 1:
        raise DataError(
            f"{where}: field 'labels_per_item' must be an integer >= 1, got {per_item!r}"
        )
    scale = settings.rating_scale
    if isinstance(scale, bool) or not isinstance(scale, int) or not 2 <= scale <= MAX_RATING_SCALE:
        raise DataError(
            f"{where}: field 'rating_scale' must be an integer in 2..{MAX_RATING_SCALE}, "
            f"got {scale!r}"
        )
    unknown = [t for t in settings.tasks if t not in TASKS]
    if unknown or not settings.tasks:
        raise DataError(
            f"{where}: field 'tasks' must be a non-empty subset of {list(TASKS)}, "
            f"got {list(settings.tasks)!r}"
        )
    return settings


def _check_unique(items: Sequence[QueueItem], where: str) -> None:
    seen: set[str] = set()
    for n, item in enumerate(items, start=1):
        if item.id in seen:
            raise DataError(f"{where}:{n}: duplicate item id {item.id!r}")
        seen.add(item.id)


# --------------------------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------------------------


def write_queue(
    queue_dir: str | Path,
    items: Iterable[QueueItem | Mapping[str, Any]],
    labels_per_item: int = 1,
    rating_scale: int = 7,
    tasks: Sequence[str] = TASKS,
) -> Path:
    """Write (or rewrite) a queue folder and return it.

    ``items`` are :class:`QueueItem` or dicts in the ``items.jsonl`` format. Labels already
    given in the folder stay: they belong to item ids, and a label whose item's prompt or
    responses changed is left out of exports (it was given for another text).
    """
    queue_dir = Path(queue_dir)
    where = str(queue_dir / ITEMS_FILE)
    parsed = [_as_item(item, f"{where}:{n}") for n, item in enumerate(items, start=1)]
    if not parsed:
        raise DataError(f"{where}: a queue needs at least one item")
    _check_unique(parsed, where)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    settings = check_settings(
        QueueSettings(labels_per_item, rating_scale, tuple(tasks), created),
        str(queue_dir / SETTINGS_FILE),
    )
    lines = "".join(json.dumps(item.to_dict(), ensure_ascii=False) + "\n" for item in parsed)
    # Items first: a reader that finds queue.json finds the items it describes.
    atomic_write_text(queue_dir / ITEMS_FILE, lines)
    atomic_write_text(queue_dir / SETTINGS_FILE, json.dumps(settings.to_dict(), indent=2) + "\n")
    return queue_dir


def read_settings(queue_dir: str | Path) -> QueueSettings:
    """``queue.json`` of a queue folder."""
    path = Path(queue_dir) / SETTINGS_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; is {queue_dir} a labelling queue?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    tasks = raw.get("tasks", list(TASKS))
    if not isinstance(tasks, list):
        raise DataError(f"{path}: field 'tasks' must be a list, got {type(tasks).__name__}")
    settings = QueueSettings(
        labels_per_item=raw.get("labels_per_item", 1),
        rating_scale=raw.get("rating_scale", 7),
        tasks=tuple(tasks),
        created=str(raw.get("created", "")),
    )
    return check_settings(settings, str(path))


def read_queue(queue_dir: str | Path) -> Queue:
    """A queue folder: its settings and items (errors name the file, line and field)."""
    queue_dir = Path(queue_dir)
    settings = read_settings(queue_dir)
    path = queue_dir / ITEMS_FILE
    items = [parse_item(raw, f"{path}:{lineno}") for lineno, raw in read_jsonl(path)]
    if not items:
        raise DataError(f"{path}: no items")
    _check_unique(items, str(path))
    return Queue(queue_dir, settings, tuple(items))
