"""Export a queue's labels as feedback files the reward-model stage reads.

Files written to the output folder (each atomically; all five always, possibly empty):

* ``rankings.jsonl``: one ranking record per label (``prompt``, ``prompt_id``, the item's
  ``responses`` in their original order, ``ranks`` with 0 = best and ties allowed);
* ``ratings.jsonl``: one rating record per rated response (``score`` on ``1..rating_scale``);
* ``critiques.jsonl``: ``{"prompt", "prompt_id", "response", "critique", "annotator"}`` per
  non-empty critique;
* ``preferences.jsonl``: the standard preference format ``{"prompt_id", "prompt", "chosen",
  "rejected"}``, one record per ordered, untied pair of each ranking;
* ``flags.jsonl``: every skip and flag, with its ``reason``.

Records carry ``annotator`` (an opaque id such as ``a3``, never a name or token) and
``item_id`` next to their format's fields; feedback readers ignore fields they do not know.
Answers given for an item whose text changed since are left out (``stale``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data.feedback import RankingFeedback, RatingFeedback, ranking_to_pairs
from alignkit.io import atomic_write_text
from alignkit.label.db import LABEL, Label, LabelStore
from alignkit.label.queue import Queue, QueueItem, read_queue
from alignkit.label.stats import current_labels

FILES: tuple[str, ...] = ("rankings", "ratings", "critiques", "preferences", "flags")


@dataclass
class Exported:
    """The records of each export file, and how many answers were left out as stale."""

    records: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {name: [] for name in FILES}
    )
    stale: int = 0


def _extras(item: QueueItem, annotator: str) -> dict[str, Any]:
    return {"item_id": item.id, "annotator": annotator}


def _label_records(item: QueueItem, label: Label, annotator: str, out: Exported) -> None:
    responses = list(item.responses)
    if label.ranks is not None:
        ranking = RankingFeedback(item.prompt, responses, list(label.ranks), item.prompt_id)
        out.records["rankings"].append({**ranking.to_dict(), **_extras(item, annotator)})
        for pair in ranking_to_pairs(ranking):
            out.records["preferences"].append(pair.to_dict())
    for i, score in enumerate(label.ratings or []):
        rating = RatingFeedback(item.prompt, responses[i], float(score), None, item.prompt_id)
        row = {**rating.to_dict(), **_extras(item, annotator), "response_index": i}
        out.records["ratings"].append(row)
    for i, critique in enumerate(label.critiques or []):
        if critique.strip():
            out.records["critiques"].append(
                {
                    "prompt": item.prompt,
                    "prompt_id": item.prompt_id,
                    "response": responses[i],
                    "critique": critique,
                    **_extras(item, annotator),
                    "response_index": i,
                }
            )


def _flag_record(item: QueueItem, label: Label, annotator: str) -> dict[str, Any]:
    return {
        "item_id": item.id,
        "prompt_id": item.prompt_id,
        "prompt": item.prompt,
        "kind": label.kind,
        "reason": label.reason,
        "annotator": annotator,
        "created": label.created,
    }


def collect(queue: Queue, labels: Iterable[Label], annotator_ids: dict[int, str]) -> Exported:
    """Every export record, in queue order and then annotator order."""
    current, stale = current_labels(queue, labels)
    position = {item.id: n for n, item in enumerate(queue.items)}
    current.sort(key=lambda label: (position[label.item_id], label.annotator_id))
    out = Exported(stale=stale)
    for label in current:
        item = queue.item(label.item_id)
        assert item is not None  # current_labels keeps only labels of present items
        annotator = annotator_ids[label.annotator_id]
        if label.kind == LABEL:
            _label_records(item, label, annotator, out)
        else:
            out.records["flags"].append(_flag_record(item, label, annotator))
    return out


def write_export(exported: Exported, out_dir: str | Path) -> dict[str, Path]:
    """Write each file of ``exported`` as JSON lines under ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {}
    for name in FILES:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in exported.records[name])
        paths[name] = atomic_write_text(out_dir / f"{name}.jsonl", text)
    return paths


def export_queue(queue_dir: str | Path, out_dir: str | Path) -> tuple[dict[str, Path], Exported]:
    """Export a queue folder's labels; the written paths and what they hold."""
    queue = read_queue(queue_dir)
    store = LabelStore(queue_dir)
    try:
        ids = {a.id: a.public_id for a in store.annotators()}
        exported = collect(queue, store.labels(), ids)
    finally:
        store.close()
    return write_export(exported, out_dir), exported


def export_labels(queue_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write the five export files of a queue folder; file name stem -> path."""
    return export_queue(queue_dir, out_dir)[0]
