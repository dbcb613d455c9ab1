"""Progress of a queue and agreement between its annotators.

Two agreement measures:

* **pairwise agreement** on rankings: for every item two annotators both ranked and every pair
  of responses both of them ordered (neither tied it), whether they ordered it the same way.
  The value is agreeing pairs / shared pairs; 1 is full agreement, 0.5 what chance gives.
* **Krippendorff's alpha** on ratings (Krippendorff 2011, "Computing Krippendorff's
  alpha-reliability"): a unit is one response of one item, its values the ratings annotators
  gave it. ``alpha = 1 - (n - 1) * sum_ck o_ck d_ck / sum_ck n_c n_k d_ck`` with ``o`` the
  coincidence matrix, ``n_c`` its margins and ``d`` the squared distance of the metric
  (``interval``: ``(c - k)^2``; ``ordinal``: the squared count of values between c and k,
  halves at both ends). 1 is full agreement, 0 what chance gives; undefined (None) when no
  unit has two ratings or every rating is the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from alignkit.label.db import ANSWERS, FLAG, LABEL, SKIP, Label, LabelStore
from alignkit.label.queue import Queue, read_queue

METRICS: tuple[str, ...] = ("interval", "ordinal", "nominal")

# --------------------------------------------------------------------------------------------
# agreement
# --------------------------------------------------------------------------------------------


@dataclass
class PairAgreement:
    """How many response pairs two rankings both ordered, and how many the same way."""

    agree: int = 0
    shared: int = 0

    @property
    def value(self) -> float | None:
        """agree / shared, or None when no pair was ordered by both."""
        return self.agree / self.shared if self.shared else None

    def add(self, other: PairAgreement) -> None:
        self.agree += other.agree
        self.shared += other.shared


def compare_rankings(a: Sequence[int], b: Sequence[int]) -> PairAgreement:
    """Agreement of two rankings of the same K responses (lower rank is better)."""
    out = PairAgreement()
    for i, j in combinations(range(len(a)), 2):
        if a[i] != a[j] and b[i] != b[j]:
            out.shared += 1
            out.agree += (a[i] < a[j]) == (b[i] < b[j])
    return out


def ranking_agreement(
    rankings: Mapping[str, Mapping[str, Sequence[int]]],
) -> tuple[PairAgreement, dict[tuple[str, str], PairAgreement]]:
    """Overall and per-annotator-pair agreement.

    ``rankings``: item -> annotator -> ranks. Each pair of annotators of an item contributes
    the pairs of responses both ordered.
    """
    total = PairAgreement()
    by_pair: dict[tuple[str, str], PairAgreement] = {}
    for by_annotator in rankings.values():
        for a, b in combinations(sorted(by_annotator), 2):
            result = compare_rankings(by_annotator[a], by_annotator[b])
            total.add(result)
            by_pair.setdefault((a, b), PairAgreement()).add(result)
    return total, by_pair


def _coincidences(units: Iterable[Sequence[float]]) -> tuple[list[float], list[list[float]]]:
    """The distinct values and the coincidence matrix of the pairable units (>= 2 values)."""
    pairable = [list(u) for u in units if len(u) >= 2]
    values = sorted({v for u in pairable for v in u})
    index = {v: i for i, v in enumerate(values)}
    o = [[0.0] * len(values) for _ in values]
    for unit in pairable:
        weight = 1.0 / (len(unit) - 1)
        for x, y in ((x, y) for n, x in enumerate(unit) for m, y in enumerate(unit) if n != m):
            o[index[x]][index[y]] += weight
    return values, o


def _distance(metric: str, values: list[float], n_c: list[float]) -> list[list[float]]:
    """Squared distances between the values (indices into ``values``) under ``metric``."""
    size = len(values)
    if metric == "nominal":
        return [[float(c != k) for k in range(size)] for c in range(size)]
    if metric == "interval":
        return [[(values[c] - values[k]) ** 2 for k in range(size)] for c in range(size)]
    if metric == "ordinal":
        d = [[0.0] * size for _ in range(size)]
        for c in range(size):
            for k in range(c, size):
                between = sum(n_c[c : k + 1]) - (n_c[c] + n_c[k]) / 2
                d[c][k] = d[k][c] = between**2
        return d
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def krippendorff_alpha(units: Iterable[Sequence[float]], metric: str = "interval") -> float | None:
    """Krippendorff's alpha of ``units`` (each the values different coders gave one unit).

    Units with fewer than two values carry no information on agreement and are left out.
    None when nothing is pairable or all values are equal (the expected disagreement is 0).
    """
    values, o = _coincidences(units)
    n_c = [sum(row) for row in o]
    n = sum(n_c)
    if n <= 1:
        return None
    d = _distance(metric, values, n_c)
    size = range(len(values))
    observed = sum(o[c][k] * d[c][k] for c in size for k in size)
    expected = sum(n_c[c] * n_c[k] * d[c][k] for c in size for k in size)
    if expected == 0:
        return None
    return 1.0 - (n - 1) * observed / expected


# --------------------------------------------------------------------------------------------
# a queue's statistics
# --------------------------------------------------------------------------------------------


@dataclass
class AnnotatorCounts:
    """What one annotator has done."""

    id: str
    name: str
    labels: int = 0
    skips: int = 0
    flags: int = 0


@dataclass
class LabelStats:
    """Counts and agreement of a queue's current answers."""

    annotators: list[AnnotatorCounts] = field(default_factory=list)
    labels: int = 0
    skips: int = 0
    flags: int = 0
    flag_reasons: dict[str, int] = field(default_factory=dict)
    stale: int = 0
    """Answers for items whose text changed since (or that left the queue); not counted."""
    ranking: PairAgreement = field(default_factory=PairAgreement)
    ranking_pairs: dict[tuple[str, str], PairAgreement] = field(default_factory=dict)
    rating_units: int = 0
    """Responses rated by at least two annotators."""
    alpha_interval: float | None = None
    alpha_ordinal: float | None = None


