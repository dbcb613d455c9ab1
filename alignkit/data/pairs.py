"""Chosen/rejected reply pairs per prompt, from any preference data alignkit reads.

Offline preference optimisation (DPO and its relatives) trains on pairs. They come from a
standard preference data set (explicit or implicit prompt, plain or conversational, a file, a
saved dataset or a hub name: :func:`~alignkit.data.load_preferences`) or from alignkit's
feedback formats (a feedback folder such as a pipeline's ``<run_dir>/feedback``, or a file of
rankings or ratings): a K-wise ranking gives each of its C(K, 2) ordered comparisons (ties
give none), ratings of one prompt give every differently rated pair
(:func:`~alignkit.data.feedback.to_groups`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

from alignkit.data.feedback import is_dataset_dir, read_feedback, to_groups
from alignkit.data.formats import parse_prompt
from alignkit.data.sources import load_preferences, read_records
from alignkit.errors import DataError

Pairs = dict[str, list[tuple[str, str]]]
"""Prompt id -> its (chosen, rejected) reply texts, in the order the data gives them."""

FEEDBACK_ONLY_FIELDS = ("responses", "ranks", "response", "score")
"""Fields of alignkit's rankings and ratings formats that no standard preference record has."""


def is_feedback(source: str | Path) -> bool:
    """Whether ``source`` holds alignkit feedback: a folder of ``*.jsonl`` files (not a saved
    dataset), or data whose first record is a ranking or a rating."""
    path = Path(source).expanduser()
    if path.is_dir() and not is_dataset_dir(path):
        return True
    first = next(iter(read_records(source)), None)
    return first is not None and any(k in first[1] for k in FEEDBACK_ONLY_FIELDS)


def preference_pairs(
    source: str | Path, *, columns: Mapping[str, str] | None = None, seed: int | None = None
) -> Pairs:
    """Every (chosen, rejected) pair of ``source``, keyed by prompt id.

    The id is the record's ``id`` or ``prompt_id`` (a pipeline's feedback carries the task's
    prompt ids), else derived from the prompt as the standard formats derive it, so a
    prompt-only file of the same prompts matches. ``columns`` maps standard field names to a
    data set's own (standard preference data only). Pairs of identical replies are dropped.
    ``seed``: each prompt's pairs in an order shuffled by ``seed`` and the prompt id (the same
    in every process); None keeps the data's order.
    """
    pairs: Pairs = {}
    if is_feedback(source):
        for group in to_groups(read_feedback(source)):
            key = group.prompt_id or parse_prompt({"prompt": group.prompt}, str(source)).id
            replies = group.responses
            pairs.setdefault(key, []).extend((replies[i], replies[j]) for i, j, _ in group.pairs)
    else:
        for pair in load_preferences(source, columns=columns):
            if pair.chosen.strip() != pair.rejected.strip():
                pairs.setdefault(pair.prompt.id, []).append((pair.chosen, pair.rejected))
    pairs = {k: v for k, v in pairs.items() if v}
    if seed is not None:
        for key, options in pairs.items():
            random.Random(f"{seed}/{key}").shuffle(options)
    if not pairs:
        raise DataError(f"{source}: no preference pairs (every pair tied or was identical)")
    return pairs