def current_labels(queue: Queue, labels: Iterable[Label]) -> tuple[list[Label], int]:
    """The answers given for the items as they are now, and how many others there are."""
    keep, stale = [], 0
    for label in labels:
        item = queue.item(label.item_id)
        if item is None or item.digest != label.item_digest:
            stale += 1
        else:
            keep.append(label)
    return keep, stale


def compute_stats(queue: Queue, store: LabelStore) -> LabelStats:
    """Per-annotator counts, skips, flags and agreement of ``queue``'s answers."""
    counts = {a.id: AnnotatorCounts(a.public_id, a.name) for a in store.annotators()}
    labels, stale = current_labels(queue, store.labels())
    stats = LabelStats(annotators=list(counts.values()), stale=stale)
    rankings: dict[str, dict[str, list[int]]] = {}
    ratings: dict[tuple[str, int], list[float]] = {}
    for label in labels:
        who = counts[label.annotator_id]
        if label.kind == SKIP:
            who.skips += 1
            stats.skips += 1
        elif label.kind == FLAG:
            who.flags += 1
            stats.flags += 1
            reason = label.reason or "unspecified"
            stats.flag_reasons[reason] = stats.flag_reasons.get(reason, 0) + 1
        else:
            who.labels += 1
            stats.labels += 1
            if label.ranks is not None:
                rankings.setdefault(label.item_id, {})[who.id] = label.ranks
            for i, score in enumerate(label.ratings or []):
                ratings.setdefault((label.item_id, i), []).append(float(score))
    stats.ranking, stats.ranking_pairs = ranking_agreement(rankings)
    units = list(ratings.values())
    stats.rating_units = sum(len(u) >= 2 for u in units)
    stats.alpha_interval = krippendorff_alpha(units, "interval")
    stats.alpha_ordinal = krippendorff_alpha(units, "ordinal")
    return stats


def label_stats(queue_dir: str | Path) -> LabelStats:
    """:func:`compute_stats` of a queue folder."""
    queue = read_queue(queue_dir)  # first: a folder that is no queue gets no database
    store = LabelStore(queue_dir)
    try:
        return compute_stats(queue, store)
    finally:
        store.close()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_stats(stats: LabelStats) -> str:
    """The ``alignkit label QUEUE --stats`` report."""
    lines = ["annotator  name                  labels  skips  flags"]
    for a in stats.annotators:
        lines.append(f"{a.id:<10} {a.name[:20]:<20} {a.labels:>7} {a.skips:>6} {a.flags:>6}")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.flag_reasons.items()))
    lines.append(
        f"total: {stats.labels} labels, {stats.skips} skips, {stats.flags} flags"
        + (f" ({reasons})" if reasons else "")
    )
    if stats.stale:
        lines.append(f"left out: {stats.stale} answers for items that changed or left the queue")
    r = stats.ranking
    lines.append(
        f"pairwise ranking agreement: {_fmt(r.value)} ({r.agree} of {r.shared} shared pairs)"
    )
    for (a, b), pair in sorted(stats.ranking_pairs.items()):
        lines.append(f"  {a} vs {b}: {_fmt(pair.value)} ({pair.agree} of {pair.shared})")
    lines.append(
        f"Krippendorff's alpha on ratings ({stats.rating_units} responses rated twice or more): "
        f"interval {_fmt(stats.alpha_interval)}, ordinal {_fmt(stats.alpha_ordinal)}"
    )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


def progress(queue: Queue, labels: Iterable[Label]) -> dict[str, Any]:
    """How far ``queue`` is: overall and per item (what ``/api/progress`` serves).

    An item's ``answers`` are its labels and flags (a skip hands it to someone else); it is
    ``done`` once it has ``labels_per_item`` of them. ``labels_given`` counts at most
    ``labels_per_item`` answers per item, so it never exceeds ``labels_needed``.
    """
    per_item: dict[str, dict[str, Any]] = {
        item.id: {"answers": 0, LABEL + "s": 0, SKIP + "s": 0, FLAG + "s": 0, "done": False}
        for item in queue.items
    }
    for label in labels:
        entry = per_item.get(label.item_id)
        if entry is None:
            continue
        entry[label.kind + "s"] += 1
        entry["answers"] += label.kind in ANSWERS
    needed = queue.settings.labels_per_item
    for entry in per_item.values():
        entry["done"] = entry["answers"] >= needed
    return {
        "items": len(queue.items),
        "labels_per_item": needed,
        "labels_needed": needed * len(queue.items),
        "labels_given": sum(min(e["answers"], needed) for e in per_item.values()),
        "items_done": sum(e["done"] for e in per_item.values()),
        "labels": sum(e["labels"] for e in per_item.values()),
        "skips": sum(e["skips"] for e in per_item.values()),
        "flags": sum(e["flags"] for e in per_item.values()),
        "complete": all(e["done"] for e in per_item.values()),
        "per_item": per_item,
    }


def queue_progress(queue_dir: str | Path) -> dict[str, Any]:
    """:func:`progress` of a queue folder, for a pipeline to poll."""
    queue = read_queue(queue_dir)
    store = LabelStore(queue_dir)
    try:
        return progress(queue, store.labels())
    finally:
        store.close()
